"""Corrected labels as the model's own training targets, the losses on them, and the validation score."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.segmentation import find_boundaries

from bioadapt.errors import BioadaptError

TARGET_KINDS = ("foreground", "foreground_boundaries", "affinities", "semantic", "classes")
INSTANCE_TARGETS = ("foreground", "foreground_boundaries", "affinities")  # segment() gives one id per object


@dataclass(frozen=True)
class Targets:
    """What each output channel means, so instance labels can become training targets for it.

    foreground (1 sigmoid channel), foreground_boundaries (2: foreground and the cells' inner boundaries),
    affinities (one sigmoid channel per offset, optionally after a foreground channel; torch-em's convention:
    1 where the pixel and the pixel at the offset belong to different objects), semantic (channel k is class
    k + 1) and classes (softmax; two classes take any instance labels as foreground).
    """

    kind: str
    n_channels: int
    offsets: tuple[tuple[int, ...], ...] = ()

    @property
    def foreground_channel(self) -> bool:
        return self.kind == "affinities" and self.n_channels == len(self.offsets) + 1

    def make(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(targets (K, *spatial) float32, or (1, *spatial) int64 for classes; valid (K or 1, *spatial) bool)."""
        if self.kind == "affinities":
            affinities, valid = affinity_targets(labels, self.offsets)
            if self.foreground_channel:
                affinities = np.concatenate([(labels > 0)[None].astype(np.float32), affinities])
                valid = np.concatenate([np.ones((1, *labels.shape), bool), valid])
            return affinities, valid
        targets = make_targets(labels, "softmax" if self.kind == "classes" else "sigmoid", self.n_channels)
        return targets, np.ones((1, *labels.shape), bool)

    @property
    def loss_name(self) -> str:
        return "CE + Dice" if self.kind == "classes" else "BCE + Dice"


def choose_targets(output_kind: str, n_channels: int, spatial_dims: int, wanted: str | None = None,
                   offsets: Sequence[Sequence[int]] | None = None, config: Mapping[str, Any] | None = None,
                   name: str = "the model") -> Targets:
    """The targets for a model's outputs: ``wanted`` (one of TARGET_KINDS) and ``offsets`` when given, else what
    the outputs say (affinity offsets from the description's config, e.g. torch-em's ``mws.offsets``)."""
    if offsets is None and config:
        offsets = (config.get("mws") or {}).get("offsets") if isinstance(config.get("mws"), Mapping) else None
    offsets = tuple(tuple(int(v) for v in o) for o in offsets) if offsets else ()
    if offsets and any(len(o) != spatial_dims for o in offsets):
        raise BioadaptError(f"affinity offsets {list(offsets)} must have {spatial_dims} values each, one per "
                            "spatial axis")
    if wanted is not None and wanted not in TARGET_KINDS:
        raise BioadaptError(f"output_targets must be one of {TARGET_KINDS}, got {wanted!r}")
    if output_kind == "softmax":
        if wanted not in (None, "classes"):
            raise BioadaptError(f"{name} has softmax outputs: its targets are classes, not {wanted!r}")
        return Targets("classes", n_channels)
    if output_kind != "sigmoid":
        return Targets(output_kind, n_channels)
    affinity_channels = offsets and n_channels in (len(offsets), len(offsets) + 1)
    if wanted is None:
        wanted = ("affinities" if affinity_channels else "foreground" if n_channels == 1 else
                  "foreground_boundaries" if n_channels == 2 else "semantic")
    expected = {"foreground": 1, "foreground_boundaries": 2}
    if wanted in expected and n_channels != expected[wanted]:
        raise BioadaptError(f"{name} has {n_channels} sigmoid channels; {wanted!r} targets need {expected[wanted]}")
    if wanted == "affinities" and not affinity_channels:
        raise BioadaptError(f"{name} has {n_channels} sigmoid channels: affinity targets need one offset per "
                            f"channel (or per channel after a foreground channel); got offsets {list(offsets)}. "
                            "Pass affinity_offsets=[[dz, dy, dx] or [dy, dx], ...] in channel order")
    if wanted == "classes":
        raise BioadaptError(f"{name} has sigmoid outputs; 'classes' targets are for softmax outputs")
    return Targets(wanted, n_channels, offsets if wanted == "affinities" else ())


def affinity_targets(labels: np.ndarray, offsets: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per offset: 1 where a pixel and the pixel at the offset carry different labels (background counts as a
    label), 0 where the same; valid only where the offset pixel lies inside the patch."""
    affinities = np.zeros((len(offsets), *labels.shape), np.float32)
    valid = np.zeros((len(offsets), *labels.shape), bool)
    for k, offset in enumerate(offsets):
        here, there = [], []
        for o, n in zip(offset, labels.shape):
            here.append(slice(max(0, -o), n - max(0, o)))
            there.append(slice(max(0, o), n - max(0, -o)))
        here, there = tuple(here), tuple(there)
        affinities[k][here] = labels[here] != labels[there]
        valid[k][here] = True
    return affinities, valid


def make_targets(labels: np.ndarray, output_kind: str, n_classes: int) -> np.ndarray:
    """Instance or class labels (*spatial) -> targets (1 or K, *spatial) for the model's outputs.

    One sigmoid channel: foreground, without the pixels where two objects touch (the model's instances are the
    foreground's connected components, so only a gap between touching objects can teach it to split them; the
    original U-Net's separation borders). Two: foreground and the cells' inner boundaries (what seeded watershed in
    ``segment`` needs to split touching cells). More: channel k is label k + 1 (semantic). Softmax: class
    indices; two classes take any instance labels as foreground.
    """
    if output_kind == "sigmoid":
        if n_classes == 1:
            return ((labels > 0) & ~touching(labels))[None].astype(np.float32)
        if n_classes == 2:
            return np.stack([labels > 0, find_boundaries(labels, mode="inner")]).astype(np.float32)
        _check_classes(labels, n_classes + 1, semantic_sigmoid=True)
        return np.stack([labels == k + 1 for k in range(n_classes)]).astype(np.float32)
    if output_kind == "softmax":
        if n_classes == 2:
            return (labels > 0)[None].astype(np.int64)
        _check_classes(labels, n_classes)
        return labels[None].astype(np.int64)
    raise BioadaptError(f"no training targets for output kind {output_kind!r}")


def touching(labels: np.ndarray) -> np.ndarray:
    """Pixels of an object with a pixel of another object among their neighbours (a full 3 x 3 neighbourhood)."""
    labels = np.asarray(labels)
    if not labels.any():
        return np.zeros(labels.shape, bool)
    background = int(labels.max()) + 1  # background counts as larger than every object for the minimum
    largest = ndimage.maximum_filter(labels, size=3, mode="nearest")
    smallest = ndimage.minimum_filter(np.where(labels > 0, labels, background), size=3, mode="nearest")
    return (labels > 0) & ((largest != labels) | (smallest != labels))


def _check_classes(labels: np.ndarray, n: int, semantic_sigmoid: bool = False) -> None:
    if labels.max() >= n:
        other = (" If its channels are affinities, load it with output_targets='affinities' and affinity_offsets="
                 "[[dy, dx], ...] (one per channel); distance maps and other regression channels cannot be trained "
                 "from labels here" if semantic_sigmoid else "")
        raise BioadaptError(f"labels hold values up to {labels.max()} but the model predicts classes 0..{n - 1}; "
                            f"give class labels for this semantic model, not instance ids.{other}")


def as_probabilities(out: torch.Tensor, output_kind: str, from_logits: bool) -> torch.Tensor:
    if not from_logits:
        return out
    return torch.sigmoid(out) if output_kind == "sigmoid" else torch.softmax(out, dim=1)


def loss(out: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, output_kind: str,
         from_logits: bool) -> torch.Tensor:
    """BCE + Dice (sigmoid) or CE + Dice over foreground classes (softmax), on valid pixels only.

    ``out``: (N, K, *s) network outputs; ``target``: (N, K, *s) floats (sigmoid) or (N, 1, *s) class indices;
    ``valid``: (N, 1 or K, *s) bool (False on padding; per channel for affinities).
    """
    weight = valid.to(out.dtype)
    proba = as_probabilities(out, output_kind, from_logits)
    if output_kind == "sigmoid":
        if from_logits:
            pixel = F.binary_cross_entropy_with_logits(out, target, reduction="none")
        else:
            pixel = F.binary_cross_entropy(proba.clamp(1e-6, 1 - 1e-6), target, reduction="none")
        weight = weight.expand_as(pixel)
        data_term = (pixel * weight).sum() / weight.sum().clamp_min(1)
        onehot = target
    else:
        log_p = torch.log_softmax(out, 1) if from_logits else proba.clamp_min(1e-8).log()
        pixel = F.nll_loss(log_p, target[:, 0], reduction="none")
        data_term = (pixel * weight[:, 0]).sum() / weight.sum().clamp_min(1)
        onehot = F.one_hot(target[:, 0], out.shape[1]).movedim(-1, 1).to(out.dtype)[:, 1:]
        proba = proba[:, 1:]
    dims = (0,) + tuple(range(2, out.dim()))
    overlap = (proba * onehot * weight).sum(dims)
    total = ((proba + onehot) * weight).sum(dims)
    dice = (2 * overlap + 1) / (total + 1)
    return data_term + (1 - dice.mean())


def dice_score(out: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, output_kind: str,
               from_logits: bool) -> float:
    """Hard Dice of the thresholded (sigmoid) or argmax (softmax) prediction, mean over foreground channels."""
    proba = as_probabilities(out, output_kind, from_logits)
    if output_kind == "sigmoid":
        pred, truth = proba > 0.5, target > 0.5
    else:
        k = out.shape[1]
        pred = F.one_hot(proba.argmax(1), k).movedim(-1, 1)[:, 1:].bool()
        truth = F.one_hot(target[:, 0], k).movedim(-1, 1)[:, 1:].bool()
    pred, truth = pred & valid, truth & valid
    dims = (0,) + tuple(range(2, out.dim()))
    overlap = (pred & truth).sum(dims).double()
    total = (pred.sum(dims) + truth.sum(dims)).double()
    present = total > 0
    if not present.any():
        return 1.0
    return float((2 * overlap[present] / total[present]).mean())
