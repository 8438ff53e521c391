"""Corrected labels as the model's own training targets, the losses on them, and the validation score."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from skimage.segmentation import find_boundaries

from bioadapt.errors import BioadaptError


def make_targets(labels: np.ndarray, output_kind: str, n_classes: int) -> np.ndarray:
    """Instance or class labels (*spatial) -> targets (1 or K, *spatial) for the model's outputs.

    One sigmoid channel: foreground. Two: foreground and the cells' inner boundaries (what seeded watershed in
    ``segment`` needs to split touching cells). More: channel k is label k + 1 (semantic). Softmax: class
    indices; two classes take any instance labels as foreground.
    """
    if output_kind == "sigmoid":
        if n_classes == 1:
            return (labels > 0)[None].astype(np.float32)
        if n_classes == 2:
            return np.stack([labels > 0, find_boundaries(labels, mode="inner")]).astype(np.float32)
        _check_classes(labels, n_classes + 1)
        return np.stack([labels == k + 1 for k in range(n_classes)]).astype(np.float32)
    if output_kind == "softmax":
        if n_classes == 2:
            return (labels > 0)[None].astype(np.int64)
        _check_classes(labels, n_classes)
        return labels[None].astype(np.int64)
    raise BioadaptError(f"no training targets for output kind {output_kind!r}")


def _check_classes(labels: np.ndarray, n: int) -> None:
    if labels.max() >= n:
        raise BioadaptError(f"labels hold values up to {labels.max()} but the model predicts classes 0..{n - 1}; "
                            "give class labels for this semantic model, not instance ids")


def as_probabilities(out: torch.Tensor, output_kind: str, from_logits: bool) -> torch.Tensor:
    if not from_logits:
        return out
    return torch.sigmoid(out) if output_kind == "sigmoid" else torch.softmax(out, dim=1)


def loss(out: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, output_kind: str,
         from_logits: bool) -> torch.Tensor:
    """BCE + Dice (sigmoid) or CE + Dice over foreground classes (softmax), on valid pixels only.

    ``out``: (N, K, *s) network outputs; ``target``: (N, K, *s) floats (sigmoid) or (N, 1, *s) class indices;
    ``valid``: (N, 1, *s) bool (False on padding).
    """
    weight = valid.to(out.dtype)
    proba = as_probabilities(out, output_kind, from_logits)
    if output_kind == "sigmoid":
        if from_logits:
            pixel = F.binary_cross_entropy_with_logits(out, target, reduction="none")
        else:
            pixel = F.binary_cross_entropy(proba.clamp(1e-6, 1 - 1e-6), target, reduction="none")
        data_term = (pixel * weight).sum() / (weight.sum() * out.shape[1]).clamp_min(1)
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
