"""The adapter interface every model kind implements, and the plain records it exchanges."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bioadapt.errors import BioadaptError

OutputKind = Literal["sigmoid", "softmax", "cellpose"]
MC_SCOPES: tuple[str, ...] = ("full", "partial", "head")  # where MC dropout acts (see adapters/dropout.py)
DROPOUT_KINDS: tuple[str, ...] = ("channel", "element")
Progress = Callable[[dict[str, Any]], None]
Stop = Callable[[], bool]
# Every adapter's defaults, read from here by the service's schemas, the clients, the page (through the schemas) and
# the demo. The fine-tuning defaults are each adapter's params class (FineTuneParams, CellposeTrainParams).
DEFAULT_MC_PASSES = 16  # T: stochastic passes per patch (ranking stability measured at 16: docs/design.md, 4.)
DEFAULT_DROPOUT_P = 0.05  # where MC dropout is added (hooks) or replaces a layer's own p (element masks)


@dataclass(frozen=True)
class ModelInfo:
    """What ``describe()`` returns: everything a caller needs to feed the model and read its outputs.

    Arrays go in as (B, C, [Z], Y, X) with ``input_channels`` channels, or as one image (C, [Z], Y, X), or
    (for single-channel models) ([Z], Y, X): :func:`check_images` holds the rule. Any spatial shape is accepted
    (the adapter pads to ``min_shape + k * step`` plus ``halo`` and crops back).
    """

    kind: str  # "bioimageio" or "cellpose"
    name: str
    source: str
    axes: str  # canonical axes of one input array, "cyx" or "czyx"
    input_channels: int
    min_shape: tuple[int, ...]
    step: tuple[int, ...]
    halo: tuple[int, ...]
    output_kind: OutputKind
    n_classes: int  # softmax classes, or sigmoid channels
    class_names: tuple[str, ...]
    weights_format: str
    trainable: bool
    mc_dropout: str  # "existing" dropout layers, "hooks" after activations, or "none"
    mc_scopes: tuple[str, ...]
    dropout_p: float
    instances: bool = True  # segment() gives instances (one id per object), not classes
    patch_features: bool = False  # patch_features() works: selection rules that read features can be used
    sample_source: str = "dropout"  # where mc_proba's passes differ: "dropout" or "tta" (test-time augmentation)
    segments_passes: bool = False  # segment_samples() works: each MC pass gives instance labels

    @property
    def activation(self) -> str:
        """What the acquisition functions should be told: Cellpose's (1-p, p) pairs are two softmax classes."""
        return "sigmoid" if self.output_kind == "sigmoid" else "softmax"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"activation": self.activation}


LR_SCHEDULES = ("cosine", "constant")
VAL_METRICS = ("dice", "f1")


@dataclass
class FineTuneParams:
    # 100 epochs: at 20 (lr 5e-4) random labels left a fresh BBBC039 test set's F1 where the demo's base had it.
    # 3e-4 rather than 3e-3: a pre-trained network (the zoo's unet2d_nuclei_broad) lost up to 0.5 F1 at 3e-3 from 2
    # labels and kept or gained at 3e-4 (benchmarks/finetune_pilot.py, service_al.py; docs/strategies.md). Early
    # stopping ends runs whose held-out score has settled.
    epochs: int = 100
    learning_rate: float = 3e-4
    batch_size: int = 4
    weight_decay: float = 1e-4
    val_fraction: float = 0.25
    augment: bool = True
    freeze_batchnorm: bool = True  # a handful of patches gives batch statistics too noisy to keep
    # "cosine": the learning rate falls to 0 over the run, so the last weights are settled rather than one noisy
    # step of many (at a constant rate test F1 swung by 0.1 between neighbouring checkpoints); "constant": off
    lr_schedule: str = "cosine"
    # early stopping: the run ends when the held-out score has not beaten its best for this many epochs (0: never;
    # None: a quarter of the run, at least 5). The best weights are kept either way. A fixed 5 lost 0.035-0.051 F1
    # on 100-epoch runs (best epochs came late), 20 lost 0-0.007; on 20-epoch runs 5 cost at most 0.005
    # (benchmarks/results/early_stopping.json)
    patience: int | None = None
    # what the held-out split's best epoch is chosen by: "dice" (pixels of the training targets) or "f1" (objects
    # at IoU 0.5, as the project's verdict judges instance models; not for models that segment classes). None: f1
    # for models that segment objects, dice for the others. On Kromp's nuclei, Dice kept the base weights where
    # labels had taught the model to split touching nuclei (docs/strategies.md)
    val_metric: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.val_metric is not None and self.val_metric not in VAL_METRICS:
            raise BioadaptError(f"fine-tuning parameter val_metric={self.val_metric!r} is not known; choose one of "
                                f"{VAL_METRICS}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise BioadaptError(f"fine-tuning parameter lr_schedule={self.lr_schedule!r} is not known; choose one "
                                f"of {LR_SCHEDULES}")
        if self.patience is not None and self.patience < 0:
            raise BioadaptError(f"fine-tuning parameter patience must be a number of epochs >= 1, 0 to never stop "
                                f"early, or None for a quarter of the run; got {self.patience}")

    @property
    def patience_epochs(self) -> int:
        """Epochs without a better held-out score that end the run (0: never)."""
        return max(5, self.epochs // 4) if self.patience is None else self.patience

    @classmethod
    def from_any(cls, params: FineTuneParams | Mapping[str, Any] | None) -> FineTuneParams:
        return checked_params(cls, params, "fine-tuning")


def checked_params(cls: type, params: Any, what: str) -> Any:
    """``params`` (None, an instance, another params dataclass or a mapping) as a ``cls`` instance; unknown names
    are refused, not ignored, and epochs, batch size, learning rate and val_fraction are range-checked."""
    if params is None:
        return cls()
    if isinstance(params, cls):
        return params
    params = dict(params if isinstance(params, Mapping) else asdict(params))
    known = {f.name for f in fields(cls)}
    unknown = set(params) - known
    if unknown:
        raise BioadaptError(f"unknown {what} parameters {sorted(unknown)}; known: {sorted(known)}")
    out = cls(**params)
    if out.epochs < 1 or out.batch_size < 1 or out.learning_rate <= 0 or not 0 <= out.val_fraction < 1:
        raise BioadaptError(f"{what} parameters out of range: {out} (epochs, batch_size >= 1, learning_rate > 0, "
                            "0 <= val_fraction < 1)")
    return out


@dataclass
class FineTuneResult:
    epochs_run: int
    best_epoch: int  # 0: the starting weights stayed the best on the held-out patches
    initial_val_score: float | None
    best_val_score: float | None
    stopped: bool  # cancelled by the caller
    seconds: float
    n_train: int
    n_val: int
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False  # ended by early stopping: ``patience`` epochs without a better held-out score
    val_metric: str | None = None  # what the held-out scores are: "dice" or "f1" (FineTuneParams.val_metric)
    val_patches: list[int] = field(default_factory=list)  # the samples held out to choose the best epoch by

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def held_out_first(order: Sequence[int], n_val: int, eligible: Collection[int] | None) -> list[int]:
    """The ``n_val`` held-out samples of a shuffled ``order``: the first ones in ``eligible`` (those the starting
    weights never trained on; fewer when it has fewer), or the first of any when ``eligible`` is None or empty."""
    allowed = set(eligible) if eligible else set(order)
    return [i for i in order if i in allowed][:n_val]


@dataclass
class TrainingRecord:
    """What the last fine-tuning did, for exports: its parameters and result, and one of its real image patches
    (C, *spatial) for the package's test tensors (None when the weights came from a file)."""

    params: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    example_image: np.ndarray | None = None


class Adapter(ABC):
    """One model behind one interface: probabilities, MC samples, segmentation, fine-tuning, weights.

    ``training_record`` holds what the last ``fine_tune`` did (exporters write it into the package); a caller
    that loads fine-tuned weights from a file sets it with ``record_training``.
    """

    training_record: TrainingRecord | None = None

    def record_training(self, params: Mapping[str, Any], result: Mapping[str, Any],
                        example_image: np.ndarray | None = None) -> TrainingRecord:
        """Remember how the current weights were trained (kept: an example image from an earlier record)."""
        if example_image is None and self.training_record is not None:
            example_image = self.training_record.example_image
        self.training_record = TrainingRecord(dict(params), dict(result), example_image)
        return self.training_record

    @abstractmethod
    def describe(self) -> ModelInfo: ...

    @abstractmethod
    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(B, C, *spatial) images -> (B, K, *spatial) float32 probabilities, deterministic. One image,
        (C, *spatial) or a single-channel model's (*spatial), gives (K, *spatial) (see :func:`check_images`)."""

    @abstractmethod
    def mc_proba(self, x: np.ndarray, passes: int = DEFAULT_MC_PASSES, *, seed: int = 0,
                 scope: str | None = None) -> np.ndarray:
        """(B, C, *spatial) -> (T, B, K, *spatial) float32 probabilities from T passes with dropout on; one image
        gives (T, K, *spatial)."""

    @abstractmethod
    def segment(self, x: np.ndarray) -> np.ndarray:
        """(B, C, *spatial) -> (B, *spatial) int32 labels (instances or classes, see describe().output_kind); one
        image gives (*spatial)."""

    def segment_samples(self, samples: np.ndarray) -> np.ndarray:
        """(T, B, K, *spatial) MC samples (``mc_proba``'s) -> (T, B, *spatial) int32 labels: each pass segmented as
        ``segment`` segments the deterministic prediction (for maps of where the passes disagree on objects)."""
        raise BioadaptError(f"{self.describe().name} cannot segment its MC passes (its labels need more than "
                            "probabilities); use a map that needs none")

    def patch_features(self, x: np.ndarray) -> np.ndarray:
        """(B, C, *spatial) -> (B, D) float32: what the model itself sees in each image, pooled over space
        (deterministic), for acquisition that needs a descriptor per patch (diversity, typicality)."""
        raise BioadaptError(f"{self.describe().name} does not expose features; use an acquisition that needs "
                            "scores only")

    @abstractmethod
    def fine_tune(self, samples: Sequence[tuple[np.ndarray, np.ndarray]],
                  params: FineTuneParams | Mapping[str, Any] | None = None,
                  progress: Progress | None = None, stop: Stop | None = None,
                  validate_on: Sequence[int] | None = None) -> FineTuneResult:
        """Train on (image, labels (*spatial)) pairs, each image (C, *spatial) or a single-channel model's
        (*spatial) (see :func:`check_samples`); keeps the best weights on held-out pairs.

        ``validate_on``: the indices of the samples the held-out pairs may be drawn from (up to the
        ``val_fraction`` share): the ones the current weights never trained on. On a sample the weights learnt
        already the starting weights score best, so a split holding such samples keeps them where new labels
        taught something. None or empty: any sample."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

    @abstractmethod
    def save(self, path: str | Path) -> Path:
        """Write the current weights in the model's own format; returns the file written."""


def _one_image_shapes(info: ModelInfo) -> str:
    spatial = ", ".join(info.axes[1:].upper())
    return f"(C, {spatial}) or ({spatial})" if info.input_channels == 1 else f"(C, {spatial})"


def _shape_rule(info: ModelInfo) -> str:
    spatial = ", ".join(info.axes[1:].upper())
    return f"(B, C, {spatial}) for a batch or {_one_image_shapes(info)} for one image"


def check_images(x: Any, info: ModelInfo) -> tuple[np.ndarray, bool]:
    """The one input-shape rule of every adapter method that takes images (predict_proba, mc_proba, segment;
    fine_tune's samples through :func:`check_samples`): ``x`` may be

    - (B, C, *spatial): a batch; results keep the batch axis;
    - (C, *spatial): one image; results come back without a batch axis;
    - (*spatial): one image of a single-channel model (``input_channels == 1``); as (C, *spatial).

    A batch always carries its channel axis, so a (B, *spatial) stack is read as (C, *spatial) and refused when
    B differs from the model's channel count. Returns the (B, C, *spatial) float32 array and whether the caller
    gave one image (True: drop the batch axis from the results).
    """
    x = np.asarray(x)
    n_spatial = len(info.axes) - 1
    if x.ndim == n_spatial and info.input_channels == 1:
        x, single = x[None, None], True
    elif x.ndim == n_spatial + 1:
        x, single = x[None], True
    elif x.ndim == n_spatial + 2:
        single = False
    else:
        raise BioadaptError(f"{info.name} takes images shaped {_shape_rule(info)}; got shape {x.shape}")
    if x.shape[1] != info.input_channels:
        raise BioadaptError(f"{info.name} takes {info.input_channels} channel(s) but the image has {x.shape[1]} "
                            f"(shape {x.shape[1:] if single else x.shape}; shapes: {_shape_rule(info)}); pick the "
                            "channels with open_image(..., channels=[...])")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise BioadaptError(f"images must be real numbers, got dtype {x.dtype}")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise BioadaptError("the image holds NaN or infinite values; fill or mask them before scoring")
    return x, single


def check_samples(samples: Sequence[tuple[np.ndarray, np.ndarray]], info: ModelInfo
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Validated (float32 image (C, *spatial), int64 labels (*spatial)) pairs. Each image follows
    :func:`check_images`' rule for one image: (C, *spatial), or (*spatial) for a single-channel model."""
    if len(samples) == 0:
        raise BioadaptError("fine-tuning needs at least one (image, labels) pair")
    out = []
    for i, pair in enumerate(samples):
        if len(pair) != 2:
            raise BioadaptError(f"sample {i} must be an (image, labels) pair")
        image, labels = pair
        image, single = check_images(image, info)
        if not single:
            raise BioadaptError(f"sample {i}: the image has shape {image.shape}, a batch; give one image per pair, "
                                f"shaped {_one_image_shapes(info)}")
        labels = np.asarray(labels)
        if labels.shape != image.shape[2:]:
            raise BioadaptError(f"sample {i}: labels have shape {labels.shape} but the image's spatial shape is "
                                f"{image.shape[2:]}; labels must cover the patch exactly (no channel axis)")
        if not np.issubdtype(labels.dtype, np.integer) and not np.issubdtype(labels.dtype, np.bool_):
            if not np.array_equal(labels, np.round(labels)):
                raise BioadaptError(f"sample {i}: labels must be integers (instance ids or class indices), "
                                    f"got {labels.dtype} with fractions")
        if labels.min() < 0:
            raise BioadaptError(f"sample {i}: labels must be >= 0 (0 is background)")
        out.append((image[0], labels.astype(np.int64)))
    return out
