"""Fine-tune the project's model on the committed patches: epochs, learning rate, batch size (each left at "model
default" keeps the model's own training default); the loss of each epoch as it trains, and Cancel (the versions
made before stay untouched)."""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import QFormLayout, QHBoxLayout, QLabel, QProgressBar, QPushButton, QWidget

from bioadapt.errors import BioadaptError
from bioadapt.napari.fields import given, optional_float_field, optional_int_field
from bioadapt.napari.session import Session


MODEL_DEFAULT = "model default"


class TunePanel(QWidget):
    def __init__(self, session: Session, parent: QWidget | None = None):
        super().__init__(parent)
        self.session = session
        self.job_id: str | None = None
        self.losses: dict[int, float] = {}  # epoch -> mean training loss, as polled, of the running (or last) job
        self.epochs = optional_int_field(10_000, MODEL_DEFAULT)
        self.learning_rate = optional_float_field(1.0, MODEL_DEFAULT)
        self.batch_size = optional_int_field(1024, MODEL_DEFAULT)
        self.tune_button = QPushButton("Fine-tune")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setFormat("epoch %v / %m")
        self.progress.setValue(0)
        self.loss = QLabel("")
        buttons = QHBoxLayout()
        buttons.addWidget(self.tune_button)
        buttons.addWidget(self.cancel_button)
        form = QFormLayout(self)
        form.addRow("Epochs", self.epochs)
        form.addRow("Learning rate", self.learning_rate)
        form.addRow("Batch size", self.batch_size)
        form.addRow(buttons)
        form.addRow(self.progress)
        form.addRow(self.loss)
        self.tune_button.clicked.connect(lambda: session.act("fine-tuning", self.fine_tune))
        self.cancel_button.clicked.connect(lambda: session.act("cancelling fine-tuning", self.cancel))

    def fine_tune(self) -> None:
        _, project_id = self.session.need_project()
        arguments = {name: given(field) for name, field in (("epochs", self.epochs), ("batch_size", self.batch_size),
                                                            ("learning_rate", self.learning_rate))}
        self.tune_button.setEnabled(False)
        self.session.start_job("fine-tuning", lambda client: client.fine_tune(project_id, **arguments),
                               self._started, self._progressed, self._finished, self._idle)

    def _started(self, started: dict[str, Any]) -> None:
        self.job_id = started["job_id"]
        self.losses = {}
        self.progress.setRange(0, given(self.epochs) or 0)  # the model's default: known from the job's progress
        self.progress.setValue(0)
        self.loss.setText("")
        self.cancel_button.setEnabled(True)
        self.session.say(f"fine-tuning version {started['base_version']} on {started['patches']} patches ...")

    def _progressed(self, job: dict[str, Any]) -> None:
        progress = job["progress"]
        if not progress.get("epochs"):
            return
        epoch = int(progress.get("epoch", 0))
        self.progress.setRange(0, int(progress["epochs"]))
        self.progress.setValue(epoch)
        if isinstance(progress.get("loss"), (int, float)) and epoch > 0:
            self.losses[epoch] = float(progress["loss"])
        self.loss.setText(_loss_text(self.losses, progress.get("val_score")))

    def _finished(self, job: dict[str, Any]) -> None:
        self._progressed(job)
        if job["state"] == "failed":
            self.session.fail("fine-tuning", BioadaptError(job["error"] or "the job failed"))
        elif job["state"] == "done" and (job.get("result") or {}).get("version") is not None:
            self.session.say(verdict_message(job["result"]))
        else:
            self.session.say(f"fine-tuning {job['state']}: no new version")
        self.session.reload_project(then_emit=self.session.versions_changed)

    def _idle(self) -> None:
        self.job_id = None
        self.tune_button.setEnabled(True)
        self.cancel_button.setEnabled(False)

    def cancel(self) -> None:
        self.session.cancel_job("fine-tuning", self.job_id)


def _loss_text(losses: dict[int, float], validation: Any) -> str:
    """The loss of the last epochs seen, oldest first, and the validation score."""
    if not losses:
        return ""
    text = "loss by epoch: " + ", ".join(f"{epoch}: {loss:.4g}" for epoch, loss in sorted(losses.items())[-5:])
    if isinstance(validation, (int, float)):
        text += f" · validation {validation:.3f}"
    return text


def verdict_message(result: dict[str, Any]) -> str:
    """What a finished fine-tune made, and what its judgement against its parent means for the user."""
    verdict = result.get("verdict") or {}
    said = f"fine-tuning done: version {result['version']}, {verdict.get('verdict', 'not judged')}"
    if verdict.get("verdict") == "worse":
        return (f"{said}: {verdict.get('reason')}. It is kept but not used unless you name it; version "
                f"{result.get('default_version')} stays the default")
    return f"{said}: {verdict.get('reason', '')}".rstrip(": ")

