"""LabelStore: sparse chunks, region log, overlaps, concurrent writers, NGFF metadata, bad input."""

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Labels, Reader

from bioadapt.data import LabelStore, open_image, sample_patches
from bioadapt.errors import BioadaptError


def _chunks_touched(windows, chunk_shape):
    touched = set()
    for window in windows:
        ranges = [range(o // c, (o + s - 1) // c + 1) for o, s, c in zip(window.origin, window.shape, chunk_shape)]
        touched.update((i, j) for i in ranges[0] for j in ranges[1])
    return touched


def test_files_on_disk_are_exactly_the_touched_chunks(cyx_image, ngff_version):
    image = open_image(cyx_image[0])
    store = LabelStore.create(None, like=image)
    assert store.path.parent.name == "labels" and store.chunks == (128, 128)
    assert store.chunk_files() == []
    windows = sample_patches(image, 5, (96, 96), seed=11)
    for k, window in enumerate(windows, start=1):
        store.write(window.origin, np.full(window.shape, k, dtype=np.uint16), author="ana")
    expected = _chunks_touched(windows, store.chunks)
    separator = "/" if ngff_version == "0.4" else "c/"
    expected_files = sorted(f"{separator}{i}/{j}" if ngff_version == "0.5" else f"{i}/{j}" for i, j in expected)
    assert store.chunk_files() == expected_files
    assert len(expected) < math.prod(math.ceil(s / c) for s, c in zip(store.shape, store.chunks))
    for k, window in enumerate(windows, start=1):
        assert (store.read(window.origin, window.shape) == k).all()


def test_background_only_labels_store_no_chunks_but_are_logged(cyx_image):
    store = LabelStore.create(None, like=open_image(cyx_image[0]))
    region = store.write((0, 0), np.zeros((100, 100), dtype=np.uint8), author="ana")
    assert store.chunk_files() == []
    assert store.regions() == [region] and region.shape == (100, 100) and region.author == "ana"


def test_regions_survive_reopening_and_overlaps_replace(cyx_image):
    image = open_image(cyx_image[0])
    store = LabelStore.create(None, like=image, name="corrections")
    first = store.write((0, 0), np.ones((64, 64), dtype=np.uint32), author="ana")
    second = store.write((32, 32), np.full((64, 64), 2, dtype=np.uint32), author="ben")
    third = store.write((0, 0), np.full((128, 128), 3, dtype=np.uint32), author="ana")
    assert second.overwrote == (first.id,) and set(third.overwrote) == {first.id, second.id}

    reopened = LabelStore.open(store.path)
    assert [r.id for r in reopened.regions()] == [third.id]
    history = reopened.regions(include_replaced=True)
    assert [r.replaced_by for r in history] == [third.id, third.id, None]
    assert [r.author for r in history] == ["ana", "ben", "ana"]
    assert (reopened.read((0, 0), (128, 128)) == 3).all()
    assert LabelStore.open(store.path.parent, name="corrections").regions() == reopened.regions()


def test_partial_overwrite_keeps_the_earlier_region(cyx_image):
    store = LabelStore.create(None, like=open_image(cyx_image[0]))
    first = store.write((0, 0), np.ones((64, 64), dtype=np.uint32))
    store.write((32, 32), np.full((64, 64), 2, dtype=np.uint32))
    assert [r.id for r in store.regions()][0] == first.id
    patch = store.read((0, 0), (96, 96))
    assert (patch[:32, :32] == 1).all() and (patch[32:, 32:] == 2).all()


def test_metadata_is_readable_by_ome_zarr_py(cyx_image):
    path = cyx_image[0]
    LabelStore.create(None, like=open_image(path), name="corrections")
    nodes = list(Reader(parse_url(path))())
    specs = [type(spec) for node in nodes for spec in node.specs]
    assert Labels in specs and Label in specs
    label_node = next(node for node in nodes if any(isinstance(s, Label) for s in node.specs))
    assert label_node.data[0].shape == (600, 700)
    assert open_image(path).label_names == ["corrections"]


def test_store_in_a_separate_directory_for_remote_or_read_only_sources(cyx_image, tmp_path):
    image = open_image(cyx_image[0])
    store = LabelStore.create(tmp_path / "my-labels", like=image)
    assert store.source_uri == image.uri and store.path == tmp_path / "my-labels" / "bioadapt"
    store.write((10, 10), np.ones((20, 20), dtype=np.uint8), author="ana")
    nodes = list(Reader(parse_url(str(tmp_path / "my-labels")))())
    assert any(isinstance(s, Label) for node in nodes for s in node.specs)
    with pytest.raises(BioadaptError, match="already exists"):
        LabelStore.create(tmp_path / "my-labels", like=image)


def test_remote_source_without_a_directory_is_refused(http_server, http_root, cyx_image, ngff_version):
    import shutil

    shutil.copytree(cyx_image[0], http_root / f"ro-{ngff_version}.ome.zarr")
    remote = open_image(f"{http_server}/ro-{ngff_version}.ome.zarr")
    with pytest.raises(BioadaptError, match="not a local OME-Zarr; pass a local directory"):
        LabelStore.create(None, like=remote)


WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from bioadapt.data import LabelStore
    store = LabelStore.open(sys.argv[1])
    worker, count = int(sys.argv[2]), int(sys.argv[3])
    for k in range(count):
        # 48 x 48 windows; the two workers' windows alternate along x, so they keep sharing chunks
        origin = (k * 64 % 576, worker * 64 + (k * 64 // 576) * 128)
        store.write(origin, np.full((48, 48), 100 * worker + k + 1, dtype=np.uint32), author=f"worker-{worker}")
""")


def test_two_processes_writing_at_once_do_not_corrupt_each_other(cyx_image):
    store = LabelStore.create(None, like=open_image(cyx_image[0]), chunks=(256, 256))
    count = 45
    processes = [subprocess.Popen([sys.executable, "-c", WRITER, str(store.path), str(w), str(count)])
                 for w in (0, 1)]
    assert [p.wait(timeout=120) for p in processes] == [0, 0]
    regions = store.regions()
    assert len(regions) == 2 * count
    for region in regions:
        value = store.read(region.origin, region.shape)
        worker = int(region.author.split("-")[1])
        assert np.unique(value).size == 1 and value.flat[0] // 100 == worker


def test_time_axis_store(tmp_path, rng):
    from bioadapt.data import write_ome_zarr

    data = rng.integers(0, 100, size=(3, 1, 64, 64), dtype=np.uint16)
    image = open_image(write_ome_zarr(tmp_path / "t.ome.zarr", data, "tcyx", n_levels=1), time=2)
    store = LabelStore.create(None, like=image)
    assert store.axes == "tyx" and store.spatial_shape == (64, 64)
    region = store.write((0, 0), np.ones((8, 8), dtype=np.uint8), time=2)
    assert region.time == 2
    assert store.read((0, 0), (8, 8), time=2).all() and not store.read((0, 0), (8, 8), time=0).any()


@pytest.mark.parametrize("labels, message", [
    (np.ones((10, 10), dtype=np.float32), "must be integers"),
    (np.ones((1, 10, 10), dtype=np.uint8), "must have 2 dimensions"),
    (-np.ones((10, 10), dtype=np.int32), "must not be negative"),
    (np.full((10, 10), 2**40, dtype=np.int64), "does not fit"),
])
def test_bad_labels_are_refused(cyx_image, labels, message):
    store = LabelStore.create(None, like=open_image(cyx_image[0]))
    with pytest.raises(BioadaptError, match=message):
        store.write((0, 0), labels)
    assert store.regions() == []


def test_window_outside_the_store_is_refused(cyx_image):
    store = LabelStore.create(None, like=open_image(cyx_image[0]))
    with pytest.raises(BioadaptError, match="outside the label store"):
        store.write((590, 0), np.ones((20, 20), dtype=np.uint8))


def test_opening_a_missing_store_is_an_error(tmp_path):
    with pytest.raises(BioadaptError, match="does not exist"):
        LabelStore.open(tmp_path / "absent")
