"""Cellpose models behind the adapter interface: Cellpose 3 (CPnet, e.g. cyto3, nuclei) and Cellpose 4
(Cellpose-SAM, "CPSAM": a ViT-L encoder, a 1x1 readout and a fixed pixel-shuffling upsampling).

The network is called directly on batches: Cellpose's ``eval()`` forces eval mode and no-grad and tiles each
image, which rules out stacked stochastic passes. Inputs are prepared as Cellpose prepares them (channel
selection, percentile normalisation with ``transforms.normalize_img``, resizing by the diameter), the outputs are
resized back to the image; probabilities are the sigmoid of the cell-probability logit, as the two classes
(background, cell); masks come from Cellpose's own flow dynamics; fine-tuning wraps ``train.train_seg``.

Diameter, as each generation's own ``CellposeModel.eval`` does it:
- Cellpose 3: images are resized by ``diam_mean / diameter``; without a ``diameter``, by ``diam_mean /
  diam_labels``, the training cells' mean diameter that ``train_seg`` stores in the weights (CellposeModel reads
  both from a weights file; after ``fine_tune`` or ``load_state_dict`` the adapter takes them from the network,
  so a tuned model predicts as its saved and reloaded self).
- Cellpose 4: images are resized by ``30 / diameter`` (CPSAM's ``diam_mean``, fixed at 30); without a
  ``diameter`` they are not resized. ``diam_labels`` is ignored, so tuned and reloaded models rescale alike.
CPSAM takes exactly 256 x 256 inputs: larger ones run as 256 x 256 tiles, padded to multiples of 256.

Precision: Cellpose 4 runs in bfloat16 on GPUs (Cellpose's default, ``use_bfloat16``) and in float32 on CPUs
(bfloat16 measured ~5x slower than float32 here); ``bfloat16=True/False`` overrides. Cellpose 3 runs in float32.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

import numpy as np
import torch

from bioadapt.adapters.allocator import tune_malloc
from bioadapt.adapters.base import (DEFAULT_DROPOUT_P, DEFAULT_MC_PASSES, Adapter, FineTuneResult, ModelInfo,
                                    Progress, Stop, check_images, check_samples, checked_params, held_out_first)
from bioadapt.adapters.bioimageio import resolve_device
from bioadapt.adapters.dropout import (MC_SCOPES, CommonMasks, DropoutKind, HeadSplit, MCDropout, check_scope,
                                       mc_strategy, round_masks, stacked_passes)
from bioadapt.adapters.partial import PartialSplit, partial_passes
from bioadapt.adapters.shapes import activation_bytes, crop_from, default_memory_budget, pad_to, valid_shape
from bioadapt.errors import BioadaptError

log = logging.getLogger(__name__)


def _installed_generation() -> int:
    """Cellpose's major version, 0 when it is not installed (``import_cellpose`` then says how to install it)."""
    try:
        return int(importlib.metadata.version("cellpose").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return 0


GENERATION = _installed_generation()
CPSAM_DIAMETER = 30.0  # Cellpose 4's eval resizes images by 30 / diameter
CPSAM_TILE = 256  # the only input size CPSAM's position embedding fits
_NITER = 200  # flow-dynamics steps at network scale (Cellpose's default; its eval scales it by 1 / rescale)
# MC defaults, from benchmarks/bench_cellpose_defaults.py and bench_napari_activelearning.py (results/*.md):
# partial MC over the last MLP activation of Cellpose-SAM (one ViT-L forward, then 16 cheap passes; full MC took
# ~15 minutes a patch) or the last DEPTH_CPNET activations of CPnet; element masks, because channel masks gave
# pool rankings that did not repeat between round seeds (Spearman -0.55 on a random CPSAM, element 0.999).
DEFAULT_MC_SCOPE = "partial"
DEPTH_CPSAM, DEPTH_CPNET = 1, 2
DEFAULT_MC_DEPTH = DEPTH_CPSAM if GENERATION >= 4 else DEPTH_CPNET  # dropout sites from the end (mc_scope="partial")
DEFAULT_DROPOUT_KIND: DropoutKind = "element"


@dataclass
class CellposeTrainParams:
    """train_seg's main hyper-parameters, with ``train_seg``'s own defaults for the installed generation
    (Cellpose 3: lr 0.005, weight decay 1e-5, batch 8, 224 crops, rescaling by diameter; Cellpose 4: lr 1e-5,
    weight decay 0.1, batch 1, 256 crops, no rescaling).

    train_seg warms the learning rate up linearly from 0 over the first 10 epochs: runs of 10 epochs or
    fewer never train at the set rate.
    """

    epochs: int = 100
    learning_rate: float = 0.005 if GENERATION < 4 else 1e-5
    weight_decay: float = 1e-5 if GENERATION < 4 else 0.1
    batch_size: int = 8 if GENERATION < 4 else 1
    bsize: int = 224 if GENERATION < 4 else CPSAM_TILE  # training crop side; CPSAM takes 256 only
    min_train_masks: int = 5
    rescale: bool = GENERATION < 4  # resize training images by their cells' diameter (train_seg's default)
    val_fraction: float = 0.25
    seed: int = 0

    @classmethod
    def from_any(cls, params: Any) -> CellposeTrainParams:
        # FineTuneParams names without a Cellpose meaning (augment, freeze_batchnorm) are refused, not ignored
        out = checked_params(cls, params, "Cellpose fine-tuning")
        if GENERATION >= 4 and out.bsize != CPSAM_TILE:
            raise BioadaptError(f"Cellpose 4 (CPSAM) trains on {CPSAM_TILE} x {CPSAM_TILE} crops only; got bsize "
                                f"{out.bsize}: leave bsize out")
        return out


class _Stopped(Exception):
    pass


def _network_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def import_cellpose() -> ModuleType:
    """``cellpose.models``, or a BioadaptError that says how to repair the installation."""
    try:
        from cellpose import models
    except ImportError as e:
        raise BioadaptError(f"Cellpose cannot be imported here ({e}); install it with `pip install -c "
                            "constraints.txt cellpose` (constraints.txt pins the torch it needs)") from e
    except RuntimeError as e:  # torchvision's compiled operators do not fit the installed torch
        raise BioadaptError(
            f"Cellpose {GENERATION} cannot be imported: torchvision does not match the installed torch ({e}). "
            "Cellpose 4 imports torchvision; install a torch and torchvision built for each other, e.g. "
            "`pip install -c constraints.txt torch torchvision` (constraints.txt pins a matching pair)") from e
    return models


def resolve_weights(name: str) -> tuple[str, bool]:
    """(what to hand Cellpose, is it a built-in name); local paths must exist (Cellpose would silently fall
    back to downloading its default model)."""
    models = import_cellpose()
    builtins = list(getattr(models, "MODEL_NAMES", [])) + (["cpsam"] if GENERATION >= 4 else [])
    path = Path(name).expanduser()
    if path.exists():
        return str(path), False
    if name in builtins:
        return name, True
    raise BioadaptError(f"Cellpose weights {name!r} are neither a file nor a built-in model; give "
                        f"cellpose:/path/to/weights or one of {sorted(set(builtins))}")


def _downloaded(name: str, error: OSError) -> BioadaptError:
    return BioadaptError(f"could not download Cellpose's built-in model {name!r} ({error}); without network "
                         "download it elsewhere and give its file: cellpose:/path/to/weights")


def _load_cellpose3(name: str, device: torch.device) -> tuple[torch.nn.Module, float, float]:
    """(CPnet, diam_mean, diam_labels) as Cellpose 3's CellposeModel loads them."""
    models = import_cellpose()
    weights, builtin = resolve_weights(name)
    try:  # mkldnn off: the CPU default converts the net in place during eval and breaks fine-tuning
        cp_model = models.CellposeModel(gpu=device.type == "cuda", device=device, pretrained_model=weights,
                                        mkldnn=False)
    except OSError as e:  # urllib's URLError is an OSError: the download of a built-in model failed
        if builtin:
            raise _downloaded(name, e) from e
        raise BioadaptError(f"could not load Cellpose weights {weights}: {e}") from e
    except RuntimeError as e:
        raise BioadaptError(f"{weights} are not Cellpose 3 weights (a Cellpose 4 model needs cellpose>=4): {e}") from e
    diam_mean = float(cp_model.diam_mean)
    return cp_model.net, diam_mean, float(getattr(cp_model, "diam_labels", diam_mean) or diam_mean)


def _load_cpsam(name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Cellpose's CPSAM with the encoder size the weights were trained with, loaded strictly (Cellpose's own
    loader is not strict: keys that do not fit are silently left random)."""
    models = import_cellpose()
    from bioadapt.adapters.cpsam import build_cpsam, encoder_size

    weights, builtin = resolve_weights(name)
    if builtin and name.startswith("cpdino"):
        raise BioadaptError(f"{name!r} is Cellpose-DINO; bioadapt adapts Cellpose-SAM models (cpsam, cpsam_v2)")
    if builtin:
        try:
            weights = models.cache_model_path(name)
        except OSError as e:
            raise _downloaded(name, e) from e
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises pickle, zip and runtime errors for files that are not state dicts
        raise BioadaptError(f"could not read Cellpose weights {weights}: {type(e).__name__}: {e}") from e
    if not isinstance(state, Mapping) or "W2" not in state:
        raise BioadaptError(f"{weights} are not Cellpose 4 (CPSAM) weights; a Cellpose 3 model needs cellpose<4")
    if "encoder.cls_token" in state:
        raise BioadaptError(f"{weights} are Cellpose-DINO weights; bioadapt adapts Cellpose-SAM (cpsam) models")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel, as Cellpose allows
    try:
        net = build_cpsam(**encoder_size(state))
        net.load_state_dict(state, strict=True)
    except (KeyError, RuntimeError) as e:
        raise BioadaptError(f"{weights} do not fit Cellpose-SAM's network: {e}") from e
    net.to(device)
    net.dtype = dtype  # CPSAM's own setter converts the weights
    return net.eval()


class CellposeAdapter(Adapter):
    """A Cellpose network with MC dropout through hooks, batched passes, flow-dynamics masks and train_seg."""

    def __init__(self, net: torch.nn.Module, source: str, *, device: torch.device, diam_mean: float = 30.0,
                 diam_labels: float | None = None, dropout_p: float = DEFAULT_DROPOUT_P,
                 mc_scope: str = DEFAULT_MC_SCOPE, mc_depth: int = DEFAULT_MC_DEPTH, channels: Sequence[int] = (0, 0),
                 diameter: float | None = None, dropout_kind: DropoutKind = DEFAULT_DROPOUT_KIND,
                 memory_budget: int | None = None, flow_threshold: float = 0.4, cellprob_threshold: float = 0.0,
                 min_size: int = 15, input_channels: int = 1, sample_source: str = "auto"):
        check_scope(mc_scope, mc_depth)
        if sample_source not in ("auto", "dropout"):
            raise BioadaptError(f"Cellpose networks take MC dropout after their activations; sample_source="
                                f"{sample_source!r} is for bioimage.io networks dropout cannot reach: leave it out")
        self.net = net
        self.generation = GENERATION
        self.source = source
        self.device = device
        self.dropout_p, self.dropout_kind = dropout_p, dropout_kind
        self.mc_scope, self.mc_depth = mc_scope, int(mc_depth)
        self.channels = tuple(int(c) for c in channels)
        if len(self.channels) != 2 or min(self.channels) < 0:
            raise BioadaptError(f"channels must be Cellpose's [cytoplasm, nucleus] pair (1-based, 0 = none/gray), "
                                f"got {channels}")
        if GENERATION >= 4 and self.channels != (0, 0):
            raise BioadaptError("channels=[cytoplasm, nucleus] is Cellpose 3's setting; Cellpose 4 takes the first "
                                "3 channels of the image as they are: pick them with open_image(..., channels=[...])")
        self.input_channels = max(input_channels, *self.channels)
        if diameter is not None and diameter <= 0:
            raise BioadaptError(f"diameter must be > 0 pixels (or None), got {diameter}")
        self.diameter = diameter
        self.diam_mean = float(diam_mean)
        self.diam_labels = float(diam_labels or diam_mean)
        self.flow_threshold, self.cellprob_threshold = flow_threshold, cellprob_threshold
        self.min_size = min_size  # masks smaller than this are dropped and holes filled, as Cellpose's eval does
        self.memory_budget = memory_budget or default_memory_budget(device)
        if device.type == "cpu":
            tune_malloc()
        self._head: HeadSplit | None = None
        self._partial: PartialSplit | None = None
        self._round_masks: CommonMasks | None = None  # the last MC round's masks, reused by its next patches
        self._bytes_per_row: dict[tuple[int, ...], int] = {}
        MCDropout(self.net, dropout_p, dropout_kind)  # warns now if nothing can be made stochastic

    @classmethod
    def load(cls, name: str, device: str = "auto", dropout_p: float = DEFAULT_DROPOUT_P, bfloat16: bool | None = None,
             **options: Any) -> CellposeAdapter:
        """``cellpose:<name>``'s weights: a file, or a built-in model name (downloaded by Cellpose when missing).
        ``bfloat16``: None for Cellpose's choice on GPUs (Cellpose 4) and float32 on CPUs."""
        torch_device = resolve_device(device)
        if GENERATION < 4:
            if bfloat16:
                raise BioadaptError("Cellpose 3 runs in float32 only; leave bfloat16 out")
            net, diam_mean, diam_labels = _load_cellpose3(name, torch_device)
        else:
            use_bf16 = torch_device.type == "cuda" if bfloat16 is None else bool(bfloat16)
            net = _load_cpsam(name, torch_device, torch.bfloat16 if use_bf16 else torch.float32)
            diam_mean, diam_labels = CPSAM_DIAMETER, None
        return cls(net, f"cellpose:{name}", device=torch_device, diam_mean=diam_mean, diam_labels=diam_labels,
                   dropout_p=dropout_p, **options)

    @property
    def dtype(self) -> torch.dtype:
        """The network's floating-point type (bfloat16 or float32)."""
        return next(self.net.parameters()).dtype

    # -- description -------------------------------------------------------------------------------------------
    def describe(self) -> ModelInfo:
        cpsam = GENERATION >= 4
        return ModelInfo(
            kind="cellpose", name=f"Cellpose {GENERATION} ({self.source.removeprefix('cellpose:')})",
            source=self.source, axes="cyx", input_channels=self.input_channels,
            min_shape=(CPSAM_TILE,) * 2 if cpsam else (16, 16), step=(CPSAM_TILE,) * 2 if cpsam else (8, 8),
            halo=(0, 0), output_kind="cellpose", n_classes=2, class_names=("background", "cell"),
            weights_format="cellpose", trainable=True, mc_dropout=mc_strategy(self.net), mc_scopes=MC_SCOPES,
            dropout_p=self.dropout_p)

    def network_kwargs(self) -> dict[str, Any]:
        """The arguments that rebuild this network: CPnet's (Cellpose 3) or the CPSAM encoder size (Cellpose 4,
        for ``bioadapt.adapters.cpsam.build_cpsam``)."""
        if GENERATION >= 4:
            from bioadapt.adapters.cpsam import encoder_size

            return encoder_size(self.net.state_dict())
        net = self.net
        return {"nbase": [int(n) for n in net.nbase], "nout": int(net.nout), "sz": int(net.sz), "mkldnn": False,
                "max_pool": True, "diam_mean": float(net.diam_mean.item())}

    def network_input(self, image: np.ndarray) -> np.ndarray:
        """(C, Y, X) image -> the channels the network takes, before normalisation and resizing, float32:
        Cellpose 3's channel selection (2 channels), or Cellpose 4's first 3 channels (missing ones are zeros)."""
        yxc = np.moveaxis(np.asarray(image, np.float32), 0, -1)
        if GENERATION < 4:
            from cellpose import transforms

            yxc = transforms.reshape(yxc, channels=list(self.channels))
        else:  # as convert_image + the first convolution do: extra channels cut, missing ones add nothing
            missing = max(0, 3 - yxc.shape[-1])
            yxc = np.concatenate([yxc[..., :3], np.zeros((*yxc.shape[:2], missing), np.float32)], axis=-1)
        return np.moveaxis(yxc, -1, 0).astype(np.float32)

    # -- the pipeline pieces -----------------------------------------------------------------------------------
    def rescale(self) -> float:
        """The factor images are resized by before the network (see the module's notes on the diameter)."""
        if GENERATION >= 4:
            return CPSAM_DIAMETER / self.diameter if self.diameter else 1.0
        return self.diam_mean / (self.diameter or self.diam_labels)

    def _preprocess(self, x: np.ndarray) -> torch.Tensor:
        """Cellpose's own channel selection, percentile normalisation and resizing, per image."""
        from cellpose import models, transforms

        params = {**models.normalize_default, "normalize": True}
        rescale = self.rescale()
        out = []
        for image in x:
            yxc = np.moveaxis(self.network_input(image), 0, -1)
            yxc = transforms.normalize_img(yxc, axis=-1, **params)
            if rescale != 1:
                yxc = transforms.resize_image(yxc, rsz=rescale)
            out.append(np.moveaxis(yxc, -1, 0))
        return torch.from_numpy(np.stack(out).astype(np.float32)).to(self.device)

    def _valid(self, shape: Sequence[int]) -> tuple[int, ...]:
        info = self.describe()
        return valid_shape(shape, info.min_shape, info.step, (0, 0))

    def _call(self, rows: torch.Tensor) -> torch.Tensor:
        """The network on (R, 3 or 2, h, w) float32 rows -> (R, 3, h, w) float32 (flows dY, dX, cell logit)."""
        return _network_output(self.net(rows.to(self.dtype))).float()

    @staticmethod
    def _tiled(padded: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """CPSAM takes exactly 256 x 256: (N, C, H, W) -> (N * tiles, C, 256, 256) and the inverse for outputs,
        also for T stacked passes of them (identity for Cellpose 3 and for inputs of one tile)."""
        if GENERATION < 4 or padded.shape[-2:] == (CPSAM_TILE, CPSAM_TILE):
            return padded, lambda out: out
        n, c, h, w = padded.shape
        tiles = padded.unfold(2, CPSAM_TILE, CPSAM_TILE).unfold(3, CPSAM_TILE, CPSAM_TILE)  # (N, C, h/t, w/t, t, t)
        rows, cols = tiles.shape[2], tiles.shape[3]

        def untile(out: torch.Tensor) -> torch.Tensor:
            out = out.reshape(-1, rows, cols, out.shape[1], CPSAM_TILE, CPSAM_TILE).permute(0, 3, 1, 4, 2, 5)
            return out.reshape(out.shape[0], -1, h, w)

        return tiles.permute(0, 2, 3, 1, 4, 5).reshape(-1, c, CPSAM_TILE, CPSAM_TILE), untile

    def _rows_per_call(self, rows: torch.Tensor, total: int) -> int:
        """How many network input rows one forward call may take within the memory budget (measured by one
        forward pass per input shape, skipped when all ``total`` rows are one)."""
        if total <= 1:
            return 1
        key = tuple(rows.shape[1:])
        if key not in self._bytes_per_row:
            self._bytes_per_row[key] = activation_bytes(self.net, rows[:1].to(self.dtype))
        return max(1, self.memory_budget // self._bytes_per_row[key])

    def _network_rows(self, x: np.ndarray) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor],
                                                    tuple[int, ...]]:
        """Preprocessed, padded and tiled network inputs, the function that puts outputs back together and crops
        the padding, and the network-scale spatial shape."""
        pre = self._preprocess(x)
        shape = tuple(pre.shape[2:])
        rows, untile = self._tiled(pad_to(pre, self._valid(shape), (0, 0)))
        self.net.eval()
        return rows, lambda out: crop_from(untile(out), shape, (0, 0)), shape

    def _raw(self, x: np.ndarray) -> torch.Tensor:
        """Deterministic raw outputs at network scale, (N, 3, h, w)."""
        rows, assemble, _ = self._network_rows(x)
        size = self._rows_per_call(rows, len(rows))
        with torch.no_grad():
            return assemble(torch.cat([self._call(rows[i:i + size]) for i in range(0, len(rows), size)]))

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

    def _head_split(self, row: torch.Tensor) -> HeadSplit:
        """The readout for mc_scope="head": CPnet's last 1x1 convolution; CPSAM's 1x1 readout followed by its
        fixed upsampling (conv_transpose2d with W2), which the T passes must repeat too."""
        if self._head is None:
            after = None
            if GENERATION >= 4:
                from bioadapt.adapters.cpsam import upsample

                def after(readout: torch.Tensor) -> torch.Tensor:
                    return upsample(self.net, readout)
            self._head = HeadSplit(self.net, row.to(self.dtype), select=_network_output, after=after)
        return self._head

    # -- inference ---------------------------------------------------------------------------------------------
    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        x, single = check_images(x, self.describe())
        raw = self._raw(x)
        proba = self._to_original(self._two_classes(raw[:, 2]), x.shape[2:]).astype(np.float32)
        return proba[0] if single else proba

    def mc_proba(self, x: np.ndarray, passes: int = DEFAULT_MC_PASSES, *, seed: int = 0,
                 scope: str | None = None) -> np.ndarray:
        """T passes with dropout. "full": dropout after every activation of the network (CPnet's ReLUs, the
        GELUs of CPSAM's encoder MLPs, feature-wise on its (B, H, W, C) tokens). "partial": the same masks at the last
        ``mc_depth`` of those activation calls only, the network up to them run once (``partial.py``). "head": the
        network runs once to the readout's input, then T passes of dropout on those features + readout (+ CPSAM's
        upsampling). Every patch (and every CPSAM tile) of a call sees the same T masks for a given ``seed``."""
        if passes < 1:
            raise BioadaptError(f"passes must be >= 1, got {passes}")
        scope = scope or self.mc_scope
        check_scope(scope, self.mc_depth)
        x, single = check_images(x, self.describe())
        rows, assemble, _ = self._network_rows(x)
        size = self._rows_per_call(rows, len(rows) * (1 if scope == "head" else passes))
        with torch.no_grad():
            if scope == "head":
                head = self._head_split(rows[:1])
                features = torch.cat([head.features(self.net, rows[i:i + size].to(self.dtype))
                                      for i in range(0, len(rows), size)])
                self._round_masks = round_masks(self._round_masks, seed, self.dropout_p, self.dropout_kind)
                raw = head.passes(features, self._round_masks, passes).float()
            else:  # hooks are attached per call: Cellpose 3's load_model re-creates submodules
                mc = MCDropout(self.net, self.dropout_p, self.dropout_kind, masks=self._round_masks)
                if scope == "partial":
                    if self._partial is None:
                        self._partial = PartialSplit(mc, self._call, rows[:1], self.mc_depth)
                    raw = partial_passes(self._partial, mc, rows, passes, size, seed)
                else:
                    raw = stacked_passes(mc, self._call, rows, passes, size, seed)  # rows are whole network inputs
                self._round_masks = mc.last_round
        logits = assemble(raw)[:, 2]
        proba = self._to_original(self._two_classes(logits), x.shape[2:]).astype(np.float32)
        proba = proba.reshape(passes, len(x), 2, *x.shape[2:])
        return proba[:, 0] if single else proba

    def segment(self, x: np.ndarray) -> np.ndarray:
        """Instance labels from Cellpose's flow dynamics on the deterministic prediction, at the image's scale
        (as Cellpose's eval with resample=True: flows resized back, dynamics steps scaled by 1 / rescale)."""
        x, single = check_images(x, self.describe())
        maps = self._to_original(self._raw(x).cpu().numpy(), x.shape[2:])
        niter = int(_NITER / self.rescale())
        out = np.stack([self.masks_from_flows(m[:2], m[2], niter=niter) for m in maps])
        return out[0] if single else out

    def masks_from_flows(self, flows: np.ndarray, cellprob: np.ndarray, niter: int = _NITER) -> np.ndarray:
        """Cellpose's mask step: (2, H, W) flows and the (H, W) cell-probability logit -> int32 labels."""
        from cellpose import dynamics

        masks = dynamics.compute_masks(flows, cellprob, niter=niter, cellprob_threshold=self.cellprob_threshold,
                                       flow_threshold=self.flow_threshold, min_size=self.min_size,
                                       device=self.device)
        masks = masks[0] if isinstance(masks, tuple) else masks  # some versions also return the pixel paths
        return np.asarray(masks, dtype=np.int32)

    # -- training ----------------------------------------------------------------------------------------------
    def fine_tune(self, samples: Sequence[tuple[np.ndarray, np.ndarray]], params: Any = None,
                  progress: Progress | None = None, stop: Stop | None = None,
                  validate_on: Sequence[int] | None = None) -> FineTuneResult:
        """``train_seg`` on the samples (a share held out as its test set, drawn from ``validate_on`` when given),
        with ``CellposeTrainParams``'s per-generation defaults for whatever ``params`` leaves out. Cellpose 4 trains
        in float32 (train_seg converts a bfloat16 network and converts it back)."""
        from cellpose import train

        params = CellposeTrainParams.from_any(params)
        pairs = check_samples(samples, self.describe())
        rng = np.random.default_rng(params.seed)
        order = rng.permutation(len(pairs)).tolist()
        n_val = 0 if len(pairs) < 2 or params.val_fraction == 0 else max(1, round(len(pairs) * params.val_fraction))
        held_out = set(held_out_first(order, n_val, validate_on))
        val = [pairs[i] for i in order if i in held_out]
        training = [pairs[i] for i in order if i not in held_out]
        enough = [p for p in training if len(np.unique(p[1])) - 1 >= params.min_train_masks]
        if not enough:
            raise BioadaptError(f"no training patch has {params.min_train_masks} cells or more (train_seg drops "
                                "such patches); annotate more cells or lower min_train_masks")
        log_ = _EpochLog(params.epochs, progress)
        original_loss = train._loss_fn_seg
        original_train = type(self.net).train  # the class's method: the instance attribute below shadows it

        def counting_loss(lbl, y, device):
            value = original_loss(lbl, y, device)
            log_.losses["train" if torch.is_grad_enabled() else "val"].append(float(value.detach()))
            return value

        def epoch_start(mode: bool = True):
            if mode:  # train_seg calls net.train() once at the start of every epoch
                if log_.epoch > 0:
                    log_.report()
                if stop is not None and stop():
                    raise _Stopped
                log_.epoch += 1
            return original_train(self.net, mode)

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
                log_.report()
            except _Stopped:
                stopped = True
        self.net.eval()
        self._weights_changed()
        history = log_.history
        result = FineTuneResult(epochs_run=len(history), best_epoch=len(history), initial_val_score=None,
                                best_val_score=None, stopped=stopped, seconds=log_.seconds(),
                                n_train=len(training), n_val=len(val), history=history,
                                val_patches=sorted(held_out))
        self.record_training(asdict(params), result.to_dict(), example_image=pairs[0][0])
        return result

    # -- weights -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The network's weights as float32 CPU tensors (as Cellpose saves them, also from a bfloat16 network)."""
        return {k: v.detach().cpu().float().clone() if v.is_floating_point() else v.detach().cpu().clone()
                for k, v in self.net.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        try:
            self.net.load_state_dict(state, strict=True)  # strict: a key mismatch must not pass silently
        except RuntimeError as e:
            raise BioadaptError(f"these weights do not fit {self.describe().name}: {e}") from e
        self._weights_changed()

    def _weights_changed(self) -> None:
        """train_seg stores the training cells' mean diameter in the network; Cellpose 3's CellposeModel reads
        it (and diam_mean) only when loading a file, so take them from the network here to predict as the saved
        model will after a reload. Cellpose 4 does not use them."""
        self.diam_mean = float(self.net.diam_mean.item())
        self.diam_labels = float(self.net.diam_labels.item())
        self._head = self._partial = None

    def save(self, path: str | Path) -> Path:
        """Weights Cellpose itself loads (``CellposeModel(pretrained_model=path)``, the GUI's custom model), in
        float32; CPSAM weights with a smaller encoder than ViT-L load in bioadapt only."""
        path = Path(path)
        if path.is_dir():
            path = path / "bioadapt_cellpose"
        torch.save(self.state_dict(), path)
        return path


@dataclass
class _EpochLog:
    """Per-epoch records of a train_seg run, from the losses it computes."""

    epochs: int
    progress: Progress | None
    epoch: int = 0
    losses: dict[str, list[float]] = field(default_factory=lambda: {"train": [], "val": []})
    history: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        return round(time.perf_counter() - self.started, 3)

    def report(self) -> None:
        record = {"epoch": self.epoch, "epochs": self.epochs,
                  "loss": float(np.mean(self.losses["train"])) if self.losses["train"] else None,
                  "val_loss": float(np.mean(self.losses["val"])) if self.losses["val"] else None,
                  "seconds": self.seconds()}
        self.history.append(record)
        self.losses["train"].clear(), self.losses["val"].clear()
        if self.progress is not None:
            self.progress(dict(record))
