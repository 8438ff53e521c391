"""TIFF and OME-TIFF files read in place through tifffile's Zarr store: chunks are the file's own tiles or strips,
read only when a window overlaps them; axes from tifffile's series (OME-XML for OME-TIFF) or the caller."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tifffile
import zarr

from bioadapt.errors import BioadaptError

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".tf2")
# tifffile's axis letters -> NGFF axes. 'S' holds RGB samples; 'I'/'Q' are unnamed image sequences.
TIFF_AXES = {"T": "t", "C": "c", "S": "c", "Z": "z", "Y": "y", "X": "x", "I": "t", "Q": "t"}
OME_UNITS = {"µm": "micrometer", "um": "micrometer", "nm": "nanometer", "mm": "millimeter"}
SUPPORTED = ("OME-Zarr (NGFF 0.4 / 0.5) and plain Zarr arrays (local, file://, http(s)://, s3://), and local TIFF / "
             "OME-TIFF files (read in place)")
CONVERT_HINT = "`bioadapt convert in.tif out.ome.zarr` writes a chunked, multiscale OME-Zarr from any TIFF tifffile reads"


def is_tiff_path(path: str | Path) -> bool:
    return str(path).lower().endswith(TIFF_SUFFIXES)


def physical_scale(tif: tifffile.TiffFile, axes: str) -> tuple[list[float], dict[str, str]]:
    """Pixel sizes (NGFF axes ``axes``) from OME-XML when the file has them, else 1."""
    scale = {a: 1.0 for a in axes}
    units: dict[str, str] = {}
    if tif.ome_metadata:
        image = tifffile.xml2dict(tif.ome_metadata).get("OME", {}).get("Image", {})
        pixels = (image[0] if isinstance(image, list) else image).get("Pixels", {})
        for axis in "zyx":
            size = pixels.get(f"PhysicalSize{axis.upper()}")
            if axis in scale and size:
                scale[axis] = float(size)
                unit = pixels.get(f"PhysicalSize{axis.upper()}Unit", "µm")
                units[axis] = OME_UNITS.get(unit, unit)
    return [scale[a] for a in axes], units


def ngff_axes(tiff_axes: str, source: str) -> str:
    """tifffile's axes letters as NGFF axes, one for one; refuses letters and repeats NGFF cannot hold."""
    names = []
    for letter in tiff_axes:
        if letter not in TIFF_AXES:
            raise BioadaptError(f"'{source}' has an axis '{letter}' (axes {tiff_axes}) that bioadapt cannot map to "
                                "t, c, z, y, x: pass axes= with one letter per dimension, or split the file")
        names.append(TIFF_AXES[letter])
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise BioadaptError(f"'{source}' has several axes ({tiff_axes}) that map to {repeated}: pass axes= with one "
                            "letter per dimension, e.g. axes='tcyx'")
    return "".join(names)


@dataclass
class TiffImage:
    """The first series of a TIFF as Zarr arrays (one per pyramid level) and its metadata."""

    arrays: list[zarr.Array]
    axes: str
    scales: list[tuple[float, ...]]  # per level, physical pixel size along each axis
    units: dict[str, str]
    name: str
    tiff: tifffile.TiffFile  # open: the Zarr stores read through its file handle (and keep it alive)


def open_tiff(path: str | Path, axes: str | None = None) -> TiffImage:
    """Open the first series of a local TIFF / OME-TIFF lazily, every pyramid level it has. ``axes`` (NGFF
    letters, one per dimension of tifffile's squeezed shape) overrides the axes tifffile reads from the file."""
    path = Path(path)
    try:
        tif = tifffile.TiffFile(path)
    except (tifffile.TiffFileError, OSError, ValueError) as err:
        raise BioadaptError(f"'{path}' could not be read as a TIFF ({err}); bioadapt opens {SUPPORTED}") from err
    try:
        series = tif.series[0]
        arrays = [zarr.open_array(series.aszarr(level=i), mode="r") for i in range(len(series.levels))]
        image_axes = ngff_axes(series.axes, str(path)) if axes is None else str(axes).lower()
        if len(image_axes) != arrays[0].ndim:
            raise BioadaptError(f"axes '{axes}' have {len(image_axes)} letters but '{path}' has {arrays[0].ndim} "
                                f"dimensions (shape {arrays[0].shape}, tifffile's axes {series.axes}): give one "
                                "letter per dimension")
        scale0, units = physical_scale(tif, image_axes)
    except BioadaptError:
        tif.close()
        raise
    except Exception as err:  # tifffile raises many kinds on files it half understands
        tif.close()
        raise BioadaptError(f"'{path}' is a TIFF that tifffile cannot present as a Zarr array ({err}); "
                            f"{CONVERT_HINT}") from err
    shape0 = arrays[0].shape
    scales = [tuple(s * shape0[i] / a.shape[i] if image_axes[i] in "zyx" else s for i, s in enumerate(scale0))
              for a in arrays]
    return TiffImage(arrays, image_axes, scales, units, path.name, tif)
