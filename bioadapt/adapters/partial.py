"""Partial-network MC dropout (``mc_scope="partial"``): masks at the last ``depth`` dropout sites of a forward only
(a U-Net's last decoder convolutions, a transformer's last blocks), and everything the network computes before the
first of them computed once per input and replayed to all T passes (the idea of baal's ``MCCachingModule``).

A dropout site is what ``MCDropout`` masks: an activation module (or a dropout layer) at one of its calls in the
forward. One traced forward numbers every module call by when it is entered and left. The first stochastic site
call is the split: every module call that is left before it is deterministic, and the outermost of those are
cached. A pass then runs the network's own forward, in which each cached call returns its stored output (the rows
of the patches that pass computes) instead of computing. So everything the stochastic part reads is at hand,
skip connections included, whatever the network's Python code does between its modules.

Why replay by module rather than splitting a ``torch.fx`` trace: fx cannot trace much of what users bring
(segment_anything's ViT, Cellpose's CPnet return lists and branch on attributes, bioimage.io architectures are
arbitrary code), and replaying keeps the network's own forward, so the result is exactly that network with the
early masks left out. The cost is that code between modules (concatenations, reshapes, additions of position
embeddings) still runs T times, a small share of any convolution or attention.

It assumes what ``HeadSplit`` assumes: the network calls the same modules in the same order for every input of a
shape. If a capture does not find the traced calls it says so instead of replaying wrong tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bioadapt.adapters.dropout import MCDropout, check_scope, is_scripted
from bioadapt.errors import BioadaptError

CallKey = tuple[int, int]  # (id of the module, its call index within one forward)


@dataclass(eq=False)
class _Call:
    module: nn.Module
    index: int  # the module's how-many-th call within the forward
    enter: int  # event number when the call started
    parent: "_Call | None"
    exit: int = -1  # event number when it returned


class _Reached(Exception):
    """Raised where a capture reaches the split: nothing after it is needed."""


def _tree(value: Any, leaf: Callable[[torch.Tensor], Any]) -> Any:
    """``value`` (tensors in tuples, lists and dicts) with ``leaf`` applied to every tensor."""
    if isinstance(value, torch.Tensor):
        return leaf(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_tree(v, leaf) for v in value)
    if isinstance(value, dict):
        return {k: _tree(v, leaf) for k, v in value.items()}
    return value


def _tree_cat(values: Sequence[Any], rows: Sequence[int]) -> Any:
    """Captures of consecutive chunks (``rows[i]`` rows each) as one: batch-major tensors concatenated."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        if len(values) > 1 and all(v.dim() and v.shape[0] == n for v, n in zip(values, rows)):
            return torch.cat(list(values))
        return first
    if isinstance(first, (tuple, list)):
        return type(first)(_tree_cat([v[i] for v in values], rows) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _tree_cat([v[k] for v in values], rows) for k in first}
    return first


def _record_calls(module: nn.Module, run: Callable[[], Any], *, stop_at: int | None = None,
                  on_exit: Callable[[_Call, Any], None] | None = None) -> list[_Call]:
    """Every module call of one ``run()`` of ``module`` in the order they start, with enter and exit event numbers;
    with ``stop_at`` the run ends (quietly) where that event would begin."""
    calls: list[_Call] = []
    stack: list[_Call] = []
    counts: dict[int, int] = {}
    events = [0]

    def enter(m: nn.Module, args: tuple) -> None:
        if stop_at is not None and events[0] == stop_at:
            raise _Reached
        index = counts.get(id(m), 0)
        counts[id(m)] = index + 1
        call = _Call(m, index, events[0], stack[-1] if stack else None)
        events[0] += 1
        calls.append(call)
        stack.append(call)

    def leave(m: nn.Module, args: tuple, output: Any) -> None:
        call = stack.pop()
        call.exit = events[0]
        events[0] += 1
        if on_exit is not None:
            on_exit(call, output)

    handles = [h for m in module.modules()
               for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        run()
    except _Reached:
        pass
    finally:
        for h in handles:
            h.remove()
    return calls


@dataclass
class Capture:
    """The outputs of a split's cached calls for ``rows`` inputs."""

    outputs: dict[CallKey, Any]
    rows: int


class PartialSplit:
    """Where partial MC passes start, found by tracing one forward of ``example`` (one row) through ``forward``
    (which calls ``mc.module``)."""

    def __init__(self, mc: MCDropout, forward: Callable[[torch.Tensor], Any], example: torch.Tensor, depth: int):
        if is_scripted(mc.module):
            raise BioadaptError("mc_scope='partial' needs hooks, which TorchScript modules do not accept; use "
                                "mc_scope='full' or pytorch_state_dict weights")
        check_scope("partial", depth)
        self.module, self.forward = mc.module, forward
        with torch.no_grad():
            calls = _record_calls(mc.module, lambda: forward(example))
        layer_of = {id(m): i for i, m in enumerate(mc.sites)}
        site_calls = [c for c in calls if id(c.module) in layer_of]
        if not site_calls:
            raise BioadaptError(f"MC dropout reaches no layer of {type(mc.module).__name__}: mc_scope='partial' has "
                                "nothing to start at; use mc_scope='full'")
        self.sites = len(site_calls)
        self.depth = min(depth, self.sites)  # deeper than the network: every site, as the full scope
        self.split = site_calls[-self.depth].enter
        self.stochastic = frozenset((layer_of[id(c.module)], c.index) for c in site_calls[-self.depth:])

        def before(call: _Call | None) -> bool:
            return call is not None and call.exit < self.split

        cached = [c for c in calls if before(c) and not before(c.parent)]  # the outermost deterministic calls
        self.cached: frozenset[CallKey] = frozenset((id(c.module), c.index) for c in cached)
        self._modules = {id(c.module): c.module for c in cached}
        cached_calls = set(map(id, cached))

        def skipped(call: _Call) -> bool:  # inside a cached call: a pass never runs it
            parent = call.parent
            while parent is not None:
                if id(parent) in cached_calls:
                    return True
                parent = parent.parent
            return False

        running: dict[int, list[int]] = {}  # per module: the call index of each call a pass runs, in order
        for call in calls:
            if not skipped(call):
                running.setdefault(id(call.module), []).append(call.index)
        self._running = running
        # per dropout site: its calls a pass runs, so the masks of the stochastic ones keep the full scope's keys
        self.site_order = {layer: running.get(id(m), []) for layer, m in enumerate(mc.sites)}

    def capture(self, batch: torch.Tensor) -> Capture:
        """The cached calls' outputs for ``batch``: the network runs up to the split only."""
        outputs: dict[CallKey, Any] = {}

        def keep(call: _Call, output: Any) -> None:
            key = (id(call.module), call.index)
            if key in self.cached:  # copied: a later in-place operation must not change what passes replay
                outputs[key] = _tree(output, lambda t: t.detach().clone())

        with torch.no_grad():
            _record_calls(self.module, lambda: self.forward(batch), stop_at=self.split, on_exit=keep)
        if outputs.keys() != self.cached:
            raise BioadaptError(f"{type(self.module).__name__} ran other modules than when mc_scope='partial' traced "
                                "it (its forward depends on the input's values or shape); use mc_scope='full'")
        return Capture(outputs, len(batch))

    @contextmanager
    def replaying(self, capture: Capture) -> Iterator["_Replay"]:
        """Inside: every cached call returns its captured output instead of computing (see ``_Replay``)."""
        replay = _Replay(capture, self._running)
        saved = {key: module.__dict__.get("forward") for key, module in self._modules.items()}
        for module in self._modules.values():
            module.forward = replay.forward_of(module, module.forward)
        handle = self.module.register_forward_pre_hook(lambda m, args: replay.counts.clear())
        try:
            yield replay
        finally:
            handle.remove()
            for key, module in self._modules.items():
                if saved[key] is None:
                    del module.forward
                else:
                    module.forward = saved[key]


class _Replay:
    """Serves captured outputs to the forward calls of partial passes: ``use(rows)`` says which captured input each
    row of the next call computes; ``checked()`` follows each call.

    Copying a captured output into every row of a call was a third of a partial pass of a U-Net, though most
    outputs are only read, or not read at all (an encoder's output that only feeds cached calls). So where all
    rows come from one captured input, outputs are served as broadcast views, except those the first call changed
    in place (an ``inplace=True`` activation): those are always copies, as every output is in that first call.
    """

    def __init__(self, capture: Capture, running: dict[int, list[int]]):
        self.capture, self.running = capture, running
        self.counts: dict[int, int] = {}
        self.rows: torch.Tensor | None = None
        self.copied: set[CallKey] = set()  # outputs a pass changes in place
        self._served: list[tuple[CallKey, torch.Tensor, int]] | None = []  # None once the first call is checked

    def use(self, rows: Sequence[int]) -> None:
        self.rows = torch.as_tensor(list(rows), dtype=torch.long)

    def checked(self) -> None:
        if self._served is not None:
            self.copied |= {key for key, served, version in self._served if served._version != version}
            self._served = None

    def _pick(self, key: CallKey, t: torch.Tensor) -> torch.Tensor:
        if self.rows is None or not t.dim() or t.shape[0] != self.capture.rows:
            return t
        if self._served is None and key not in self.copied and self.capture.rows == 1:
            return t.expand(len(self.rows), *t.shape[1:])
        out = t.index_select(0, self.rows.to(t.device))
        if self._served is not None:
            self._served.append((key, out, out._version))
        return out

    def forward_of(self, module: nn.Module, original: Callable) -> Callable:
        order = self.running.get(id(module), [])

        def forward(*args: Any, **kwargs: Any) -> Any:
            seen = self.counts.get(id(module), 0)
            self.counts[id(module)] = seen + 1
            key = (id(module), order[seen] if seen < len(order) else -1)
            if key in self.capture.outputs:
                return _tree(self.capture.outputs[key], lambda t: self._pick(key, t))
            return original(*args, **kwargs)

        return forward


def partial_passes(split: PartialSplit, mc: MCDropout, batch: torch.Tensor, passes: int, chunk_rows: int,
                   seed: int) -> torch.Tensor:
    """T partial passes of ``batch`` (N rows), pass-major (row t * N + b) like ``stacked_passes``: the network
    runs once per row up to the split (in calls of at most ``chunk_rows`` rows), then T times from there. The
    stochastic sites get the same masks as in the full scope (common random numbers, the round's cached masks)."""
    n = len(batch)
    chunks = [split.capture(batch[i:i + chunk_rows]) for i in range(0, n, chunk_rows)]
    keys = chunks[0].outputs.keys()
    capture = Capture({k: _tree_cat([c.outputs[k] for c in chunks], [c.rows for c in chunks]) for k in keys}, n)
    stacked = batch.repeat(passes, *[1] * (batch.dim() - 1))
    outputs = []
    with mc.enabled(seed, only=split.stochastic, call_order=split.site_order), split.replaying(capture) as replay:
        for start in range(0, len(stacked), chunk_rows):
            rows = range(start, min(start + chunk_rows, len(stacked)))
            replay.use([row % n for row in rows])
            with mc.rows([row // n for row in rows]):
                outputs.append(split.forward(stacked[rows.start:rows.stop]))
            replay.checked()
    return torch.cat(outputs)
