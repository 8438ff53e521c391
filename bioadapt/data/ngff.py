"""OME-NGFF metadata: read multiscales from a group, write them through ome-zarr-py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import zarr
from ome_zarr.format import FormatV04, FormatV05
from ome_zarr.writer import get_metadata, write_label_metadata, write_multiscales_metadata

from bioadapt.errors import BioadaptError

AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
CANONICAL_ORDER = "tczyx"
SUPPORTED_VERSIONS = ("0.4", "0.5")


@dataclass(frozen=True)
class MultiscaleLevel:
    """One resolution level: its array path and the physical scale/translation of each axis."""

    path: str
    scale: tuple[float, ...]
    translation: tuple[float, ...]


@dataclass(frozen=True)
class Multiscales:
    version: str
    axes: str
    units: dict[str, str]
    levels: list[MultiscaleLevel]
    name: str | None


def ngff_format(version: str):
    """The ome-zarr-py format object for an NGFF version ('0.4' on Zarr v2, '0.5' on Zarr v3)."""
    if version == "0.4":
        return FormatV04()
    if version == "0.5":
        return FormatV05()
    raise BioadaptError(f"NGFF version '{version}' is not supported: use one of {SUPPORTED_VERSIONS}")


def ngff_version_for(zarr_format: int) -> str:
    return "0.4" if zarr_format == 2 else "0.5"


def _transforms(items: Sequence[dict[str, Any]] | None, ndim: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    scale = [1.0] * ndim
    translation = [0.0] * ndim
    for item in items or []:
        if item.get("type") == "scale" and "scale" in item:
            scale = [a * b for a, b in zip(scale, item["scale"])]
        elif item.get("type") == "translation" and "translation" in item:
            translation = [a + b for a, b in zip(translation, item["translation"])]
    return tuple(float(s) for s in scale), tuple(float(t) for t in translation)


def read_multiscales(group: zarr.Group) -> Multiscales | None:
    """The first multiscales entry of an OME-Zarr group, None when the group has none."""
    attrs = get_metadata(group)
    entries = attrs.get("multiscales")
    if not entries:
        return None
    entry = entries[0]
    version = str(attrs.get("version") or entry.get("version") or "")
    axes_meta = entry.get("axes")
    if not axes_meta:
        raise BioadaptError(f"the OME-Zarr at '{group.store}' has multiscales without axes (NGFF < 0.4); "
                            "convert it to NGFF 0.4 or 0.5 first")
    names = [a["name"] if isinstance(a, dict) else a for a in axes_meta]
    units = {a["name"]: a["unit"] for a in axes_meta if isinstance(a, dict) and a.get("unit")}
    axes = "".join(n.lower() for n in names)
    outer_scale, outer_translation = _transforms(entry.get("coordinateTransformations"), len(axes))
    levels = []
    for dataset in entry["datasets"]:
        scale, translation = _transforms(dataset.get("coordinateTransformations"), len(axes))
        levels.append(MultiscaleLevel(
            path=dataset["path"],
            scale=tuple(s * o for s, o in zip(scale, outer_scale)),
            translation=tuple(t * o + ot for t, o, ot in zip(translation, outer_scale, outer_translation)),
        ))
    return Multiscales(version=version, axes=axes, units=units, levels=levels, name=entry.get("name"))


def axes_metadata(axes: str, units: dict[str, str] | None = None) -> list[dict[str, str]]:
    """NGFF axis dictionaries for an axes string such as 'czyx'."""
    units = units or {}
    out = []
    for name in axes:
        axis = {"name": name, "type": AXIS_TYPES[name]}
        if name in units:
            axis["unit"] = units[name]
        out.append(axis)
    return out


def write_multiscales(group: zarr.Group, *, axes: str, level_paths: Sequence[str],
                      level_scales: Sequence[Sequence[float]], version: str,
                      units: dict[str, str] | None = None, name: str | None = None,
                      translation: Sequence[float] | None = None) -> None:
    """Write the multiscales metadata for arrays already stored in ``group``."""
    datasets = []
    for path, scale in zip(level_paths, level_scales):
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": [float(s) for s in scale]}]
        if translation is not None and any(translation):
            transforms.append({"type": "translation", "translation": [float(t) for t in translation]})
        datasets.append({"path": path, "coordinateTransformations": transforms})
    write_multiscales_metadata(group, datasets, fmt=ngff_format(version), axes=axes_metadata(axes, units), name=name)


def register_label(labels_group: zarr.Group, name: str, *, version: str, source_image: str | None) -> None:
    """Mark ``labels_group/name`` as an NGFF label image and list it in the labels group."""
    if name in listed_labels(labels_group):  # ome-zarr-py appends the name again on every call
        return
    metadata: dict[str, Any] = {}
    if source_image is not None:
        metadata["source"] = {"image": source_image}
    write_label_metadata(labels_group, name, fmt=ngff_format(version), **metadata)


def listed_labels(labels_group: zarr.Group) -> list[str]:
    """The names a ``labels`` group lists in its NGFF metadata."""
    return list(get_metadata(labels_group).get("labels", []))


def label_names(group: zarr.Group) -> list[str]:
    """Names of the label images listed under ``group/labels``."""
    try:
        labels_group = group["labels"]
    except (KeyError, FileNotFoundError):
        return []
    return listed_labels(labels_group) if isinstance(labels_group, zarr.Group) else []
