"""Real community descriptions (../shared/data/zoo): every torch description goes the whole way, ONNX runs for
inference and scoring, everything else is refused at load with one sentence.

The whole way: load, describe, predict (equal to bioimageio.core's own prediction of the same description by the
same route), MC passes that differ and scores that are not zero, segment, one epoch of fine-tuning, export,
bioimageio.core's test of the export (``export_bioimageio`` raises unless it passes), and the export predicting
like the tuned model.

Fixed input shapes: the fixed shape is a block with the halo inside it. An image of that shape is one pass (the
package's own test output, within the description's reproducibility tolerance), larger images go in such blocks
as core's fixed blocking does, smaller ones are padded at their end to one block.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from bioimageio.core import create_prediction_pipeline
from bioimageio.core.axis import AxisId
from bioimageio.core.sample import Sample
from bioimageio.core.tensor import Tensor
from bioimageio.spec import load_model_description
from scipy import ndimage

from bioadapt.active import bald
from bioadapt.adapters import load_adapter
from bioadapt.adapters.bioimageio_tiling import Plan
from bioadapt.adapters.shapes import activation_bytes
from bioadapt.data.synthetic import synthetic_cells
from bioadapt.errors import BioadaptError
from bioadapt.exporters import export_bioimageio
from shared_data import shared_folder
from zoo_corpus import (BY_NAME, NUCLEI, REFUSED, RUNS, ZOO, Description, assert_within_tolerance, no_network,
                        runnable)

# our path and core's run the same network on the same pre-processed blocks; only the batch size of the forward
# calls differs (and with it the order of float operations in the convolutions)
ATOL = 1e-4


@pytest.fixture(autouse=True)
def _offline_one_thread(monkeypatch, tmp_path):
    shared_folder("zoo")
    no_network(monkeypatch, tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(description: Description, model, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n (image, instance labels) pairs for the model: crops of the package's own test input where it has a 2D one
    (labels from a threshold: enough for one epoch), synthetic cells otherwise; uint8-valued where the model takes
    uint8."""
    info = model.describe()
    test_input = (ZOO / description.rdf).parent / "test_input.npy"
    smallest = model.layout.grid.smallest
    if test_input.is_file() and len(smallest) == 2:
        real = np.load(test_input).astype(np.float32)
        real = real.reshape(1, *real.shape[-2:])
        size = [min(s, 256) for s in real.shape[1:]]
        rng = np.random.default_rng(seed)
        images, labels = [], []
        for _ in range(n):
            corner = [int(rng.integers(0, s - c + 1)) for s, c in zip(real.shape[1:], size)]
            crop = real[(slice(None), *[slice(c, c + k) for c, k in zip(corner, size)])]
            images.append(crop)
            labels.append(ndimage.label(crop[0] > np.percentile(crop, 70))[0])
        return np.stack(images), np.stack(labels)
    shape = [max(s, 48) for s in smallest] if len(smallest) == 2 else list(smallest)
    images, labels = [], []
    for i in range(n):
        cells = synthetic_cells(shape, "nuclei", seed=seed + i)
        image = cells.image.astype(np.float32)
        if description.uint8:
            image = np.round(image / image.max() * 255)
        images.append(image[:info.input_channels])
        labels.append(cells.labels)
    return np.stack(images), np.stack(labels)


def _core(descr, images: np.ndarray, plan, weights_format: str) -> np.ndarray:
    """bioimageio.core's prediction of each image by the route the plan names:

    - whole with the halo and nothing added: ``predict_sample_without_blocking`` (core pads by the halo itself);
    - whole without the halo and nothing added (the image is the fixed input): the model test's route, no padding
      and no cropping;
    - blocks: ``predict_sample_with_fixed_blocking`` with the plan's block shape;
    - whole with padding up to a valid shape (core refuses such images): core's pre-processing of the image and its
      halo, then padding at the end with the description's pad mode, then core's prediction of that.
    """
    pipeline = create_prediction_pipeline(descr, weights_format=weights_format)
    member = descr.inputs[0].id
    ids = [str(a.id) for a in descr.inputs[0].axes]
    spatial = [a for a in ("z", "y", "x") if a in ids]
    outputs = []
    for image in images:
        sample = Sample(members={member: _tensor(image, ids)}, stat={}, id=0)
        halo = [h if plan.whole and plan.halo else 0 for h in _halo(descr, spatial)]
        if not plan.whole:
            blocks = {member: {AxisId(a): s for a, s in zip(spatial, plan.shape)}}
            result = pipeline.predict_sample_with_fixed_blocking(sample, input_block_shape=blocks)
        elif not any(plan.extra) and plan.halo:
            result = pipeline.predict_sample_without_blocking(sample)
        else:
            sample = sample.pad({member: {AxisId(a): (h, h) for a, h in zip(spatial, halo)}}, pipeline.pad_mode)
            pipeline.apply_preprocessing(sample)
            sample = sample.pad({member: {AxisId(a): (0, e) for a, e in zip(spatial, plan.extra)}},
                                pipeline.pad_mode)
            result = pipeline.predict_sample_without_blocking(sample, skip_preprocessing=True,
                                                              skip_input_padding=True, skip_output_cropping=True)
        tensor = result.members[descr.outputs[0].id]
        order = [AxisId(a) for a in ("batch", "channel", *spatial) if AxisId(a) in tensor.dims]
        array = tensor.transpose(order).data.to_numpy()
        array = array.reshape(-1, *array.shape[-len(spatial):])  # (K, *spatial): batch 1, size-1 axes dropped
        if plan.whole and (any(plan.extra) or not plan.halo):
            array = array[(slice(None), *[slice(h, h + n) for h, n in zip(halo, image.shape[1:])])]
        outputs.append(array)
    return np.stack(outputs)


def _halo(descr, spatial: list[str]) -> list[int]:
    from bioimageio.core.common import Halo
    from bioimageio.core.digest_spec import get_input_halo

    output = descr.outputs[0]
    halos = {output.id: {a.id: Halo(a.halo, a.halo) for a in output.axes if getattr(a, "halo", None)}}
    found = get_input_halo(descr, halos).get(descr.inputs[0].id, {})
    return [found[AxisId(a)].left if AxisId(a) in found else 0 for a in spatial]


def _tensor(image: np.ndarray, ids: list[str]) -> Tensor:
    """A (C, *spatial) image as a core tensor in the description's axis order."""
    canonical = ["batch", "channel", *[a for a in ("z", "y", "x") if a in ids]]
    array = image[None] if "channel" in ids else image
    present = [a for a in canonical if a in ids]
    return Tensor(np.transpose(array, [present.index(a) for a in ids]), dims=tuple(AxisId(a) for a in ids))


def _described(rdf: Path, description: Description, model):
    """The description core should run for the comparison (bioadapt's rewrite where spec cannot convert it)."""
    if description.rewritten:
        return model.description
    return load_model_description(rdf, perform_io_checks=False, format_version="latest")


# slow: each description runs its real network at its real size (the nuclei models take only 512 x 512, the 3D
# one is tested by core at up to 64^3 x 2); 24-103 s each on 2 cores shared with other jobs
@pytest.mark.slow
@pytest.mark.parametrize("description", RUNS, ids=[d.name for d in RUNS])
def test_the_whole_chain(description, tmp_path):
    rdf = runnable(description, tmp_path)
    model = load_adapter(rdf, device="cpu", dropout_p=0.2, **description.options)
    info = model.describe()
    assert info.trainable and info.sample_source == description.sample_source
    assert info.mc_dropout in (("hooks", "existing") if description.sample_source == "dropout" else ("none",))

    images, labels = _images(description, model, 2, seed=1)
    proba = model.predict_proba(images)
    assert proba.shape == (2, info.n_classes, *images.shape[2:]) and proba.dtype == np.float32
    plan = model.tiling_plan(images.shape[2:])
    reference = _core(_described(rdf, description, model), images, plan,
                      description.core_weights or info.weights_format)
    if description.options.get("output_activation") == "sigmoid":  # the description leaves it to the user
        reference = 1 / (1 + np.exp(-reference))
    np.testing.assert_allclose(proba, reference, atol=ATOL)

    samples = model.mc_proba(images, passes=3, seed=3)
    assert samples.shape == (3, *proba.shape)
    assert np.abs(samples[1] - samples[2]).max() > 1e-4
    assert bald(samples[:, 0], activation=info.activation).mean() > 0

    segmentation = model.segment(images)
    assert segmentation.shape == (2, *images.shape[2:]) and segmentation.dtype == np.int32

    result = model.fine_tune(list(zip(images, labels)), {"epochs": 1, "batch_size": 1, "augment": False})
    assert result.epochs_run == 1 and result.n_train == 1 and result.n_val == 1

    tuned = model.predict_proba(images)
    out = export_bioimageio(model, tmp_path / "tuned", name=f"{info.name} tuned", description="one epoch",
                            authors=["Test Author"], license="CC-BY-4.0", as_folder=True)
    again = load_adapter(out, device="cpu", **description.options)
    np.testing.assert_allclose(again.predict_proba(images), tuned, atol=ATOL)


def _test_pair(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    return np.load(folder / "test_input.npy").astype(np.float32)[0], np.load(folder / "test_output.npy")[0]


# slow: three weight formats of a real 512 x 512 network, each on five image shapes (~1 min on 2 busy cores)
@pytest.mark.slow
@pytest.mark.parametrize("name, weights_format", [("nuclei-broad-torchscript", None),
                                                  ("nuclei-broad-state-dict", None),
                                                  ("nuclei-broad-torchscript", "onnx")])
def test_a_fixed_input_is_one_block_with_its_halo_inside(name, weights_format, tmp_path):
    """unet2d_nuclei_broad takes exactly 512 x 512 with a halo of 32: on its own test input it gives its own test
    output (one pass, as the zoo's model test runs it), and images of other sizes give core's prediction by the
    route their plan names: blocks of 512 x 512 with the halo inside for larger ones, one padded block for smaller
    ones; MC passes and segment follow the same blocks."""
    description = BY_NAME[name]
    rdf = runnable(description, tmp_path)
    options = {"weights_format": weights_format} if weights_format else {}
    model = load_adapter(rdf, device="cpu", **options)
    descr = _described(rdf, description, model)
    core_weights = weights_format or description.core_weights or model.describe().weights_format

    test_input, test_output = _test_pair(ZOO / NUCLEI)
    assert model.tiling_plan((512, 512)) == Plan(True, (512, 512), (0, 0), halo=False)
    assert_within_tolerance(model.predict_proba(test_input), test_output, descr)

    rng = np.random.default_rng(0)
    for shape, whole in [((600, 530), False), ((513, 512), False), ((300, 260), True), ((480, 500), True)]:
        image = (test_input[:, :shape[0], :shape[1]] if all(s <= 512 for s in shape) else
                 rng.random((1, *shape)).astype(np.float32))
        plan = model.tiling_plan(shape)
        assert plan.whole == whole and plan.shape == (512, 512), (shape, plan)
        proba = model.predict_proba(image[None])
        reference = _core(descr, image[None], plan, core_weights)
        assert_within_tolerance(proba, reference, descr)
        np.testing.assert_allclose(proba, reference, atol=ATOL)

    image = rng.random((1, 530, 300)).astype(np.float32)  # blocks: two in y, one padded block's width in x
    proba = model.predict_proba(image)
    kept = load_adapter(rdf, device="cpu", dropout_p=1e-9, fixed_shape="keep", **options)
    passes = kept.mc_proba(image, passes=2, seed=5)
    np.testing.assert_allclose(passes[0], proba, atol=ATOL)  # pass 0: the prediction itself (TTA: identity)
    assert model.segment(image).shape == (530, 300)


def test_a_fully_convolutional_fixed_shape_network_scores_and_trains_on_smaller_inputs(tmp_path):
    """unet2d_nuclei_broad's network gives its 512 x 512 outputs from 72 x 72 up in steps of 8: a 128-pixel patch
    is scored and trained as one 192 x 192 input (a seventh of the pixels) and scores as the fixed shape does;
    prediction keeps the described shape. Without a halo nothing shows the cut windows agree: it keeps 512."""
    rdf = runnable(BY_NAME["nuclei-broad-state-dict"], tmp_path)
    model = load_adapter(rdf, device="cpu", dropout_p=1e-9)
    kept = load_adapter(rdf, device="cpu", dropout_p=1e-9, fixed_shape="keep")
    grid = model.work_tiling.grid
    assert grid.smallest == (72, 72) and [s.step for s in grid.sizes] == [8, 8]
    assert model.work_tiling.plan((128, 128)) == Plan(True, (192, 192), (0, 0))
    assert model.tiling_plan((128, 128)).shape == (512, 512) and kept.work_tiling is kept.tiling

    test_input, _ = _test_pair(ZOO / NUCLEI)
    patches = np.stack([test_input[:, 100:228, 200:328], test_input[:, 384:512, 0:128]])
    np.testing.assert_allclose(model.mc_proba(patches, passes=2, seed=3), kept.mc_proba(patches, passes=2, seed=3),
                               atol=0.01)
    np.testing.assert_allclose(model.predict_proba(test_input), kept.predict_proba(test_input), atol=ATOL)

    seen = []
    model.module.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    labels, _ = ndimage.label(patches[:, 0] > np.median(patches))
    model.fine_tune([(p, lab) for p, lab in zip(patches, labels)], {"epochs": 1, "val_fraction": 0.0})
    assert seen and set(seen) == {(192, 192)}

    no_halo = load_adapter(runnable(BY_NAME["nuclei-broad-no-halo"], tmp_path / "no-halo"), device="cpu")
    assert no_halo.work_tiling is no_halo.tiling


def test_onnx_weights_predict_like_core_score_by_augmentation_and_are_not_tuned(tmp_path):
    model = load_adapter(ZOO / NUCLEI / "bioimageio.yaml", device="cpu", weights_format="onnx")
    info = model.describe()
    assert (info.weights_format, info.trainable, info.sample_source, info.mc_dropout) == ("onnx", False, "tta",
                                                                                          "none")
    images, labels = _images(BY_NAME["nuclei-broad-torchscript"], model, 1, seed=4)
    plan = model.tiling_plan(images.shape[2:])
    assert plan.whole and plan.shape == (512, 512)  # ONNX takes exactly 512 x 512: never 576
    reference = _core(load_model_description(ZOO / NUCLEI / "bioimageio.yaml", perform_io_checks=False), images,
                      plan, "onnx")
    np.testing.assert_allclose(model.predict_proba(images), reference, atol=ATOL)
    assert model.segment(images).shape == (1, 256, 256)
    samples = model.mc_proba(images, passes=4, seed=1)
    assert np.abs(samples[1] - samples[2]).max() > 1e-3 and bald(samples[:, 0], activation="sigmoid").mean() > 0
    with pytest.raises(BioadaptError, match="cannot be fine-tuned"):
        model.fine_tune(list(zip(images, labels)))


def test_torchscript_without_dropout_is_refused_dropout_with_what_to_pass_instead():
    with pytest.raises(BioadaptError, match="TorchScript without dropout layers.*pass sample_source='tta'") as e:
        load_adapter(ZOO / NUCLEI / "bioimageio.yaml", device="cpu", sample_source="dropout")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("rdf", sorted(REFUSED))
def test_refused_at_load_with_one_sentence(rdf, tmp_path):
    with pytest.raises(BioadaptError, match=REFUSED[rdf]) as refusal:
        load_adapter(ZOO / rdf, device="cpu")
    assert "\n" not in str(refusal.value)


def test_volumes_beyond_the_memory_budget_go_in_blocks_like_core(tmp_path):
    """The 3D platynereis model with a small memory budget: a volume goes in blocks, exactly as core's fixed
    blocking with that block shape; within the default budget the same volume is one whole pass, as core's."""
    description = BY_NAME["platynereis-nuclei-3d"]
    rdf = runnable(description, tmp_path)
    roomy = load_adapter(rdf, device="cpu")
    volume = np.round(np.random.default_rng(3).random((1, 1, 44, 48, 64)) * 255).astype(np.float32)
    one_block = roomy.network_input(volume[0][:, :32, :32, :32])
    tight = load_adapter(rdf, device="cpu", memory_budget=int(1.2 * activation_bytes(roomy.module, one_block)))
    descr = load_model_description(rdf, perform_io_checks=False, format_version="latest")
    for model, whole in [(roomy, True), (tight, False)]:
        plan = model.tiling_plan(volume.shape[2:])
        assert plan.whole == whole, plan
        np.testing.assert_allclose(model.predict_proba(volume), _core(descr, volume, plan, "pytorch_state_dict"),
                                   atol=ATOL)


def test_the_corpus_reproduces_its_own_test_outputs():
    """The corpus is what its authors published: core's prediction of each package's test input (as its model
    test runs it: no padding, no cropping) matches the package's test output."""
    from bioimageio.core.digest_spec import get_test_input_sample, get_test_output_sample

    for rdf, weights_format in [(f"{NUCLEI}/bioimageio.yaml", "torchscript"), (f"{NUCLEI}/bioimageio.yaml", "onnx")]:
        descr = load_model_description(ZOO / rdf, perform_io_checks=False)
        pipeline = create_prediction_pipeline(descr, weights_format=weights_format)
        result = pipeline.predict_sample_without_blocking(get_test_input_sample(descr), skip_input_padding=True,
                                                          skip_output_cropping=True)
        for member, tensor in get_test_output_sample(descr).members.items():
            assert_within_tolerance(result.members[member].data.to_numpy(), tensor.data.to_numpy(), descr)


def test_the_fixed_shape_package_gives_its_test_output_through_torch_em(tmp_path):
    """unet2d_fixed_shape (format 0.4, fixed 256 x 256, halo 8, real weights) runs its state dict in torch-em's
    UNet2d from PyPI and reproduces its own test output."""
    description = BY_NAME["fixed-shape-0.4"]
    model = load_adapter(runnable(description, tmp_path), device="cpu", **description.options)
    test_input, test_output = _test_pair(ZOO / "spec" / "unet2d_fixed_shape")
    logits = np.log(model.predict_proba(test_input)) - np.log1p(-model.predict_proba(test_input))
    assert_within_tolerance(logits, test_output, model.description)


def _as_0_5_with(rdf: Path, edit) -> Path:
    """The description converted to format 0.5, edited by ``edit(dict)`` and written beside the original."""
    import yaml

    descr = load_model_description(rdf, perform_io_checks=False, format_version="latest")
    content = descr.model_dump(mode="json", exclude_unset=True, exclude_none=True)
    edit(content)
    out = rdf.parent / "edited.bioimageio.yaml"
    out.write_text(yaml.safe_dump(content, sort_keys=False))
    return out


def _axis(tensor: dict, axis_id: str) -> dict:
    return next(a for a in tensor["axes"] if a.get("id", {"space": "x"}.get(a["type"], a["type"])) == axis_id)


def test_an_input_axis_tied_to_another_and_an_offset_output(tmp_path):
    """The epithelia model with its x size tied to its y size (a size reference within the input): square
    network inputs, any image shape, equal to core; the same model with an output 16 pixels smaller than its
    input is refused at load, naming the axis."""
    epithelia = BY_NAME["epithelia-affinity"]
    rdf = runnable(epithelia, tmp_path)

    def square(content):
        for tensor in (content["inputs"][0], content["outputs"][0]):  # the spec wants references to resolve
            _axis(tensor, "x")["size"] = {"tensor_id": content["inputs"][0]["id"], "axis_id": "y"}

    tied = _as_0_5_with(rdf, square)
    model = load_adapter(tied, device="cpu")
    images, _ = _images(epithelia, model, 1, seed=5)
    images = images[..., :48]  # 64 x 48: the network input must be square, and at least 96 x 96
    plan = model.tiling_plan(images.shape[2:])
    assert plan.whole and plan.shape == (96, 96) and plan.extra == (0, 16)
    reference = _core(load_model_description(tied, perform_io_checks=False), images, plan, "pytorch_state_dict")
    np.testing.assert_allclose(model.predict_proba(images), reference, atol=ATOL)

    def smaller(content):
        _axis(content["outputs"][0], "y")["size"]["offset"] = -16

    with pytest.raises(BioadaptError, match="output axis y is 16 pixels smaller than the input"):
        load_adapter(_as_0_5_with(rdf, smaller), device="cpu")


def test_a_fixed_shape_without_halo_gives_its_test_output_and_blocks_without_overlap(tmp_path):
    description = BY_NAME["nuclei-broad-no-halo"]
    rdf = runnable(description, tmp_path)
    model = load_adapter(rdf, device="cpu")
    assert model.describe().halo == (0, 0)
    test_input, test_output = _test_pair(ZOO / NUCLEI)
    assert_within_tolerance(model.predict_proba(test_input), test_output, model.description)
    image = np.concatenate([test_input, test_input[:, :100]], axis=1)  # 612 x 512: two blocks in y
    plan = model.tiling_plan(image.shape[1:])
    assert not plan.whole
    np.testing.assert_allclose(model.predict_proba(image[None]), _core(_described(rdf, description, model),
                                                                       image[None], plan, "pytorch_state_dict"),
                               atol=ATOL)

