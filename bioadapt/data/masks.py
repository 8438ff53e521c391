"""Sampling masks: where patches may be drawn, kept at a coarse resolution.

A mask is stored as *coverage*: for each coarse cell, the fraction of its level-0 pixels that lie
inside the mask. A full-resolution mask is never held in memory; a label image with no coarse
level small enough is reduced block by block.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from bioadapt.data.image import Image
from bioadapt.errors import BioadaptError

DEFAULT_MAX_MASK_PIXELS = 16_000_000


class SamplingMask:
    """Coverage in [0, 1] on a coarse grid; ``factors`` = level-0 pixels per cell along each spatial axis."""

    def __init__(self, coverage: np.ndarray, factors: Sequence[float]):
        coverage = np.asarray(coverage, dtype=np.float32)
        if coverage.ndim != len(factors):
            raise BioadaptError(f"mask has {coverage.ndim} dimensions but {len(factors)} scale factors were given")
        if any(f <= 0 for f in factors):
            raise BioadaptError(f"mask scale factors {tuple(factors)} must be positive")
        self.coverage = coverage
        self.factors = tuple(float(f) for f in factors)
        self._cells: np.ndarray | None = None
        self._cumulative: np.ndarray | None = None

    # -- constructors ----------------------------------------------------------------------------
    @classmethod
    def from_array(cls, mask: np.ndarray, image: Image, scale: Sequence[float] | float | None = None) -> "SamplingMask":
        """A binary (or label) array over the image's spatial extent, at its own scale.

        ``scale`` is the number of level-0 pixels per mask pixel (one value or one per axis); by default it is
        the ratio of the image's spatial shape to the mask's shape.
        """
        mask = np.asarray(mask)
        spatial = image.spatial_shape
        if mask.ndim != len(spatial):
            raise BioadaptError(f"mask of shape {mask.shape} has {mask.ndim} dimensions; the image's spatial axes "
                                f"'{image.spatial_axes}' need {len(spatial)}")
        if scale is None:
            factors = tuple(s / m for s, m in zip(spatial, mask.shape))
        elif np.isscalar(scale):
            factors = (float(scale),) * mask.ndim
        else:
            factors = tuple(float(s) for s in scale)
        return cls(mask > 0, factors)

    @classmethod
    def from_label_image(cls, labels: Image, image: Image, *,
                         max_pixels: int = DEFAULT_MAX_MASK_PIXELS) -> "SamplingMask":
        """A label image aligned with ``image`` (any non-zero label is inside), from its coarsest usable level."""
        if labels.spatial_axes != image.spatial_axes:
            raise BioadaptError(f"mask '{labels.uri}' has spatial axes '{labels.spatial_axes}' but the image has "
                                f"'{image.spatial_axes}'")
        to_image = [i / l for i, l in zip(image.spatial_shape, labels.spatial_shape)]
        small_enough = [lv for lv in labels.levels if math.prod(labels.spatial_shape_of(lv.index)) <= max_pixels]
        if small_enough:
            level = small_enough[0]
            data = labels.read_level(level.index, max_pixels=max_pixels * labels.n_channels)
            factors = tuple(f * r for f, r in zip(level.factors, to_image))
            return cls(np.any(data > 0, axis=0), factors)
        return cls._reduced(labels, to_image, max_pixels)

    @classmethod
    def _reduced(cls, labels: Image, to_image: Sequence[float], max_pixels: int) -> "SamplingMask":
        """Coverage by block-averaging the finest level chunk row by chunk row (never all at once)."""
        coarsest = labels.levels[-1]
        spatial = labels.spatial_shape_of(coarsest.index)
        factor = math.ceil((math.prod(spatial) / max_pixels) ** (1 / len(spatial)))
        chunks = [coarsest.chunks[labels.axes.index(a)] for a in labels.spatial_axes]
        block = [max(factor, (c // factor) * factor) for c in chunks]
        coverage = np.zeros([math.ceil(s / factor) for s in spatial], dtype=np.float32)
        for starts in np.ndindex(*[math.ceil(s / b) for s, b in zip(spatial, block)]):
            origin = [i * b for i, b in zip(starts, block)]
            shape = [min(b, s - o) for b, s, o in zip(block, spatial, origin)]
            inside = np.any(labels.read(origin, shape, level=coarsest.index) > 0, axis=0)
            padded = np.zeros([math.ceil(s / factor) * factor for s in shape], dtype=np.float32)
            padded[tuple(slice(0, s) for s in shape)] = inside
            reshaped = padded.reshape([v for s in padded.shape for v in (s // factor, factor)])
            cells = reshaped.mean(axis=tuple(range(1, reshaped.ndim, 2)))
            target = tuple(slice(o // factor, o // factor + c) for o, c in zip(origin, cells.shape))
            coverage[target] = cells
        factors = tuple(f * factor * r for f, r in zip(coarsest.factors, to_image))
        return cls(coverage, factors)

    @classmethod
    def from_image_level(cls, image: Image, level: int = -1, threshold: float | str = "otsu",
                         smooth_sigma: float = 0.0) -> "SamplingMask":
        """Foreground (e.g. tissue) of a coarse level of the image itself: mean over channels > threshold.

        ``smooth_sigma`` (in level-0 pixels) blurs first, so sparse cells merge into one tissue region;
        a few cell diameters works well.
        """
        lv = image.levels[level % len(image.levels)]
        data = image.read_level(lv.index, dtype=np.float32).mean(axis=0)
        if smooth_sigma > 0:
            from scipy.ndimage import gaussian_filter

            data = gaussian_filter(data, [smooth_sigma / f for f in lv.factors])
        if threshold == "otsu":
            from skimage.filters import threshold_otsu

            threshold = float(threshold_otsu(data)) if data.min() < data.max() else float(data.max())
        return cls(data > float(threshold), lv.factors)

    # -- queries ---------------------------------------------------------------------------------
    @property
    def covered_fraction(self) -> float:
        return float(self.coverage.mean()) if self.coverage.size else 0.0

    def fraction(self, origin: Sequence[int], shape: Sequence[int]) -> float:
        """Fraction of the level-0 window ``origin``/``shape`` that lies inside the mask (area-weighted)."""
        weights, slices = [], []
        for o, s, f, n in zip(origin, shape, self.factors, self.coverage.shape):
            start, stop = o / f, (o + s) / f
            first, last = int(math.floor(start)), min(int(math.ceil(stop)), n)
            if first >= last:
                return 0.0
            edges = np.arange(first, last + 1, dtype=np.float64)
            weights.append(np.clip(np.minimum(stop, edges[1:]) - np.maximum(start, edges[:-1]), 0, None))
            slices.append(slice(first, last))
        inside = self.coverage[tuple(slices)].astype(np.float64)
        for w in reversed(weights):  # contract the last axis each time
            inside = inside @ w
        volume = math.prod(s / f for s, f in zip(shape, self.factors))
        return float(inside / volume)

    def window(self, origin: Sequence[int], shape: Sequence[int]) -> np.ndarray:
        """A level-0 boolean mask of the window ``origin``/``shape``: each pixel takes its coarse cell's value
        (inside when at least half of the cell is covered)."""
        index = [np.minimum((np.arange(o, o + s) + 0.5) // f, n - 1).astype(np.int64)
                 for o, s, f, n in zip(origin, shape, self.factors, self.coverage.shape)]
        return self.coverage[np.ix_(*index)] >= 0.5

    def bounding_box(self) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """Level-0 origin and shape enclosing every covered cell, None when nothing is covered."""
        covered = np.nonzero(self.coverage > 0)
        if not covered[0].size:
            return None
        origin = tuple(int(math.floor(idx.min() * f)) for idx, f in zip(covered, self.factors))
        stop = tuple(int(math.ceil((idx.max() + 1) * f)) for idx, f in zip(covered, self.factors))
        return origin, tuple(b - a for a, b in zip(origin, stop))

    def draw_centres(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """``count`` level-0 points drawn with density proportional to coverage, shape (count, ndim)."""
        if self._cells is None:
            # Only covered cells enter the cumulative sum, so sparse masks cost little memory.
            self._cells = np.flatnonzero(self.coverage)
            self._cumulative = np.cumsum(self.coverage.ravel()[self._cells], dtype=np.float64)
        if not self._cells.size:
            raise BioadaptError("the sampling mask excludes the whole image: no pixel lies inside it")
        picks = np.searchsorted(self._cumulative, rng.random(count) * self._cumulative[-1], side="right")
        cells = self._cells[np.minimum(picks, self._cells.size - 1)]
        index = np.stack(np.unravel_index(cells, self.coverage.shape), axis=1).astype(np.float64)
        return (index + rng.random(index.shape)) * np.asarray(self.factors)
