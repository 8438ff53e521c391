"""Where callers may point the service (``PathGuard``), without a service: the data folder is out of reach even
inside an allowed folder, and error texts leave without its path or file excerpts."""

from __future__ import annotations

import pytest
import yaml

from bioadapt.errors import BioadaptError
from bioadapt.service.paths import DATA_FOLDER, PathGuard


@pytest.fixture
def guard(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "data" / "projects" / "p1").mkdir(parents=True)
    (tmp_path / "images" / "into-data").symlink_to(tmp_path / "data" / "projects")
    return PathGuard([tmp_path], private=tmp_path / "data")


@pytest.mark.parametrize("inside", ["data", "data/projects/p1/labels.ome.zarr", "data//projects/p1",
                                    "images/into-data/p1", "data/./projects"])
def test_the_data_folder_is_refused_inside_an_allowed_folder(guard, tmp_path, inside):
    for given in (f"{tmp_path}/{inside}", f"file://{tmp_path}/{inside}"):
        with pytest.raises(BioadaptError, match="data folder") as refused:
            guard.uri(given)
        assert str(tmp_path / "data") not in str(refused.value)
    with pytest.raises(BioadaptError, match="data folder"):
        guard.model_source(f"cellpose:{tmp_path}/{inside}/v1.pt")


def test_user_data_beside_the_data_folder_stays_readable(guard, tmp_path):
    assert guard.uri(str(tmp_path / "images" / "slide.ome.zarr")) == str(tmp_path / "images" / "slide.ome.zarr")
    assert guard.uri(str(tmp_path / "data-2" / "x.zarr")) == str(tmp_path / "data-2" / "x.zarr")  # a prefix only


def test_without_allowed_folders_local_paths_are_refused(tmp_path):
    with pytest.raises(BioadaptError, match="reads no local folders"):
        PathGuard([], private=tmp_path / "data").uri(str(tmp_path / "x.zarr"))


def test_error_texts_lose_the_data_folder_and_file_excerpts(guard, tmp_path):
    text = f"cannot read '{tmp_path}/data/projects/p1/versions/v1.pt'"
    assert guard.redact(text) == f"cannot read '{DATA_FOLDER}/projects/p1/versions/v1.pt'"
    with pytest.raises(yaml.YAMLError) as parsed:
        yaml.safe_load("token: s3cr3t: value\n")
    assert "s3cr3t" in str(parsed.value) and "s3cr3t" not in guard.redact(str(parsed.value))
    ruamel_like = ('could not read model: mapping values are not allowed here\n  in "<unicode string>", line 1, '
                   'column 14:\n    token: s3cr3t: x\n                 ^ (line: 1)')
    assert guard.redact(ruamel_like) == ('could not read model: mapping values are not allowed here\n'
                                         '  in "<unicode string>", line 1, column 14:')
    pydantic_like = "name\n  Input should be a valid string [type=string_type, input_value='s3cr3t', input_type=int]"
    assert "s3cr3t" not in guard.redact(pydantic_like) and "Input should be a valid string" in guard.redact(
        pydantic_like)
