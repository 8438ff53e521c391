"""Patch scores: one number per patch from a per-pixel acquisition map."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from bioadapt.errors import BioadaptError

Reduce = Literal["mean", "max", "quantile"]


def patch_score(score_map: Any, mask: Any = None, reduce: Reduce = "mean", quantile: float = 0.95) -> float:
    """Reduce a map to a patch score over the pixels inside ``mask`` (all pixels when None).

    ``"mean"`` ranks patches by overall uncertainty; ``"max"`` and ``"quantile"`` find patches whose
    uncertainty sits in a few pixels (a single ambiguous cell in an otherwise easy field).
    """
    values = score_map.detach().float().cpu().numpy() if hasattr(score_map, "detach") else np.asarray(score_map)
    if mask is not None:
        mask = mask.detach().cpu().numpy() if hasattr(mask, "detach") else np.asarray(mask)
        if mask.shape != values.shape:
            raise BioadaptError(f"mask shape {mask.shape} does not match the score map's shape {values.shape}")
        values = values[mask.astype(bool)]
        if values.size == 0:
            raise BioadaptError("the mask excludes every pixel of the patch: no score can be computed")
    values = values.astype(np.float64, copy=False).ravel()
    if reduce == "mean":
        return float(values.mean())
    if reduce == "max":
        return float(values.max())
    if reduce == "quantile":
        if not 0.0 <= quantile <= 1.0:
            raise BioadaptError(f"quantile must lie in [0, 1], got {quantile}")
        return float(np.quantile(values, quantile))
    raise BioadaptError(f"reduce must be 'mean', 'max' or 'quantile', got {reduce!r}")
