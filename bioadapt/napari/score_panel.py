"""Score patches of the open project: random new patches (how many) or every tile inside the mask (grid, a whole
slide), their size, MC-dropout passes, and the strategy (what is scored and how the patches to label are
picked; its acquisition map may be replaced); a progress bar follows the service's job, and Cancel stops it. The
fields start from the service's defaults."""

from __future__ import annotations

import re
from typing import Any

from qtpy.QtWidgets import QComboBox, QFormLayout, QHBoxLayout, QLineEdit, QProgressBar, QPushButton, QWidget

from bioadapt.errors import BioadaptError
from bioadapt.napari.fields import int_field
from bioadapt.napari.session import Session
from bioadapt.service.client import ACQUISITIONS, DEFAULT_RANDOM_PATCHES, STRATEGIES, defaults

SERVICE_DEFAULT = "(default)"  # the choice that leaves the argument out: the service decides


class ScorePanel(QWidget):
    def __init__(self, session: Session, parent: QWidget | None = None):
        super().__init__(parent)
        self.session = session
        self.job_id: str | None = None
        default = defaults("score")
        self.mode = QComboBox()
        self.mode.addItems(["random", "grid"])
        self.mode.setToolTip("random: new patches drawn inside the mask; grid: every tile inside the mask")
        self.n_patches = int_field(1, 100_000, DEFAULT_RANDOM_PATCHES)
        self.n_patches.setToolTip("random mode: how many new patches (grid mode scores every tile)")
        self.patch_shape = QLineEdit(", ".join(map(str, default["patch_shape"])))
        self.patch_shape.setToolTip("patch size in pixels: Y, X (2D images) or Z, Y, X (3D)")
        self.mc_passes = int_field(2, 256, default["mc_passes"])
        self.strategy = QComboBox()
        self.strategy.addItems([SERVICE_DEFAULT, *STRATEGIES])
        self.strategy.setCurrentText(default["strategy"] or SERVICE_DEFAULT)
        self.strategy.setToolTip("what is scored and how the patches to label are picked from every pending patch "
                                 "(bioadapt.active.STRATEGIES); default: typical_half_nonconvex_then_typical "
                                 "(the patches with the most merged-looking objects of the model's segmentation "
                                 "among the pool's typical half first; typical ones of them once some are "
                                 "labelled), bald for models without patch features (Cellpose)")
        self.acquisition = QComboBox()
        self.acquisition.addItems([SERVICE_DEFAULT, *ACQUISITIONS])
        self.acquisition.setCurrentText(default["acquisition"] or SERVICE_DEFAULT)
        self.acquisition.setToolTip("the acquisition map in place of the strategy's own")
        self.score_button = QPushButton("Score")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setFormat("%v / %m patches")
        self.progress.setValue(0)
        buttons = QHBoxLayout()
        buttons.addWidget(self.score_button)
        buttons.addWidget(self.cancel_button)
        form = QFormLayout(self)
        form.addRow("Mode", self.mode)
        form.addRow("Patches", self.n_patches)
        form.addRow("Patch size", self.patch_shape)
        form.addRow("MC passes", self.mc_passes)
        form.addRow("Strategy", self.strategy)
        form.addRow("Acquisition", self.acquisition)
        form.addRow(buttons)
        form.addRow(self.progress)
        self.mode.currentTextChanged.connect(lambda mode: self.n_patches.setEnabled(mode == "random"))
        self.score_button.clicked.connect(lambda: session.act("scoring", self.score))
        self.cancel_button.clicked.connect(lambda: session.act("cancelling scoring", self.cancel))

    def shape(self) -> list[int]:
        numbers = [int(n) for n in re.findall(r"\d+", self.patch_shape.text())]
        if len(numbers) not in (2, 3) or min(numbers, default=0) < 1:
            raise BioadaptError(f"patch size {self.patch_shape.text()!r}: give 2 (Y, X) or 3 (Z, Y, X) positive "
                                "numbers, e.g. 256, 256")
        return numbers

    def score(self) -> None:
        _, project_id = self.session.need_project()
        arguments = {"mode": self.mode.currentText(), "patch_shape": self.shape(), "mc_passes": self.mc_passes.value()}
        for name, field in (("strategy", self.strategy), ("acquisition", self.acquisition)):
            if field.currentText() != SERVICE_DEFAULT:
                arguments[name] = field.currentText()
        if arguments["mode"] == "random":
            arguments["n_patches"] = self.n_patches.value()
        self.score_button.setEnabled(False)
        how_many = arguments.get("n_patches", "every tile inside the mask:")
        how = ", ".join(arguments[k] for k in ("strategy", "acquisition") if k in arguments) or "default strategy"
        self.session.say(f"scoring {how_many} patches ({how}, {arguments['mc_passes']} MC passes) ...")
        self.session.start_job("scoring", lambda client: client.score(project_id, **arguments), self._started,
                               self._progressed, self._finished, self._idle)

    def _started(self, started: dict[str, Any]) -> None:
        self.job_id = started["job_id"]
        self.progress.setRange(0, started["patches"] or 0)  # grid: the count comes with the job's progress
        self.progress.setValue(0)
        self.cancel_button.setEnabled(True)

    def _progressed(self, job: dict[str, Any]) -> None:
        progress = job["progress"]
        if progress.get("total"):
            self.progress.setRange(0, int(progress["total"]))
            self.progress.setValue(int(progress.get("done", 0)))

    def _finished(self, job: dict[str, Any]) -> None:
        scored = (job.get("result") or {}).get("scored", job["progress"].get("done", 0))
        if job["state"] == "failed":
            self.session.fail("scoring", BioadaptError(job["error"] or "the job failed"))
        else:
            self.session.say(f"scoring {job['state']}: {scored} patches scored")
        self.session.reload_project(then_emit=self.session.patches_changed)

    def _idle(self) -> None:
        self.job_id = None
        self.score_button.setEnabled(True)
        self.cancel_button.setEnabled(False)

    def cancel(self) -> None:
        self.session.cancel_job("scoring", self.job_id)
