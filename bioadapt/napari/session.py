"""What the widget's panels share: the service client, the open project, the background runner, and signals that
tell each panel when they change. Panels talk to each other only through this object."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qtpy.QtCore import QObject, Signal

from bioadapt.errors import BioadaptError
from bioadapt.napari.background import Background
from bioadapt.service.client import BioadaptClient


class Session(QObject):
    connected = Signal(object)  # the BioadaptClient, or None once disconnected
    project_changed = Signal(object)  # get_project()'s answer, or None
    patches_changed = Signal()  # new patches were scored
    versions_changed = Signal()  # a fine-tune made a version (the project was re-read)
    message = Signal(str, bool)  # text for the status line, and whether it reports an error

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self.client: BioadaptClient | None = None
        self.project: dict[str, Any] | None = None
        self.background = Background(self.fail)

    # -- state ----------------------------------------------------------------------------------------
    def set_client(self, client: BioadaptClient | None) -> None:
        old, self.client = self.client, client
        if old is not None and old is not client:
            self.background.run("disconnecting", old.disconnect)
        self.set_project(None)
        self.connected.emit(client)

    def set_project(self, project: dict[str, Any] | None) -> None:
        self.project = project
        self.project_changed.emit(project)

    def reload_project(self, then_emit: Signal | None = None) -> None:
        """Re-read the open project (patch counts, versions); ``then_emit`` is emitted after it arrived."""
        if self.project is None:
            return
        client, project_id = self.need_project()

        def arrived(project: dict[str, Any]) -> None:
            if self.project is not None and self.project["id"] == project_id:
                self.project = project
                if then_emit is not None:
                    then_emit.emit()

        self.background.run("reading the project", lambda: client.get_project(project_id), arrived)

    # -- jobs ---------------------------------------------------------------------------------------------
    def start_job(self, what: str, start: Callable[[BioadaptClient], dict[str, Any]],
                  on_started: Callable[[dict[str, Any]], None], on_progress: Callable[[dict[str, Any]], None],
                  on_finished: Callable[[dict[str, Any]], None], on_idle: Callable[[], None]) -> None:
        """Start a service job (``start(client)`` returns {job_id, ...}) and follow it: ``on_started`` with that
        answer, ``on_progress`` / ``on_finished`` with job_status answers, ``on_idle`` once nothing runs any more
        (also when starting failed)."""
        client = self.need_client()

        def started(answer: dict[str, Any]) -> None:
            on_started(answer)
            watcher = self.background.watch_job(what, client, answer["job_id"], on_progress, on_finished)
            watcher.finished.connect(on_idle)

        worker = self.background.run(what, lambda: start(client), started)
        worker.errored.connect(lambda _: on_idle())

    def cancel_job(self, what: str, job_id: str | None) -> None:
        if job_id is not None:
            client = self.need_client()
            self.background.run(f"cancelling {what}", lambda: client.cancel_job(job_id))
            self.say(f"cancelling {what} ...")

    def need_client(self) -> BioadaptClient:
        if self.client is None:
            raise BioadaptError("not connected: enter the server URL, token and workspace, then Connect")
        return self.client

    def need_project(self) -> tuple[BioadaptClient, str]:
        client = self.need_client()
        if self.project is None:
            raise BioadaptError("no project open: pick one or create one on the Project tab")
        return client, self.project["id"]

    def image_name(self, image_id: str) -> str:
        """A short name for one of the project's images (the last part of its URI)."""
        for image in (self.project or {}).get("images", []):
            if image["id"] == image_id:
                return image["uri"].rstrip("/").rsplit("/", 1)[-1] or image["uri"]
        return image_id

    # -- messages -------------------------------------------------------------------------------------
    def act(self, what: str, action: Callable[[], Any]) -> None:
        """Run a button's action; a BioadaptError (bad input, nothing open) goes to the status line."""
        try:
            action()
        except BioadaptError as e:
            self.fail(what, e)

    def say(self, text: str) -> None:
        self.message.emit(text, False)

    def fail(self, what: str, error: Exception) -> None:
        text = str(error) if isinstance(error, (BioadaptError, PermissionError)) else f"{type(error).__name__}: " \
            f"{error}"
        self.message.emit(f"{what} failed: {text}", True)

    def close(self, wait: bool = True) -> None:
        """Stop watching jobs (waiting for the workers, unless ``wait`` is off) and disconnect; the service keeps
        running the jobs."""
        self.background.stop(timeout_s=10 if wait else 0)
        client, self.client = self.client, None
        if client is not None:
            client.disconnect()
