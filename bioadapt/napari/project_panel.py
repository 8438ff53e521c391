"""Pick one of your projects, or create one: a model source, the images (URIs the service can read) and an
optional sampling mask ('auto': the foreground of the coarsest level, or a label image inside the OME-Zarr)."""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import (QComboBox, QFormLayout, QGroupBox, QHBoxLayout, QLineEdit, QPlainTextEdit, QPushButton,
                            QVBoxLayout, QWidget)

from bioadapt.errors import BioadaptError
from bioadapt.napari.session import Session
from bioadapt.service.client import BioadaptClient

NO_MASK = "none"
MASK_CHOICES = (NO_MASK, "auto")


class ProjectPanel(QWidget):
    def __init__(self, session: Session, parent: QWidget | None = None):
        super().__init__(parent)
        self.session = session
        self.projects = QComboBox()
        self.projects.setPlaceholderText("connect to list your projects")
        self.refresh_button = QPushButton("Refresh")
        row = QHBoxLayout()
        row.addWidget(self.projects, 1)
        row.addWidget(self.refresh_button)

        self.name = QLineEdit()
        self.model_source = QLineEdit()
        self.model_source.setPlaceholderText("bioimage.io package path/URL/id, or cellpose:<name>")
        self.image_uris = QPlainTextEdit()
        self.image_uris.setPlaceholderText("one image per line: OME-Zarr path, file://, http(s)://, s3://")
        self.image_uris.setFixedHeight(64)
        self.mask = QComboBox()
        self.mask.setEditable(True)  # a label image name inside the OME-Zarr can be typed in
        self.mask.addItems(MASK_CHOICES)
        self.mask.setToolTip("where patches are drawn: everywhere (none), the foreground of the coarsest level "
                             "(auto), or a label image of the OME-Zarr (type its name, e.g. tissue)")
        self.create_button = QPushButton("Create project")
        new = QGroupBox("New project")
        form = QFormLayout(new)
        form.addRow("Name", self.name)
        form.addRow("Model", self.model_source)
        form.addRow("Images", self.image_uris)
        form.addRow("Mask", self.mask)
        form.addRow(self.create_button)

        layout = QVBoxLayout(self)
        layout.addLayout(row)
        layout.addWidget(new)
        layout.addStretch(1)

        self.refresh_button.clicked.connect(lambda: session.act("listing projects", self.refresh))
        self.projects.activated.connect(lambda index: session.act("opening the project", lambda: self.open(index)))
        self.create_button.clicked.connect(lambda: session.act("creating the project", self.create))
        session.connected.connect(self._connected)

    def _connected(self, client: BioadaptClient | None) -> None:
        self.projects.clear()
        if client is not None:
            self.refresh()

    def refresh(self, select: str | None = None) -> None:
        """Re-list the projects; open ``select`` (a project id) once listed."""
        client = self.session.need_client()
        self.session.background.run("listing projects", client.list_projects,
                                    lambda projects: self._listed(projects, select))

    def _listed(self, projects: list[dict[str, Any]], select: str | None) -> None:
        current = select or (self.session.project or {}).get("id")
        self.projects.blockSignals(True)
        self.projects.clear()
        for project in projects:
            counts = project["patches"]
            self.projects.addItem(f"{project['name']}  ({counts['annotated']} annotated, {counts['pending']} to "
                                  f"label)", project["id"])
        self.projects.setCurrentIndex(self.projects.findData(current) if current else -1)
        self.projects.blockSignals(False)
        if select:
            self.open(self.projects.currentIndex())
        self.session.say(f"{len(projects)} project(s)")

    def open(self, index: int) -> None:
        project_id = self.projects.itemData(index)
        if project_id is None:
            return
        client = self.session.need_client()
        self.session.background.run("opening the project", lambda: client.get_project(project_id), self._opened)

    def _opened(self, project: dict[str, Any]) -> None:
        self.session.set_project(project)
        self.session.say(f"project {project['name']!r}: model {project['model']['name']!r}, "
                         f"{len(project['images'])} image(s), {len(project['versions'])} model version(s)")

    def create(self) -> None:
        client = self.session.need_client()
        name, model = self.name.text().strip(), self.model_source.text().strip()
        uris = [line.strip() for line in self.image_uris.toPlainText().splitlines() if line.strip()]
        if not name or not model or not uris:
            raise BioadaptError("a new project needs a name, a model and at least one image URI")
        mask = self.mask.currentText().strip()
        images = [{"uri": uri, "mask": None if mask in ("", NO_MASK) else mask} for uri in uris]
        self.create_button.setEnabled(False)
        self.session.say(f"creating {name!r}: loading the model and checking {len(images)} image(s) ...")
        worker = self.session.background.run("creating the project",
                                             lambda: client.create_project(name, model, images), self._created)
        worker.finished.connect(lambda: self.create_button.setEnabled(True))

    def _created(self, project: dict[str, Any]) -> None:
        self.refresh(select=project["id"])
