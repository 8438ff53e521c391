"""Fine-tuned bioimage.io models exported as new packages: bioimageio.core's test passes, they load back and
predict like the in-memory model, and differ from the parent only where they must."""

import zipfile

import numpy as np
import pytest
import yaml

from bioadapt.adapters import load_adapter
from bioadapt.errors import BioadaptError
from bioadapt.exporters import export_bioimageio
from bioadapt.exporters.metadata import bump_version
from model_factory import SMALL_CPSAM, cell_patches, cellpose_weights, unet_package

# the export runs the same float32 network; the package's own pre-processing is the parent's, so the
# only difference is float order in the convolutions: 1e-5 on probabilities
ATOL = 1e-5
TRAINING = {"regions": [{"image": "s3://bucket/slide.ome.zarr", "origin": [0, 128], "shape": [64, 64]}],
            "label_store": "/projects/p1/labels.ome.zarr", "metrics": {"f1_before": 0.42, "f1_after": 0.56}}


def _fine_tuned(package, style="crowded", dims=2, **options):
    model = load_adapter(package, device="cpu", **options)
    if dims == 2:
        samples = cell_patches(style, 3, seed=2)
    else:
        rng = np.random.default_rng(0)
        samples = [(rng.normal(100, 10, (1, 16, 32, 32)).astype(np.float32),
                    (rng.random((16, 32, 32)) > 0.7).astype(np.int64)) for _ in range(3)]
    model.fine_tune(samples, {"epochs": 1, "learning_rate": 1e-2})
    return model


def _export(model, out, **kwargs):
    return export_bioimageio(model, out, name="adapted model", description="fine-tuned on crowded cells",
                             authors=["Ada Lovelace"], license="CC-BY-4.0", training=TRAINING, **kwargs)


def _rdf(package):
    with zipfile.ZipFile(package) as z:
        return yaml.safe_load(z.read("rdf.yaml")), set(z.namelist())


@pytest.mark.parametrize("kind", ["state_dict_0.5", "format_0.4", "torchscript_only", "3d_softmax"])
def test_round_trip(kind, tmp_path):
    if kind == "state_dict_0.5":
        parent = unet_package(tmp_path / "parent.zip", dropout=0.1)
    elif kind == "format_0.4":
        parent = unet_package(tmp_path / "parent.zip", out_channels=1, weights=("pytorch_state_dict",),
                              format_version="0.4")
    elif kind == "torchscript_only":
        parent = unet_package(tmp_path / "parent.zip", weights=("torchscript",))
    else:
        parent = unet_package(tmp_path / "parent.zip", dims=3, out_channels=3, batchnorm=True,
                              output_activation="softmax", weights=("pytorch_state_dict",))
    model = _fine_tuned(parent, dims=3 if kind == "3d_softmax" else 2)
    out = _export(model, tmp_path / "adapted.zip")  # raises unless bioimageio.core's test passed
    again = load_adapter(out, device="cpu")
    x = model.training_record.example_image[None]
    np.testing.assert_allclose(again.predict_proba(x), model.predict_proba(x), atol=ATOL)
    rdf, files = _rdf(out)
    assert rdf["format_version"].startswith("0.5")
    expected_weights = {"state_dict_0.5": {"pytorch_state_dict", "torchscript"}, "format_0.4": {"pytorch_state_dict"},
                        "torchscript_only": {"torchscript"}, "3d_softmax": {"pytorch_state_dict"}}[kind]
    assert set(rdf["weights"]) == expected_weights
    assert rdf["config"]["bioadapt"]["regions"] == TRAINING["regions"]
    assert rdf["config"]["bioadapt"]["label_store"] == TRAINING["label_store"]
    assert rdf["config"]["bioimageio"]["training"]["training_epochs"] == 1
    assert {"README.md", "cover.png", "test_input.npy", "test_output.npy"} <= files
    with zipfile.ZipFile(out) as z:  # the held-out score is named by what fine-tuning validated by
        readme = z.read("README.md").decode()
    metric = "Dice" if kind == "3d_softmax" else "F1 at IoU 0.5"  # classes, or objects
    assert f"- held-out {metric}: " in readme, readme


def test_export_differs_from_the_parent_only_where_it_must(tmp_path):
    parent = unet_package(tmp_path / "parent.zip", dropout=0.1)
    out = _export(_fine_tuned(parent), tmp_path / "adapted.zip")
    before, _ = _rdf(parent)
    after, _ = _rdf(out)
    allowed = {"name", "description", "authors", "license", "version", "weights", "covers", "documentation",
               "config", "timestamp", "tags", "attachments", "cite", "parent", "inputs", "outputs"}
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert changed <= allowed, changed - allowed
    for io in ("inputs", "outputs"):  # tensors keep everything but their test files
        strip = [{k: v for k, v in t.items() if k != "test_tensor"} for t in before[io]]
        assert strip == [{k: v for k, v in t.items() if k != "test_tensor"} for t in after[io]]
        assert before[io][0]["test_tensor"]["sha256"] != after[io][0]["test_tensor"]["sha256"]
    assert before["weights"]["pytorch_state_dict"]["architecture"] == after["weights"]["pytorch_state_dict"]["architecture"]
    assert before["weights"]["pytorch_state_dict"]["sha256"] != after["weights"]["pytorch_state_dict"]["sha256"]
    assert after["version"] == "0.1.0" and after["config"]["bioadapt"]["parent_source"] == str(parent)
    assert "Ada Lovelace" in [a["name"] for a in after["authors"]]


def test_bad_metadata_fails_before_anything_is_written(tmp_path):
    model = _fine_tuned(unet_package(tmp_path / "parent.zip", out_channels=1, weights=("pytorch_state_dict",)))
    out = tmp_path / "out" / "adapted.zip"
    out.parent.mkdir()
    cases = [(dict(authors=[]), "authors"), (dict(name=" "), "name"), (dict(license="NOT-A-LICENCE"), "SPDX"),
             (dict(cite=[{"text": "x"}]), "doi")]
    for change, message in cases:
        arguments = dict(name="adapted", description="d", authors=["A"], license="MIT") | change
        with pytest.raises(BioadaptError, match=message):
            export_bioimageio(model, out, **arguments)
    with pytest.raises(BioadaptError, match=r"\.zip"):
        export_bioimageio(model, tmp_path / "out" / "adapted.tar", name="a", description="d", authors=["A"])
    assert list(out.parent.iterdir()) == []
    fresh = load_adapter(unet_package(tmp_path / "p2.zip", out_channels=1, weights=("pytorch_state_dict",)))
    with pytest.raises(BioadaptError, match="fine-tune the model first"):
        export_bioimageio(fresh, out, name="a", description="d", authors=["A"])
    assert list(out.parent.iterdir()) == []


def test_version_bump():
    assert bump_version(None) == "0.1.0"
    assert bump_version("1.2.3") == "1.2.4"
    assert bump_version("2") == "3"


def test_cellpose_round_trip(tmp_path):
    """A random Cellpose network of the installed generation (a CPnet, or a reduced CPSAM built from Cellpose's own
    class) trained briefly at its native scale, exported with the spec's cellpose_flow_dynamics post-processing,
    passes bioimageio.core's test, loads back with load_adapter and predicts and segments like the adapter."""
    from bioadapt.adapters.cellpose import GENERATION

    cpsam = GENERATION >= 4
    size = 256 if cpsam else 96  # CPSAM's package takes exactly 256 x 256
    # flow_threshold 0: a briefly trained net has poor flows, and Cellpose would drop every mask for it
    model = load_adapter(f"cellpose:{cellpose_weights(tmp_path / 'weights')}", device="cpu", flow_threshold=0.0)
    params = {"epochs": 25, "batch_size": 4, "min_train_masks": 1, "rescale": False}
    params |= {"learning_rate": 2e-3} if cpsam else {"bsize": 96}
    model.fine_tune(cell_patches("nuclei", 6, size=size, seed=1), params)
    out = _export(model, tmp_path / "cellpose.zip")
    rdf, files = _rdf(out)
    assert rdf["outputs"][0]["postprocessing"][0]["id"] == "cellpose_flow_dynamics"
    architecture = rdf["weights"]["pytorch_state_dict"]["architecture"]
    if cpsam:
        assert architecture["callable"] == "CellposeSAMFlows" and architecture["kwargs"] == SMALL_CPSAM
        assert "cpsam.py" in files and [a.get("size") for a in rdf["inputs"][0]["axes"][2:]] == [256, 256]
    else:
        assert architecture["callable"] == "CellposeFlows" and "cellpose_arch.py" in files
    # the resize the model's own eval applies without a diameter: none for Cellpose 4, diam_mean / diam_labels for 3
    assert rdf["config"]["bioadapt"]["cellpose_version"] == GENERATION
    assert rdf["config"]["bioadapt"]["rescale"] == pytest.approx(1.0 if cpsam else model.diam_mean / model.diam_labels)
    packaged = load_adapter(out, device="cpu")
    assert packaged.describe().output_kind == "cellpose"
    if not cpsam:  # the package runs at the network's scale: tell the adapter the cells are diam_mean wide
        model.diameter = model.diam_mean
    images = np.stack([p[0] for p in cell_patches("nuclei", 2, size=size, seed=3)])
    as_packaged = np.stack([model.network_input(image) for image in images])
    # Cellpose's normalize_img and the package's scale_range compute the same percentiles: 1e-5
    np.testing.assert_allclose(packaged.predict_proba(as_packaged), model.predict_proba(images), atol=1e-5)
    np.testing.assert_array_equal(packaged.segment(as_packaged), model.segment(images))
