"""Freshly built U-Nets packaged as bioimage.io models: each loads and passes bioimageio.core's own test."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import bioimageio.core
import numpy as np
import pytest
import torch
from bioimageio.spec import load_model_description
from bioimageio.spec.model import v0_5
from bioimageio.spec.utils import load_array

from bioadapt.adapters.unet import UNet
from bioadapt.errors import BioadaptError
from bioadapt.exporters.fresh import package_new_model


@pytest.fixture(autouse=True)
def private_tempdir(tmp_path, monkeypatch) -> Path:
    """Temporary files go to a folder of this test, so the test can see what is left behind."""
    folder = tmp_path / "system-tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def assert_passes_bioimageio_test(path: Path) -> None:
    started = time.perf_counter()
    summary = bioimageio.core.test_model(path)
    failures = [f"{detail.name}: {[error.msg for error in detail.errors]}"
                for detail in summary.details if detail.status != "passed"]
    assert summary.status == "passed", failures
    print(f"test_model({path.name}): {time.perf_counter() - started:.2f} s")


def unet_and_kwargs(**kwargs) -> tuple[UNet, dict]:
    kwargs = {"features": 4, "depth": 2, **kwargs}
    torch.manual_seed(0)
    return UNet(**kwargs), kwargs


def test_2d_sigmoid_unet_with_dropout_as_zip(tmp_path, private_tempdir):
    unet, kwargs = unet_and_kwargs(in_channels=1, out_channels=2, dropout=0.2)

    path = package_new_model(unet, tmp_path / "unet2d.zip", name="tiny 2d unet", architecture_kwargs=kwargs,
                             output_names=("foreground", "boundaries"))

    assert path == tmp_path / "unet2d.zip" and path.is_file()
    assert unet.training, "packaging must leave the module in the mode it found it"
    leftovers = [p for p in private_tempdir.rglob("*") if p.name.startswith("bioadapt-package-") or p.suffix == ".png"]
    assert not leftovers, "temporary files left behind"
    descr = load_model_description(path)
    assert isinstance(descr, v0_5.ModelDescr)
    assert descr.weights.pytorch_state_dict.parent is None
    assert descr.weights.torchscript.parent == "pytorch_state_dict"
    assert descr.documentation is not None
    assert descr.outputs[0].axes[1].channel_names == ["foreground", "boundaries"]
    assert descr.outputs[0].postprocessing[0].id == "sigmoid"
    expected = load_array(descr.outputs[0].test_tensor)
    assert expected.shape == (1, 2, 32, 32) and 0 < expected.min() and expected.max() < 1
    assert_passes_bioimageio_test(path)


def test_3d_softmax_unet_with_batchnorm_and_halo_as_folder(tmp_path):
    unet, kwargs = unet_and_kwargs(in_channels=1, out_channels=3, dims=3, batchnorm=True)

    path = package_new_model(unet, tmp_path / "unet3d", name="tiny 3d unet", architecture_kwargs=kwargs,
                             axes="czyx", halo=2, output_activation="softmax", weights=("pytorch_state_dict",),
                             as_folder=True)

    assert (path / "rdf.yaml").is_file() and (path / "unet.py").is_file()
    descr = load_model_description(path)
    assert [a.id for a in descr.inputs[0].axes] == ["batch", "channel", "z", "y", "x"]
    assert all(axis.halo == 2 for axis in descr.outputs[0].axes[2:])
    expected = load_array(descr.outputs[0].test_tensor)
    np.testing.assert_allclose(expected.sum(axis=1), 1.0, atol=1e-5)  # softmax over channels was applied
    assert_passes_bioimageio_test(path)


def test_format_0_4_package_with_scale_range(tmp_path):
    unet, kwargs = unet_and_kwargs()

    path = package_new_model(unet, tmp_path / "unet04.zip", name="tiny 0.4 unet", architecture_kwargs=kwargs,
                             format_version="0.4", preprocessing="scale_range", halo=4)

    descr = load_model_description(path, format_version="discover")
    assert descr.format_version.startswith("0.4")
    assert descr.weights.torchscript.parent == "pytorch_state_dict"
    assert_passes_bioimageio_test(path)


def test_onnx_only_package_holds_the_networks_own_output(tmp_path):
    unet, kwargs = unet_and_kwargs(in_channels=2, out_channels=1)
    test_input = np.random.default_rng(3).normal(size=(2, 24, 40)).astype("float32")

    path = package_new_model(unet, tmp_path / "onnx.zip", name="tiny onnx unet", architecture_kwargs=kwargs,
                             weights=("onnx",), preprocessing=None, output_activation=None,
                             test_input=test_input)

    descr = load_model_description(path)
    assert descr.weights.onnx is not None and descr.weights.pytorch_state_dict is None
    with torch.no_grad():
        logits = unet.eval()(torch.from_numpy(test_input[None])).numpy()
    np.testing.assert_allclose(load_array(descr.outputs[0].test_tensor), logits, atol=1e-4)
    assert_passes_bioimageio_test(path)


@pytest.mark.parametrize("bad, message", [
    ({"axes": "yxc"}, "unknown axes"),
    ({"weights": ("keras_hdf5",)}, "weights must be"),
    ({"weights": ()}, "weights must be"),
    ({"format_version": "0.4", "output_activation": "softmax"}, "no softmax"),
    ({"output_names": ("only one",)}, "one name per channel"),
    ({"min_shape": (16,)}, "min_shape must be 2"),
    ({"min_shape": (16, 16), "halo": 8}, "exceed 2 \\* halo"),
])
def test_bad_arguments_are_explained(tmp_path, bad, message):
    unet, kwargs = unet_and_kwargs()
    with pytest.raises(BioadaptError, match=message):
        package_new_model(unet, tmp_path / "bad.zip", name="bad unet", architecture_kwargs=kwargs, **bad)
    assert not (tmp_path / "bad.zip").exists()
