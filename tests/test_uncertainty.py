"""The uncertainty store: per-pixel maps as a multiscale OME-Zarr image aligned with its source, NaN where nothing
was scored, an overview kept in step with the scored windows."""

import numpy as np
import pytest

from bioadapt.data import UncertaintyStore, open_image, write_ome_zarr
from bioadapt.data.uncertainty import nan_downsample
from bioadapt.errors import BioadaptError


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_maps_land_where_they_were_scored_and_the_overview_follows(tmp_path, rng, version):
    source = open_image(write_ome_zarr(tmp_path / "slide.ome.zarr", np.zeros((1, 1500, 1300), np.uint8), "cyx",
                                       version=version, scale=(1.0, 0.5, 0.5),
                                       units={"y": "micrometer", "x": "micrometer"}))
    store = UncertaintyStore.create(tmp_path / "uncertainty.ome.zarr", like=source)
    assert store.shape == (1500, 1300) and store.n_levels == 3 and store.factors(2) == (4.0, 4.0)
    windows = [((int(rng.integers(0, 1400)), int(rng.integers(0, 1200))), (100, 100)) for _ in range(12)]
    for origin, shape in windows:
        store.write(origin, rng.random(shape, dtype=np.float32))
    store.update_overview(windows)
    full = store.read((0, 0), store.shape)
    scored = np.zeros(full.shape, bool)
    for (y, x), (h, w) in windows:
        scored[y:y + h, x:x + w] = True
    assert np.array_equal(np.isfinite(full), scored)
    level1 = nan_downsample(full, "yx")
    np.testing.assert_allclose(store.read((0, 0), store.level_shape(1), level=1), level1, rtol=1e-6)
    np.testing.assert_allclose(store.read((0, 0), store.level_shape(2), level=2), nan_downsample(level1, "yx"),
                               rtol=1e-6)
    level, overview = store.overview(max_pixels=400 * 400)
    assert level == 2 and overview.shape == (375, 325)

    # the same image in napari's or any OME-Zarr reader's eyes: aligned with the source, physical units kept
    image = open_image(tmp_path / "uncertainty.ome.zarr")
    assert image.axes == "yx" and image.spatial_shape == source.spatial_shape and image.ngff_version == version
    assert image.spatial_scale == source.spatial_scale and image.units == {"y": "micrometer", "x": "micrometer"}
    assert [lv.factors for lv in image.levels] == [(1.0, 1.0), (2.0, 2.0), (4.0, 4.0)]
    np.testing.assert_array_equal(image.read((0, 0), store.shape)[0], full)


def test_a_3d_store_halves_only_y_and_x(tmp_path, rng):
    source = open_image(write_ome_zarr(tmp_path / "vol.ome.zarr", np.zeros((1, 8, 1100, 1100), np.uint8), "czyx"))
    store = UncertaintyStore.create(tmp_path / "uncertainty.ome.zarr", like=source)
    values = rng.random((4, 64, 64), dtype=np.float32)
    store.write((2, 500, 510), values)
    store.update_overview([((2, 500, 510), (4, 64, 64))])
    assert store.level_shape(1) == (8, 550, 550)
    np.testing.assert_allclose(store.read((2, 250, 255), (4, 32, 32), level=1),
                               values.reshape(4, 32, 2, 32, 2).mean(axis=(2, 4)), rtol=1e-6)


def test_writes_outside_the_image_are_refused(tmp_path):
    source = open_image(write_ome_zarr(tmp_path / "small.ome.zarr", np.zeros((1, 64, 64), np.uint8), "cyx"))
    store = UncertaintyStore.create(tmp_path / "uncertainty.ome.zarr", like=source)
    with pytest.raises(BioadaptError, match="outside"):
        store.write((40, 40), np.zeros((32, 32), np.float32))
    with pytest.raises(BioadaptError, match="no uncertainty store"):
        UncertaintyStore.open(tmp_path / "absent.ome.zarr")
