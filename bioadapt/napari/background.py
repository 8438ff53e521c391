"""Service calls off napari's GUI thread: every call runs in a superqt worker thread and hands its answer (or its
error) back to the GUI thread, so the viewer never freezes while the service works or the network is slow."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from superqt.utils import WorkerBase, create_worker

from bioadapt.service.client import FINISHED, BioadaptClient

JOB_POLL_S = 0.5


class Background:
    """Runs calls in worker threads; ``on_error(what, error)`` gets every failure, in the GUI thread.

    ``busy`` says whether a call is still running (tests wait on it); ``stop()`` asks running job watchers to
    stop and waits for the workers (at most ``timeout_s``)."""

    def __init__(self, on_error: Callable[[str, Exception], None]):
        self.on_error = on_error
        self._running: set[WorkerBase] = set()

    @property
    def busy(self) -> bool:
        return bool(self._running)

    def run(self, what: str, call: Callable[[], Any], on_done: Callable[[Any], None] | None = None) -> WorkerBase:
        """Run ``call()`` in a worker thread; ``on_done(answer)`` in the GUI thread when it returns."""
        return self._start(what, create_worker(call, _start_thread=False, _ignore_errors=True), on_done)

    def watch_job(self, what: str, client: BioadaptClient, job_id: str, on_progress: Callable[[dict], None],
                  on_done: Callable[[dict], None] | None = None, poll_s: float = JOB_POLL_S) -> WorkerBase:
        """Poll ``job_status`` until the job finishes: ``on_progress(job)`` for each poll, ``on_done(job)`` with
        the finished job (done, failed or cancelled: the caller decides what each means)."""
        worker = create_worker(_poll_job, client, job_id, poll_s, _start_thread=False, _ignore_errors=True)
        worker.yielded.connect(on_progress)
        return self._start(what, worker, on_done)

    def _start(self, what: str, worker: WorkerBase, on_done: Callable[[Any], None] | None) -> WorkerBase:
        # errors are ours to report (_ignore_errors: superqt would otherwise re-raise them in the GUI thread)
        if on_done is not None:
            worker.returned.connect(on_done)
        worker.errored.connect(lambda error: self.on_error(what, error))
        worker.finished.connect(lambda: self._running.discard(worker))
        self._running.add(worker)
        worker.start()
        return worker

    def stop(self, timeout_s: float = 10) -> None:
        from qtpy.QtCore import QThreadPool
        from qtpy.QtWidgets import QApplication

        for worker in list(self._running):
            worker.quit()
        deadline = time.monotonic() + timeout_s
        while self._running and time.monotonic() < deadline:
            QThreadPool.globalInstance().waitForDone(50)
            QApplication.processEvents()  # delivers 'finished', which empties _running


def _poll_job(client: BioadaptClient, job_id: str, poll_s: float) -> Iterator[dict]:
    while True:
        job = client.job_status(job_id)
        yield job
        if job["state"] in FINISHED:
            return job
        time.sleep(poll_s)
