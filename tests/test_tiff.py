"""TIFF and OME-TIFF opened in place through tifffile's Zarr store (no conversion): axes from OME metadata, the
file's tiles as chunks, pyramid levels; a TIFF made by someone else (scikit-image's multipage.tif); errors that name
what is supported and `bioadapt convert`; and a TIFF scored end to end through a real `bioadapt serve`."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import numpy as np
import pytest
import tifffile
from model_factory import unet_package
from service_helpers import ServiceProcess, client_for

from bioadapt.data import LabelStore, open_image, sample_patches
from bioadapt.data.synthetic import synthetic_cells
from bioadapt.errors import BioadaptError

# shipped with scikit-image (a project dependency): two 15 x 10 uint8 pages, written by another tool than ours
SKIMAGE_MULTIPAGE = Path(str(importlib.resources.files("skimage") / "data" / "multipage.tif"))
USER, WORKSPACE = "svc-tiff", "ws-user-svc-tiff"


@pytest.fixture(scope="module")
def cells():
    return synthetic_cells((600, 700), "crowded", seed=3, n_channels=2)


def test_ome_tiff_opens_in_place_with_its_axes_scale_and_tiles(tmp_path, cells):
    path = tmp_path / "cells.ome.tif"
    tifffile.imwrite(path, cells.image, tile=(128, 128), compression="zlib",
                     metadata={"axes": "CYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5, "PhysicalSizeXUnit": "µm"})
    image = open_image(path)
    assert image.axes == "cyx" and image.shape == (2, 600, 700) and image.dtype == np.uint16
    assert image.chunks == (1, 128, 128)  # the file's tiles: a window reads only the tiles it overlaps
    assert image.spatial_scale == (0.5, 0.5) and image.units == {"y": "micrometer", "x": "micrometer"}
    np.testing.assert_array_equal(image.read((130, 250), (64, 96)), cells.image[:, 130:194, 250:346])
    np.testing.assert_array_equal(open_image(path, channels=[1]).read((0, 0), (8, 8)), cells.image[1:, :8, :8])
    windows = sample_patches(image, 5, (64, 64), seed=0)
    assert len(windows) == 5
    store = LabelStore.create(tmp_path / "labels", like=image)  # beside it: a TIFF holds no labels
    assert store.shape == (600, 700) and store.chunks == (128, 128)


def test_pyramidal_ome_tiff_gives_its_levels(tmp_path, cells):
    plane = cells.image[0]
    path = tmp_path / "pyramid.ome.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(plane, subifds=2, tile=(128, 128), metadata={"axes": "YX", "PhysicalSizeX": 0.25,
                                                                  "PhysicalSizeY": 0.25})
        tif.write(plane[::2, ::2], subfiletype=1, tile=(128, 128))
        tif.write(plane[::4, ::4], subfiletype=1, tile=(128, 128))
    image = open_image(path)
    assert image.axes == "yx" and [lv.factors for lv in image.levels] == [(1.0, 1.0), (2.0, 2.0), (4.0, 4.0)]
    assert image.levels[2].scale == (1.0, 1.0)
    np.testing.assert_array_equal(image.read_level(-1)[0], plane[::4, ::4])
    np.testing.assert_array_equal(image.read((40, 30), (16, 16), level=1)[0], plane[::2, ::2][40:56, 30:46])


def test_a_plain_tiff_takes_axes_from_tifffile_or_the_caller(tmp_path, cells):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, cells.image)  # no OME metadata: tifffile calls the first axis Q (unnamed)
    assert open_image(path).axes == "tyx"  # an unnamed sequence: one time point at a time
    image = open_image(path, axes="cyx")
    assert image.n_channels == 2
    np.testing.assert_array_equal(image.read((5, 6), (7, 8)), cells.image[:, 5:12, 6:14])
    with pytest.raises(BioadaptError, match=r"axes 'yx' have 2 letters but .* has 3 dimensions \(shape \(2, 600, 700\)"):
        open_image(path, axes="yx")


def test_a_tiff_written_by_another_tool():
    image = open_image(SKIMAGE_MULTIPAGE)
    truth = tifffile.imread(SKIMAGE_MULTIPAGE)
    assert image.axes == "tyx" and image.shape == truth.shape == (2, 15, 10)
    for t in (0, 1):
        np.testing.assert_array_equal(open_image(SKIMAGE_MULTIPAGE, time=t).read_level(0)[0], truth[t])


def test_errors_name_what_is_supported_and_the_convert_command(tmp_path):
    png = tmp_path / "cells.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(32))
    for uri, message in [(png, "is a file but not a TIFF"), ("https://example.org/cells.tif", "remote TIFF"),
                         (tmp_path, "no Zarr array or group")]:
        with pytest.raises(BioadaptError, match=message) as error:
            open_image(uri)
        assert "bioadapt convert in.tif out.ome.zarr" in str(error.value), str(error.value)
    assert "TIFF" in str(error.value) and "OME-Zarr" in str(error.value)


# -- through the service --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_tiff_scores_in_place_through_the_service(hypha_server, ray_cluster, tmp_path, cells):
    allowed = tmp_path / "inputs"
    allowed.mkdir()
    tiff = allowed / "cells.ome.tif"
    tifffile.imwrite(tiff, cells.image[:1], tile=(128, 128), metadata={"axes": "CYX"})
    unet_package(allowed / "model.zip", features=4, weights=("pytorch_state_dict",))
    process = ServiceProcess(hypha_server, ray_cluster, USER, tmp_path / "data", [allowed])
    process.start()
    client = client_for(hypha_server, "tiffuser", WORKSPACE)
    try:
        project = client.create_project("tiff", str(allowed / "model.zip"), [{"uri": str(tiff), "mask": "auto"}])
        assert project["images"][0]["uri"] == str(tiff)
        started = client.score(project["id"], n_patches=4, patch_shape=[64, 64], mc_passes=2, seed=0)
        assert client.wait(started["job_id"], progress=False, timeout_s=120)["state"] == "done"
        patches = client.list_patches(project["id"])
        assert len(patches) == 4 and all(p["score"] is not None for p in patches)
        top = client.get_patch(project["id"], patches[0]["id"])
        (y, x), (h, w) = patches[0]["origin"], patches[0]["shape"]
        np.testing.assert_array_equal(np.asarray(top["image"]).reshape(1, h, w), cells.image[:1, y:y + h, x:x + w])
        assert np.isfinite(top["uncertainty"]).all() and top["predicted_labels"].shape == (h, w)
        assert not list(allowed.glob("*.zarr")), "nothing is written beside the TIFF"
    finally:
        client.disconnect()
        process.stop()
