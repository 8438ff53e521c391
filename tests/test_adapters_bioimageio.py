"""The bioimage.io adapter on tiny U-Nets exported in the test as real packages (state dict, torchscript, onnx)."""

import zipfile

import numpy as np
import pytest
import torch
from bioimageio.core import predict
from bioimageio.spec import load_model_description

from bioadapt.active import bald
from bioadapt.adapters import load_adapter
from bioadapt.adapters.shapes import activation_bytes
from bioadapt.errors import BioadaptError
from model_factory import cell_patches, unet_package

# bioimageio.core and our path run the same float32 network and the same pre-processing; what remains is the
# order of float operations in normalisation (xarray there, the same xarray ops here) and in the convolutions
# (batch size differs): 1e-5 on probabilities.
ATOL = 1e-5


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    root = tmp_path_factory.mktemp("packages")
    return {
        "dropout2d": unet_package(root / "dropout2d.zip", dropout=0.2),
        "bn3d": unet_package(root / "bn3d", dims=3, out_channels=3, batchnorm=True, output_activation="softmax",
                             weights=("pytorch_state_dict",), as_folder=True),
        "plain2d": unet_package(root / "plain2d.zip", out_channels=1, weights=("pytorch_state_dict", "torchscript")),
        "logits2d": unet_package(root / "logits2d.zip", out_channels=1, output_activation=None,
                                 weights=("pytorch_state_dict",)),
        "onnx2d": unet_package(root / "onnx2d.zip", weights=("onnx",)),
        "v04": unet_package(root / "v04.zip", out_channels=1, weights=("pytorch_state_dict",), format_version="0.4"),
    }


@pytest.fixture(scope="module")
def image2d():
    return np.stack([p[0] for p in cell_patches("nuclei", 2, size=64, seed=3)])  # (2, 1, 64, 64)


def _core_prediction(package, image):
    descr = load_model_description(package, perform_io_checks=False)
    sample = predict(model=descr, inputs=image)
    return next(iter(sample.members.values())).data.to_numpy()


def test_loads_from_zip_folder_and_rdf_with_the_same_description(packages, tmp_path):
    folder = tmp_path / "unzipped"
    with zipfile.ZipFile(packages["dropout2d"]) as z:
        z.extractall(folder)
    infos = [load_adapter(src, device="cpu").describe() for src in
             (packages["dropout2d"], folder, folder / "rdf.yaml")]
    assert infos[0].to_dict() | {"source": ""} == infos[1].to_dict() | {"source": ""} == \
        infos[2].to_dict() | {"source": ""}
    info = infos[0]
    assert (info.axes, info.input_channels, info.output_kind, info.n_classes) == ("cyx", 1, "sigmoid", 2)
    assert info.class_names == ("foreground", "boundaries")
    assert info.weights_format == "pytorch_state_dict" and info.trainable and info.mc_dropout == "existing"
    assert info.mc_scopes == ("full", "partial", "head")


def test_predict_proba_equals_bioimageio_core(packages, image2d):
    model = load_adapter(packages["dropout2d"], device="cpu")
    ours = model.predict_proba(image2d)
    for i in range(len(image2d)):
        np.testing.assert_allclose(ours[i], _core_prediction(packages["dropout2d"], image2d[i:i + 1])[0], atol=ATOL)
    assert ours.dtype == np.float32 and ours.shape == (2, 2, 64, 64)


def test_predict_proba_3d_softmax_batchnorm_equals_bioimageio_core(packages):
    rng = np.random.default_rng(0)
    image = rng.normal(100, 20, (1, 1, 16, 32, 32)).astype(np.float32)
    model = load_adapter(packages["bn3d"], device="cpu")
    ours = model.predict_proba(image)
    np.testing.assert_allclose(ours, _core_prediction(packages["bn3d"], image), atol=ATOL)
    np.testing.assert_allclose(ours.sum(1), 1, atol=1e-5)
    labels = model.segment(image)
    assert labels.shape == (1, 16, 32, 32) and labels.max() <= 2


def test_any_patch_shape_is_padded_and_cropped_back(packages, image2d):
    model = load_adapter(packages["dropout2d"], device="cpu")
    odd = image2d[:, :, :50, :37]
    proba = model.predict_proba(odd)
    assert proba.shape == (2, 2, 50, 37)
    single = model.predict_proba(odd[0])
    assert single.shape == (2, 50, 37)
    np.testing.assert_allclose(single, proba[0], atol=ATOL)
    # the interior of a padded patch agrees with the same pixels predicted in a larger context
    full = model.predict_proba(image2d)
    assert np.abs(proba[:, :, 8:40, 8:30] - full[:, :, 8:40, 8:30]).mean() < 0.05


def test_mc_passes_differ_are_seeded_and_leave_the_network_unchanged(packages, image2d):
    model = load_adapter(packages["dropout2d"], device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deterministic = model.predict_proba(image2d)
    samples = model.mc_proba(image2d, passes=6, seed=1)
    assert samples.shape == (6, 2, 2, 64, 64) and samples.dtype == np.float32
    assert np.abs(samples[0] - samples[1]).max() > 1e-3
    np.testing.assert_array_equal(samples, model.mc_proba(image2d, passes=6, seed=1))
    assert np.abs(samples - model.mc_proba(image2d, passes=6, seed=2)).max() > 1e-3
    np.testing.assert_array_equal(model.predict_proba(image2d), deterministic)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.module.training


def test_hooked_mc_mean_approaches_the_deterministic_output_as_p_goes_to_zero(packages, image2d):
    errors = []
    for p in (0.2, 0.02, 1e-4):
        model = load_adapter(packages["plain2d"], device="cpu", dropout_p=p)
        assert model.describe().mc_dropout == "hooks"
        mean = model.mc_proba(image2d, passes=16).mean(0)
        errors.append(float(np.abs(mean - model.predict_proba(image2d)).mean()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-3, errors


def _one_row_budget(package, image):
    """A memory budget that holds the forward of exactly one network input like ``image`` (not two)."""
    probe = load_adapter(package, device="cpu")
    return int(1.5 * activation_bytes(probe.module, probe.network_input(image)))


def _forward_calls(model):
    calls = []
    model.module.register_forward_pre_hook(lambda module, inputs: calls.append(len(inputs[0])))
    return calls


def test_passes_are_split_into_calls_that_fit_the_memory_budget(packages, image2d):
    roomy = load_adapter(packages["plain2d"], device="cpu", dropout_p=1e-9, mc_scope="full")
    tight = load_adapter(packages["plain2d"], device="cpu", dropout_p=1e-9, mc_scope="full",
                         memory_budget=_one_row_budget(packages["plain2d"], image2d[0]))
    assert tight.tiling_plan((64, 64)) == roomy.tiling_plan((64, 64))  # the budget holds one whole image
    roomy_calls, tight_calls = _forward_calls(roomy), _forward_calls(tight)
    np.testing.assert_allclose(tight.mc_proba(image2d, passes=3), roomy.mc_proba(image2d, passes=3), atol=ATOL)
    assert tight_calls == [1] * 6 and roomy_calls == [6]


@pytest.mark.parametrize("name,scope", [("plain2d", "full"), ("dropout2d", "full"), ("plain2d", "head"),
                                        ("plain2d", "partial"), ("dropout2d", "partial")])
def test_a_patch_gets_the_same_mc_samples_whatever_its_batch(packages, image2d, name, scope):
    """Common random numbers: the masks of a round are the same for every patch and every batching, so a
    patch's samples (and its score) do not depend on which patches share its forward calls."""
    roomy = load_adapter(packages[name], device="cpu", dropout_p=0.2, mc_scope=scope)
    tight = load_adapter(packages[name], device="cpu", dropout_p=0.2, mc_scope=scope,
                         memory_budget=_one_row_budget(packages[name], image2d[0]))
    together = roomy.mc_proba(image2d, passes=5, seed=7)
    assert np.ptp(together, axis=0).max() > 1e-3  # the passes differ
    for i in range(len(image2d)):
        alone = tight.mc_proba(image2d[i], passes=5, seed=7)
        np.testing.assert_allclose(alone, together[:, i], atol=ATOL)
    # the same image twice in one batch: identical samples, pass by pass
    twice = roomy.mc_proba(np.stack([image2d[0], image2d[0]]), passes=5, seed=7)
    np.testing.assert_allclose(twice[:, 0], twice[:, 1], atol=ATOL)


def test_head_scope(packages, image2d):
    model = load_adapter(packages["plain2d"], device="cpu", mc_scope="head", dropout_p=0.3, dropout_kind="element")
    samples = model.mc_proba(image2d, passes=4)
    assert samples.shape == (4, 2, 1, 64, 64) and np.abs(samples[0] - samples[1]).max() > 1e-3
    quiet = load_adapter(packages["plain2d"], device="cpu", mc_scope="head", dropout_p=1e-9)
    np.testing.assert_allclose(quiet.mc_proba(image2d, passes=2)[1], quiet.predict_proba(image2d), atol=ATOL)


@pytest.mark.parametrize("scope", ["full", "partial", "head"])
def test_a_rounds_masks_are_drawn_once_for_all_its_patches(packages, image2d, scope, mask_draws):
    """The service scores a round patch by patch: every scope keeps the round's masks between calls and draw
    new ones only for a new seed."""
    model = load_adapter(packages["plain2d"], device="cpu", mc_scope=scope, dropout_p=0.3, dropout_kind="element")
    first = model.mc_proba(image2d[:1], passes=3, seed=7)
    drawn = len(mask_draws)
    assert drawn > 0
    np.testing.assert_array_equal(model.mc_proba(image2d[:1], passes=3, seed=7), first)
    model.mc_proba(image2d[1:], passes=3, seed=7)
    assert len(mask_draws) == drawn
    model.mc_proba(image2d[:1], passes=3, seed=8)
    assert len(mask_draws) == 2 * drawn


def test_partial_scope_is_the_full_scope_without_the_early_masks(packages, image2d):
    """mc_scope="partial" keeps the masks of the last mc_depth dropout sites, with the full scope's keys: as deep as
    the network it is the full scope exactly; shallower, its passes differ less from each other than the full
    scope's, and with p ~ 0 it predicts as the network does."""
    full = load_adapter(packages["plain2d"], device="cpu", dropout_p=0.3, dropout_kind="element", mc_scope="full")
    sites = full.mc.patched_layers
    assert full.describe().mc_scopes == ("full", "partial", "head")
    assert load_adapter(packages["plain2d"], device="cpu").mc_scope == "partial"  # the default where it works
    whole = load_adapter(packages["plain2d"], device="cpu", dropout_p=0.3, dropout_kind="element",
                         mc_scope="partial", mc_depth=sites)
    np.testing.assert_allclose(whole.mc_proba(image2d, passes=4, seed=3), full.mc_proba(image2d, passes=4, seed=3),
                               atol=ATOL)
    last = load_adapter(packages["plain2d"], device="cpu", dropout_p=0.3, dropout_kind="element",
                        mc_scope="partial", mc_depth=2)
    spread = [np.ptp(m.mc_proba(image2d, passes=6, seed=3), axis=0).mean() for m in (last, full)]
    assert 1e-4 < spread[0] < spread[1], spread
    quiet = load_adapter(packages["plain2d"], device="cpu", dropout_p=1e-9, mc_scope="partial")
    np.testing.assert_allclose(quiet.mc_proba(image2d, passes=2)[1], quiet.predict_proba(image2d), atol=ATOL)
    with pytest.raises(BioadaptError, match="mc_depth must be >= 1"):
        load_adapter(packages["plain2d"], device="cpu", mc_scope="partial", mc_depth=0)


def test_each_pass_is_segmented_as_the_prediction_is(packages, image2d):
    """segment_samples gives each MC pass's instances by the model's own rule (the pass-disagreement map reads them):
    with p ~ 0 every pass is the prediction, so its labels are segment()'s."""
    quiet = load_adapter(packages["plain2d"], device="cpu", dropout_p=1e-9)
    assert quiet.describe().segments_passes
    labels = quiet.segment_samples(quiet.mc_proba(image2d, passes=2))
    assert labels.shape == (2, *image2d.shape[:1], *image2d.shape[2:])
    np.testing.assert_array_equal(labels[1], quiet.segment(image2d))
    assert labels.max() > 0


def test_torchscript_weights_predict_like_the_state_dict_and_use_their_dropout(packages, image2d):
    script = load_adapter(packages["dropout2d"], device="cpu", weights_format="torchscript")
    state = load_adapter(packages["dropout2d"], device="cpu")
    info = script.describe()
    assert (info.weights_format, info.mc_dropout, info.mc_scopes) == ("torchscript", "existing", ("full",))
    np.testing.assert_allclose(script.predict_proba(image2d), state.predict_proba(image2d), atol=ATOL)
    samples = script.mc_proba(image2d, passes=3)
    assert np.abs(samples[0] - samples[1]).max() > 1e-3
    with pytest.raises(BioadaptError, match="not available"):
        script.mc_proba(image2d, passes=2, scope="head")


def test_segment_gives_instances_for_foreground_boundary_models(packages, image2d):
    model = load_adapter(packages["dropout2d"], device="cpu")
    labels = model.segment(image2d)
    assert labels.shape == (2, 64, 64) and labels.dtype == np.int32
    proba = model.predict_proba(image2d)
    assert ((labels > 0) == (proba[:, 0] > 0.5)).all()


def test_onnx_is_inference_only_and_samples_by_test_time_augmentation(packages, image2d):
    model = load_adapter(packages["onnx2d"], device="cpu")
    info = model.describe()
    assert (info.weights_format, info.trainable, info.sample_source, info.mc_scopes) == ("onnx", False, "tta",
                                                                                         ("full",))
    proba = model.predict_proba(image2d[:1])
    np.testing.assert_allclose(proba, _core_prediction(packages["onnx2d"], image2d[:1]), atol=ATOL)
    assert model.segment(image2d).shape == (2, 64, 64)
    with pytest.raises(BioadaptError, match="pytorch_state_dict"):
        model.fine_tune(cell_patches("nuclei", 2))
    samples = model.mc_proba(image2d, passes=8, seed=2)
    np.testing.assert_allclose(samples[0, :1], proba, atol=ATOL)  # pass 0 is the image itself
    assert bald(samples[:, 0], activation=info.activation).mean() > 0  # the passes disagree: scores are not zero
    np.testing.assert_allclose(model.mc_proba(image2d[1:], passes=8, seed=2)[:, 0], samples[:, 1], atol=ATOL)


def test_unknown_output_kind_needs_output_activation(packages, image2d):
    with pytest.raises(BioadaptError, match="output_activation='sigmoid' or 'softmax'"):
        load_adapter(packages["logits2d"], device="cpu")
    model = load_adapter(packages["logits2d"], device="cpu", output_activation="sigmoid")
    raw = _core_prediction(packages["logits2d"], image2d[:1])
    expected = 1 / (1 + np.exp(-raw))
    assert np.abs(expected - raw).max() > 0.05  # applying the sigmoid or not is visible
    np.testing.assert_allclose(model.predict_proba(image2d[:1]), expected, atol=ATOL)
    with pytest.raises(BioadaptError, match="contradicts"):
        load_adapter(packages["dropout2d"], device="cpu", output_activation="softmax")


def test_format_0_4_package(packages, image2d):
    model = load_adapter(packages["v04"], device="cpu")
    assert model.describe().output_kind == "sigmoid"
    np.testing.assert_allclose(model.predict_proba(image2d[:1]), _core_prediction(packages["v04"], image2d[:1]),
                               atol=ATOL)


def test_bad_images_and_labels(packages, image2d):
    model = load_adapter(packages["dropout2d"], device="cpu")
    with pytest.raises(BioadaptError, match="takes 1 channel"):
        model.predict_proba(np.zeros((1, 3, 64, 64), np.float32))
    nan = image2d.copy()
    nan[0, 0, 5, 5] = np.nan
    with pytest.raises(BioadaptError, match="NaN"):
        model.mc_proba(nan, passes=2)
    with pytest.raises(BioadaptError, match="shaped"):  # (Y, X) is one image of this one-channel model; 5D is not
        model.segment(np.zeros((2, 1, 1, 64, 64), np.float32))
    image, labels = cell_patches("nuclei", 1)[0]
    with pytest.raises(BioadaptError, match="labels have shape"):
        model.fine_tune([(image, labels[:32])])
    with pytest.raises(BioadaptError, match="unknown fine-tuning parameters"):
        model.fine_tune([(image, labels)], {"epoch": 3})


def test_missing_files_zoo_ids_and_urls_fail_clearly_offline(tmp_path):
    with pytest.raises(BioadaptError, match="does not exist"):
        load_adapter(tmp_path / "nope.zip")
    with pytest.raises(BioadaptError, match="without rdf.yaml"):
        load_adapter(tmp_path)
    for source in ("affable-shark", "https://127.0.0.1:9/models/rdf.yaml"):
        with pytest.raises(BioadaptError, match="need the network"):
            load_adapter(source)


def test_weights_round_trip(packages, image2d, tmp_path):
    model = load_adapter(packages["plain2d"], device="cpu")
    other = load_adapter(unet_package(tmp_path / "other.zip", out_channels=1, seed=7,
                                      weights=("pytorch_state_dict",)), device="cpu")
    assert np.abs(other.predict_proba(image2d) - model.predict_proba(image2d)).max() > 1e-3
    path = model.save(tmp_path / "weights.pt")
    other.load_state_dict(torch.load(path, weights_only=True))
    np.testing.assert_array_equal(other.predict_proba(image2d), model.predict_proba(image2d))
    with pytest.raises(BioadaptError, match="do not fit"):
        other.load_state_dict({"head.weight": torch.zeros(1)})
    script = load_adapter(packages["plain2d"], device="cpu", weights_format="torchscript")
    saved = script.save(tmp_path)
    assert saved.name == "weights-torchscript.pt"
    reloaded = torch.jit.load(saved)
    assert set(reloaded.state_dict()) == set(script.state_dict())


def test_patch_features_pool_the_last_feature_maps_and_do_not_depend_on_the_batch(packages, image2d):
    model = load_adapter(packages["plain2d"], device="cpu")
    together = model.patch_features(image2d)
    assert together.shape == (2, 8) and together.dtype == np.float32  # mean and std of 4 feature maps
    np.testing.assert_allclose(model.patch_features(image2d[1:]), together[1:], atol=ATOL)
    assert np.abs(together[0] - together[1]).max() > 1e-4  # different images, different features
    np.testing.assert_allclose(model.patch_features(image2d), together)  # deterministic: no dropout
