"""`bioadapt demo` runs end to end on data it generates (a small image to keep the test short)."""

from bioadapt.cli import main
from bioadapt.data import LabelStore, open_image


def test_demo_converts_samples_and_stores_labels(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path / "demo"), "--size", "1024", "--patches", "4"]) == 0
    out = capsys.readouterr().out
    assert "Summary" in out and "4 regions logged" in out and "come with the bioadapt service" in out
    image = open_image(tmp_path / "demo" / "cells.ome.zarr")
    assert image.axes == "cyx" and image.shape == (2, 1024, 1024) and image.scale[-1] == 0.65
    store = LabelStore.open(tmp_path / "demo" / "cells.ome.zarr" / "labels" / "corrections")
    regions = store.regions()
    assert len(regions) == 4 and all(r.author == "demo-annotator" for r in regions)
    assert all(store.read(r.origin, r.shape).max() > 0 for r in regions)
