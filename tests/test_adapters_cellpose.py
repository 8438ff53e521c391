"""The Cellpose 3 adapter on a CPnet with random weights saved in the test (nothing is downloaded)."""

import urllib.error

import numpy as np
import pytest
import torch

from bioadapt.active.metrics import match_instances
from bioadapt.adapters import load_adapter
from bioadapt.adapters.cellpose import GENERATION
from bioadapt.errors import BioadaptError
from model_factory import cell_patches

pytestmark = pytest.mark.skipif(GENERATION != 3, reason="these tests build a Cellpose 3 CPnet")


@pytest.fixture(scope="session")
def cpnet_weights(tmp_path_factory):
    from cellpose import resnet_torch

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cellpose") / "cpnet_random"
    resnet_torch.CPnet([2, 32, 64, 128, 256], 3, sz=3, mkldnn=False).save_model(str(path))
    return path


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch, tmp_path):
    """Any download attempt fails loudly, and no model cached in ~/.cellpose can be picked up."""
    from cellpose import models, utils

    def refuse(url, *args, **kwargs):
        raise urllib.error.URLError(f"test tried to download {url}")

    monkeypatch.setattr(utils, "download_url_to_file", refuse)
    monkeypatch.setattr(models, "MODEL_DIR", tmp_path / "cellpose-models")


@pytest.fixture(scope="module")
def images():
    return np.stack([p[0] for p in cell_patches("nuclei", 2, size=64, seed=4)])


def test_shapes_and_describe(cpnet_weights, images):
    model = load_adapter(f"cellpose:{cpnet_weights}", device="cpu")
    info = model.describe()
    assert (info.kind, info.output_kind, info.class_names, info.mc_dropout) == \
        ("cellpose", "cellpose", ("background", "cell"), "hooks")
    assert (info.min_shape, info.step, info.axes, info.input_channels) == ((16, 16), (8, 8), "cyx", 1)
    proba = model.predict_proba(images)
    assert proba.shape == (2, 2, 64, 64) and proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(1), 1, atol=1e-6)
    assert model.mc_proba(images, passes=3).shape == (3, 2, 2, 64, 64)
    assert model.segment(images).shape == (2, 64, 64)
    odd = images[:1, :, :50, :45]
    assert model.predict_proba(odd).shape == (1, 2, 50, 45)


def test_mc_samples_vary_with_dropout_and_the_network_is_unchanged(cpnet_weights, images):
    model = load_adapter(f"cellpose:{cpnet_weights}", device="cpu", dropout_p=0.1)
    keys = list(model.net.state_dict())
    before = model.predict_proba(images)
    samples = model.mc_proba(images, passes=4, seed=3)
    assert np.abs(samples[0] - samples[1]).max() > 1e-3
    np.testing.assert_array_equal(samples, model.mc_proba(images, passes=4, seed=3))
    np.testing.assert_array_equal(model.predict_proba(images), before)
    assert list(model.net.state_dict()) == keys
    assert not any(m._forward_hooks for m in model.net.modules())
    off = load_adapter(f"cellpose:{cpnet_weights}", device="cpu", dropout_p=0.0).mc_proba(images, passes=3)
    np.testing.assert_allclose(off[0], off[2], atol=1e-6)
    np.testing.assert_allclose(off[0], before, atol=1e-5)


def test_head_scope_differs_from_full_but_predicts_the_same(cpnet_weights, images):
    full = load_adapter(f"cellpose:{cpnet_weights}", device="cpu", dropout_p=0.2)
    head = load_adapter(f"cellpose:{cpnet_weights}", device="cpu", dropout_p=0.2, mc_scope="head")
    np.testing.assert_array_equal(full.predict_proba(images), head.predict_proba(images))
    a, b = full.mc_proba(images, passes=4), head.mc_proba(images, passes=4)
    assert np.abs(b[0] - b[1]).max() > 1e-4 and np.abs(a - b).max() > 1e-3
    quiet = load_adapter(f"cellpose:{cpnet_weights}", device="cpu", dropout_p=1e-9, mc_scope="head")
    np.testing.assert_allclose(quiet.mc_proba(images, passes=2)[1], quiet.predict_proba(images), atol=1e-5)


def test_flows_from_ground_truth_give_back_the_labels(cpnet_weights):
    from cellpose import dynamics

    model = load_adapter(f"cellpose:{cpnet_weights}", device="cpu")
    _, labels = cell_patches("nuclei", 1, size=128, seed=6)[0]
    flows = dynamics.labels_to_flows([labels], device=torch.device("cpu"))[0]  # (labels, probability, dY, dX)
    cellprob = np.where(labels > 0, 10.0, -10.0).astype(np.float32)
    recovered = model.masks_from_flows(5 * flows[2:], cellprob)  # the network predicts flows x 5
    result = match_instances(recovered, labels)
    assert result.fp == 0 and result.fn == 0 and result.average_precision == 1.0, result


def test_fine_tune_lowers_the_loss_saves_reloadable_weights_and_stops(cpnet_weights, images, tmp_path):
    model = load_adapter(f"cellpose:{cpnet_weights}", device="cpu")
    history = []
    params = {"epochs": 12, "bsize": 96, "batch_size": 4, "min_train_masks": 1}
    result = model.fine_tune(cell_patches("nuclei", 6, size=96, seed=1), params, progress=history.append)
    assert len(history) == 12 and not result.stopped and (result.n_train, result.n_val) == (4, 2)
    first, last = np.mean([h["loss"] for h in history[:3]]), np.mean([h["loss"] for h in history[-3:]])
    assert last < 0.8 * first, (first, last)
    assert any(h["val_loss"] is not None for h in history)
    saved = model.save(tmp_path / "tuned")
    again = load_adapter(f"cellpose:{saved}", device="cpu")  # through Cellpose's own loader, as its GUI does
    np.testing.assert_array_equal(again.predict_proba(images), model.predict_proba(images))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())

    calls = []
    stopped = model.fine_tune(cell_patches("nuclei", 6, size=96, seed=1), dict(params, epochs=50),
                              stop=lambda: calls.append(1) or len(calls) > 2)
    assert stopped.stopped and stopped.epochs_run == 2
    with pytest.raises(BioadaptError, match="no training patch"):
        model.fine_tune(cell_patches("nuclei", 2, size=32, seed=1), {"min_train_masks": 50})


def test_missing_weights_and_offline_builtin_names_fail_clearly(tmp_path):
    with pytest.raises(BioadaptError, match="neither a file nor a built-in"):
        load_adapter(f"cellpose:{tmp_path / 'missing'}")
    with pytest.raises(BioadaptError, match=r"cellpose:/path/to/weights"):
        load_adapter("cellpose:cyto3", device="cpu")
    with pytest.raises(BioadaptError, match="unknown Cellpose fine-tuning parameters"):
        from bioadapt.adapters.cellpose import CellposeTrainParams

        CellposeTrainParams.from_any({"lr": 1})
