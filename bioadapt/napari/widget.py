"""The bioadapt dock widget for napari: a client of a bioadapt service (``bioadapt.service.client``) that connects,
opens or creates a project, scores patches, loads them for correction, commits labels, fine-tunes, evaluates and
exports. Every service call runs in a worker thread; the panels share one Session."""

from __future__ import annotations

import napari
from napari.utils.notifications import show_error
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QLabel, QTabWidget, QVBoxLayout, QWidget

from bioadapt.napari.connect_panel import ConnectPanel
from bioadapt.napari.overview import OverviewToggle
from bioadapt.napari.patch_panel import PatchPanel
from bioadapt.napari.project_panel import ProjectPanel
from bioadapt.napari.score_panel import ScorePanel
from bioadapt.napari.session import Session
from bioadapt.napari.shortcuts import bind_shortcuts, unbind_shortcuts
from bioadapt.napari.tune_panel import TunePanel
from bioadapt.napari.versions_panel import VersionsPanel


class AdaptWidget(QWidget):
    """Tabs: Project (connect; pick or create a project), Label (score; the patch table; commit, skip, next,
    previous), Tune (fine-tune with live loss; versions, evaluate, export); a status line under them."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.session = Session()  # no Qt parent: it may outlive this widget's C++ object
        self.connect_panel = ConnectPanel(self.session)
        self.project_panel = ProjectPanel(self.session)
        self.score_panel = ScorePanel(self.session)
        self.patch_panel = PatchPanel(self.session, napari_viewer)
        self.overview = OverviewToggle(self.session, napari_viewer,
                                       lambda: (self.patch_panel.shown or {}).get("image_id"))
        self.tune_panel = TunePanel(self.session)
        self.versions_panel = VersionsPanel(self.session)
        self.status = QLabel("connect to a bioadapt service (`bioadapt serve` prints the URL, token and workspace)")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)  # paths can be copied

        self.tabs = QTabWidget()
        self.tabs.addTab(_stacked(self.connect_panel, self.project_panel), "Project")
        self.tabs.addTab(_stacked(self.score_panel, self.overview, self.patch_panel), "Label")
        self.tabs.addTab(_stacked(self.tune_panel, self.versions_panel), "Tune")
        layout = QVBoxLayout(self)
        layout.addWidget(self.tabs, 1)
        layout.addWidget(self.status)

        self.session.message.connect(self._show_message)
        self.session.project_changed.connect(self._project_opened)
        self._keys_before = bind_shortcuts(napari_viewer, {
            "commit": self.patch_panel.commit, "skip": self.patch_panel.skip, "next": self.patch_panel.next,
            "previous": self.patch_panel.previous})
        session = self.session
        self.destroyed.connect(lambda: session.close(wait=False))

    def _show_message(self, text: str, is_error: bool) -> None:
        self.status.setText(text)
        self.status.setStyleSheet("color: #ff6b6b;" if is_error else "")
        if is_error:
            show_error(text)  # napari's notification (and its log)

    def _project_opened(self, project: dict | None) -> None:
        if project is not None and self.tabs.currentIndex() == 0:
            self.tabs.setCurrentIndex(1)  # next step: score and label

    def close_session(self) -> None:
        """Give the shortcut keys back, stop watching jobs and disconnect (the service keeps the jobs running)."""
        unbind_shortcuts(self.viewer, self._keys_before)
        self._keys_before = {}
        self.session.close()


def _stacked(*panels: QWidget) -> QWidget:
    page = QWidget()
    layout = QVBoxLayout(page)
    for panel in panels:
        layout.addWidget(panel)
    return page
