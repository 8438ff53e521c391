"""The project's model versions with their held-out scores and verdicts, and its learning curve: every fine-tune
is judged against its parent on the held-out patches; a version judged worse, or undecided (too few held-out
patches), is marked and is not the default.
Evaluate compares versions (F1 and AP at IoU 0.5 for instance models, Dice for semantic ones), Export writes a
version as a bioimage.io package to a chosen file. Both are service jobs, followed like scoring and fine-tuning."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (QAbstractItemView, QFileDialog, QHBoxLayout, QPushButton, QTableWidgetItem, QVBoxLayout,
                            QWidget)

from bioadapt.errors import BioadaptError
from bioadapt.napari.curve_plot import LearningCurvePlot
from bioadapt.napari.fields import read_only_table
from bioadapt.napari.session import Session

COLUMNS = ("version", "from", "patches", "F1", "AP", "Dice", "verdict")
METRIC_COLUMNS = {"F1": "f1", "AP": "ap", "Dice": "dice"}
FINISHED_BADLY = ("failed", "cancelled")


class VersionsPanel(QWidget):
    def __init__(self, session: Session, parent: QWidget | None = None):
        super().__init__(parent)
        self.session = session
        self.versions: list[dict[str, Any]] = []
        self.table = read_only_table(COLUMNS, QAbstractItemView.SelectionMode.ExtendedSelection)
        self.table.setToolTip("select versions to evaluate (default: the first, the default and the latest) or the "
                              "one to export (default: the project's default)")
        self.evaluate_button = QPushButton("Evaluate")
        self.export_button = QPushButton("Export…")
        self.curve = LearningCurvePlot()
        buttons = QHBoxLayout()
        buttons.addWidget(self.evaluate_button)
        buttons.addWidget(self.export_button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.curve)
        layout.addLayout(buttons)
        self.evaluate_button.clicked.connect(lambda: session.act("evaluating", self.evaluate))
        self.export_button.clicked.connect(lambda: session.act("exporting", self._export_clicked))
        session.project_changed.connect(lambda project: self._fill())
        session.versions_changed.connect(self._fill)

    def _fill(self) -> None:
        project = self.session.project or {}
        self.versions = list(project.get("versions", []))
        curve = {row["version"]: row for row in project.get("learning_curve", [])}
        self.curve.set_rows(list(curve.values()))
        shown = [column for column, key in METRIC_COLUMNS.items()
                 if any(key in (v["metrics"].get("holdout") or {}) for v in self.versions)]
        self.table.setRowCount(len(self.versions))
        for row, version in enumerate(self.versions):
            holdout = version["metrics"].get("holdout") or {}
            judged = curve.get(version["number"], {})
            default = " (default)" if version["number"] == project.get("default_version") else ""
            cells = {"version": str(version["number"]) + default,
                     "from": "" if version["parent"] is None else str(version["parent"]),
                     "patches": str(version["metrics"].get("patches", "")),
                     **{column: _number(holdout.get(key)) for column, key in METRIC_COLUMNS.items()},
                     "verdict": judged.get("verdict", "")}
            for column, name in enumerate(COLUMNS):
                item = QTableWidgetItem(cells[name])
                item.setData(Qt.ItemDataRole.UserRole, version["number"])
                if judged:
                    item.setToolTip(judged["reason"])
                self.table.setItem(row, column, item)
        for column, name in enumerate(COLUMNS):
            self.table.setColumnHidden(column, name in METRIC_COLUMNS and name not in shown)

    def selected_versions(self) -> list[int]:
        return sorted({self.versions[index.row()]["number"] for index in self.table.selectionModel().selectedRows()})

    def evaluate(self) -> None:
        _, project_id = self.session.need_project()
        versions = self.selected_versions() or None
        self.evaluate_button.setEnabled(False)
        self.session.say("evaluating on the held-out patches ...")
        self.session.start_job("evaluating", lambda client: client.evaluate(project_id, versions), lambda _: None,
                               lambda _: None, self._evaluated, lambda: self.evaluate_button.setEnabled(True))

    def _evaluated(self, job: dict[str, Any]) -> None:
        if job["state"] in FINISHED_BADLY:
            self.session.fail("evaluating", BioadaptError(job["error"] or f"the job was {job['state']}"))
            return
        answer = job["result"]
        summary = "; ".join(f"v{number}: " + ", ".join(f"{key} {_number(metrics.get(key))}" for key in
                                                       METRIC_COLUMNS.values() if key in metrics)
                            for number, metrics in answer["versions"].items())
        self.session.say(f"evaluated on {answer['holdout_patches']} held-out patches: {summary}")
        self.session.reload_project(then_emit=self.session.versions_changed)

    def _export_clicked(self) -> None:
        project = self.session.project
        if project is None:
            raise BioadaptError("no project open: pick one or create one on the Project tab")
        version = (self.selected_versions() or [project.get("default_version")])[-1]
        suggested = f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', project['name'])}-v{version}.zip"
        path, _ = QFileDialog.getSaveFileName(self, "Export a bioimage.io package", str(Path.home() / suggested),
                                              "bioimage.io package (*.zip)")
        if path:
            self.export_to(Path(path), version)

    def export_to(self, path: Path, version: int | None = None) -> None:
        """Export ``version`` (default: the project's default) as a bioimage.io package and write it to ``path``
        here: the package comes through the service (``job_output``), so this works wherever napari runs."""
        _, project_id = self.session.need_project()
        self.export_button.setEnabled(False)
        which = "the default version" if version is None else f"version {version}"
        self.session.say(f"exporting {which} (the service builds and tests the package) ...")
        self.session.start_job("exporting", lambda client: client.export_model(project_id, version=version),
                               lambda _: None, lambda _: None, lambda job: self._exported(path, job),
                               lambda: self.export_button.setEnabled(True))

    def _exported(self, path: Path, job: dict[str, Any]) -> None:
        if job["state"] in FINISHED_BADLY:
            self.session.fail("exporting", BioadaptError(job["error"] or f"the job was {job['state']}"))
            return
        client = self.session.need_client()

        def fetch() -> dict[str, Any]:
            package = client.job_output(job["id"], "package")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(bytes(package))
            return {"version": job["result"]["version"], "size": len(package)}

        self.session.background.run("fetching the package", fetch, lambda answer: self._saved(path, answer))

    def _saved(self, path: Path, answer: dict[str, Any]) -> None:
        self.session.say(f"exported version {answer['version']} to {path} ({answer['size'] / 2**20:.1f} MiB)")


def _number(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else ""
