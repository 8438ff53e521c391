"""Remote reads: OME-Zarr served over HTTP (read-only) and from an S3-compatible server (moto), on 127.0.0.1."""

import shutil
from pathlib import Path

import boto3
import numpy as np
import pytest

from bioadapt.data import open_image, sample_patches, write_ome_zarr
from bioadapt.errors import BioadaptError


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_http_reads_match_local(http_server, http_root, tmp_path, rng, version):
    data = rng.integers(0, 4000, size=(2, 300, 400), dtype=np.uint16)
    data[:, :128, :128] = 0  # chunks that were never written must read as zeros over HTTP too
    local = write_ome_zarr(tmp_path / "img.ome.zarr", data, "cyx", version=version, chunks=(1, 128, 128), n_levels=2)
    shutil.copytree(local, http_root / f"img-{version}.ome.zarr")
    image = open_image(f"{http_server}/img-{version}.ome.zarr")
    assert image.axes == "cyx" and image.shape == (2, 300, 400) and len(image.levels) == 2
    np.testing.assert_array_equal(image.read((0, 0), (200, 250)), data[:, :200, :250])
    windows = sample_patches(image, 3, (64, 64), seed=3)
    for window in windows:
        np.testing.assert_array_equal(image.read(window.origin, window.shape), data[(slice(None), *window.slices)])


def test_http_missing_image_is_an_error(http_server):
    with pytest.raises(BioadaptError, match="no Zarr array or group|could not read"):
        open_image(f"{http_server}/absent.ome.zarr")


def _upload(directory: Path, bucket: str, prefix: str, endpoint: str) -> None:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="bioadapt", aws_secret_access_key="bioadapt-secret")
    client.create_bucket(Bucket=bucket)
    for path in directory.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(directory).as_posix()}")


def test_s3_reads_match_local(s3_server, tmp_path, rng):
    endpoint, options = s3_server
    data = rng.integers(0, 4000, size=(1, 6, 96, 128), dtype=np.uint16)
    labels = (rng.random((6, 96, 128)) > 0.7).astype(np.uint32)
    local = write_ome_zarr(tmp_path / "vol.ome.zarr", data, "czyx", chunks=(1, 2, 32, 32), n_levels=1,
                           labels={"cells": labels})
    _upload(Path(local), "images", "vol.ome.zarr", endpoint)
    image = open_image("s3://images/vol.ome.zarr", storage_options=options)
    assert image.spatial_axes == "zyx" and image.label_names == ["cells"]
    np.testing.assert_array_equal(image.read((1, 10, 20), (4, 50, 60)), data[:, 1:5, 10:60, 20:80])
    cells = image.label_image("cells")
    np.testing.assert_array_equal(cells.read((0, 0, 0), (6, 96, 128))[0], labels)
