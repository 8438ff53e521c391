"""The Cellpose adapter on networks with random weights saved in the test (nothing is downloaded): a CPnet
(cyto3's architecture) under Cellpose 3, a reduced Cellpose-SAM (Cellpose's own CPSAM class with a 2-block
encoder, 32 wide) under Cellpose 4. `make test-cellpose3` runs this file under Cellpose 3."""

import inspect
import subprocess
import sys
import textwrap
import urllib.error

import numpy as np
import pytest
import torch

from bioadapt.active.metrics import match_instances
from bioadapt.adapters import load_adapter
from bioadapt.adapters.cellpose import GENERATION, CellposeTrainParams
from bioadapt.errors import BioadaptError
from model_factory import SMALL_CPSAM, cell_patches, cellpose_weights

CPSAM = GENERATION >= 4
cpsam_only = pytest.mark.skipif(not CPSAM, reason="Cellpose 4 (CPSAM) behaviour")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    return cellpose_weights(tmp_path_factory.mktemp("cellpose") / "random_weights")


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


def test_shapes_and_describe(weights, images):
    model = load_adapter(f"cellpose:{weights}", device="cpu")
    info = model.describe()
    assert (info.kind, info.output_kind, info.class_names, info.mc_dropout) == \
        ("cellpose", "cellpose", ("background", "cell"), "hooks")
    expected = ((256, 256), (256, 256)) if CPSAM else ((16, 16), (8, 8))
    assert (info.min_shape, info.step, info.axes, info.input_channels) == (*expected, "cyx", 1)
    assert info.name.startswith(f"Cellpose {GENERATION} ")
    proba = model.predict_proba(images)
    assert proba.shape == (2, 2, 64, 64) and proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(1), 1, atol=1e-6)
    assert model.mc_proba(images, passes=3).shape == (3, 2, 2, 64, 64)
    assert model.mc_proba(images, passes=3, scope="head").shape == (3, 2, 2, 64, 64)
    assert model.segment(images).shape == (2, 64, 64)
    odd = images[:1, :, :50, :45]
    assert model.predict_proba(odd).shape == (1, 2, 50, 45)


def test_mc_samples_vary_with_dropout_and_the_network_is_unchanged(weights, images):
    model = load_adapter(f"cellpose:{weights}", device="cpu", dropout_p=0.1)
    keys = list(model.net.state_dict())
    before = model.predict_proba(images)
    samples = model.mc_proba(images, passes=4, seed=3)
    assert np.abs(samples[0] - samples[1]).max() > 1e-3
    np.testing.assert_array_equal(samples, model.mc_proba(images, passes=4, seed=3))
    np.testing.assert_array_equal(model.predict_proba(images), before)
    assert list(model.net.state_dict()) == keys
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.net.modules())
    off = load_adapter(f"cellpose:{weights}", device="cpu", dropout_p=0.0).mc_proba(images, passes=3)
    np.testing.assert_allclose(off[0], off[2], atol=1e-6)
    np.testing.assert_allclose(off[0], before, atol=1e-5)


@pytest.mark.parametrize("scope", ["full", "partial", "head"])
def test_a_rounds_masks_are_drawn_once_for_all_its_patches(weights, images, scope, mask_draws):
    """The service scores a round patch by patch: the adapter keeps the round's masks between calls (drawing
    element masks is a large share of a CPU pass) and draws new ones only for a new seed."""
    model = load_adapter(f"cellpose:{weights}", device="cpu", dropout_p=0.2, mc_scope=scope, dropout_kind="element")
    first = model.mc_proba(images[0], passes=3, seed=7)
    drawn = len(mask_draws)
    assert drawn > 0
    np.testing.assert_array_equal(model.mc_proba(images[0], passes=3, seed=7), first)
    model.mc_proba(images[1], passes=3, seed=7)
    assert len(mask_draws) == drawn
    model.mc_proba(images[0], passes=3, seed=8)
    assert len(mask_draws) == 2 * drawn


def test_head_scope_differs_from_full_but_predicts_the_same(weights, images):
    """For CPSAM the head is the 1x1 readout plus the fixed conv_transpose2d upsampling (W2): with p ~ 0 its
    passes must reproduce the deterministic prediction exactly as the whole network computes it."""
    full = load_adapter(f"cellpose:{weights}", device="cpu", dropout_p=0.2, mc_scope="full")
    head = load_adapter(f"cellpose:{weights}", device="cpu", dropout_p=0.2, mc_scope="head")
    np.testing.assert_array_equal(full.predict_proba(images), head.predict_proba(images))
    a, b = full.mc_proba(images, passes=4), head.mc_proba(images, passes=4)
    assert np.abs(b[0] - b[1]).max() > 1e-4 and np.abs(a - b).max() > 1e-3
    quiet = load_adapter(f"cellpose:{weights}", device="cpu", dropout_p=1e-9, mc_scope="head")
    np.testing.assert_allclose(quiet.mc_proba(images, passes=2)[1], quiet.predict_proba(images), atol=1e-5)


@pytest.mark.parametrize("scope", ["full", "partial", "head"])
def test_every_patch_sees_the_same_masks_whatever_the_batch(weights, images, scope):
    """Common random numbers: a patch's T samples do not depend on which other patches share the call."""
    model = load_adapter(f"cellpose:{weights}", device="cpu", dropout_p=0.2, mc_scope=scope)
    together = model.mc_proba(images, passes=3, seed=7)
    for i in range(len(images)):
        np.testing.assert_allclose(model.mc_proba(images[i], passes=3, seed=7), together[:, i], atol=1e-5)
    assert np.abs(model.mc_proba(images, passes=3, seed=8) - together).max() > 1e-3


def test_partial_scope_keeps_the_last_sites_masks_and_computes_the_rest_once(weights, images):
    """Partial MC: the network up to the last mc_depth activation calls runs once per patch, the passes repeat only
    the rest, with the full scope's masks there (as deep as the network: the full scope itself)."""
    full = load_adapter(f"cellpose:{weights}", device="cpu", dropout_p=0.2, mc_scope="full")
    assert load_adapter(f"cellpose:{weights}", device="cpu").mc_scope == "partial"  # the default
    sites = len([m for m in full.net.modules() if isinstance(m, (torch.nn.ReLU, torch.nn.GELU))])
    whole = load_adapter(f"cellpose:{weights}", device="cpu", dropout_p=0.2, mc_scope="partial", mc_depth=sites)
    np.testing.assert_allclose(whole.mc_proba(images, passes=3, seed=2), full.mc_proba(images, passes=3, seed=2),
                               atol=1e-5)
    last = load_adapter(f"cellpose:{weights}", device="cpu", dropout_p=0.2, mc_scope="partial", mc_depth=1)
    last.mc_proba(images, passes=4, seed=1)  # traces the network once
    first_stage = last.net.encoder.blocks[0] if CPSAM else last.net.downsample
    first_layer = next(m for m in first_stage.modules() if not list(m.children()))  # a replayed stage's hooks run
    rows = []
    first_layer.register_forward_pre_hook(lambda module, inputs: rows.append(len(inputs[0])))
    samples = last.mc_proba(images, passes=4, seed=2)
    assert sum(rows) == len(images)  # once per image, never in the 4 passes
    assert np.abs(samples[0] - samples[1]).max() > 1e-4
    assert np.abs(samples - full.mc_proba(images, passes=4, seed=2)).max() > 1e-4


@cpsam_only
def test_cpsam_tokens_drop_whole_features_of_every_token(weights, images):
    """CPSAM's blocks hold tokens as (B, H, W, C): the MLP's GELU outputs lose whole features (last axis), the
    same ones at every token of a pass, and every encoder MLP is hooked."""
    from torch import nn

    from bioadapt.adapters.dropout import MCDropout

    model = load_adapter(f"cellpose:{weights}", device="cpu")
    gelus = [m for m in model.net.modules() if isinstance(m, nn.GELU)]
    assert len(gelus) == len(model.net.encoder.blocks) == 2
    seen: dict[str, torch.Tensor] = {}
    plain = gelus[0].register_forward_hook(lambda m, i, out: seen.setdefault("plain", out.clone()))
    mc = MCDropout(model.net, p=0.5)
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad(), mc.enabled(seed=1):
        dropped = gelus[0].register_forward_hook(lambda m, i, out: seen.setdefault("dropped", out.clone()))
        model.net(x)
    plain.remove(), dropped.remove()
    assert seen["plain"].shape == (2, 32, 32, 4 * SMALL_CPSAM["embed_dim"])
    factor = seen["dropped"] / seen["plain"]
    assert set(np.unique(np.round(factor.numpy(), 4))) == {0.0, 2.0}
    np.testing.assert_array_equal(factor, factor[:1, :1, :1].expand_as(factor))  # one mask for every token and row


def test_flows_from_ground_truth_give_back_the_labels(weights):
    from cellpose import dynamics

    model = load_adapter(f"cellpose:{weights}", device="cpu")
    _, labels = cell_patches("nuclei", 1, size=128, seed=6)[0]
    flows = dynamics.labels_to_flows([labels], device=torch.device("cpu"))[0]  # (labels, probability, dY, dX)
    cellprob = np.where(labels > 0, 10.0, -10.0).astype(np.float32)
    recovered = model.masks_from_flows(5 * flows[2:], cellprob)  # the network predicts flows x 5
    result = match_instances(recovered, labels)
    assert result.fp == 0 and result.fn == 0 and result.average_precision == 1.0, result


def test_training_defaults_are_train_segs_own():
    from cellpose import train

    defaults = CellposeTrainParams()
    signature = inspect.signature(train.train_seg).parameters
    assert defaults.learning_rate == signature["learning_rate"].default
    assert defaults.weight_decay == signature["weight_decay"].default
    assert defaults.batch_size == signature["batch_size"].default
    assert defaults.rescale == signature["rescale"].default
    assert (defaults.learning_rate, defaults.weight_decay) == ((1e-5, 0.1) if CPSAM else (0.005, 1e-5))
    assert CellposeTrainParams.from_any({"epochs": 3}).learning_rate == defaults.learning_rate
    if CPSAM:
        with pytest.raises(BioadaptError, match="256 x 256 crops"):
            CellposeTrainParams.from_any({"bsize": 224})


def _training_params():
    """A short run that visibly lowers the loss: a higher rate than train_seg's default (which warms up from 0
    over 10 epochs), crops the size of the patches."""
    if CPSAM:
        return {"epochs": 12, "learning_rate": 2e-3, "batch_size": 2, "min_train_masks": 1}
    return {"epochs": 12, "bsize": 96, "batch_size": 4, "min_train_masks": 1}


def test_fine_tune_lowers_the_loss_saves_reloadable_weights_and_stops(weights, images, tmp_path):
    model = load_adapter(f"cellpose:{weights}", device="cpu")
    rescale_before = model.rescale()
    history = []
    params = _training_params()
    result = model.fine_tune(cell_patches("nuclei", 6, size=96, seed=1), params, progress=history.append)
    assert len(history) == 12 and not result.stopped and (result.n_train, result.n_val) == (4, 2)
    first, last = np.mean([h["loss"] for h in history[:3]]), np.mean([h["loss"] for h in history[-3:]])
    assert last < 0.8 * first, (first, last)
    assert any(h["val_loss"] is not None for h in history)
    saved = model.save(tmp_path / "tuned")
    again = load_adapter(f"cellpose:{saved}", device="cpu")  # through the same loader, as Cellpose's GUI does
    assert again.rescale() == model.rescale()
    if CPSAM:  # Cellpose 4 ignores the training cells' diameter: no resizing unless a diameter is given
        assert model.rescale() == rescale_before == 1.0 and model.diam_labels != 30.0
    np.testing.assert_array_equal(again.predict_proba(images), model.predict_proba(images))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())

    calls = []
    stopped = model.fine_tune(cell_patches("nuclei", 6, size=96, seed=1), dict(params, epochs=50),
                              stop=lambda: calls.append(1) or len(calls) > 2, validate_on=[0, 3, 4])
    assert stopped.stopped and stopped.epochs_run == 2
    assert stopped.n_val == 2 and set(stopped.val_patches) <= {0, 3, 4}  # test set: patches the weights never saw
    with pytest.raises(BioadaptError, match="no training patch"):
        model.fine_tune(cell_patches("nuclei", 2, size=32, seed=1), {"min_train_masks": 50})


def test_diameter_resizes_as_cellposes_own_eval(weights, images):
    model = load_adapter(f"cellpose:{weights}", device="cpu", diameter=15.0)
    assert model.rescale() == pytest.approx(30.0 / 15.0 if CPSAM else model.diam_mean / 15.0)
    assert model.predict_proba(images).shape == (2, 2, 64, 64)  # run at twice the size, resized back
    with pytest.raises(BioadaptError, match="diameter must be > 0"):
        load_adapter(f"cellpose:{weights}", device="cpu", diameter=0)


@cpsam_only
def test_bfloat16_runs_close_to_float32_and_saves_float32(weights, images, tmp_path):
    plain = load_adapter(f"cellpose:{weights}", device="cpu")
    half = load_adapter(f"cellpose:{weights}", device="cpu", bfloat16=True)
    assert plain.dtype == torch.float32 and half.dtype == torch.bfloat16
    np.testing.assert_allclose(half.predict_proba(images), plain.predict_proba(images), atol=0.05)
    assert half.mc_proba(images, passes=2, scope="head").dtype == np.float32
    assert all(v.dtype == torch.float32 for v in half.state_dict().values() if v.is_floating_point())
    again = load_adapter(f"cellpose:{half.save(tmp_path / 'half')}", device="cpu", bfloat16=True)
    np.testing.assert_array_equal(again.predict_proba(images), half.predict_proba(images))


@cpsam_only
def test_weights_of_the_other_generation_or_no_weights_fail_clearly(tmp_path):
    torch.save({"downsample.down.res_down_0.conv.conv_0.2.weight": torch.zeros(1)}, tmp_path / "cp3")
    with pytest.raises(BioadaptError, match="not Cellpose 4 .* cellpose<4"):
        load_adapter(f"cellpose:{tmp_path / 'cp3'}", device="cpu")
    (tmp_path / "text").write_text("not weights")
    with pytest.raises(BioadaptError, match="could not read Cellpose weights"):
        load_adapter(f"cellpose:{tmp_path / 'text'}", device="cpu")


@cpsam_only
def test_a_torchvision_that_does_not_fit_torch_is_explained(tmp_path):
    """The error PyPI's torchvision raises next to a torch it was not built for, from a torchvision placed first
    on the path: load_adapter turns it into a BioadaptError that says what to install."""
    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from bioadapt.adapters import load_adapter
        from bioadapt.errors import BioadaptError
        try:
            load_adapter("cellpose:cpsam", device="cpu")
        except BioadaptError as e:
            print("BioadaptError:", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "BioadaptError: Cellpose 4 cannot be imported: torchvision does not match" in out.stdout, out.stderr
    assert "torchvision::nms" in out.stdout and "constraints.txt" in out.stdout


def test_missing_weights_and_offline_builtin_names_fail_clearly(tmp_path):
    with pytest.raises(BioadaptError, match="neither a file nor a built-in"):
        load_adapter(f"cellpose:{tmp_path / 'missing'}")
    with pytest.raises(BioadaptError, match=r"cellpose:/path/to/weights"):
        load_adapter("cellpose:cpsam" if CPSAM else "cellpose:cyto3", device="cpu")
    with pytest.raises(BioadaptError, match="unknown Cellpose fine-tuning parameters"):
        CellposeTrainParams.from_any({"lr": 1})


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~2 minutes on 2 quiet cores; far more on a shared, busy machine
@cpsam_only
def test_full_size_cpsam_predicts_scores_trains_and_reloads(tmp_path):
    """Cellpose-SAM at full size (ViT-L, 305 M parameters, random weights: nothing is downloaded) through every
    path once on the CPU, with train_seg's own defaults for one epoch. About 2 minutes and 11 GB at peak."""
    from bioadapt.adapters.cpsam import VIT_L, build_cpsam

    torch.manual_seed(0)
    build_cpsam().save_model(str(tmp_path / "vitl"))
    model = load_adapter(f"cellpose:{tmp_path / 'vitl'}", device="cpu", mc_scope="head")
    assert model.network_kwargs() == VIT_L and sum(p.numel() for p in model.net.parameters()) > 300e6
    pairs = cell_patches("nuclei", 2, size=256, seed=1)
    image = pairs[0][0]
    proba = model.predict_proba(image)
    assert proba.shape == (2, 256, 256)
    head = model.mc_proba(image, passes=3)
    assert head.shape == (3, 2, 256, 256) and np.abs(head[0] - head[1]).max() > 0
    assert model.mc_proba(image, passes=2, scope="full").shape == (2, 2, 256, 256)
    result = model.fine_tune(pairs, {"epochs": 1, "min_train_masks": 1})
    assert result.epochs_run == 1 and model.training_record.params["learning_rate"] == 1e-5
    tuned = model.predict_proba(image)
    saved = model.save(tmp_path / "tuned")
    del model
    np.testing.assert_array_equal(load_adapter(f"cellpose:{saved}", device="cpu").predict_proba(image), tuned)


@pytest.mark.gpu
@cuda
def test_on_the_gpu_in_cellposes_precision(weights, images, tmp_path):
    """On CUDA: Cellpose 4 runs in bfloat16 by default (Cellpose's own choice), Cellpose 3 in float32; every
    path runs on the GPU and matches the CPU within the precision."""
    gpu = load_adapter(f"cellpose:{weights}", device="cuda")
    cpu = load_adapter(f"cellpose:{weights}", device="cpu")
    assert gpu.dtype == (torch.bfloat16 if CPSAM else torch.float32)
    assert next(gpu.net.parameters()).is_cuda
    np.testing.assert_allclose(gpu.predict_proba(images), cpu.predict_proba(images), atol=0.05 if CPSAM else 1e-3)
    for scope in ("full", "partial", "head"):
        samples = gpu.mc_proba(images, passes=4, scope=scope)
        assert samples.shape == (4, 2, 2, 64, 64) and np.abs(samples[0] - samples[1]).max() > 0
    assert gpu.segment(images).shape == (2, 64, 64)
    gpu.fine_tune(cell_patches("nuclei", 6, size=96, seed=1), dict(_training_params(), epochs=2))
    assert gpu.dtype == (torch.bfloat16 if CPSAM else torch.float32)  # train_seg converts back after training
    again = load_adapter(f"cellpose:{gpu.save(tmp_path / 'tuned')}", device="cuda")
    np.testing.assert_array_equal(again.predict_proba(images), gpu.predict_proba(images))
