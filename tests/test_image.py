"""open_image and Image.read over OME-Zarr 0.4/0.5, plain Zarr, 2D multichannel, 3D, multiscale and time."""

import numpy as np
import pytest
import zarr

from bioadapt.data import open_image, write_ome_zarr
from bioadapt.errors import BioadaptError


def test_ome_zarr_metadata_and_reads(cyx_image, ngff_version):
    path, data = cyx_image
    image = open_image(path)
    assert image.ngff_version == ngff_version
    assert image.zarr_format == (2 if ngff_version == "0.4" else 3)
    assert image.axes == "cyx" and image.shape == (2, 600, 700) and image.dtype == np.uint16
    assert image.chunks == (1, 128, 128)
    assert image.scale == (1.0, 0.5, 0.5) and image.units == {"y": "micrometer", "x": "micrometer"}
    assert [lv.shape for lv in image.levels] == [(2, 600, 700), (2, 300, 350), (2, 150, 175)]
    assert image.levels[2].factors == (4.0, 4.0)
    assert image.spatial_axes == "yx" and image.spatial_shape == (600, 700)

    patch = image.read((100, 250), (256, 200))
    assert patch.shape == (2, 256, 200) and patch.dtype == np.uint16
    np.testing.assert_array_equal(patch, data[:, 100:356, 250:450])
    as_float = image.read((0, 0), (8, 8), dtype="float32")
    assert as_float.dtype == np.float32


def test_channel_selection(cyx_image):
    path, data = cyx_image
    np.testing.assert_array_equal(open_image(path, channels=[1]).read((5, 6), (10, 12)), data[1:2, 5:15, 6:18])
    swapped = open_image(path, channels=[1, 0]).read((5, 6), (10, 12))
    np.testing.assert_array_equal(swapped, data[[1, 0], 5:15, 6:18])
    with pytest.raises(BioadaptError, match=r"channels \[2\] do not exist"):
        open_image(path, channels=[0, 2])


def test_coarse_level_is_downsampled_level_zero(cyx_image):
    path, data = cyx_image
    image = open_image(path)
    coarse = image.read((0, 0), (300, 350), level=1).astype(np.float64)
    expected = data.astype(np.float64).reshape(2, 300, 2, 350, 2).mean(axis=(2, 4))
    assert np.abs(coarse - expected).max() <= 0.5


def test_plain_zarr_needs_axes_and_is_reordered(tmp_path, rng):
    data = rng.integers(0, 255, size=(90, 120, 3), dtype=np.uint8)
    zarr.save_array(str(tmp_path / "plain.zarr"), data)
    with pytest.raises(BioadaptError, match="without axes metadata: pass axes="):
        open_image(tmp_path / "plain.zarr")
    with pytest.raises(BioadaptError, match="have 2 letters but .* has 3 dimensions"):
        open_image(tmp_path / "plain.zarr", axes="yx")
    with pytest.raises(BioadaptError, match="contain \\['q'\\]"):
        open_image(tmp_path / "plain.zarr", axes="yxq")
    image = open_image(f"file://{tmp_path / 'plain.zarr'}", axes="YXC")
    assert image.axes == "yxc" and image.n_channels == 3 and image.spatial_shape == (90, 120)
    np.testing.assert_array_equal(image.read((10, 20), (30, 40)), np.moveaxis(data[10:40, 20:60], -1, 0))


def test_3d_image(tmp_path, rng):
    data = rng.integers(0, 1000, size=(1, 20, 64, 80), dtype=np.uint16)
    path = write_ome_zarr(tmp_path / "vol.ome.zarr", data, "czyx", chunks=(1, 8, 32, 32), n_levels=2)
    image = open_image(path)
    assert image.spatial_axes == "zyx" and image.spatial_shape == (20, 64, 80)
    assert image.levels[1].shape == (1, 20, 32, 40)  # z keeps full resolution
    np.testing.assert_array_equal(image.read((3, 10, 20), (8, 32, 32)), data[:, 3:11, 10:42, 20:52])


def test_time_axis_picks_a_time_point(tmp_path, rng):
    data = rng.integers(0, 1000, size=(3, 2, 4, 32, 48), dtype=np.uint16)
    path = write_ome_zarr(tmp_path / "movie.ome.zarr", data, "tczyx", chunks=(1, 1, 4, 32, 32), n_levels=1)
    image = open_image(path, time=2)
    assert image.n_timepoints == 3 and image.time == 2
    np.testing.assert_array_equal(image.read((0, 0, 0), (4, 32, 48)), data[2])
    with pytest.raises(BioadaptError, match="time point 3 does not exist"):
        open_image(path, time=3)


def test_image_without_time_axis_refuses_a_time_point(cyx_image):
    with pytest.raises(BioadaptError, match="no time axis"):
        open_image(cyx_image[0], time=1)


@pytest.mark.parametrize("origin, shape", [((500, 0), (256, 256)), ((-1, 0), (10, 10)), ((0, 0), (0, 5))])
def test_window_outside_the_image_is_an_error(cyx_image, origin, shape):
    image = open_image(cyx_image[0])
    with pytest.raises(BioadaptError, match="outside the image|must be positive"):
        image.read(origin, shape)


def test_window_with_wrong_dimensions_is_an_error(cyx_image):
    with pytest.raises(BioadaptError, match="must have 2 values"):
        open_image(cyx_image[0]).read((0, 0, 0), (1, 1, 1))


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(BioadaptError, match="does not exist"):
        open_image(tmp_path / "nothing-here.ome.zarr")


def test_axes_that_contradict_the_metadata_are_an_error(cyx_image):
    with pytest.raises(BioadaptError, match="do not match the OME-NGFF axes 'cyx'"):
        open_image(cyx_image[0], axes="zyx")


def test_group_without_ngff_metadata_names_its_arrays(tmp_path):
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("raw", shape=(10, 10), dtype="uint8")
    with pytest.raises(BioadaptError, match=r"without OME-NGFF multiscales metadata; open one of its arrays \(raw\)"):
        open_image(tmp_path / "g.zarr")


def test_unsupported_scheme_is_an_error():
    with pytest.raises(BioadaptError, match="unsupported URI scheme 'gs://'"):
        open_image("gs://bucket/image.ome.zarr")
