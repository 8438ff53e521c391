"""Bodies of the service processes that tests/test_postgres_store.py starts (spawned: each a fresh interpreter,
like a service replica). Kept apart from the test module so that a child imports only the store, not the whole
service (numpy, zarr, ...)."""

from __future__ import annotations

import os

from bioadapt.service.db import make_engine
from bioadapt.service.store import ProjectStore


def label_patches(database_url: str, project_id: str, patch_ids: list[int], holdout_fraction: float, start) -> None:
    """Open the store, wait at ``start`` until every process is ready, then mark ``patch_ids`` annotated."""
    engine = make_engine(database_url=database_url)
    store = ProjectStore(engine)
    start.wait(timeout=60)
    for patch_id in patch_ids:
        store.mark_annotated(project_id, patch_id, f"annotator-{os.getpid()}", holdout_fraction)
    engine.dispose()


def open_store(database_url: str, start) -> None:
    """Wait at ``start``, then open the store (creating its tables when they are missing)."""
    start.wait(timeout=60)
    make_engine(database_url=database_url).dispose()


def draw_patches(database_url: str, project_id: str, image_id: str, windows: list, start) -> None:
    """Wait at ``start``, then store ``windows`` as a draw that saw no patch (as two replicas scoring at once)."""
    engine = make_engine(database_url=database_url)
    store = ProjectStore(engine)
    start.wait(timeout=60)
    store.add_drawn(project_id, {image_id: windows}, seen=0)
    engine.dispose()
