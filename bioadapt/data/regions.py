"""The durable log of annotated regions kept beside a label store (SQLite, one row per write)."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

from bioadapt.data.windows import window_contains, windows_overlap

SCHEMA = """
CREATE TABLE IF NOT EXISTS regions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    origin TEXT NOT NULL,
    shape TEXT NOT NULL,
    time INTEGER,
    author TEXT NOT NULL,
    created TEXT NOT NULL,
    replaced_by INTEGER REFERENCES regions(id),
    overwrote TEXT NOT NULL DEFAULT '[]'
)
"""


@dataclass(frozen=True)
class Region:
    """One annotated window: where, by whom, when; ``replaced_by`` once a later write covered it entirely,
    ``overwrote`` lists earlier regions whose pixels this write changed."""

    id: int
    origin: tuple[int, ...]
    shape: tuple[int, ...]
    time: int | None
    author: str
    created: str
    replaced_by: int | None
    overwrote: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "origin": list(self.origin), "shape": list(self.shape),
                "overwrote": list(self.overwrote)}


class RegionLog:
    """Regions in a SQLite file; every write is one transaction, safe across processes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with self._connect() as connection:
            connection.execute(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self.path, timeout=60, isolation_level=None)) as connection:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    def record(self, origin: Sequence[int], shape: Sequence[int], *, author: str, time: int | None) -> Region:
        """Add a region and mark the earlier ones it covers (entirely: replaced; in part: overwritten)."""
        created = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        with self._connect() as connection:
            rows = connection.execute(
                "SELECT id, origin, shape FROM regions WHERE replaced_by IS NULL AND time IS ?", (time,)).fetchall()
            touched = [(rid, json.loads(o), json.loads(s)) for rid, o, s in rows]
            touched = [(rid, o, s) for rid, o, s in touched if windows_overlap(origin, shape, o, s)]
            cursor = connection.execute(
                "INSERT INTO regions (origin, shape, time, author, created, overwrote) VALUES (?, ?, ?, ?, ?, ?)",
                (json.dumps(list(origin)), json.dumps(list(shape)), time, author, created,
                 json.dumps([rid for rid, _, _ in touched])))
            new_id = cursor.lastrowid
            covered = [rid for rid, o, s in touched if window_contains(origin, shape, o, s)]
            connection.executemany("UPDATE regions SET replaced_by = ? WHERE id = ?", [(new_id, r) for r in covered])
        return Region(new_id, tuple(origin), tuple(shape), time, author, created, None,
                      tuple(rid for rid, _, _ in touched))

    def list(self, *, include_replaced: bool = False) -> list[Region]:
        query = "SELECT id, origin, shape, time, author, created, replaced_by, overwrote FROM regions"
        if not include_replaced:
            query += " WHERE replaced_by IS NULL"
        with self._connect() as connection:
            rows = connection.execute(query + " ORDER BY id").fetchall()
        return [Region(rid, tuple(json.loads(o)), tuple(json.loads(s)), t, a, c, r, tuple(json.loads(w)))
                for rid, o, s, t, a, c, r, w in rows]
