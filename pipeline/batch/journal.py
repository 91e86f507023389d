"""The batch journal: ``journal.sqlite`` in the batch directory, the source of truth for resume.

Devices move planned → intent → bundled → registered (or conflict / register_failed when the
registration stage cannot finish them; ``failed`` is an issuance failure; the states are
:class:`pipeline.vocabulary.DeviceState`). Every
certificate serial is recorded as an *intent* (committed) before it is signed, and ends
``issued`` (its bundle is durable), ``void`` (it may have been signed but its bundle is not
durable: list it for revocation) or ``unused`` (the worker proved it was never signed).

The journal is written only by the orchestrating process, one transaction per chunk, in WAL
mode with synchronous=FULL: a committed chunk survives a crash or power loss.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..layout import JOURNAL, LOCK
from ..registration.target import RegistrationOutcome
from ..vocabulary import REWORK_STATES, DeviceState, SerialState
from .records import IssuedBundle, NotIssued, PendingDevice

_PLANNED, _INTENT, _BUNDLED, _FAILED = (
    DeviceState.PLANNED.value,
    DeviceState.INTENT.value,
    DeviceState.BUNDLED.value,
    DeviceState.FAILED.value,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    idx INTEGER PRIMARY KEY,
    registration_id TEXT NOT NULL UNIQUE,
    device_id TEXT NOT NULL UNIQUE,
    extra TEXT NOT NULL,            -- JSON: tags, desired properties
    state TEXT NOT NULL,            -- planned | intent | bundled | failed
                                    -- | registered | conflict | register_failed
    serial TEXT,                    -- hex serial of the current certificate
    detail TEXT,                    -- JSON: thumbprints, key reference, reason of a failure
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS devices_state ON devices(state, idx);
CREATE TABLE IF NOT EXISTS serials (
    serial TEXT PRIMARY KEY,
    registration_id TEXT NOT NULL,
    state TEXT NOT NULL,            -- intent | issued | void | unused
    reason TEXT,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS serials_state ON serials(state);
CREATE INDEX IF NOT EXISTS serials_device ON serials(registration_id);
"""


class Journal:
    def __init__(self, path: Path, conn: sqlite3.Connection, lock: int | None) -> None:
        self.path = path
        self._db = conn
        self._lock = lock

    # -- opening ---------------------------------------------------------------------
    @classmethod
    def open(cls, batch_dir: Path, *, create: bool) -> Journal:
        """``create`` opens for writing: it takes the batch lock (one run per batch at a
        time; the kernel drops it when the process dies, kill -9 included)."""
        path = batch_dir / JOURNAL
        if not create and not path.exists():
            raise InputError(f"{batch_dir} has no {JOURNAL}", rule="a batch directory")
        lock = _lock(batch_dir) if create else None
        conn = sqlite3.connect(path, isolation_level=None, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_SCHEMA)
        return cls(path, conn, lock)

    @staticmethod
    def exists(batch_dir: Path) -> bool:
        return (batch_dir / JOURNAL).exists()

    def close(self) -> None:
        self._db.close()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def meta(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT key, value FROM meta"))

    def set_meta(self, values: dict[str, str]) -> None:
        with self._tx():
            self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", values.items())

    # -- planning ----------------------------------------------------------------------
    def plan(self, devices: Iterable[tuple[str, str, dict[str, Any]]], batch: int = 5000) -> int:
        """Insert devices as ``planned`` in manifest order; streams, one commit per batch."""
        now = time.time()
        total = 0
        rows: list[tuple[int, str, str, str, float]] = []
        for idx, (rid, did, extra) in enumerate(devices):
            rows.append((idx, rid, did, json.dumps(extra, sort_keys=True), now))
            if len(rows) >= batch:
                total += self._insert_planned(rows)
                rows = []
        total += self._insert_planned(rows)
        self.set_meta({"planned": "complete"})
        return total

    def _insert_planned(self, rows: list[tuple[int, str, str, str, float]]) -> int:
        if rows:
            with self._tx():
                self._db.executemany(
                    "INSERT INTO devices (idx, registration_id, device_id, extra, state, updated)"
                    f" VALUES (?, ?, ?, ?, '{_PLANNED}', ?)",
                    rows,
                )
        return len(rows)

    def discard_plan(self) -> None:
        """Forget a plan that a crash interrupted (only ever before the first intent)."""
        with self._tx():
            if self._db.execute("SELECT COUNT(*) FROM serials").fetchone()[0]:
                raise InputError(
                    f"{self.path}: serials exist but the plan is incomplete",
                    rule="journal consistency",
                )
            self._db.execute("DELETE FROM devices")

    def pending(self, chunk_size: int) -> Iterator[list[PendingDevice]]:
        """Chunks of ``planned`` devices in manifest order, read lazily."""
        last = -1
        while True:
            rows = self._db.execute(
                "SELECT idx, registration_id, device_id, extra, EXISTS (SELECT 1 FROM serials "
                "s WHERE s.registration_id = d.registration_id) FROM devices d "
                "WHERE state = ? AND idx > ? ORDER BY idx LIMIT ?",
                (_PLANNED, last, chunk_size),
            ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield [PendingDevice(i, r, d, json.loads(e), bool(x)) for i, r, d, e, x in rows]

    # -- issuance ---------------------------------------------------------------------
    def record_intents(self, pairs: list[tuple[str, str]]) -> None:
        """(registration_id, serial) pairs become intents, durably, before any is signed."""
        now = time.time()
        with self._tx():
            self._db.executemany(
                "INSERT INTO serials (serial, registration_id, state, updated) VALUES (?, ?, ?, ?)",
                [(s, r, SerialState.INTENT.value, now) for r, s in pairs],
            )
            self._db.executemany(
                "UPDATE devices SET state = ?, serial = ?, updated = ? WHERE registration_id = ?",
                [(_INTENT, s, now, r) for r, s in pairs],
            )

    def record_results(self, issued: list[IssuedBundle], not_issued: list[NotIssued]) -> None:
        now = time.time()
        with self._tx():
            self._db.executemany(
                "UPDATE serials SET state = ?, updated = ? WHERE serial = ?",
                [(SerialState.ISSUED.value, now, i.serial) for i in issued],
            )
            self._db.executemany(
                "UPDATE devices SET state = ?, detail = ?, updated = ? WHERE registration_id = ?",
                [
                    (_BUNDLED, json.dumps(i.to_json(), sort_keys=True), now, i.registration_id)
                    for i in issued
                ],
            )
            self._db.executemany(
                "UPDATE serials SET state = ?, reason = ?, updated = ? WHERE serial = ?",
                [
                    (
                        (SerialState.VOID if n.signed else SerialState.UNUSED).value,
                        n.reason,
                        now,
                        n.serial,
                    )
                    for n in not_issued
                ],
            )
            self._db.executemany(
                "UPDATE devices SET state = ?, detail = ?, updated = ? WHERE registration_id = ?",
                [
                    (_FAILED, json.dumps({"reason": n.reason}), now, n.registration_id)
                    for n in not_issued
                ],
            )

    def void_dangling(self, reason: str) -> list[tuple[str, str]]:
        """Resume: intents with no durable bundle are voided and their devices planned again.
        Returns the (registration_id, serial) pairs voided."""
        now = time.time()
        with self._tx():
            dangling = self._db.execute(
                "SELECT registration_id, serial FROM devices WHERE state = ?", (_INTENT,)
            ).fetchall()
            self._db.executemany(
                "UPDATE serials SET state = ?, reason = ?, updated = ? WHERE serial = ?",
                [(SerialState.VOID.value, reason, now, s) for _, s in dangling],
            )
            self._db.execute(
                "UPDATE devices SET state = ?, serial = NULL, updated = ? WHERE state = ?",
                (_PLANNED, now, _INTENT),
            )
        return [(r, s) for r, s in dangling]

    def retry_failed(self) -> int:
        """Failed devices get another chance on the next run."""
        with self._tx():
            cur = self._db.execute(
                "UPDATE devices SET state = ?, serial = NULL WHERE state = ?", (_PLANNED, _FAILED)
            )
        return cur.rowcount

    # -- registration -------------------------------------------------------------------
    def registration_targets(self, retry_conflicts: bool) -> list[tuple[str, str, str]]:
        """(registration_id, device_id, extra JSON) of bundled devices not yet registered."""
        states = (DeviceState.BUNDLED, DeviceState.REGISTER_FAILED) + (
            (DeviceState.CONFLICT,) if retry_conflicts else ()
        )
        marks = ",".join("?" * len(states))
        return [
            (rid, did, extra)
            for rid, did, extra in self._db.execute(
                f"SELECT registration_id, device_id, extra FROM devices WHERE state IN ({marks}) "
                "ORDER BY idx",
                states,
            )
        ]

    def record_registration(self, outcomes: list[RegistrationOutcome]) -> None:
        now = time.time()
        with self._tx():
            self._db.executemany(
                "UPDATE devices SET state = ?, updated = ?, detail = json_set("
                "COALESCE(detail, '{}'), '$.registration', json(?)) WHERE registration_id = ?",
                [(o.state.value, now, json.dumps(o.detail()), o.registration_id) for o in outcomes],
            )

    # -- reading ----------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT state, COUNT(*) FROM devices GROUP BY state"))

    def serial_counts(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT state, COUNT(*) FROM serials GROUP BY state"))

    def voids(self) -> list[dict[str, str]]:
        return [
            {"registration_id": r, "serial": s, "reason": why or ""}
            for r, s, why in self._db.execute(
                "SELECT registration_id, serial, reason FROM serials "
                "WHERE state = ? ORDER BY updated, serial",
                (SerialState.VOID.value,),
            )
        ]

    def failures(self, limit: int = 1000) -> list[dict[str, str]]:
        marks = ",".join("?" * len(REWORK_STATES))
        rows = self._db.execute(
            f"SELECT registration_id, state, detail FROM devices WHERE state IN ({marks}) "
            "ORDER BY idx LIMIT ?",
            (*REWORK_STATES, limit),
        )
        out = []
        for rid, state, detail in rows:
            info = json.loads(detail or "{}")
            reason = info.get("reason") or info.get("registration", {}).get("reason", "")
            out.append({"registration_id": rid, "state": state, "reason": reason})
        return out

    def registration_ids(self, states: tuple[DeviceState, ...]) -> Iterator[str]:
        marks = ",".join("?" * len(states))
        for (rid,) in self._db.execute(
            f"SELECT registration_id FROM devices WHERE state IN ({marks}) ORDER BY idx", states
        ):
            yield rid

    def device_rows(self) -> Iterator[tuple[str, str, str | None]]:
        """(registration_id, state, detail JSON) of every device, in manifest order."""
        yield from self._db.execute(
            "SELECT registration_id, state, detail FROM devices ORDER BY idx"
        )

    def attempted_registration_ids(self) -> set[str]:
        """Devices a serial was ever reserved for: the only ones a retained key of this batch
        can exist for (orphan removal touches no other label)."""
        return {rid for (rid,) in self._db.execute("SELECT DISTINCT registration_id FROM serials")}

    def inventory_rows(self) -> Iterator[tuple[str, str, str, str | None, str | None]]:
        """(registration_id, device_id, state, serial, detail JSON) of every device, for the
        station inventory (pipeline.lifecycle.inventory)."""
        yield from self._db.execute(
            "SELECT registration_id, device_id, state, serial, detail FROM devices ORDER BY idx"
        )

    def total(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM devices").fetchone()[0])

    def _tx(self) -> _Transaction:
        return _Transaction(self._db)


def _lock(batch_dir: Path) -> int:
    fd = os.open(batch_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise InputError(
            f"{batch_dir} is being run by another process", rule="one run per batch at a time"
        ) from exc
    return fd


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, *_: object) -> None:
        self._db.execute("ROLLBACK" if kind else "COMMIT")
