"""`bioadapt convert`: TIFF to multiscale OME-Zarr, axes mapped, pixel sizes kept, memory bounded by blocks."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tifffile

from bioadapt.cli import main
from bioadapt.data import open_image
from bioadapt.data.convert import convert_to_ome_zarr
from bioadapt.errors import BioadaptError


@pytest.mark.parametrize("tiff_axes, shape, expected_axes", [
    ("CYX", (2, 700, 900), "cyx"),
    ("ZYX", (6, 200, 300), "zyx"),
    ("TZCYX", (2, 3, 2, 100, 120), "tczyx"),
])
def test_convert_keeps_pixels_axes_and_scale(tmp_path, rng, tiff_axes, shape, expected_axes):
    data = rng.integers(0, 60000, size=shape, dtype=np.uint16)
    source = tmp_path / "in.ome.tif"
    tifffile.imwrite(source, data, ome=True, tile=(64, 64),
                     metadata={"axes": tiff_axes, "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25})
    image = open_image(convert_to_ome_zarr(source, tmp_path / "out.ome.zarr", progress=False))
    assert image.axes == expected_axes
    assert image.scale[-2:] == (0.25, 0.25) and image.units["x"] == "micrometer"
    expected = np.moveaxis(data, 2, 1)[0] if tiff_axes == "TZCYX" else data  # time point 0, c before z
    if "c" not in expected_axes:
        expected = expected[np.newaxis]
    np.testing.assert_array_equal(image.read((0,) * len(image.spatial_shape), image.spatial_shape), expected)


def test_rgb_samples_become_channels_and_the_cli_writes_ngff_04(tmp_path, rng):
    data = rng.integers(0, 255, size=(300, 400, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", data, photometric="rgb")
    assert main(["convert", str(tmp_path / "rgb.tif"), str(tmp_path / "rgb.ome.zarr"), "--ngff-version", "0.4",
                 "--chunks", "1,128,128", "--levels", "2"]) == 0
    image = open_image(tmp_path / "rgb.ome.zarr")
    assert image.ngff_version == "0.4" and image.axes == "cyx" and image.chunks == (1, 128, 128)
    assert len(image.levels) == 2
    np.testing.assert_array_equal(image.read((0, 0), (300, 400)), np.moveaxis(data, -1, 0))


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing.tif"), str(tmp_path / "out.ome.zarr")]) == 2
    assert "missing.tif' does not exist" in capsys.readouterr().err


def test_existing_output_is_not_overwritten(tmp_path, rng):
    tifffile.imwrite(tmp_path / "a.tif", rng.integers(0, 9, size=(64, 64), dtype=np.uint8))
    convert_to_ome_zarr(tmp_path / "a.tif", tmp_path / "a.ome.zarr", progress=False)
    with pytest.raises(BioadaptError, match="already exists"):
        convert_to_ome_zarr(tmp_path / "a.tif", tmp_path / "a.ome.zarr", progress=False)


STREAM = textwrap.dedent("""
    import json, resource, sys
    from bioadapt.data.convert import convert_to_ome_zarr
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    convert_to_ome_zarr(sys.argv[1], sys.argv[2], progress=False)
    print(json.dumps({"before_kb": before, "after_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""")


def test_conversion_streams_instead_of_loading_the_file(tmp_path):
    side, tile = 8192, 512  # 128 MiB of uint16, written tile by tile so the test never holds it either
    source = tmp_path / "big.tif"

    def tiles():
        for y in range(0, side, tile):
            for x in range(0, side, tile):
                yield np.full((tile, tile), (y // tile) * 16 + x // tile, dtype=np.uint16)

    tifffile.imwrite(source, tiles(), shape=(side, side), dtype=np.uint16, tile=(tile, tile))
    result = subprocess.run([sys.executable, "-c", STREAM, str(source), str(tmp_path / "big.ome.zarr")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    growth_mib = (report["after_kb"] - report["before_kb"]) / 1024
    assert growth_mib < 100, f"conversion grew the process by {growth_mib:.0f} MiB for a 128 MiB image"
    image = open_image(tmp_path / "big.ome.zarr")
    assert image.read((4096, 1024), (1, 1))[0, 0, 0] == 8 * 16 + 2
