"""Opened images and stores, kept so that their metadata is parsed once (pixels are always read fresh): the most
recently used ones, and never those of a deleted project."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any


class OpenedCache:
    """Entries keyed by (kind, project id, ...); at most ``capacity`` of them, least recently used out first."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._entries: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, open_it: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        opened = open_it()  # outside the lock: opening a remote image may take a while
        with self._lock:
            self._entries[key] = opened
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return opened

    def forget_project(self, project_id: str) -> None:
        with self._lock:
            for key in [k for k in self._entries if k[1] == project_id]:
                del self._entries[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def keys(self) -> list[tuple]:
        with self._lock:
            return list(self._entries)
