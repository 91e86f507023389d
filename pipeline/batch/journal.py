"""The batch journal: ``journal.sqlite`` in the batch directory, the source of truth for resume.

Devices move planned → intent → bundled → registered (or conflict / register_failed when the
registration stage cannot finish them; ``failed`` is an issuance failure; the states are
:class:`pipeline.vocabulary.DeviceState`). Every certificate serial is recorded as an
*intent* (committed) before it is signed, and ends ``issued`` (its bundle is durable),
``void`` (it may have been signed but its bundle is not durable: list it for revocation),
``unused`` (the worker proved it was never signed; the device failed) or ``released`` (it
never reached a signer: nothing to revoke, the device is planned again).

The journal is written only by the orchestrating process, one transaction per chunk, in WAL
mode with synchronous=FULL: a committed chunk survives a crash or power loss. A new batch is
created whole (:meth:`Journal.create_batch`): its directory, journal, settings and plan are
built under a temporary name and renamed into place, so a kill while creating leaves either
no batch or a complete, resumable one. A full disk becomes
:class:`~pipeline.errors.StorageError` and rolls the transaction back.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .. import locks
from ..crashpoint import crash_point
from ..errors import InputError, StorageError
from ..files import STORAGE_RULE, storage_errors, sync_directory
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
CREATE TABLE IF NOT EXISTS requests (  -- custody device: the CSR each device's leaf certifies
    registration_id TEXT PRIMARY KEY,
    csr BLOB NOT NULL,              -- DER, as checked
    csr_sha256 TEXT NOT NULL,
    public_key_sha256 TEXT NOT NULL UNIQUE  -- one key per device in a batch
) WITHOUT ROWID;
"""

# (registration_id, DER CSR, its SHA-256, its public key's SHA-256): a checked request
RequestRow = tuple[str, bytes, str, str]
# A device's request replaces its earlier one; a key that is another device's raises
# IntegrityError (INSERT OR REPLACE would delete that other device's request instead).
_UPSERT_REQUEST = (
    "INSERT INTO requests VALUES (?, ?, ?, ?) ON CONFLICT(registration_id) DO UPDATE SET "
    "csr = excluded.csr, csr_sha256 = excluded.csr_sha256, "
    "public_key_sha256 = excluded.public_key_sha256"
)


PLANNED_COMPLETE = ("planned", "complete")  # the meta row that says the plan is whole
CREATING = ".creating-"  # <output>/.<batch-id>.creating-<random>: a batch being built


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
        try:
            return cls(path, _connect(path), lock)
        except BaseException:
            if lock is not None:
                os.close(lock)
            raise

    @classmethod
    def create_batch(
        cls,
        batch_dir: Path,
        meta: dict[str, str],
        devices: Iterable[tuple[str, str, dict[str, Any]]],
        requests: Iterable[RequestRow] = (),
    ) -> Journal:
        """Create a new batch whole: a directory with its lock, journal, settings and plan
        (and, in custody device, every device's checked CSR) is built as
        ``.<batch-id>.creating-<random>`` next to ``batch_dir``, synced and renamed into
        place; the returned journal holds the batch lock. A kill at any point leaves no
        batch (the next run removes the abandoned build) or a complete one. Raises
        InputError if another run created the batch first."""
        output = batch_dir.parent
        with storage_errors(output):
            output.mkdir(parents=True, exist_ok=True)
            _remove_abandoned(output, batch_dir)
            building = output / f".{batch_dir.name}{CREATING}{secrets.token_hex(4)}"
            building.mkdir()
        lock = None
        with storage_errors(building):
            try:
                lock = _lock(building)
                journal = cls(building / JOURNAL, _connect(building / JOURNAL), None)
                try:
                    journal.set_meta(meta, label="create")
                    journal.add_requests(requests)
                    journal.plan(devices)
                finally:
                    journal._db.close()
                sync_directory(building)
                try:
                    os.rename(building, batch_dir)  # replaces an empty directory, never a full one
                except OSError as exc:
                    if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                        raise InputError(
                            f"{batch_dir} was created by another run meanwhile",
                            rule="one run per batch at a time",
                        ) from exc
                    raise
                sync_directory(output)
            except BaseException:
                if lock is not None:
                    os.close(lock)
                shutil.rmtree(building, ignore_errors=True)
                raise
        crash_point("batch.created")
        try:
            return cls(batch_dir / JOURNAL, _connect(batch_dir / JOURNAL), lock)
        except BaseException:
            os.close(lock)
            raise

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

    def planned(self) -> bool:
        """Whether the plan is whole (a batch created by :meth:`create_batch` always is)."""
        return self.meta().get(PLANNED_COMPLETE[0]) == PLANNED_COMPLETE[1]

    def set_meta(self, values: dict[str, str], label: str = "meta") -> None:
        with self._tx(label):
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
        self.set_meta(dict([PLANNED_COMPLETE]), label="planned")
        return total

    def replan(
        self,
        meta: dict[str, str],
        devices: Iterable[tuple[str, str, dict[str, Any]]],
        requests: Iterable[RequestRow] = (),
    ) -> None:
        """Finish a batch that an older provline was killed while creating: nothing was
        issued yet, so its half-written plan is discarded and made again."""
        self.discard_plan()
        self.set_meta(meta)
        self.add_requests(requests)
        self.plan(devices)

    # -- requests (custody device) ------------------------------------------------------
    def add_requests(self, rows: Iterable[RequestRow], batch: int = 2000) -> int:
        """Record checked CSRs, one commit per ``batch``; a request already recorded for a
        device is replaced. Raises InputError if a key is another device's."""
        total = 0
        chunk: list[RequestRow] = []
        for row in rows:
            chunk.append(row)
            if len(chunk) >= batch:
                total += self._insert_requests(chunk)
                chunk = []
        return total + self._insert_requests(chunk)

    def _insert_requests(self, rows: list[RequestRow]) -> int:
        if not rows:
            return 0
        try:
            with self._tx("requests"):
                self._db.executemany(_UPSERT_REQUEST, rows)
        except sqlite3.IntegrityError as exc:
            raise InputError(
                f"{self.path}: a public key of these CSRs is another device's in this batch",
                rule="one key per device",
            ) from exc
        return len(rows)

    def request(self, registration_id: str) -> RequestRow | None:
        row = self._db.execute(
            "SELECT registration_id, csr, csr_sha256, public_key_sha256 FROM requests "
            "WHERE registration_id = ?",
            (registration_id,),
        ).fetchone()
        return (row[0], bytes(row[1]), row[2], row[3]) if row else None

    def key_owner(self, public_key_sha256: str) -> str | None:
        """The device of this batch whose request has this key, if any."""
        row = self._db.execute(
            "SELECT registration_id FROM requests WHERE public_key_sha256 = ?",
            (public_key_sha256,),
        ).fetchone()
        return str(row[0]) if row else None

    def device_state(self, registration_id: str) -> tuple[DeviceState, str | None] | None:
        """(state, detail JSON) of one device, or None if the batch does not have it."""
        row = self._db.execute(
            "SELECT state, detail FROM devices WHERE registration_id = ?", (registration_id,)
        ).fetchone()
        return (DeviceState(row[0]), row[1]) if row else None

    def join(
        self,
        registration_id: str,
        device_id: str,
        extra: dict[str, Any],
        request: RequestRow,
        serial: str,
    ) -> None:
        """One device joins an open batch (batch/sign.py), in one transaction: the device
        (planned, at the end of the batch, unless it is planned again after a void), its
        request, and its serial as an intent (before it is signed)."""
        now = time.time()
        with self._tx("intents"):
            self._db.execute(
                # No FROM in the outer SELECT: an aggregate over devices would yield a row
                # (idx 0) even when the device exists, and clash with the first device.
                "INSERT INTO devices (idx, registration_id, device_id, extra, state, updated) "
                "SELECT (SELECT COALESCE(MAX(idx), -1) + 1 FROM devices), ?, ?, ?, ?, ? "
                "WHERE NOT EXISTS (SELECT 1 FROM devices WHERE registration_id = ?)",
                (
                    registration_id,
                    device_id,
                    json.dumps(extra, sort_keys=True),
                    _PLANNED,
                    now,
                    registration_id,
                ),
            )
            self._db.execute(_UPSERT_REQUEST, request)
            self._db.execute(
                "INSERT INTO serials (serial, registration_id, state, updated) VALUES (?, ?, ?, ?)",
                (serial, registration_id, SerialState.INTENT.value, now),
            )
            self._db.execute(
                "UPDATE devices SET state = ?, serial = ?, updated = ? WHERE registration_id = ?",
                (_INTENT, serial, now, registration_id),
            )

    def _insert_planned(self, rows: list[tuple[int, str, str, str, float]]) -> int:
        if rows:
            with self._tx("plan"):
                self._db.executemany(
                    "INSERT INTO devices (idx, registration_id, device_id, extra, state, updated)"
                    f" VALUES (?, ?, ?, ?, '{_PLANNED}', ?)",
                    rows,
                )
        return len(rows)

    def discard_plan(self) -> None:
        """Forget a plan that a crash interrupted (only ever before the first intent)."""
        with self._tx("plan"):
            if self._db.execute("SELECT COUNT(*) FROM serials").fetchone()[0]:
                raise InputError(
                    f"{self.path}: serials exist but the plan is incomplete",
                    rule="journal consistency",
                )
            self._db.execute("DELETE FROM devices")
            self._db.execute("DELETE FROM requests")

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
        with self._tx("intents"):
            self._db.executemany(
                "INSERT INTO serials (serial, registration_id, state, updated) VALUES (?, ?, ?, ?)",
                [(s, r, SerialState.INTENT.value, now) for r, s in pairs],
            )
            self._db.executemany(
                "UPDATE devices SET state = ?, serial = ?, updated = ? WHERE registration_id = ?",
                [(_INTENT, s, now, r) for r, s in pairs],
            )

    def record_results(
        self,
        issued: list[IssuedBundle],
        not_issued: list[NotIssued],
        released: Iterable[tuple[str, str]] = (),
        released_reason: str = "",
    ) -> None:
        """One chunk's outcome in one transaction: bundled devices, failed devices (their
        serial void or unused) and ``released`` (registration_id, serial) pairs the worker
        never started (the serial is released, the device planned again)."""
        now = time.time()
        with self._tx("results"):
            self._bundled(issued, now)
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
            self._release(released, released_reason, now)

    def dangling(self) -> list[tuple[str, str]]:
        """(registration_id, serial) of every device whose serial is an open intent: reserved,
        maybe handed to a signer, no durable bundle recorded."""
        return [
            (r, s)
            for r, s in self._db.execute(
                "SELECT registration_id, serial FROM devices WHERE state = ? ORDER BY idx",
                (_INTENT,),
            )
        ]

    def _bundled(self, issued: Iterable[IssuedBundle], now: float) -> None:
        issued = list(issued)
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

    def settle(
        self,
        void: list[tuple[str, str]],
        released: list[tuple[str, str]],
        void_reason: str,
        released_reason: str,
        recovered: Iterable[IssuedBundle] = (),
    ) -> None:
        """Close open intents (see :meth:`dangling`) in one transaction: ``recovered``
        bundles are whole on disk and become bundled; ``void`` serials may have been signed
        (revoke them); ``released`` ones never reached a signer. The devices of the last two
        are planned again, to be issued with new serials."""
        now = time.time()
        with self._tx("settle"):
            self._bundled(recovered, now)
            self._db.executemany(
                "UPDATE serials SET state = ?, reason = ?, updated = ? WHERE serial = ? "
                "AND state = ?",
                [(SerialState.VOID.value, void_reason, now, s, _INTENT) for _, s in void],
            )
            self._db.executemany(
                "UPDATE devices SET state = ?, serial = NULL, updated = ? "
                "WHERE registration_id = ? AND serial = ?",
                [(_PLANNED, now, r, s) for r, s in void],
            )
            self._release(released, released_reason, now)

    def _release(self, pairs: Iterable[tuple[str, str]], reason: str, now: float) -> None:
        pairs = list(pairs)
        self._db.executemany(
            "UPDATE serials SET state = ?, reason = ?, updated = ? WHERE serial = ? AND state = ?",
            [(SerialState.RELEASED.value, reason, now, s, _INTENT) for _, s in pairs],
        )
        self._db.executemany(
            "UPDATE devices SET state = ?, serial = NULL, updated = ? "
            "WHERE registration_id = ? AND serial = ?",
            [(_PLANNED, now, r, s) for r, s in pairs],
        )

    def retry_failed(self) -> int:
        """Failed devices get another chance on the next run."""
        with self._tx("retry"):
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
        with self._tx("registration"):
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

    def _tx(self, label: str) -> _Transaction:
        return _Transaction(self._db, self.path, label)


class RequestReader:
    """Read-only access to the requests a batch recorded (custody device), for the worker
    processes that sign them while the orchestrator holds the journal."""

    def __init__(self, batch_dir: Path) -> None:
        path = batch_dir / JOURNAL
        try:
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        except sqlite3.Error as exc:
            raise InputError(f"{path} cannot be read: {exc}", rule="a batch journal") from exc

    def get(self, registration_id: str) -> RequestRow | None:
        row = self._db.execute(
            "SELECT registration_id, csr, csr_sha256, public_key_sha256 FROM requests "
            "WHERE registration_id = ?",
            (registration_id,),
        ).fetchone()
        return (row[0], bytes(row[1]), row[2], row[3]) if row else None

    def close(self) -> None:
        self._db.close()


def _connect(path: Path) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_SCHEMA)
    except sqlite3.Error as exc:
        storage = _sqlite_storage(exc, path)
        if storage is None:
            raise
        raise storage from exc
    return conn


def _lock(batch_dir: Path) -> int:
    return locks.hold(
        batch_dir, f"{batch_dir} is being run by another process", "one run per batch at a time"
    )


def _remove_abandoned(output: Path, batch_dir: Path) -> None:
    """Remove what a kill while creating ``batch_dir`` left behind: unlocked
    ``.<batch-id>.creating-*`` builds (nothing in them was ever issued), and a batch
    directory holding only an unlocked lock file (an older provline's half-made batch)."""
    for building in output.glob(f".{batch_dir.name}{CREATING}*"):
        if building.is_dir() and _unlocked(building):
            shutil.rmtree(building, ignore_errors=True)
    only_a_lock = batch_dir.is_dir() and {p.name for p in batch_dir.iterdir()} == {LOCK}
    if only_a_lock and _unlocked(batch_dir):
        (batch_dir / LOCK).unlink()


def _unlocked(directory: Path) -> bool:
    """No live process holds ``directory``'s lock (an absent lock counts as unlocked only
    once the directory is a minute old: its creator takes the lock right after mkdir)."""
    try:
        fd = os.open(directory / LOCK, os.O_RDWR)
    except FileNotFoundError:
        return time.time() - directory.stat().st_mtime > 60
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


# SQLite result codes (the low byte of an extended code) that mean the storage failed.
_SQLITE_STORAGE = {13: "no space left on device", 10: "I/O error", 8: "read-only database"}


def _sqlite_storage(exc: sqlite3.Error, path: Path) -> StorageError | None:
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if code in _SQLITE_STORAGE:
        return StorageError(_SQLITE_STORAGE[code], where=str(path), rule=STORAGE_RULE)
    return None


class _Transaction:
    """BEGIN IMMEDIATE … COMMIT, rolled back on any exception; a commit that fails for lack
    of space raises StorageError with nothing committed."""

    def __init__(self, db: sqlite3.Connection, path: Path, label: str) -> None:
        self._db = db
        self._path = path
        self._label = label

    def __enter__(self) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            storage = _sqlite_storage(exc, self._path)
            if storage is None:
                raise
            raise storage from exc

    def __exit__(self, kind: object, error: BaseException | None, *_: object) -> None:
        if kind is None:
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                storage = _sqlite_storage(exc, self._path)
                if storage is None:
                    raise
                raise storage from exc
            crash_point(f"commit.{self._label}")
            return
        self._rollback()
        if isinstance(error, sqlite3.Error):
            storage = _sqlite_storage(error, self._path)
            if storage is not None:
                raise storage from error

    def _rollback(self) -> None:
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
