"""`bioadapt demo` runs one full active-learning round through a real `bioadapt serve` (small settings)."""

import json

from bioadapt.active import DEFAULT_STRATEGY
from bioadapt.cli import main


def test_demo_runs_a_full_round_through_the_service(tmp_path, capsys):
    workdir = tmp_path / "demo"
    assert main(["demo", "--workdir", str(workdir), "--size", "512", "--patches", "8", "--top-k", "8",
                 "--patch-size", "64", "--epochs", "5", "--base-epochs", "3"]) == 0
    out = capsys.readouterr().out
    assert "Summary" in out and "F1 @ IoU 0.5" in out and "bioimageio.core test: passed" in out
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["scored"] == 8 and summary["annotated"] == 8 and summary["holdout_patches"] == 2
    assert summary["package_test"] == "passed" and summary["version"] == 1
    assert 0 <= summary["f1_before"] <= 1 and 0 <= summary["f1_after"] <= 1
    assert summary["strategy"] == DEFAULT_STRATEGY and len(summary["picked_scores"]) == 8  # the service's picks
    assert (workdir / "summary.png").stat().st_size > 10_000
    assert not (workdir / "service" / "connection.json").exists()  # the service stopped cleanly
