"""Cellpose models (3: CPnet, e.g. cyto3/nuclei; 4: CPSAM) behind the adapter interface.

The network is called directly on batches: Cellpose's ``eval()`` forces eval mode and no-grad and tiles each
image, which rules out stacked stochastic passes. Inputs are prepared exactly as Cellpose does (channel
selection with ``transforms.reshape``, percentile normalisation with ``transforms.normalize_img``, resizing by
``diam_mean / diameter``). Probabilities are the sigmoid of the cell-probability logit, as the two classes
(background, cell); masks come from Cellpose's own flow dynamics; fine-tuning wraps ``train.train_seg``.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

from bioadapt.adapters.allocator import tune_malloc
from bioadapt.adapters.base import (Adapter, FineTuneResult, ModelInfo, Progress, Stop, check_images,
                                    check_samples, checked_params)
from bioadapt.adapters.bioimageio import resolve_device
from bioadapt.adapters.dropout import CommonMasks, DropoutKind, HeadSplit, MCDropout, mc_strategy, stacked_passes
from bioadapt.adapters.shapes import activation_bytes, crop_from, default_memory_budget, pad_to, valid_shape
from bioadapt.errors import BioadaptError

log = logging.getLogger(__name__)
GENERATION = int(importlib.metadata.version("cellpose").split(".")[0])


@dataclass
class CellposeTrainParams:
    """train_seg's main hyper-parameters, with Cellpose's defaults for the installed generation.

    train_seg warms the learning rate up linearly from 0 over the first 10 epochs: runs of 10 epochs or
    fewer never train at the set rate.
    """

    epochs: int = 100
    learning_rate: float = 0.005 if GENERATION < 4 else 1e-5
    weight_decay: float = 1e-5 if GENERATION < 4 else 0.1
    batch_size: int = 8 if GENERATION < 4 else 1
    bsize: int = 224 if GENERATION < 4 else 256  # training crop side
    min_train_masks: int = 5
    rescale: bool = True
    val_fraction: float = 0.25
    seed: int = 0

    @classmethod
    def from_any(cls, params: Any) -> CellposeTrainParams:
        # FineTuneParams names without a Cellpose meaning (augment, freeze_batchnorm) are refused, not ignored
        return checked_params(cls, params, "Cellpose fine-tuning")


class _Stopped(Exception):
    pass


def _network_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def resolve_weights(name: str) -> tuple[str, bool]:
    """(what to hand Cellpose, is it a built-in name); local paths must exist (Cellpose would silently fall
    back to downloading its default model)."""
    from cellpose import models

    builtins = list(getattr(models, "MODEL_NAMES", [])) + ["cpsam"]
    path = Path(name).expanduser()
    if path.exists():
        return str(path), False
    if name in builtins:
        return name, True
    raise BioadaptError(f"Cellpose weights {name!r} are neither a file nor a built-in model; give "
                        f"cellpose:/path/to/weights or one of {sorted(set(builtins))}")


class CellposeAdapter(Adapter):
    """A Cellpose network with MC dropout through hooks, batched passes, flow-dynamics masks and train_seg."""

    def __init__(self, cp_model: Any, source: str, *, device: torch.device, dropout_p: float = 0.05,
                 mc_scope: str = "full", channels: Sequence[int] = (0, 0), diameter: float | None = None,
                 dropout_kind: DropoutKind = "channel", memory_budget: int | None = None,
                 flow_threshold: float = 0.4, cellprob_threshold: float = 0.0, min_size: int = 15,
                 input_channels: int = 1):
        if mc_scope not in ("full", "head"):
            raise BioadaptError(f"mc_scope must be 'full' or 'head', got {mc_scope!r}")
        self.cp_model = cp_model
        self.source = source
        self.device = device
        self.dropout_p, self.dropout_kind, self.mc_scope = dropout_p, dropout_kind, mc_scope
        self.channels = tuple(int(c) for c in channels)
        if len(self.channels) != 2 or min(self.channels) < 0:
            raise BioadaptError(f"channels must be Cellpose's [cytoplasm, nucleus] pair (1-based, 0 = none/gray), "
                                f"got {channels}")
        self.input_channels = max(input_channels, *self.channels)
        self.diameter = diameter
        self.flow_threshold, self.cellprob_threshold = flow_threshold, cellprob_threshold
        self.min_size = min_size  # masks smaller than this are dropped and holes filled, as Cellpose's eval does
        self.memory_budget = memory_budget or default_memory_budget(device)
        if device.type == "cpu":
            tune_malloc()
        self._head: HeadSplit | None = None
        self._bytes_per_sample: dict[tuple[int, ...], int] = {}
        MCDropout(self.net, dropout_p, dropout_kind)  # warns now if nothing can be made stochastic

    @classmethod
    def load(cls, name: str, device: str = "auto", dropout_p: float = 0.05, **options: Any) -> CellposeAdapter:
        from cellpose import models

        weights, builtin = resolve_weights(name)
        torch_device = resolve_device(device)
        kwargs: dict[str, Any] = dict(gpu=torch_device.type == "cuda", device=torch_device, pretrained_model=weights)
        if GENERATION < 4:
            kwargs["mkldnn"] = False  # the CPU default converts the net in place and breaks fine-tuning
        else:
            kwargs["use_bfloat16"] = False
        try:
            cp_model = models.CellposeModel(**kwargs)
        except OSError as e:  # urllib's URLError is an OSError: the download of a built-in model failed
            if builtin:
                raise BioadaptError(f"could not download Cellpose's built-in model {name!r} ({e}); without network "
                                    "download it elsewhere and give its file: cellpose:/path/to/weights") from e
            raise BioadaptError(f"could not load Cellpose weights {weights}: {e}") from e
        except RuntimeError as e:
            raise BioadaptError(f"{weights} are not Cellpose {GENERATION} weights: {e}") from e
        return cls(cp_model, f"cellpose:{name}", device=torch_device, dropout_p=dropout_p, **options)

    @property
    def net(self) -> torch.nn.Module:
        return self.cp_model.net

    # -- description -------------------------------------------------------------------------------------------
    def describe(self) -> ModelInfo:
        cpsam = GENERATION >= 4
        return ModelInfo(
            kind="cellpose", name=f"Cellpose {GENERATION} ({self.source.removeprefix('cellpose:')})",
            source=self.source, axes="cyx", input_channels=self.input_channels,
            min_shape=(256, 256) if cpsam else (16, 16), step=(256, 256) if cpsam else (8, 8), halo=(0, 0),
            output_kind="cellpose", n_classes=2, class_names=("background", "cell"),
            weights_format="cellpose", trainable=True, mc_dropout=mc_strategy(self.net), mc_scopes=("full", "head"),
            dropout_p=self.dropout_p)

    # -- the pipeline pieces -----------------------------------------------------------------------------------
    def _rescale(self) -> float:
        diam_mean = float(self.cp_model.diam_mean)
        if self.diameter:
            return diam_mean / self.diameter
        return diam_mean / float(getattr(self.cp_model, "diam_labels", diam_mean) or diam_mean)

    def _preprocess(self, x: np.ndarray) -> torch.Tensor:
        """Cellpose's own channel selection, percentile normalisation and resizing, per image."""
        from cellpose import models, transforms

        params = {**models.normalize_default, "normalize": True}
        rescale = self._rescale()
        out = []
        for image in x:
            yxc = np.moveaxis(image, 0, -1)
            if GENERATION < 4:
                yxc = transforms.reshape(yxc, channels=list(self.channels))
            else:  # CPSAM takes 3 channels: extra ones are cut, missing ones are zeros (as its convert_image does)
                yxc = np.concatenate([yxc[..., :3], np.zeros((*yxc.shape[:2], max(0, 3 - yxc.shape[-1])),
                                                               yxc.dtype)], axis=-1)
            yxc = transforms.normalize_img(yxc.astype(np.float32), axis=-1, **params)
            if rescale != 1:
                yxc = transforms.resize_image(yxc, rsz=rescale)
            out.append(np.moveaxis(yxc, -1, 0))
        return torch.from_numpy(np.stack(out).astype(np.float32)).to(self.device)

    def _valid(self, shape: Sequence[int]) -> tuple[int, ...]:
        info_min, info_step = ((256, 256), (256, 256)) if GENERATION >= 4 else ((16, 16), (8, 8))
        return valid_shape(shape, info_min, info_step, (0, 0))

    def _forward(self, padded: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) raw outputs: flows dY, dX and the cell-probability logit; CPSAM runs in 256 tiles."""
        tiles, untile = self._tiled(padded)
        return untile(_network_output(self.net(tiles)))

    @staticmethod
    def _tiled(padded: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """CPSAM takes exactly 256 x 256: (N, C, H, W) -> (N * tiles, C, 256, 256) and the inverse for outputs
        (identity for Cellpose 3 and for inputs of one tile)."""
        if GENERATION < 4 or padded.shape[-2:] == (256, 256):
            return padded, lambda out: out
        n, c, h, w = padded.shape
        tiles = padded.unfold(2, 256, 256).unfold(3, 256, 256)  # (N, C, h/256, w/256, 256, 256)
        rows, cols = tiles.shape[2], tiles.shape[3]

        def untile(out: torch.Tensor) -> torch.Tensor:
            out = out.reshape(-1, rows, cols, out.shape[1], 256, 256).permute(0, 3, 1, 4, 2, 5)
            return out.reshape(out.shape[0], -1, h, w)

        return tiles.permute(0, 2, 3, 1, 4, 5).reshape(-1, c, 256, 256), untile

    def _chunk(self, padded: torch.Tensor) -> int:
        key = tuple(padded.shape[1:])
        if key not in self._bytes_per_sample:
            self._bytes_per_sample[key] = activation_bytes(self.net, padded[:1])
        return max(1, self.memory_budget // self._bytes_per_sample[key])

    def _raw(self, x: np.ndarray) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
        """Deterministic raw outputs at network scale, the network-scale and the original spatial shapes."""
        pre = self._preprocess(x)
        shape = tuple(pre.shape[2:])
        padded = pad_to(pre, self._valid(shape), (0, 0))
        self.net.eval()
        size = self._chunk(padded)
        with torch.no_grad():
            raw = torch.cat([self._forward(padded[i:i + size]) for i in range(0, len(padded), size)])
        return crop_from(raw, shape, (0, 0)), shape, tuple(x.shape[2:])

    def _to_original(self, maps: np.ndarray, original: tuple[int, ...]) -> np.ndarray:
        """(N, K, h, w) maps at network scale -> (N, K, *original) (undoes the diameter resize)."""
        if maps.shape[2:] == original:
            return maps
        from cellpose import transforms

        return np.stack([np.moveaxis(transforms.resize_image(np.moveaxis(m, 0, -1), *original), -1, 0)
                         for m in maps])

    @staticmethod
    def _two_classes(logit: torch.Tensor) -> np.ndarray:
        p = torch.sigmoid(logit.float())
        return torch.stack([1 - p, p], dim=-3).cpu().numpy()

    # -- inference ---------------------------------------------------------------------------------------------
    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        x, single = check_images(x, self.describe())
        raw, _, original = self._raw(x)
        proba = self._to_original(self._two_classes(raw[:, 2]), original).astype(np.float32)
        return proba[0] if single else proba

    def mc_proba(self, x: np.ndarray, passes: int = 16, *, seed: int = 0, scope: str | None = None) -> np.ndarray:
        if passes < 1:
            raise BioadaptError(f"passes must be >= 1, got {passes}")
        scope = scope or self.mc_scope
        if scope not in ("full", "head"):
            raise BioadaptError(f"mc scope must be 'full' or 'head', got {scope!r}")
        x, single = check_images(x, self.describe())
        pre = self._preprocess(x)
        shape = tuple(pre.shape[2:])
        padded = pad_to(pre, self._valid(shape), (0, 0))
        n = len(padded)
        self.net.eval()
        with torch.no_grad():
            if scope == "head":
                if self._head is None:
                    self._head = HeadSplit(self.net, padded[:1], select=_network_output)
                features = self._head.features(self.net, padded)
                logits = self._head.passes(features, CommonMasks(seed, self.dropout_p, self.dropout_kind),
                                           passes)[:, 2]
            else:
                # hooks are attached per call: Cellpose's load_model re-creates submodules
                mc = MCDropout(self.net, self.dropout_p, self.dropout_kind)
                tiles, untile = self._tiled(padded)  # tiles before stacking: mask rows are whole network inputs
                chunk = max(1, self._chunk(padded) * len(padded) // len(tiles))
                logits = untile(stacked_passes(mc, lambda t: _network_output(self.net(t)), tiles, passes, chunk,
                                               seed))[:, 2]
        logits = logits[(slice(None), *[slice(0, s) for s in shape])]
        proba = self._to_original(self._two_classes(logits), x.shape[2:]).astype(np.float32)
        proba = proba.reshape(passes, n, 2, *x.shape[2:])
        return proba[:, 0] if single else proba

    def segment(self, x: np.ndarray) -> np.ndarray:
        """Instance labels from Cellpose's flow dynamics on the deterministic prediction."""
        x, single = check_images(x, self.describe())
        raw, _, original = self._raw(x)
        maps = self._to_original(raw.cpu().numpy(), original)
        out = np.stack([self.masks_from_flows(m[:2], m[2]) for m in maps])
        return out[0] if single else out

    def masks_from_flows(self, flows: np.ndarray, cellprob: np.ndarray) -> np.ndarray:
        """Cellpose's mask step: (2, H, W) flows and the (H, W) cell-probability logit -> int32 labels."""
        from cellpose import dynamics

        masks = dynamics.compute_masks(flows, cellprob, niter=200, cellprob_threshold=self.cellprob_threshold,
                                       flow_threshold=self.flow_threshold, min_size=self.min_size,
                                       device=self.device)
        masks = masks[0] if isinstance(masks, tuple) else masks  # some versions also return the pixel paths
        return np.asarray(masks, dtype=np.int32)

    # -- training ----------------------------------------------------------------------------------------------
    def fine_tune(self, samples: Sequence[tuple[np.ndarray, np.ndarray]], params: Any = None,
                  progress: Progress | None = None, stop: Stop | None = None) -> FineTuneResult:
        import time

        from cellpose import train

        params = CellposeTrainParams.from_any(params)
        pairs = check_samples(samples, self.describe())
        rng = np.random.default_rng(params.seed)
        order = rng.permutation(len(pairs)).tolist()
        n_val = 0 if len(pairs) < 2 or params.val_fraction == 0 else max(1, round(len(pairs) * params.val_fraction))
        val, training = [pairs[i] for i in order[:n_val]], [pairs[i] for i in order[n_val:]]
        enough = [p for p in training if len(np.unique(p[1])) - 1 >= params.min_train_masks]
        if not enough:
            raise BioadaptError(f"no training patch has {params.min_train_masks} cells or more (train_seg drops "
                                "such patches); annotate more cells or lower min_train_masks")
        history: list[dict[str, Any]] = []
        losses: dict[str, list[float]] = {"train": [], "val": []}
        epoch = {"n": 0}
        started = time.perf_counter()

        def report() -> None:
            record = {"epoch": epoch["n"], "epochs": params.epochs,
                      "loss": float(np.mean(losses["train"])) if losses["train"] else None,
                      "val_loss": float(np.mean(losses["val"])) if losses["val"] else None,
                      "seconds": round(time.perf_counter() - started, 3)}
            history.append(record)
            losses["train"].clear(), losses["val"].clear()
            if progress is not None:
                progress(dict(record))

        original_loss = train._loss_fn_seg
        original_train = type(self.net).train  # the class's method: the instance attribute below shadows it

        def counting_loss(lbl, y, device):
            value = original_loss(lbl, y, device)
            losses["train" if torch.is_grad_enabled() else "val"].append(float(value.detach()))
            return value

        def epoch_start(mode: bool = True):
            module = self.net
            if mode:  # train_seg calls net.train() once at the start of every epoch
                if epoch["n"] > 0:
                    report()
                if stop is not None and stop():
                    raise _Stopped
                epoch["n"] += 1
            return original_train(module, mode)

        stopped = False
        torch.manual_seed(params.seed)
        with tempfile.TemporaryDirectory() as save_path, \
                mock.patch.object(train, "_loss_fn_seg", counting_loss), \
                mock.patch.object(self.net, "train", epoch_start, create=True):
            arguments = dict(
                train_data=[p[0] for p in training], train_labels=[p[1] for p in training],
                test_data=[p[0] for p in val] or None, test_labels=[p[1] for p in val] or None,
                channels=list(self.channels), channel_axis=0, normalize=True, save_path=save_path,
                n_epochs=params.epochs, learning_rate=params.learning_rate, weight_decay=params.weight_decay,
                batch_size=params.batch_size, bsize=params.bsize, min_train_masks=params.min_train_masks,
                rescale=params.rescale, model_name="bioadapt")
            accepted = inspect.signature(train.train_seg).parameters  # Cellpose 4 dropped `channels`
            try:
                train.train_seg(self.net, **{k: v for k, v in arguments.items() if k in accepted})
                report()
            except _Stopped:
                stopped = True
        self.net.eval()
        self._sync_diameters()
        result = FineTuneResult(epochs_run=len(history), best_epoch=len(history), initial_val_score=None,
                                best_val_score=None, stopped=stopped, seconds=round(time.perf_counter() - started, 3),
                                n_train=len(training), n_val=len(val), history=history)
        self.record_training(asdict(params), result.to_dict(), example_image=pairs[0][0])
        return result

    # -- weights -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        try:
            self.net.load_state_dict(state, strict=True)  # strict: a key mismatch must not pass silently
        except RuntimeError as e:
            raise BioadaptError(f"these weights do not fit {self.describe().name}: {e}") from e
        self._sync_diameters()

    def _sync_diameters(self) -> None:
        """train_seg stores the training cells' mean diameter in the net; CellposeModel reads it only when
        loading a file, so mirror it here to predict as the saved model will after a reload."""
        self.cp_model.diam_labels = float(self.net.diam_labels.item())
        self._head = None

    def save(self, path: str | Path) -> Path:
        """Weights Cellpose itself loads (``CellposeModel(pretrained_model=path)``, the GUI's custom model)."""
        path = Path(path)
        if path.is_dir():
            path = path / "bioadapt_cellpose"
        self.net.save_model(str(path))
        return path
