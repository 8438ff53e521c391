"""The scored patches, the ones picked for labelling first: selecting one loads it into the viewer (image, the
model's labels to correct, uncertainty); Commit sends the corrected labels of the patch, Skip sets it aside,
Previous / Next move through the table."""

from __future__ import annotations

from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QAbstractItemView, QGridLayout, QLabel, QPushButton, QTableWidgetItem, QVBoxLayout, QWidget

from bioadapt.errors import BioadaptError
from bioadapt.napari.fields import read_only_table
from bioadapt.napari.layers import edited_labels, patch_layers, show_patch
from bioadapt.napari.session import Session

COLUMNS = ("score", "image", "origin", "status")
LISTED_PATCHES = 1000


class PatchPanel(QWidget):
    def __init__(self, session: Session, viewer: Any, parent: QWidget | None = None):
        super().__init__(parent)
        self.session = session
        self.viewer = viewer
        self.patches: list[dict[str, Any]] = []
        self.wanted: int | None = None  # the patch whose data is on its way (older answers are dropped)
        self._listing = 0  # the last listing asked for: an older one answering late is dropped
        self.shown: dict[str, Any] | None = None  # the patch in the viewer
        self.table = read_only_table(COLUMNS, QAbstractItemView.SelectionMode.SingleSelection, stretch="image")
        self.about = QLabel("score patches, then select one to correct its labels")
        self.about.setWordWrap(True)
        self.previous_button = QPushButton("◀ Previous")
        self.next_button = QPushButton("Next ▶")
        self.commit_button = QPushButton("Commit labels")
        self.skip_button = QPushButton("Skip")
        self.commit_button.setToolTip("send the labels layer of this patch to the service (Shift+Enter)")
        self.skip_button.setToolTip("never offer this patch again nor train on it (Shift+Backspace)")
        self.previous_button.setToolTip("previous patch in the table (Shift+Left)")
        self.next_button.setToolTip("next patch in the table (Shift+Right)")
        buttons = QGridLayout()
        buttons.addWidget(self.previous_button, 0, 0)
        buttons.addWidget(self.next_button, 0, 1)
        buttons.addWidget(self.commit_button, 1, 0)
        buttons.addWidget(self.skip_button, 1, 1)
        layout = QVBoxLayout(self)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.about)
        layout.addLayout(buttons)

        self.table.itemSelectionChanged.connect(lambda: session.act("loading the patch", self._selected))
        self.previous_button.clicked.connect(self.previous)
        self.next_button.clicked.connect(self.next)
        self.commit_button.clicked.connect(self.commit)
        self.skip_button.clicked.connect(self.skip)
        session.project_changed.connect(lambda project: session.act("listing patches", self.reload))
        session.patches_changed.connect(lambda: session.act("listing patches", self.reload))

    # -- the table ------------------------------------------------------------------------------------
    def reload(self) -> None:
        self._listing += 1
        if self.session.project is None:
            self._fill([])
            return
        client, project_id = self.session.need_project()
        asked = self._listing
        self.session.background.run("listing patches",
                                    lambda: client.list_patches(project_id, limit=LISTED_PATCHES),
                                    lambda patches: self._listed(asked, patches))

    def _listed(self, asked: int, patches: list[dict[str, Any]]) -> None:
        # calls run in parallel threads: the listing asked for when the project opened can come back after the
        # one asked for once scoring ended, and would show the patches as they were (drawn, not yet scored)
        if asked == self._listing:
            self._fill(patches)

    def _fill(self, patches: list[dict[str, Any]]) -> None:
        self.patches = patches
        self.table.blockSignals(True)
        self.table.clearSelection()
        self.table.setRowCount(len(patches))
        for row, patch in enumerate(patches):
            self._show_row(row, patch)
        self.table.blockSignals(False)
        if patches:
            pending = sum(p["status"] == "pending" for p in patches)
            self.about.setText(f"{len(patches)} patches, {pending} to label: select one (Shift+Right: next)")

    def _show_row(self, row: int, patch: dict[str, Any]) -> None:
        score = "" if patch["score"] is None else f"{patch['score']:.4g}"
        cells = (score, self.session.image_name(patch["image_id"]), ", ".join(map(str, patch["origin"])),
                 patch["status"])
        for column, text in enumerate(cells):
            item = QTableWidgetItem(text)
            item.setData(Qt.ItemDataRole.UserRole, patch["id"])
            self.table.setItem(row, column, item)

    def current_row(self) -> int:
        rows = self.table.selectionModel().selectedRows()
        return rows[0].row() if rows else -1

    def select(self, row: int) -> None:
        if 0 <= row < self.table.rowCount():
            self.table.selectRow(row)

    def next(self) -> None:
        self.select(self.current_row() + 1)

    def previous(self) -> None:
        self.select(max(self.current_row() - 1, 0))

    def _next_pending(self, after: int) -> None:
        for row in range(after + 1, len(self.patches)):
            if self.patches[row]["status"] == "pending":
                self.select(row)
                return

    # -- one patch in the viewer ----------------------------------------------------------------------
    def _selected(self) -> None:
        row = self.current_row()
        if row < 0:
            return
        client, project_id = self.session.need_project()
        patch_id = self.patches[row]["id"]
        self.wanted = patch_id
        self.about.setText(f"loading patch {patch_id} ...")
        self.session.background.run("loading the patch", lambda: client.get_patch(project_id, patch_id),
                                    lambda patch: self._arrived(project_id, patch))

    def _arrived(self, project_id: str, patch: dict[str, Any]) -> None:
        if patch["id"] != self.wanted:
            return
        show_patch(self.viewer, patch_layers(patch, project_id))
        self.shown = patch
        score = "not scored" if patch["score"] is None else f"score {patch['score']:.4g}"
        todo = {"annotated": "your stored correction: edit and Commit to replace it",
                "skipped": "skipped: Commit labels to use it after all"}.get(
            patch["status"], "correct the labels, then Commit (Shift+Enter)")
        self.about.setText(f"patch {patch['id']} ({patch['status']}, {score}) at {tuple(patch['origin'])}, "
                           f"{' x '.join(map(str, patch['shape']))} px: {todo}")

    def commit(self) -> None:
        self.session.act("committing labels", self._commit)

    def _commit(self) -> None:
        where, labels = edited_labels(self.viewer)
        client = self.session.need_client()
        self.session.say(f"sending the labels of patch {where['patch_id']} ...")
        self.session.background.run(
            "committing labels", lambda: client.submit_labels(where["project_id"], where["patch_id"], labels),
            self._updated)

    def skip(self) -> None:
        self.session.act("skipping the patch", self._skip)

    def _skip(self) -> None:
        client, project_id = self.session.need_project()
        row = self.current_row()
        if row < 0:
            raise BioadaptError("select a patch in the table first")
        patch_id = self.patches[row]["id"]
        self.session.background.run("skipping the patch", lambda: client.skip_patch(project_id, patch_id),
                                    self._updated)

    def _updated(self, patch: dict[str, Any]) -> None:
        """A patch's new status came back: show it, then move on to the next patch to label."""
        rows = [row for row, p in enumerate(self.patches) if p["id"] == patch["id"]]
        if not rows or self.session.project is None or self.session.project["id"] != patch["project_id"]:
            return
        self.patches[rows[0]] = {**self.patches[rows[0]], **patch}
        self._show_row(rows[0], self.patches[rows[0]])
        self.session.say(f"patch {patch['id']} {patch['status']}")
        if rows[0] == self.current_row():
            self._next_pending(rows[0])
