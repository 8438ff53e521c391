"""Test-time augmentation as a sample source: each transform is undone exactly, pass 0 is the image itself, and a
round's transforms depend on its seed and pass index alone (common random numbers across images)."""

from __future__ import annotations

import numpy as np

from bioadapt.adapters.augmentation import Augmentations


def test_every_transform_is_undone_and_pass_zero_is_the_identity():
    images = np.random.default_rng(0).random((2, 1, 5, 7)).astype(np.float32)  # non-square: rotations swap y, x
    augment = Augmentations(seed=3)
    np.testing.assert_array_equal(augment.apply(0, images), images)
    shapes = set()
    for t in range(16):
        moved = augment.apply(t, images)
        shapes.add(moved.shape)
        assert augment.undo(t, moved).shape == images.shape
        if augment.gamma(t) == 1.0:
            np.testing.assert_array_equal(augment.undo(t, moved), images)
    assert shapes == {(2, 1, 5, 7), (2, 1, 7, 5)}
    geometric = Augmentations(seed=3, gamma_sigma=0.0)
    for t in range(8):
        np.testing.assert_array_equal(geometric.undo(t, geometric.apply(t, images)), images)
    assert len({geometric.apply(t, images).tobytes() for t in range(8)}) == 8  # the eight dihedral transforms


def test_contrast_changes_keep_each_images_range_and_follow_the_seed_only():
    images = np.stack([np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 8, 8),
                       np.linspace(10, 90, 64, dtype=np.float32).reshape(1, 8, 8)])
    augment = Augmentations(seed=5)
    for t in range(1, 6):
        changed = augment.apply(t, images)
        assert augment.gamma(t) != 1.0
        for before, after in zip(images, changed):
            assert np.isclose(after.min(), before.min()) and np.isclose(after.max(), before.max())
        np.testing.assert_array_equal(augment.apply(t, images[1:]), changed[1:])  # alone or in a batch: the same
    assert [Augmentations(5).gamma(t) for t in range(4)] == [augment.gamma(t) for t in range(4)]
    assert Augmentations(6).gamma(1) != augment.gamma(1)
