"""Monte-Carlo dropout for any torch module, without changing its state-dict keys.

Where the network has dropout layers, MC mode switches exactly those to training mode. Where it has none,
forward hooks on every hidden activation module apply functional dropout to the activation's output (channel
dropout for convolutional feature maps, as nn.Dropout1d/2d/3d would). Hooks add no modules, so weights saved
or loaded non-strictly keep their keys. Batch-norm and every other module stay in eval mode, and leaving MC
mode restores the exact deterministic network.

TorchScript modules accept no hooks: only their own dropout layers can be switched on.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from bioadapt.errors import BioadaptError

Scope = Literal["full", "head"]
DropoutKind = Literal["channel", "element"]

DROPOUT_TYPES = ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout")
# Hidden-layer activations. Sigmoid, Softmax and LogSoftmax are left out: they usually make the output, and
# dropout after them would scale probabilities above one.
ACTIVATION_TYPES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardtanh, nn.Softplus, nn.Tanh,
)
OUTPUT_ACTIVATION_TYPES = (nn.Sigmoid, nn.Softmax, nn.LogSoftmax, nn.Identity)


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
    """Dropout that is always on; channel-wise on (N, C, *spatial) feature maps unless ``kind="element"``."""
    if kind == "element" or x.dim() < 3:
        return F.dropout(x, p, training=True)
    if x.dim() == 3:
        return F.dropout1d(x, p, training=True)
    if x.dim() == 4:
        return F.dropout2d(x, p, training=True)
    if x.dim() == 5:
        return F.dropout3d(x, p, training=True)
    return F.dropout(x, p, training=True)


def mc_strategy(module: nn.Module) -> str:
    """What MC mode does for this module: "existing", "hooks" or "none" (see MCDropout)."""
    if dropout_layers(module):
        return "existing"
    return "none" if is_scripted(module) or not activation_layers(module) else "hooks"


class MCDropout:
    """Switches a module's Monte-Carlo dropout on and off (use ``with mc.enabled():``).

    ``strategy`` says what MC mode does for this module: "existing" (its own dropout layers), "hooks"
    (functional dropout after each of its activation modules) or "none" (nothing could be made stochastic:
    TorchScript without dropout layers, or a network whose activations are not modules).
    """

    def __init__(self, module: nn.Module, p: float = 0.05, kind: DropoutKind = "channel"):
        if not 0 <= p < 1:
            raise BioadaptError(f"dropout_p must be in [0, 1), got {p}")
        self.module = module
        self.p = p
        self.kind = kind
        self._existing = dropout_layers(module)
        self._activations = [] if is_scripted(module) else activation_layers(module)
        self.strategy = mc_strategy(module)
        if self.strategy == "none":
            why = ("it is TorchScript without dropout layers (TorchScript accepts no hooks)" if is_scripted(module)
                   else "it has neither dropout layers nor activation modules")
            warnings.warn(f"MC dropout cannot make {type(module).__name__} stochastic: {why}; all MC passes will be "
                          "equal and BALD zero. Use pytorch_state_dict weights or a network with dropout layers.",
                          stacklevel=2)

    @property
    def patched_layers(self) -> int:
        return len(self._existing) if self.strategy == "existing" else len(self._activations)

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return functional_dropout(output, self.p, self.kind)

    @contextmanager
    def enabled(self) -> Iterator[None]:
        was_training = [m.training for m in self._existing]
        handles = []
        try:
            if self.strategy == "existing":
                for m in self._existing:
                    m.train()
            elif self.strategy == "hooks" and self.p > 0:
                handles = [m.register_forward_hook(self._hook) for m in self._activations]
            yield
        finally:
            for handle in handles:
                handle.remove()
            for m, training in zip(self._existing, was_training):
                m.train(training)


class HeadSplit:
    """The output layer of a network, found by tracing one forward pass, for ``mc_scope="head"``.

    The network runs once to get the output layer's input features; the T passes then only repeat
    dropout + output layer (+ a trailing activation module, if the network ends with one).
    """

    def __init__(self, module: nn.Module, example: torch.Tensor,
                 select: Callable[[Any], torch.Tensor] = lambda output: output):
        """``select`` picks the prediction from the network's return value (e.g. ``out[0]`` for Cellpose,
        whose networks also return a style vector)."""
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
        ends_in_head = final is head_output if not self.tail else final is order[-1][1]
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

    def run(self, features: torch.Tensor, p: float, kind: DropoutKind) -> torch.Tensor:
        out = self.head(functional_dropout(features, p, kind))
        for m in self.tail:
            out = m(out)
        return out

