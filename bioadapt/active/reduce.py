"""Patch scores: one number per patch from a per-pixel acquisition map."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from bioadapt.errors import BioadaptError

Reduce = Literal["mean", "max", "quantile", "object_mean", "object_sum", "object_max", "nonconvex"]
REDUCES = ("mean", "max", "quantile", "object_mean", "object_sum", "object_max", "nonconvex")


def patch_score(score_map: Any, mask: Any = None, reduce: Reduce = "mean", quantile: float = 0.95,
                labels: Any = None) -> float:
    """Reduce a map to a patch score over the pixels inside ``mask`` (all pixels when None).

    ``"mean"`` ranks patches by overall uncertainty; ``"max"`` and ``"quantile"`` find patches whose
    uncertainty sits in a few pixels (a single ambiguous cell in an otherwise easy field). ``"object_mean"``,
    ``"object_sum"`` and ``"object_max"`` score the patch by its objects instead of its pixels (see
    ``bioadapt.active.objects``); they need the model's ``labels`` of the patch. ``"nonconvex"`` counts the
    model's objects that look like merged ones and ignores the map (``bioadapt.active.shapes``): what MC dropout
    cannot see.
    """
    if reduce == "nonconvex":
        from bioadapt.active.shapes import nonconvex_count

        if labels is None:
            raise BioadaptError("reduce='nonconvex' counts the patch's merged-looking objects: pass the model's labels")
        return float(nonconvex_count(labels, _check_mask(mask, np.shape(labels))))
    if reduce.startswith("object_"):
        from bioadapt.active.objects import object_patch_score

        if labels is None:
            raise BioadaptError(f"reduce={reduce!r} scores the patch's objects: pass the model's labels")
        _check_mask(mask, np.shape(score_map))
        return object_patch_score(score_map, labels, mask, reduce.removeprefix("object_"))
    values = score_map.detach().float().cpu().numpy() if hasattr(score_map, "detach") else np.asarray(score_map)
    if mask is not None:
        mask = _check_mask(mask, values.shape)
        values = values[mask]
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
    raise BioadaptError(f"reduce must be one of {REDUCES}, got {reduce!r}")


def _check_mask(mask: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    if mask is None:
        return None
    mask = mask.detach().cpu().numpy() if hasattr(mask, "detach") else np.asarray(mask)
    if mask.shape != tuple(shape):
        raise BioadaptError(f"mask shape {mask.shape} does not match the score map's shape {tuple(shape)}")
    return mask.astype(bool)
