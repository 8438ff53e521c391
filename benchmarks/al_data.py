"""The label-efficiency benchmarks' data: a base model, and per data set a pool image (OME-Zarr, as the service
reads it) with its candidate patch windows and ground truth, and a separate test image with its ground truth.

- ``synthetic``: the demo's domain shift. The base U-Net is trained on synthetic 'nuclei'; the pool is a
  1024 x 1024 synthetic 'crowded' image cut into a grid of 64 x 64 patches (256, not overlapping, as the service
  draws them); the test image is another 'crowded' image, 768 x 768 (hundreds of cells, so that F1 moves little
  with the luck of a few objects).
- ``dsb2018``: a real fluorescence nuclei image with manual annotation (benchmarks/data/dsb2018_nuclei,
  2018 Data Science Bowl, CC0). The pool is its upper half (256 x 512): 64 x 64 windows every 16 pixels (377;
  one image holds too few disjoint patches for a pool of hundreds, so candidates overlap); the test image is
  its lower half (256 x 512), which no pool window touches.
- ``bbbc039``: a second real image, from another lab and microscope (``bbbc039_nuclei`` of the shared data beside
  the repository, ../shared/data or $BIOADAPT_SHARED_DATA: BBBC039, U2OS nuclei, CC0; not among the DSB images):
  pool = upper half (260 x 696, 520 windows of 64 x 64 every 16 pixels), test = lower half.

The base model is the same for all: the demo's U-Net trained on synthetic 'nuclei' (so the real image is a
domain shift too).

Whole-field sets (``FIELD_SETS``, for benchmarks/service_al.py): pools and test sets of whole images, never
windows of one image. ``bbbc039``: the 25 BBBC039 fields of ``bbbc039/`` in the shared data (U2OS nuclei, CC0);
``usiigaci``: the 10 phase-contrast fields of ``usiigaci_phase/`` (whole fibroblast-like cells, MIT);
``kromp``: the fields of ``kromp_nuclei/`` (Kromp et al. 2020, S-BSST265: DAPI/Hoechst nuclei of tissue sections,
cytospins and cell lines, wide-field and confocal, CC0) whose nuclei are at the scale of the DSB 2018 training data
of unet2d_nuclei_broad (median ground-truth diameter at most ``KROMP_MAX_DIAMETER`` pixels: 13 of its 79 fields,
10x-40x; the 63x fields hold nuclei of 70-180 pixels, which a user would rescale first). The test set is every
other field of the sorted list, from the second, up to ``TEST_FIELDS``; the pool is the rest.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from shared_data import SHARED_DATA  # noqa: E402

DATA = Path(__file__).parent / "data"  # what a package registry ships (DSB 2018 from the stardist wheel)
DATASETS = ("synthetic", "dsb2018", "bbbc039")
PATCH = 64


@dataclass
class Dataset:
    name: str
    pool_path: Path  # OME-Zarr of the pool image
    windows: list  # PatchWindow candidates
    truth: np.ndarray  # pool ground truth (Y, X)
    test_image: np.ndarray  # (C, Y, X) float32
    test_truth: np.ndarray  # (Y, X)

    def patch(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Pool patch ``index`` and its ground-truth labels (what the simulated annotator returns)."""
        from bioadapt.data import open_image

        window = self.windows[index]
        image = open_image(self.pool_path)
        return image.read(window.origin, window.shape, dtype="float32"), self.truth[window.slices].astype(np.int64)

    def foreground_fraction(self) -> np.ndarray:
        return np.array([float((self.truth[w.slices] > 0).mean()) for w in self.windows])


def annotated_arrays(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """An annotated image (``folder`` holds image.tif and labels.tif): (1, Y, X) float32 and its labels (Y, X)."""
    import tifffile

    if not folder.is_dir():
        raise SystemExit(f"{folder} is missing: it comes from a public repository and lives beside the repository "
                         "(set BIOADAPT_SHARED_DATA to the folder that holds it)")
    return (tifffile.imread(folder / "image.tif").astype(np.float32)[None],
            tifffile.imread(folder / "labels.tif").astype(np.int64))


def load_dataset(name: str, workdir: Path) -> Dataset:
    from bioadapt.data import PatchWindow, open_image, sample_patches
    from bioadapt.data.synthetic import synthetic_cells
    from bioadapt.data.writer import write_ome_zarr

    pool_path = workdir / f"{name}-pool.ome.zarr"
    if name == "synthetic":
        pool = synthetic_cells((1024, 1024), "crowded", seed=11)
        pool_image, pool_truth = pool.image, pool.labels
        test = synthetic_cells((768, 768), "crowded", seed=12)
        test_image, test_truth = test.image.astype(np.float32), test.labels
    elif name in ("dsb2018", "bbbc039"):  # the upper half is the pool, the lower half the test image
        image, labels = annotated_arrays((DATA if name == "dsb2018" else SHARED_DATA) / f"{name}_nuclei")
        half = labels.shape[0] // 2
        pool_image, pool_truth = image[:, :half], labels[:half]
        test_image, test_truth = image[:, half:], labels[half:]
    else:
        raise ValueError(f"unknown data set {name!r}; known: {DATASETS}")
    write_ome_zarr(pool_path, pool_image, "cyx", overwrite=True)
    if name == "synthetic":
        windows = sample_patches(open_image(pool_path), None, (PATCH, PATCH), mode="grid")
    else:
        height, width = pool_truth.shape
        windows = [PatchWindow((y, x), (PATCH, PATCH)) for y in range(0, height - PATCH + 1, 16)
                   for x in range(0, width - PATCH + 1, 16)]
    return Dataset(name, pool_path, windows, np.asarray(pool_truth), test_image, np.asarray(test_truth))


# the demo's U-Net with twice the width and one more pooling (receptive field about twice as wide): the "demo base
# with enough capacity" of service_al.py's ``demo_deep``
DEEP_UNET = {"features": 16, "depth": 3}


def base_model(workdir: Path, epochs: int = 40, deep: bool = False) -> Path:
    """The demo's base U-Net (synthetic 'nuclei', ``epochs`` epochs; ``deep``: DEEP_UNET's width and depth),
    packaged once per work folder."""
    from bioadapt.demo import UNET, build_base_model

    path = workdir / ("base_deep.zip" if deep else "base.zip")
    architecture = {**UNET, **DEEP_UNET} if deep else UNET
    return path if path.exists() else build_base_model(path, epochs, seed=0, architecture=architecture)


def test_f1(adapter, dataset: Dataset) -> float:
    """F1 at IoU 0.5 of the adapter's segmentation of the whole test image."""
    from bioadapt.active import f1_score

    return float(f1_score(adapter.segment(dataset.test_image[None])[0], dataset.test_truth, 0.5))


# -- whole-field sets (benchmarks/service_al.py) ----------------------------------------------------------------
FIELD_SETS = ("bbbc039", "usiigaci", "kromp")
TEST_FIELDS = {"bbbc039": 10, "usiigaci": 4, "kromp": 5}  # of 25, 10 and 13 fields; the pool is the rest
KROMP_MAX_DIAMETER = 40  # pixels; DSB 2018 nuclei are mostly 10-40 pixels across


@dataclass
class Field:
    name: str
    image: np.ndarray  # (1, Y, X) as stored (uint16)
    truth: np.ndarray  # (Y, X) instance labels


def whole_fields(name: str) -> tuple[list[Field], list[Field]]:
    """(pool, test) fields of a whole-field set: the test set is every other field of the sorted list, from the
    second, up to ``TEST_FIELDS[name]``; the pool is the rest. They never share an image."""
    fields = {"bbbc039": _bbbc039_fields, "usiigaci": _usiigaci_fields, "kromp": _kromp_fields}[name]()
    test_names = {field.name for field in fields[1::2][:TEST_FIELDS[name]]}
    return [f for f in fields if f.name not in test_names], [f for f in fields if f.name in test_names]


def _shared_folder(name: str) -> Path:
    folder = SHARED_DATA / name
    if not folder.is_dir():
        raise SystemExit(f"{folder} is missing: it comes from a public repository and lives beside the repository "
                         "(set BIOADAPT_SHARED_DATA to the folder that holds it)")
    return folder


def _bbbc039_fields() -> list[Field]:
    """BBBC039 fields; instance labels are the connected regions of equal value of the mask's first channel (its
    SOURCE.md)."""
    import imageio.v3 as iio
    import tifffile
    from skimage.measure import label

    folder = _shared_folder("bbbc039")
    return [Field(tif.stem, tifffile.imread(tif)[None],
                  label(iio.imread(folder / "masks" / f"{tif.stem}.png")[..., 0], background=0, connectivity=2))
            for tif in sorted((folder / "images").glob("*.tif"))]


def _usiigaci_fields() -> list[Field]:
    """Usiigaci phase-contrast fields (set5 ... set50, by set number); ``instances_ids.png`` is the instance label
    image as published."""
    import imageio.v3 as iio
    import tifffile

    folder = _shared_folder("usiigaci_phase")
    sets = sorted(folder.glob("set*"), key=lambda path: int(path.name.removeprefix("set")))
    return [Field(path.name, tifffile.imread(path / "raw.tif")[None],
                  iio.imread(path / "instances_ids.png").astype(np.int64)) for path in sets]


def _kromp_fields() -> list[Field]:
    """Kromp et al.'s fields (``rawimages/<name>.tif``, ``groundtruth/<name>.tif``) at the model's nucleus scale.
    The 20x tissue sections are stored as RGB with three equal channels: the first is the image. Label ids are
    not always consecutive as published: relabelled."""
    import tifffile
    from skimage.segmentation import relabel_sequential

    folder = _shared_folder("kromp_nuclei")
    fields = []
    for truth_path in sorted((folder / "groundtruth").glob("*.tif")):
        truth = relabel_sequential(tifffile.imread(truth_path).astype(np.int64))[0]
        areas = np.bincount(truth.ravel())[1:]
        if 2 * np.sqrt(np.median(areas[areas > 0]) / np.pi) > KROMP_MAX_DIAMETER:
            continue
        image = tifffile.imread(folder / "rawimages" / truth_path.name)
        fields.append(Field(truth_path.stem, (image[..., 0] if image.ndim == 3 else image)[None], truth))
    return fields


def write_fields(fields: list[Field], folder: Path) -> dict[str, Path]:
    """Each field as its own OME-Zarr in ``folder`` (written once: an existing one is kept); name -> path."""
    from bioadapt.data.writer import write_ome_zarr

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for field in fields:
        path = folder / f"{field.name}.ome.zarr"
        if not path.exists():
            write_ome_zarr(path, field.image, "cyx")
        paths[field.name] = path
    return paths


def pooled_f1(predictions: list[np.ndarray], truths: list[np.ndarray]) -> dict:
    """F1 at IoU 0.5 pooled over images (true and false positives and misses summed over them), with the counts."""
    from bioadapt.active.metrics import match_instances, summarize_matches

    summary = summarize_matches([match_instances(p, t, 0.5) for p, t in zip(predictions, truths)])
    return {key: summary[key] for key in ("f1", "tp", "fp", "fn")}
