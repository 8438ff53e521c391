"""sample_patches: random non-overlapping windows, deterministic, inside masks of every kind, and grid tiling."""

import warnings

import numpy as np
import pytest

from bioadapt.data import PatchWindow, SamplingMask, open_image, sample_patches, write_ome_zarr
from bioadapt.data.synthetic import write_synthetic_ome_zarr
from bioadapt.errors import BioadaptError


def _no_overlaps(windows):
    return not any(a.overlaps(b) for i, a in enumerate(windows) for b in windows[i + 1:])


@pytest.fixture
def tissue_image(tmp_path):
    """A synthetic image whose cells sit in a blob of tissue, stored as labels/tissue."""
    sample = write_synthetic_ome_zarr(tmp_path / "tissue.ome.zarr", (1024, 1024), "nuclei", seed=5,
                                      tissue_fraction=0.4, chunks=(1, 256, 256))
    return open_image(tmp_path / "tissue.ome.zarr"), sample


def test_random_patches_are_deterministic_non_overlapping_and_inside(cyx_image):
    image = open_image(cyx_image[0])
    first = sample_patches(image, 20, (64, 64), seed=7)
    assert first == sample_patches(image, 20, (64, 64), seed=7)
    assert first != sample_patches(image, 20, (64, 64), seed=8)
    assert len(first) == 20 and _no_overlaps(first)
    for window in first:
        assert all(0 <= o and o + s <= d for o, s, d in zip(window.origin, window.shape, image.spatial_shape))


def test_avoid_keeps_new_patches_away_from_earlier_ones(cyx_image):
    image = open_image(cyx_image[0])
    earlier = sample_patches(image, 15, (64, 64), seed=1)
    later = sample_patches(image, 15, (64, 64), seed=2, avoid=earlier)
    assert not any(a.overlaps(b) for a in earlier for b in later)


def test_label_image_mask_in_the_same_ome_zarr(tissue_image):
    image, sample = tissue_image
    windows = sample_patches(image, 12, (64, 64), mask="tissue", seed=0, min_mask_fraction=0.8)
    assert len(windows) == 12 and _no_overlaps(windows)
    for window in windows:
        true_fraction = sample.tissue[window.slices].mean()
        assert window.mask_fraction >= 0.8
        assert true_fraction >= 0.7  # coarse levels blur the border a little, never more than that


def test_coarse_level_of_the_image_as_mask(tissue_image):
    image, sample = tissue_image
    mask = SamplingMask.from_image_level(image, level=-1, smooth_sigma=20)
    factor = int(image.levels[-1].factors[0])
    assert factor > 1 and mask.factors == (factor, factor)
    overlap = (np.kron(mask.coverage > 0, np.ones((factor, factor))) > 0)[:1024, :1024]
    assert (overlap & sample.tissue).sum() / sample.tissue.sum() > 0.9  # finds the tissue
    assert (overlap & ~sample.tissue).sum() / overlap.sum() < 0.1  # and little else
    windows = sample_patches(image, 8, (64, 64), mask=mask, seed=1)
    assert all(sample.tissue[w.slices].mean() > 0.3 for w in windows)


def test_array_mask_with_its_own_scale(cyx_image):
    image = open_image(cyx_image[0])  # 600 x 700
    mask = np.zeros((60, 70), dtype=bool)
    mask[10:30, 40:70] = True  # level-0 rows 100..300, columns 400..700
    windows = sample_patches(image, 10, (50, 50), mask=mask, seed=4, min_mask_fraction=1.0)
    assert len(windows) == 10
    for window in windows:
        y, x = window.origin
        assert 100 <= y and y + 50 <= 300 and 400 <= x and x + 50 <= 700
    explicit = sample_patches(image, 10, (50, 50), mask=mask, mask_scale=10, seed=4, min_mask_fraction=1.0)
    assert explicit == windows


def test_fraction_is_area_weighted():
    mask = SamplingMask(np.array([[1, 0], [0, 0]]), factors=(10, 10))
    assert mask.fraction((0, 0), (10, 10)) == pytest.approx(1.0)
    assert mask.fraction((5, 5), (10, 10)) == pytest.approx(0.25)
    assert mask.fraction((0, 0), (20, 20)) == pytest.approx(0.25)


def test_label_mask_reduced_block_by_block_matches_the_coarse_level(tissue_image):
    image, _ = tissue_image
    labels = image.label_image("tissue")
    from_level = SamplingMask.from_label_image(labels, image)  # a small enough level exists
    reduced = SamplingMask.from_label_image(labels, image, max_pixels=1000)  # forces the streaming reduction
    assert reduced.factors[0] > from_level.factors[0]
    box_a, box_b = from_level.bounding_box(), reduced.bounding_box()
    assert all(abs(a - b) <= 2 * reduced.factors[0] for a, b in zip(box_a[0], box_b[0]))
    assert abs(from_level.covered_fraction - reduced.covered_fraction) < 0.05


def test_grid_tiles_the_image_and_the_mask_box(cyx_image):
    image = open_image(cyx_image[0])  # 600 x 700
    tiles = sample_patches(image, None, (200, 200), mode="grid")
    assert [t.origin for t in tiles] == [(y, x) for y in (0, 200, 400) for x in (0, 200, 400)]
    subset = sample_patches(image, 4, (200, 200), mode="grid", seed=3)
    assert len(subset) == 4 and set(subset) <= set(tiles)
    mask = np.zeros((600, 700), dtype=np.uint8)
    mask[250:480, 300:620] = 1
    in_box = sample_patches(image, None, (100, 100), mask=mask, mode="grid", min_mask_fraction=0.5)
    assert in_box[0].origin == (250, 300)
    assert all(w.mask_fraction >= 0.5 for w in in_box) and _no_overlaps(in_box)


def test_3d_sampling(tmp_path, rng):
    data = rng.integers(0, 100, size=(1, 16, 128, 128), dtype=np.uint16)
    image = open_image(write_ome_zarr(tmp_path / "v.ome.zarr", data, "czyx", n_levels=1))
    windows = sample_patches(image, 6, (8, 32, 32), seed=0)
    assert len(windows) == 6 and _no_overlaps(windows) and all(len(w.origin) == 3 for w in windows)


def test_mask_that_excludes_everything_is_an_error(cyx_image):
    image = open_image(cyx_image[0])
    with pytest.raises(BioadaptError, match="excludes the whole image"):
        sample_patches(image, 5, (64, 64), mask=np.zeros((60, 70), dtype=bool))


def test_mask_too_small_for_the_patch_is_an_error(cyx_image):
    image = open_image(cyx_image[0])
    mask = np.zeros((600, 700), dtype=bool)
    mask[:10, :10] = True
    with pytest.raises(BioadaptError, match="no patch of shape \\(64, 64\\) fits inside the mask"):
        sample_patches(image, 5, (64, 64), mask=mask, min_mask_fraction=0.5)


def test_asking_for_more_patches_than_fit_warns_and_returns_what_fits(cyx_image):
    image = open_image(cyx_image[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        windows = sample_patches(image, 50, (200, 200), seed=0, max_attempts=3000)
    assert 0 < len(windows) < 50 and _no_overlaps(windows)
    assert any("found only" in str(w.message) for w in caught)


@pytest.mark.parametrize("patch_shape, message", [((64,), "must have 2 values"), ((700, 10), "fit in the image")])
def test_bad_patch_shapes(cyx_image, patch_shape, message):
    with pytest.raises(BioadaptError, match=message):
        sample_patches(open_image(cyx_image[0]), 1, patch_shape)


def test_unknown_mask_label_names_the_ones_that_exist(tissue_image):
    image, _ = tissue_image
    with pytest.raises(BioadaptError, match="no label image 'nuclei'; it has \\['ground_truth', 'tissue'\\]"):
        sample_patches(image, 1, (32, 32), mask="nuclei")


def test_patch_window_serialises():
    window = PatchWindow((1, 2), (3, 4), 0.5)
    assert window.to_dict() == {"origin": [1, 2], "shape": [3, 4], "mask_fraction": 0.5}
    assert window.slices == (slice(1, 4), slice(2, 6))
