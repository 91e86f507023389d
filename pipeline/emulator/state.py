"""Persistent emulator state: one SQLite file in the data directory, so a restart keeps
enrollments, groups, registrations, hub devices and CA certificates."""

from __future__ import annotations

import base64
import json
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL,
    id TEXT NOT NULL,
    body TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (kind, id)
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


def new_etag() -> str:
    """DPS etags are base64 of a quoted GUID-like string (docs/dps.md)."""
    return base64.b64encode(f'"{uuid.uuid4()}"'.encode()).decode()


class State:
    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.RLock()

    @contextmanager
    def transaction(self) -> Iterator[State]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def get(self, kind: str, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT body FROM objects WHERE kind = ? AND id = ?", (kind, key.lower())
            ).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, kind: str, key: str, body: dict[str, Any]) -> None:
        with self._lock:
            seq = self._next("seq")
            self._db.execute(
                "INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?)",
                (kind, key.lower(), json.dumps(body), seq),
            )

    def delete(self, kind: str, key: str) -> bool:
        with self._lock:
            cur = self._db.execute(
                "DELETE FROM objects WHERE kind = ? AND id = ?", (kind, key.lower())
            )
        return cur.rowcount > 0

    def page(self, kind: str, after: int, limit: int) -> list[tuple[int, dict[str, Any]]]:
        """Objects in creation order after sequence ``after`` (for continuation tokens)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, body FROM objects WHERE kind = ? AND seq > ? ORDER BY seq LIMIT ?",
                (kind, after, limit),
            ).fetchall()
        return [(seq, json.loads(body)) for seq, body in rows]

    def all(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT body FROM objects WHERE kind = ? ORDER BY seq", (kind,)
            ).fetchall()
        return [json.loads(body) for (body,) in rows]

    def count(self, kind: str) -> int:
        with self._lock:
            return int(
                self._db.execute("SELECT COUNT(*) FROM objects WHERE kind = ?", (kind,)).fetchone()[
                    0
                ]
            )

    def _next(self, name: str) -> int:
        self._db.execute("INSERT OR IGNORE INTO counters VALUES (?, 0)", (name,))
        self._db.execute("UPDATE counters SET value = value + 1 WHERE name = ?", (name,))
        return int(
            self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()[0]
        )
