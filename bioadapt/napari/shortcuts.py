"""Keyboard shortcuts for labelling in the viewer: commit, skip, next and previous patch. Keys that napari's own
layers do not use, so painting keys keep working."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

SHORTCUTS = {"commit": "Shift-Enter", "skip": "Shift-Backspace", "next": "Shift-Right", "previous": "Shift-Left"}


def bind_shortcuts(viewer: Any, actions: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """Bind each of ``actions`` (named as in SHORTCUTS) to its key in ``viewer``; returns what the keys were bound
    to before, for ``unbind_shortcuts``. A key already bound to something else is taken over, with a warning."""
    before = {}
    for name, action in actions.items():
        key = SHORTCUTS[name]
        before[key] = viewer.bind_key(key, lambda _viewer, action=action: action(), overwrite=True)
        if before[key] is not None:
            log.warning("bioadapt takes over %s (was %s) while its widget is open", key, before[key])
    return before


def unbind_shortcuts(viewer: Any, before: dict[str, Any]) -> None:
    """Give each key back what it was bound to before ``bind_shortcuts``."""
    for key, previous in before.items():
        viewer.bind_key(key, previous, overwrite=True)
