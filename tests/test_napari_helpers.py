"""The parts of the napari widget that need neither napari nor Qt: the remembered connection, a patch turned into
layer data, and the npe2 manifest. These run in CI without the napari extra."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import yaml

from bioadapt.napari.layers import IMAGE_LAYER, LABELS_LAYER, UNCERTAINTY_LAYER, patch_layers, patch_of
from bioadapt.napari.settings import (DEFAULT_SERVER_URL, SETTINGS_ENV, Connection, load_connection,
                                      save_connection, settings_path)

MANIFEST = Path(__file__).resolve().parents[1] / "bioadapt" / "napari" / "napari.yaml"


def test_the_last_connection_is_remembered_for_its_owner_only(tmp_path, monkeypatch):
    path = tmp_path / "config" / "bioadapt" / "napari.json"
    monkeypatch.setenv(SETTINGS_ENV, str(path))
    assert settings_path() == path
    assert load_connection() == Connection(DEFAULT_SERVER_URL, "", "")  # nothing saved yet
    saved = Connection("http://127.0.0.1:9000", "secret-token", "ws-user-lab")
    assert save_connection(saved) == path
    assert load_connection() == saved
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text(json.dumps({"server_url": "http://x", "unknown": 1}))  # keys of another version are ignored
    assert load_connection() == Connection("http://x", "", "")
    path.write_text("{not json")
    assert load_connection() == Connection()  # unreadable: the defaults, with a warning


def test_a_patch_becomes_layers_placed_at_its_origin():
    rng = np.random.default_rng(0)
    patch = {"id": 7, "origin": [100, 200], "shape": [32, 48], "status": "pending", "score": 0.5,
             "image": rng.random((1, 32, 48)).astype(np.float32),
             "predicted_labels": rng.integers(0, 5, (32, 48)).astype(np.uint32),
             "uncertainty": rng.random((32, 48)).astype(np.float32)}
    image, uncertainty, labels = patch_layers(patch, "p1")
    assert [image.name, uncertainty.name, labels.name] == [IMAGE_LAYER, UNCERTAINTY_LAYER, LABELS_LAYER]
    assert image.data.shape == (32, 48)  # one channel: no channel axis
    for layer in (image, uncertainty, labels):
        assert tuple(layer.properties["translate"]) == (100, 200)
        assert patch_of(layer.properties["metadata"]) == {"project_id": "p1", "patch_id": 7, "origin": [100, 200],
                                                          "shape": [32, 48]}
    assert uncertainty.properties["colormap"] == "magma" and uncertainty.properties["blending"] == "additive"
    np.testing.assert_array_equal(labels.data, patch["predicted_labels"])
    labels.data[0, 0] = 99  # painting the layer never writes into the answer it came from
    assert patch["predicted_labels"][0, 0] != 99

    corrected = {**patch, "status": "annotated", "labels": np.full((32, 48), 3, np.uint16),
                 "image": rng.random((2, 32, 48)).astype(np.float32)}
    image, _, labels = patch_layers(corrected, "p1")
    assert image.data.shape == (2, 32, 48) and tuple(image.properties["translate"]) == (0, 100, 200)
    assert np.all(labels.data == 3)  # an annotated patch opens with its stored correction
    assert patch_of({}) is None


def test_the_manifest_names_the_widget():
    manifest = yaml.safe_load(MANIFEST.read_text())
    assert manifest["name"] == "bioadapt"
    command, = manifest["contributions"]["commands"]
    widget, = manifest["contributions"]["widgets"]
    assert widget["command"] == command["id"]
    assert command["python_name"] == "bioadapt.napari.widget:AdaptWidget"
    assert (MANIFEST.parent / "widget.py").read_text().count("class AdaptWidget(") == 1
