"""The parts of an exported package's README that both exporters write alike: held-out metrics, the project's
learning curve up to this version, the training regions and where the corrected labels are."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def training_sections(training: Mapping[str, Any], fine_tuned: bool) -> list[str]:
    """Markdown lines: ``training["metrics"]`` (held-out scores), ``training["learning_curve"]`` (rows of
    ``service.holdout.learning_curve``), ``training["regions"]`` and ``training["label_store"]``."""
    lines: list[str] = []
    metrics = training.get("metrics") or {}
    if metrics:
        lines += ["## Metrics", ""] + [f"- {k}: {v}" for k, v in metrics.items()] + [""]
    lines += learning_curve_table(training.get("learning_curve") or [])
    lines += ["## Training regions", ""]
    lines += [f"- `{r.get('image')}` origin {r.get('origin')} shape {r.get('shape')}"
              for r in training.get("regions", [])] or ["- not recorded" if fine_tuned else "- none: not fine-tuned"]
    if training.get("label_store"):
        lines += ["", f"Corrected labels: `{training['label_store']}` (OME-Zarr label image)."]
    return lines


def learning_curve_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The learning curve as a Markdown table (nothing when the model was never fine-tuned)."""
    if not rows:
        return []
    metric = next((r["metric"] for r in rows if r.get("metric")), "score")
    lines = ["## Learning curve", "",
             f"Each fine-tune was judged against its parent on the project's held-out patches ({metric}; both "
             "versions on the same patches, a paired bootstrap over them). A version judged worse is not used "
             "unless named.", "",
             "| version | from | training labels | held-out patches | parent | this version | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['version']} | {row['parent']} | {row['labels']} | {row.get('holdout_patches', 0)} | "
                     f"{_score(row.get('parent_score'))} | {_score(row.get('score'))} | {row['verdict']} |")
    return lines + [""]


def _score(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"
