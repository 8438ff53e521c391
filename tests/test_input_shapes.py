"""One input-shape rule for predict_proba, mc_proba, segment and fine_tune (bioadapt.adapters.base.check_images):
(B, C, *spatial) for a batch, (C, *spatial) for one image, (*spatial) for one image of a single-channel model.
Checked on real U-Net packages."""

from __future__ import annotations

import numpy as np
import pytest
from model_factory import cell_patches, unet_package

from bioadapt.adapters import load_adapter
from bioadapt.errors import BioadaptError

SIZE = 48


@pytest.fixture(scope="module")
def one_channel(tmp_path_factory):
    package = unet_package(tmp_path_factory.mktemp("shapes") / "one.zip", weights=("pytorch_state_dict",))
    return load_adapter(package, device="cpu")


@pytest.fixture(scope="module")
def two_channel(tmp_path_factory):
    package = unet_package(tmp_path_factory.mktemp("shapes") / "two.zip", weights=("pytorch_state_dict",),
                           in_channels=2)
    return load_adapter(package, device="cpu")


@pytest.fixture(scope="module")
def image():
    return cell_patches("nuclei", 1, size=SIZE)[0][0][0]  # (Y, X) float32


def test_every_method_takes_the_same_three_shapes(one_channel, image):
    batch = np.stack([image, image[::-1]])[:, None]  # (2, 1, Y, X)
    proba = one_channel.predict_proba(batch)
    assert proba.shape == (2, 2, SIZE, SIZE)
    for one in (image, image[None]):  # (Y, X) and (C, Y, X): one image, no batch axis in the results
        np.testing.assert_allclose(one_channel.predict_proba(one), proba[0], atol=1e-6)
        assert one_channel.mc_proba(one, passes=2, seed=3).shape == (2, 2, SIZE, SIZE)
        np.testing.assert_array_equal(one_channel.segment(one), one_channel.segment(batch)[0])


def test_fine_tune_takes_one_image_per_pair_in_either_shape(one_channel, image):
    labels = cell_patches("nuclei", 1, size=SIZE)[0][1]
    result = one_channel.fine_tune([(image, labels), (image[None], labels)], {"epochs": 1, "val_fraction": 0})
    assert result.epochs_run == 1 and result.n_train == 2
    with pytest.raises(BioadaptError, match=r"a batch; give one image per pair, shaped \(C, Y, X\) or \(Y, X\)"):
        one_channel.fine_tune([(image[None, None], labels)], {"epochs": 1})


def test_a_bare_spatial_image_needs_a_single_channel_model(two_channel, image):
    two = np.stack([image, image])
    assert two_channel.predict_proba(two).shape == (2, SIZE, SIZE)
    for call in (two_channel.predict_proba, two_channel.segment, lambda x: two_channel.mc_proba(x, passes=2)):
        with pytest.raises(BioadaptError, match=r"shaped \(B, C, Y, X\) for a batch or \(C, Y, X\) for one image; "
                                                r"got shape \(48, 48\)"):
            call(image)
        with pytest.raises(BioadaptError, match=r"takes 2 channel\(s\) but the image has 1"):
            call(image[None])
    with pytest.raises(BioadaptError, match=r"shaped \(B, C, Y, X\) for a batch or \(C, Y, X\) for one image"):
        two_channel.fine_tune([(image, np.zeros((SIZE, SIZE), np.int64))], {"epochs": 1})
