"""Synthetic fluorescence-like images with instance labels, in several styles (to simulate domain shift).

Cells are ellipses (2D) or ellipsoids (3D), round or elongated, placed with a minimum spacing that
lets neighbours touch; each pixel belongs to the cell whose normalised ellipse distance is smallest,
so touching cells get clean shared borders. The image adds texture, a bright rim, blur, an uneven
background, Poisson shot noise and Gaussian read noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from bioadapt.errors import BioadaptError


@dataclass(frozen=True)
class CellStyle:
    name: str
    radius: tuple[float, float]  # minor semi-axis range, pixels
    elongation: tuple[float, float]  # major / minor semi-axis
    density: float  # target fraction of the area covered by cells
    spacing: float  # minimum centre distance, in mean radii (below 2 lets cells touch)
    intensity: tuple[float, float]  # mean photons per pixel inside a cell
    texture: float  # relative amplitude of intracellular texture
    rim: float  # 0: flat cells, 1: bright borders (membrane-like)
    background: float  # mean background photons
    unevenness: float  # relative amplitude of the slowly varying background
    blur: float  # point-spread sigma, pixels
    read_noise: float  # Gaussian noise sigma, photons


STYLES: dict[str, CellStyle] = {
    "nuclei": CellStyle("nuclei", (7, 11), (1.0, 1.3), 0.25, 2.3, (300, 600), 0.10, 0.0, 40, 0.2, 1.0, 5),
    "cytoplasm": CellStyle("cytoplasm", (9, 15), (1.4, 2.6), 0.35, 2.0, (150, 350), 0.35, 0.5, 60, 0.5, 1.5, 8),
    "crowded": CellStyle("crowded", (7, 10), (1.0, 1.5), 0.55, 1.7, (200, 450), 0.15, 0.2, 50, 0.3, 1.2, 6),
    "dim": CellStyle("dim", (7, 12), (1.0, 1.8), 0.30, 2.1, (40, 90), 0.25, 0.1, 30, 0.8, 1.5, 10),
}


@dataclass
class SyntheticImage:
    image: np.ndarray  # (C, [Z], Y, X)
    labels: np.ndarray  # ([Z], Y, X) int32 instance ids, 0 = background
    tissue: np.ndarray | None  # ([Z], Y, X) bool, where cells may sit; None when the whole image is tissue
    style: CellStyle

    @property
    def axes(self) -> str:
        return "czyx" if self.image.ndim == 4 else "cyx"


def get_style(style: str | CellStyle) -> CellStyle:
    if isinstance(style, CellStyle):
        return style
    if style not in STYLES:
        raise BioadaptError(f"unknown synthetic style '{style}': choose one of {sorted(STYLES)}")
    return STYLES[style]


def smooth_field(shape: Sequence[int], rng: np.random.Generator, sigma_fraction: float = 0.15) -> np.ndarray:
    """A slowly varying random field in [-1, 1], computed on a coarse grid and upsampled."""
    coarse_shape = [max(4, math.ceil(s / 16)) for s in shape]
    coarse = ndimage.gaussian_filter(rng.standard_normal(coarse_shape),
                                     [max(1.0, c * sigma_fraction) for c in coarse_shape], mode="reflect")
    field = ndimage.zoom(coarse, [s / c for s, c in zip(shape, coarse_shape)], order=1)
    field = field[tuple(slice(0, s) for s in shape)]
    field -= field.mean()
    return (field / (np.abs(field).max() + 1e-12)).astype(np.float32)


def tissue_mask(shape: Sequence[int], rng: np.random.Generator, fraction: float = 0.5) -> np.ndarray:
    """A smooth blob-shaped region covering about ``fraction`` of the image."""
    field = smooth_field(shape, rng, sigma_fraction=0.12)
    return field > np.quantile(field, 1.0 - fraction)


def _place_centres(shape: Sequence[int], style: CellStyle, rng: np.random.Generator,
                   allowed: np.ndarray | None) -> np.ndarray:
    mean_radius = float(np.mean(style.radius))
    mean_elong = float(np.mean(style.elongation))
    if len(shape) == 2:
        cell_volume = math.pi * mean_radius**2 * mean_elong
    else:
        cell_volume = 4 / 3 * math.pi * mean_radius**3 * mean_elong
    area = float(allowed.sum()) if allowed is not None else float(np.prod(shape))
    target = max(1, int(style.density * area / cell_volume))
    min_distance = style.spacing * mean_radius
    cell = min_distance
    occupied: dict[tuple[int, ...], list[np.ndarray]] = {}
    centres: list[np.ndarray] = []
    attempts = 0
    while len(centres) < target and attempts < 30 * target:
        attempts += 1
        point = rng.random(len(shape)) * np.asarray(shape)
        if allowed is not None and not allowed[tuple(np.minimum(point.astype(int), np.asarray(shape) - 1))]:
            continue
        key = tuple((point // cell).astype(int))
        neighbours = (occupied.get(tuple(k + d for k, d in zip(key, offset)), [])
                      for offset in np.ndindex(*([3] * len(shape))) for offset in [tuple(o - 1 for o in offset)])
        if any(np.sum((point - other) ** 2) < min_distance**2 for group in neighbours for other in group):
            continue
        occupied.setdefault(key, []).append(point)
        centres.append(point)
    return np.asarray(centres).reshape(-1, len(shape))


def _random_rotation(ndim: int, rng: np.random.Generator) -> np.ndarray:
    if ndim == 2:
        angle = rng.uniform(0, math.pi)
        return np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _render_cells(shape: Sequence[int], centres: np.ndarray, style: CellStyle,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Instance labels and the normalised ellipse distance (0 at a centre, 1 at the border)."""
    ndim = len(shape)
    labels = np.zeros(shape, dtype=np.int32)
    distance = np.full(shape, np.inf, dtype=np.float32)
    for label, centre in enumerate(centres, start=1):
        minor = rng.uniform(*style.radius)
        semi_axes = np.full(ndim, minor)
        semi_axes[-1] = minor * rng.uniform(*style.elongation)
        rotation = _random_rotation(ndim, rng)
        reach = int(math.ceil(semi_axes.max())) + 1
        low = np.maximum(np.floor(centre).astype(int) - reach, 0)
        high = np.minimum(np.floor(centre).astype(int) + reach + 1, shape)
        if np.any(high <= low):
            continue
        grids = np.meshgrid(*[np.arange(lo, hi) + 0.5 for lo, hi in zip(low, high)], indexing="ij")
        offsets = np.stack([g - c for g, c in zip(grids, centre)], axis=-1)
        local = offsets @ rotation  # coordinates in the ellipse's own frame
        q = np.sum((local / semi_axes) ** 2, axis=-1).astype(np.float32)
        window = tuple(slice(lo, hi) for lo, hi in zip(low, high))
        wins = (q < 1.0) & (q < distance[window])
        labels[window][wins] = label
        distance[window][wins] = q[wins]
    distance[labels == 0] = 1.0
    return labels, np.sqrt(distance)


def synthetic_cells(shape: Sequence[int], style: str | CellStyle = "nuclei", seed: int = 0, *,
                    n_channels: int = 1, tissue_fraction: float | None = None,
                    dtype: str | np.dtype = "uint16") -> SyntheticImage:
    """A synthetic image of ``shape`` ((Y, X) or (Z, Y, X)) with instance labels.

    ``n_channels=2`` adds a nuclear channel (a small bright core per cell). ``tissue_fraction`` confines
    cells to a blob-shaped region covering that fraction of the image (for sampling-mask demos).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3):
        raise BioadaptError(f"synthetic images are 2D (Y, X) or 3D (Z, Y, X), got shape {shape}")
    if n_channels not in (1, 2):
        raise BioadaptError(f"n_channels must be 1 (cells) or 2 (cells and nuclei), got {n_channels}")
    cell_style = get_style(style)
    rng = np.random.default_rng(seed)
    tissue = tissue_mask(shape, rng, tissue_fraction) if tissue_fraction is not None else None
    centres = _place_centres(shape, cell_style, rng, tissue)
    labels, distance = _render_cells(shape, centres, cell_style, rng)

    brightness = np.zeros(len(centres) + 1, dtype=np.float32)
    brightness[1:] = rng.uniform(*cell_style.intensity, size=len(centres))
    texture = 1.0 + cell_style.texture * ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 1.5) * 3
    profile = (1.0 - cell_style.rim) + cell_style.rim * distance**2 * 1.5
    inside = labels > 0
    channels = [np.where(inside, brightness[labels] * profile * np.clip(texture, 0.2, None), 0.0)]
    if n_channels == 2:
        channels.append(np.where(inside & (distance < 0.55), brightness[labels] * 1.5, 0.0))
    background = cell_style.background * (1.0 + cell_style.unevenness * smooth_field(shape, rng))
    out_dtype = np.dtype(dtype)
    image = np.empty((n_channels, *shape), dtype=out_dtype)
    for c, signal in enumerate(channels):
        clean = ndimage.gaussian_filter(signal.astype(np.float32), cell_style.blur) + background
        noisy = rng.poisson(np.clip(clean, 0, None)).astype(np.float32)
        noisy += rng.normal(0.0, cell_style.read_noise, size=shape).astype(np.float32)
        if np.issubdtype(out_dtype, np.integer):
            noisy = np.clip(np.rint(noisy), 0, np.iinfo(out_dtype).max)
        image[c] = noisy.astype(out_dtype)
    return SyntheticImage(image=image, labels=labels, tissue=tissue, style=cell_style)


def write_synthetic_ome_zarr(path: str | Path, shape: Sequence[int], style: str | CellStyle = "nuclei",
                             seed: int = 0, *, n_channels: int = 1, tissue_fraction: float | None = None,
                             version: str = "0.5", chunks: Sequence[int] | None = None,
                             overwrite: bool = False) -> SyntheticImage:
    """Write a synthetic image as OME-Zarr with ``labels/ground_truth`` (and ``labels/tissue`` when confined)."""
    from bioadapt.data.writer import write_ome_zarr

    sample = synthetic_cells(shape, style, seed, n_channels=n_channels, tissue_fraction=tissue_fraction)
    label_images = {"ground_truth": sample.labels.astype(np.uint32)}
    if sample.tissue is not None:
        label_images["tissue"] = sample.tissue.astype(np.uint8)
    write_ome_zarr(path, sample.image, sample.axes, version=version, chunks=chunks, labels=label_images,
                   overwrite=overwrite)
    return sample
