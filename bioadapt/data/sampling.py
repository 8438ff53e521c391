"""Draw patch windows: random and non-overlapping, or a grid, inside an optional sampling mask."""

from __future__ import annotations

import itertools
import logging
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

import numpy as np

from bioadapt.data.image import Image
from bioadapt.data.masks import DEFAULT_MAX_MASK_PIXELS, SamplingMask
from bioadapt.data.windows import as_int_tuple, windows_overlap
from bioadapt.errors import BioadaptError

log = logging.getLogger(__name__)

MaskLike = SamplingMask | np.ndarray | Image | str | None
AUTO_MASK_SMOOTHING = 16  # level-0 pixels: sparse cells merge into one foreground region


@dataclass(frozen=True)
class PatchWindow:
    """A patch: level-0 origin and shape along the image's spatial axes (z y x order)."""

    origin: tuple[int, ...]
    shape: tuple[int, ...]
    mask_fraction: float = 1.0

    @property
    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + s) for o, s in zip(self.origin, self.shape))

    def overlaps(self, other: "PatchWindow") -> bool:
        return windows_overlap(self.origin, self.shape, other.origin, other.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"origin": list(self.origin), "shape": list(self.shape), "mask_fraction": self.mask_fraction}


def resolve_mask(image: Image, mask: MaskLike, *, mask_scale: Sequence[float] | float | None = None,
                 max_mask_pixels: int = DEFAULT_MAX_MASK_PIXELS) -> SamplingMask | None:
    """Turn what a user passes as a mask into a coarse ``SamplingMask``.

    - ``SamplingMask``: used as is.
    - ``"auto"``: the foreground of the image's coarsest level (smoothed over a few cell diameters).
    - ``str``: the name of a label image in the same OME-Zarr (``"tissue"`` or ``"labels/tissue"``).
    - ``Image``: an aligned label image (e.g. another OME-Zarr); its coarsest usable level is used.
    - array: a mask at its own scale (``mask_scale`` level-0 pixels per mask pixel, default the shape ratio).
    """
    if mask is None or isinstance(mask, SamplingMask):
        return mask
    if isinstance(mask, str) and mask == "auto":
        return SamplingMask.from_image_level(image, level=-1, smooth_sigma=AUTO_MASK_SMOOTHING)
    if isinstance(mask, str):
        name = mask.removeprefix("labels/")
        return SamplingMask.from_label_image(image.label_image(name), image, max_pixels=max_mask_pixels)
    if isinstance(mask, Image):
        return SamplingMask.from_label_image(mask, image, max_pixels=max_mask_pixels)
    if isinstance(mask, np.ndarray) or hasattr(mask, "__array__"):
        return SamplingMask.from_array(np.asarray(mask), image, scale=mask_scale)
    raise BioadaptError(f"mask must be a label name, an Image, an array or a SamplingMask, got {type(mask).__name__}")


class _OccupancyGrid:
    """Accepted windows hashed on a grid of patch-sized cells, for fast overlap checks."""

    def __init__(self, cell_shape: Sequence[int]):
        self.cell_shape = tuple(cell_shape)
        self.cells: dict[tuple[int, ...], list[PatchWindow]] = defaultdict(list)

    def _cells_of(self, window: PatchWindow) -> Iterable[tuple[int, ...]]:
        ranges = [range(o // c, (o + s - 1) // c + 1) for o, s, c in zip(window.origin, window.shape, self.cell_shape)]
        return itertools.product(*ranges)

    def collides(self, window: PatchWindow) -> bool:
        return any(window.overlaps(other) for cell in self._cells_of(window) for other in self.cells.get(cell, ()))

    def add(self, window: PatchWindow) -> None:
        for cell in self._cells_of(window):
            self.cells[cell].append(window)


def _check_patch_shape(image: Image, patch_shape: Sequence[int]) -> tuple[int, ...]:
    spatial = image.spatial_shape
    shape = as_int_tuple(patch_shape, "patch_shape")
    if len(shape) != len(spatial):
        raise BioadaptError(f"patch_shape {shape} must have {len(spatial)} values for the spatial axes "
                            f"'{image.spatial_axes}' of '{image.uri}'")
    if any(s <= 0 for s in shape) or any(s > d for s, d in zip(shape, spatial)):
        raise BioadaptError(f"patch_shape {shape} must be positive and fit in the image's spatial shape {spatial}")
    return shape


def sample_patches(image: Image, n: int | None, patch_shape: Sequence[int], mask: MaskLike = None, seed: int = 0, *,
                   mode: Literal["random", "grid"] = "random", min_mask_fraction: float = 0.5,
                   mask_scale: Sequence[float] | float | None = None, avoid: Sequence[PatchWindow] = (),
                   stride: Sequence[int] | None = None, max_attempts: int | None = None,
                   max_mask_pixels: int = DEFAULT_MAX_MASK_PIXELS) -> list[PatchWindow]:
    """Draw up to ``n`` patch windows of ``patch_shape`` from ``image``.

    ``mode="random"``: uniform (or proportional to mask coverage) and non-overlapping, with each other and
    with ``avoid``; the same seed gives the same patches. ``mode="grid"``: tiles with ``stride`` (default the
    patch shape) over the image or the mask's bounding box; a seeded subset of ``n`` when there are more.
    With a mask, a patch needs at least ``min_mask_fraction`` of its pixels inside it.
    Nothing is read at full resolution: the mask is used at a coarse level.
    """
    shape = _check_patch_shape(image, patch_shape)
    if n is not None and n < 0:
        raise BioadaptError(f"n must be a non-negative number of patches, got {n}")
    if not 0.0 <= min_mask_fraction <= 1.0:
        raise BioadaptError(f"min_mask_fraction must lie in [0, 1], got {min_mask_fraction}")
    sampling_mask = resolve_mask(image, mask, mask_scale=mask_scale, max_mask_pixels=max_mask_pixels)
    if sampling_mask is not None and sampling_mask.covered_fraction == 0.0:
        raise BioadaptError("the sampling mask excludes the whole image: no pixel lies inside it; "
                            "check the mask (label name, threshold or array)")
    rng = np.random.default_rng(seed)
    if mode == "grid":
        windows = _grid(image, shape, sampling_mask, min_mask_fraction, stride)
        if n is not None and n < len(windows):
            keep = np.sort(rng.choice(len(windows), size=n, replace=False))
            windows = [windows[i] for i in keep]
    elif mode == "random":
        if n is None:
            raise BioadaptError("random sampling needs n, the number of patches")
        windows = _random(image, n, shape, sampling_mask, min_mask_fraction, rng, avoid, max_attempts)
    else:
        raise BioadaptError(f"mode must be 'random' or 'grid', got {mode!r}")
    if not windows and n != 0:
        where = "inside the mask" if sampling_mask is not None else "in the image"
        raise BioadaptError(f"no patch of shape {shape} fits {where} with min_mask_fraction={min_mask_fraction} "
                            f"(mask covers {100 * (sampling_mask.covered_fraction if sampling_mask else 1):.2f}% "
                            "of the image): use smaller patches, a lower min_mask_fraction or a larger mask")
    return windows


def _random(image: Image, n: int, shape: tuple[int, ...], mask: SamplingMask | None, min_fraction: float,
            rng: np.random.Generator, avoid: Sequence[PatchWindow], max_attempts: int | None) -> list[PatchWindow]:
    spatial = np.asarray(image.spatial_shape)
    half = np.asarray(shape) / 2
    highest_origin = spatial - np.asarray(shape)
    grid = _OccupancyGrid(shape)
    for window in avoid:
        grid.add(window)
    max_attempts = max_attempts if max_attempts is not None else max(2000, 200 * n)
    accepted: list[PatchWindow] = []
    attempts = 0
    while len(accepted) < n and attempts < max_attempts:
        batch = min(max(4 * (n - len(accepted)), 64), max_attempts - attempts)
        if mask is None:
            origins = np.floor(rng.random((batch, len(shape))) * (highest_origin + 1)).astype(np.int64)
        else:
            centres = mask.draw_centres(rng, batch)
            origins = np.clip(np.floor(centres - half), 0, highest_origin).astype(np.int64)
        for origin in origins:
            attempts += 1
            fraction = mask.fraction(origin, shape) if mask is not None else 1.0
            if fraction < min_fraction or fraction == 0.0:
                continue
            window = PatchWindow(tuple(int(o) for o in origin), shape, round(fraction, 4))
            if grid.collides(window):
                continue
            grid.add(window)
            accepted.append(window)
            if len(accepted) == n:
                break
    if 0 < len(accepted) < n:
        message = (f"found only {len(accepted)} of {n} non-overlapping patches of shape {shape} after "
                   f"{attempts} attempts; the image or mask has room for fewer")
        log.warning(message)
        warnings.warn(message, stacklevel=3)
    return accepted


def _grid(image: Image, shape: tuple[int, ...], mask: SamplingMask | None, min_fraction: float,
          stride: Sequence[int] | None) -> list[PatchWindow]:
    spatial = image.spatial_shape
    step = tuple(int(s) for s in stride) if stride is not None else shape
    if len(step) != len(shape) or any(s <= 0 for s in step):
        raise BioadaptError(f"stride {step} must have {len(shape)} positive values")
    if mask is not None:
        box = mask.bounding_box()
        if box is None:
            return []
        start, extent = box
    else:
        start, extent = (0,) * len(shape), spatial
    axes_origins = []
    for a, e, s, st, d in zip(start, extent, shape, step, spatial):
        first = min(a, d - s)
        axes_origins.append(range(first, min(a + e, d - s + 1), st) or range(first, first + 1))
    windows = []
    for index in np.ndindex(*[len(r) for r in axes_origins]):
        origin = tuple(int(r[i]) for r, i in zip(axes_origins, index))
        fraction = mask.fraction(origin, shape) if mask is not None else 1.0
        if mask is None or (fraction >= min_fraction and fraction > 0.0):
            windows.append(PatchWindow(origin, shape, round(fraction, 4)))
    return windows
