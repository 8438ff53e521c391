"""Monte-Carlo dropout for any torch module, without changing its state-dict keys, with common random numbers.

Where the network has dropout layers, MC mode applies dropout at exactly those layers (with their own p). Where
it has none, forward hooks on every hidden activation module apply dropout to the activation's output (channel
dropout for feature maps, as nn.Dropout1d/2d/3d would). Hooks add no modules, so weights saved or loaded
non-strictly keep their keys. Batch-norm and every other module stay in eval mode, and leaving MC mode restores
the exact deterministic network.

Common random numbers: scores are compared across patches, so within one scoring round every patch must see
the same T dropout masks. The mask of (layer, call of that layer within the forward, pass) is drawn from a
generator seeded by (round seed, layer, call, pass) alone; which pass each row of a batch belongs to is told
by ``MCDropout.rows``. The masks therefore do not depend on how patches are batched, sharded or spread over
actors. Channel masks are per feature channel (axis 1 of convolutional maps, the last axis of token tensors
after a Linear layer, as in a transformer's MLP); element masks cover a whole feature map of one pass.

TorchScript modules accept no hooks: only their own dropout layers can be switched on, in training mode, with
torch's global generator (masks then differ per row: no common random numbers).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bioadapt.adapters.base import DEFAULT_DROPOUT_P, DROPOUT_KINDS, MC_SCOPES
from bioadapt.errors import BioadaptError

Scope = Literal["full", "partial", "head"]
DropoutKind = Literal["channel", "element"]

DROPOUT_TYPES = ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout")
CHANNEL_DROPOUT_TYPES = ("Dropout1d", "Dropout2d", "Dropout3d")
# Hidden-layer activations. Sigmoid, Softmax and LogSoftmax are left out: they usually make the output, and
# dropout after them would scale probabilities above one.
ACTIVATION_TYPES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardtanh, nn.Softplus, nn.Tanh,
)
OUTPUT_ACTIVATION_TYPES = (nn.Sigmoid, nn.Softmax, nn.LogSoftmax, nn.Identity)
CONV_TYPES = (nn.modules.conv._ConvNd,)


def check_scope(scope: str, depth: int) -> None:
    """Refuse an unknown MC scope or a partial depth below one dropout site."""
    if scope not in MC_SCOPES:
        raise BioadaptError(f"mc_scope must be one of {MC_SCOPES}, got {scope!r}")
    if int(depth) < 1:
        raise BioadaptError(f"mc_depth must be >= 1: the number of dropout sites, counted from the network's end, "
                            f"that mc_scope='partial' keeps stochastic; got {depth}")


def _type_name(module: nn.Module) -> str:
    """Class name, also for TorchScript modules (which are all RecursiveScriptModule)."""
    return getattr(module, "original_name", type(module).__name__)


def is_scripted(module: nn.Module) -> bool:
    return isinstance(module, torch.jit.ScriptModule)


def dropout_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if _type_name(m) in DROPOUT_TYPES]


def activation_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, ACTIVATION_TYPES)]


def functional_dropout(x: torch.Tensor, p: float, kind: DropoutKind = "channel") -> torch.Tensor:
    """Dropout that is always on, from torch's global generator; channel-wise on (N, C, *spatial) feature maps
    unless ``kind="element"``. (MC scoring uses ``CommonMasks`` instead.)"""
    if kind == "element" or x.dim() < 3:
        return F.dropout(x, p, training=True)
    if x.dim() == 3:
        return F.dropout1d(x, p, training=True)
    if x.dim() == 4:
        return F.dropout2d(x, p, training=True)
    if x.dim() == 5:
        return F.dropout3d(x, p, training=True)
    return F.dropout(x, p, training=True)


def feature_axes(module: nn.Module) -> dict[int, int]:
    """For each module id, the axis its output's features lie on: the last axis where the module's parent
    holds Linear layers and no convolution (a transformer MLP: tokens are (..., features)), else axis 1."""
    axes: dict[int, int] = {}
    for parent in module.modules():
        children = list(parent.children())
        linear = any(isinstance(c, nn.Linear) for c in children)
        conv = any(isinstance(c, CONV_TYPES) for c in children)
        for child in children:
            axes.setdefault(id(child), -1 if linear and not conv else 1)
    return axes


def mask_seed(*parts: int) -> int:
    """A 63-bit generator seed from non-negative integers (round seed, layer, call, pass), well mixed."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(1, np.uint64)[0]
               >> np.uint64(1))


ELEMENT_CACHE_BYTES = 256 * 2**20


class CommonMasks:
    """Dropout masks shared by every patch of a round: the mask of (key, pass) depends only on the round's seed,
    the key (layer, call) and the pass index, never on the batch a row sits in."""

    def __init__(self, seed: int, p: float, kind: DropoutKind = "channel", cache_bytes: int = ELEMENT_CACHE_BYTES):
        self.seed, self.p, self.kind = int(seed), float(p), kind
        self._channel: dict[tuple, torch.Tensor] = {}
        # element masks are the same for every patch of a round; drawing them took ~45 % of a CPU MC pass of a
        # small U-Net (256 x 256), so they are kept (as bool) until ``cache_bytes`` are held, then drawn each time
        self._element: dict[tuple, torch.Tensor] = {}
        self.cache_bytes, self.cached_bytes = int(cache_bytes), 0

    def _keep(self, shape: Sequence[int], key: tuple[int, ...], pass_index: int, p: float) -> torch.Tensor:
        # drawn on the CPU: CUDA's generator gives other numbers for the same seed, and a round's masks must not
        # depend on the device an actor scores on
        generator = torch.Generator().manual_seed(mask_seed(self.seed, *key, pass_index))
        return torch.rand(tuple(shape), generator=generator) >= p

    def _draw(self, shape: Sequence[int], key: tuple[int, ...], pass_index: int, p: float,
              device: torch.device) -> torch.Tensor:
        return (self._keep(shape, key, pass_index, p).to(torch.float32) / (1 - p)).to(device)

    def _element_mask(self, shape: tuple[int, ...], key: tuple[int, ...], pass_index: int, p: float,
                      device: torch.device) -> torch.Tensor:
        cache_key = (key, pass_index, shape, p, str(device))
        keep = self._element.get(cache_key)
        if keep is None:
            keep = self._keep(shape, key, pass_index, p).to(device)
            if self.cached_bytes + keep.numel() <= self.cache_bytes:
                self._element[cache_key] = keep
                self.cached_bytes += keep.numel()
        return keep.to(torch.float32) / (1 - p)

    def mask(self, x: torch.Tensor, key: tuple[int, ...], pass_index: int, *, feature_axis: int = 1,
             p: float | None = None, kind: DropoutKind | None = None) -> torch.Tensor:
        """The multiplicative mask of one pass for one row of ``x`` (shape ``x.shape[1:]`` or broadcastable)."""
        p = self.p if p is None else p
        kind = kind or self.kind
        row_shape = tuple(x.shape[1:])
        if kind == "element" or len(row_shape) == 0:
            return self._element_mask(row_shape, key, pass_index, p, x.device)
        axis = feature_axis % x.dim()
        channels = x.shape[axis]
        cache_key = (key, pass_index, channels, p, str(x.device))
        if cache_key not in self._channel:
            self._channel[cache_key] = self._draw((channels,), key, pass_index, p, x.device)
        shape = [1] * len(row_shape)
        shape[axis - 1] = channels
        return self._channel[cache_key].reshape(shape)

    def apply(self, x: torch.Tensor, key: tuple[int, ...], passes: Sequence[int], *, feature_axis: int = 1,
              p: float | None = None, kind: DropoutKind | None = None) -> torch.Tensor:
        """``x`` with each row multiplied by the mask of its pass (``passes[i]`` for row i)."""
        p = self.p if p is None else p
        if p <= 0:
            return x
        if len(passes) != x.shape[0]:
            raise BioadaptError(f"{len(passes)} pass indices for a batch of {x.shape[0]} rows")
        masks = {t: self.mask(x, key, t, feature_axis=feature_axis, p=p, kind=kind) for t in set(passes)}
        if len(masks) == 1:
            return x * next(iter(masks.values())).to(x.dtype)
        return x * torch.stack([masks[t] for t in passes]).to(x.dtype)


def round_masks(previous: CommonMasks | None, seed: int, p: float, kind: DropoutKind) -> CommonMasks:
    """The masks of round ``seed``: ``previous`` if it was drawn for the same seed, p and kind (so its cached
    element masks serve the round's next patches), else new ones."""
    if previous is not None and (previous.seed, previous.p, previous.kind) == (int(seed), float(p), kind):
        return previous
    return CommonMasks(seed, p, kind)


def mc_strategy(module: nn.Module) -> str:
    """What MC mode does for this module: "existing", "hooks" or "none" (see MCDropout)."""
    if dropout_layers(module):
        return "existing"
    return "none" if is_scripted(module) or not activation_layers(module) else "hooks"


class MCDropout:
    """Switches a module's Monte-Carlo dropout on and off: ``with mc.enabled(seed): ... with mc.rows(passes):``.

    ``strategy`` says what MC mode does for this module: "existing" (its own dropout layers), "hooks" (dropout
    after each of its activation modules) or "none" (nothing could be made stochastic: TorchScript without
    dropout layers, or a network whose activations are not modules). Inside ``enabled`` and outside ``rows``,
    every forward call of the whole module is one new pass, shared by all rows of that call.
    """

    def __init__(self, module: nn.Module, p: float = DEFAULT_DROPOUT_P, kind: DropoutKind = "channel",
                 masks: CommonMasks | None = None):
        """``masks``: a round's masks from an earlier wrapper of the same network, reused when the seed matches."""
        if not 0 <= p < 1:
            raise BioadaptError(f"dropout_p must be in [0, 1), got {p}")
        if kind not in DROPOUT_KINDS:
            raise BioadaptError(f"dropout_kind must be one of {DROPOUT_KINDS}, got {kind!r}")
        self.module = module
        self.p = p
        self.kind = kind
        self._existing = dropout_layers(module)
        self._activations = [] if is_scripted(module) else activation_layers(module)
        self.strategy = mc_strategy(module)
        self._axes = {} if is_scripted(module) else feature_axes(module)
        self._masks: CommonMasks | None = None
        self._round: CommonMasks | None = masks  # the last round's masks, kept for its next patches
        self._rows: list[int] | None = None
        self._calls = -1  # forward calls of the whole module inside enabled(): the pass index outside rows()
        self._invocations: dict[int, int] = {}  # per layer: how often it ran in the current forward call
        self._only: frozenset[tuple[int, int]] | None = None  # (layer, call) pairs that get masks; None: all
        self._call_order: dict[int, list[int]] = {}  # per layer: the call index of each call a partial pass runs
        if self.strategy == "none":
            why = ("it is TorchScript without dropout layers (TorchScript accepts no hooks)" if is_scripted(module)
                   else "it has neither dropout layers nor activation modules")
            warnings.warn(f"MC dropout cannot make {type(module).__name__} stochastic: {why}; all MC passes will be "
                          "equal and BALD zero. Use pytorch_state_dict weights or a network with dropout layers.",
                          stacklevel=2)

    @property
    def patched_layers(self) -> int:
        return len(self._existing) if self.strategy == "existing" else len(self._activations)

    @property
    def sites(self) -> list[nn.Module]:
        """The modules masks are applied at, in the order their layer indices count (mask keys are (index, call))."""
        return self._existing if self.strategy == "existing" else self._activations

    @property
    def last_round(self) -> CommonMasks | None:
        """The masks of the last round ``enabled`` ran (to hand to the next wrapper of the same network)."""
        return self._round

    @property
    def common_masks(self) -> bool:
        """Whether passes use common random numbers (False only for TorchScript's own dropout layers)."""
        return self.strategy == "hooks" or (self.strategy == "existing" and not is_scripted(self.module))

    def _passes_of(self, rows: int) -> list[int]:
        if self._rows is None:
            return [self._calls] * rows
        if len(self._rows) != rows:
            raise BioadaptError(f"mc.rows() was given {len(self._rows)} pass indices for a batch of {rows} rows")
        return self._rows

    def _start_call(self, module: nn.Module, inputs: tuple) -> None:
        self._calls += 1
        self._invocations.clear()

    def _masked(self, layer: int, module: nn.Module, x: torch.Tensor, p: float, kind: DropoutKind) -> torch.Tensor:
        seen = self._invocations.get(layer, 0)
        self._invocations[layer] = seen + 1
        order = self._call_order.get(layer)
        call = order[seen] if order is not None and seen < len(order) else seen
        if self._only is not None and (layer, call) not in self._only:
            return x
        return self._masks.apply(x, (layer, call), self._passes_of(x.shape[0]),
                                 feature_axis=self._axes.get(id(module), 1), p=p, kind=kind)

    def _activation_hook(self, layer: int) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            return self._masked(layer, module, output, self.p, self.kind)

        return hook

    def _dropout_hook(self, layer: int) -> Callable:
        """The layer stays in eval mode (identity); its output is replaced by the masked input."""
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            kind: DropoutKind = "channel" if _type_name(module) in CHANNEL_DROPOUT_TYPES else "element"
            return self._masked(layer, module, inputs[0], float(module.p), kind)

        return hook

    @contextmanager
    def enabled(self, seed: int = 0, *, only: Iterable[tuple[int, int]] | None = None,
                call_order: Mapping[int, Sequence[int]] | None = None) -> Iterator[None]:
        """MC mode with the masks of round ``seed``. ``only``: the (layer, call) pairs that get masks (the others
        pass unchanged; None: all). ``call_order``: per layer, the call index (in a whole forward) of each call
        that runs, for forwards that skip some calls (partial passes replay them): a mask keeps its key."""
        was_training = [m.training for m in self._existing]
        handles = []
        self._round = round_masks(self._round, seed, self.p, self.kind)  # drawn once per round, then reused
        self._masks, self._calls, self._rows = self._round, -1, None
        self._only = None if only is None else frozenset(only)
        self._call_order = {int(k): list(v) for k, v in (call_order or {}).items()}
        try:
            if self.common_masks:
                handles.append(self.module.register_forward_pre_hook(self._start_call))
            if self.strategy == "existing" and is_scripted(self.module):
                for m in self._existing:
                    m.train()
            elif self.strategy == "existing":
                handles += [m.register_forward_hook(self._dropout_hook(i))
                            for i, m in enumerate(self._existing) if _type_name(m) != "AlphaDropout"
                            and _type_name(m) != "FeatureAlphaDropout"]
                for m in self._existing:  # alpha dropout keeps its own (self-normalising) noise
                    if "Alpha" in _type_name(m):
                        m.train()
            elif self.strategy == "hooks" and self.p > 0:
                handles += [m.register_forward_hook(self._activation_hook(i))
                            for i, m in enumerate(self._activations)]
            yield
        finally:
            for handle in handles:
                handle.remove()
            for m, training in zip(self._existing, was_training):
                m.train(training)
            self._masks, self._rows, self._only, self._call_order = None, None, None, {}

    @contextmanager
    def rows(self, passes: Sequence[int]) -> Iterator[None]:
        """Inside ``enabled``: row i of the next forward calls belongs to pass ``passes[i]``."""
        self._rows = [int(t) for t in passes]
        try:
            yield
        finally:
            self._rows = None


def stacked_passes(mc: MCDropout, forward: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor,
                   passes: int, chunk_rows: int, seed: int) -> torch.Tensor:
    """T stochastic passes of ``batch`` (N rows) in forward calls of at most ``chunk_rows`` rows; returns the
    outputs pass-major (row t * N + b). Every row of pass t sees the same masks (common random numbers)."""
    n = len(batch)
    stacked = batch.repeat(passes, *[1] * (batch.dim() - 1))
    outputs = []
    with mc.enabled(seed):
        for start in range(0, len(stacked), chunk_rows):
            stop = min(start + chunk_rows, len(stacked))
            with mc.rows([row // n for row in range(start, stop)]):
                outputs.append(forward(stacked[start:stop]))
    return torch.cat(outputs)


class HeadSplit:
    """The output layer of a network, found by tracing one forward pass, for ``mc_scope="head"``.

    The network runs once to get the output layer's input features; the T passes then only repeat
    dropout + output layer (+ a trailing activation module, if the network ends with one, and the
    fixed ``after`` function).
    """

    def __init__(self, module: nn.Module, example: torch.Tensor,
                 select: Callable[[Any], torch.Tensor] = lambda output: output,
                 after: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """``select`` picks the prediction from the network's return value (e.g. ``out[0]`` for Cellpose,
        whose networks also return a style vector). ``after``: a fixed function without trainable weights that the
        network applies to its output layer's result (Cellpose-SAM's pixel-shuffling ``conv_transpose2d``); it is
        checked on ``example`` to reproduce the network's output."""
        if is_scripted(module):
            raise BioadaptError("mc_scope='head' needs hooks, which TorchScript modules do not accept; "
                                "use mc_scope='full' or pytorch_state_dict weights")
        order: list[tuple[nn.Module, torch.Tensor]] = []

        def record(m: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            order.append((m, output))

        leaves = [m for m in module.modules() if not list(m.children())]
        handles = [m.register_forward_hook(record) for m in leaves]
        try:
            with torch.no_grad():
                final = select(module(example))
        finally:
            for h in handles:
                h.remove()
        with_params = [i for i, (m, _) in enumerate(order) if any(True for _ in m.parameters(recurse=False))]
        if not with_params:
            raise BioadaptError("mc_scope='head' found no layer with weights; use mc_scope='full'")
        last = with_params[-1]
        self.head, head_output = order[last]
        self.tail = [m for m, _ in order[last + 1:]]
        self.feature_axis = feature_axes(module).get(id(self.head), 1) if isinstance(self.head, nn.Linear) else 1
        self.after = after
        last_output = order[-1][1] if self.tail else head_output
        if after is None:
            ends_in_head = final is last_output
        else:
            with torch.no_grad():
                ends_in_head = torch.equal(after(last_output), final)
        if not ends_in_head or not all(isinstance(m, OUTPUT_ACTIVATION_TYPES) for m in self.tail):
            raise BioadaptError(f"mc_scope='head' needs a network whose output is its last weighted layer "
                                f"({type(self.head).__name__}) or that layer plus an activation; this one computes "
                                "more after it: use mc_scope='full'")

    def features(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The output layer's input for ``x`` (the network runs up to and including the output layer once)."""
        captured: list[torch.Tensor] = []
        handle = self.head.register_forward_pre_hook(lambda m, inputs: captured.append(inputs[0]))
        try:
            module(x)
        finally:
            handle.remove()
        return captured[0]

    def run(self, features: torch.Tensor, masks: CommonMasks, pass_index: int) -> torch.Tensor:
        """Pass ``pass_index`` of the head on ``features``: every row gets that pass's mask."""
        dropped = masks.apply(features, (-1, 0), [pass_index] * len(features), feature_axis=self.feature_axis)
        out = self.head(dropped)
        for m in self.tail:
            out = m(out)
        return out if self.after is None else self.after(out)

    def passes(self, features: torch.Tensor, masks: CommonMasks, passes: int) -> torch.Tensor:
        """All T passes, pass-major (row t * N + b)."""
        return torch.cat([self.run(features, masks, t) for t in range(passes)])
