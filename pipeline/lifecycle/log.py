"""The station lifecycle log: ``audit.jsonl`` + ``audit.jsonl.p7s`` in the station's
lifecycle directory, hash-chained and CMS-signed by the station's audit key exactly like a
batch log (:class:`pipeline.audit.log.AuditLog` writes and seals it), verified offline by
``provline audit verify <lifecycle dir>`` (:mod:`pipeline.audit.lifecycle_verify`).

The log is one chain for the whole life of the station: its first line is
``station_log_start``; every lifecycle command appends its events and seals the log when it
ends, so a sealed log always ends with ``seal``. One lifecycle command runs at a time (a lock
in the lifecycle directory, dropped by the kernel when the process dies).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .. import __version__, locks
from ..audit.log import AuditLog, Event
from ..batch.signing import open_signer
from ..ca.certs import common_name, load_cert, require_key_matches, thumbprints
from ..ca.chain import Chain, load_chain
from ..config.station import Station
from ..errors import CAError, InputError, ProvlineError
from ..vocabulary import AuditEvent
from .paths import lifecycle_dir, log_path


class StationLog:
    """The open lifecycle log of a station, with its lock held."""

    def __init__(self, station: Station) -> None:
        if station.audit is None:
            raise InputError(
                "lifecycle operations are recorded in a signed log: the station needs an audit key",
                where=str(station.path),
                rule="audit.key and audit.cert",
            )
        self.station = station
        self.dir = lifecycle_dir(station)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = lock(self.dir)
        try:
            self.chain: Chain = load_chain(station)
            self.cert = load_cert(str(station.audit.cert), where=f"{station.path}: audit.cert")
            self.signer = open_signer(station, station.audit.key)
            require_key_matches(
                self.signer, self.cert, "the audit key", CAError, where=str(station.path)
            )
            self.log = AuditLog(log_path(station))
        except BaseException:
            os.close(self._lock)
            raise
        if self.log.torn_bytes:
            self.log.append(AuditEvent.TORN_TAIL_REMOVED, data={"bytes": self.log.torn_bytes})
        if self.log.seq == 0:
            self.log.append(
                AuditEvent.STATION_LOG_START,
                data={
                    "station": station.name,
                    "tool": f"provline {__version__}",
                    "ca_sha256": {common_name(c): thumbprints(c).sha256 for c in self.chain.certs},
                    "host": socket.gethostname(),
                },
            )
        self.log.flush()

    @property
    def path(self) -> Path:
        return self.log.path

    def offset(self) -> int:
        """Bytes written so far (after a flush): where the next event will start."""
        self.log.flush(sync=False)
        return self.path.stat().st_size

    def write(self, events: list[Event]) -> None:
        """Append and sync: the events are durable when this returns."""
        if events:
            self.log.extend(events)
            self.log.flush()

    def close(self, note: Callable[[str], None] = print) -> bool:
        """Seal (append ``seal`` and sign the whole log) and release the lock. Returns whether
        it was sealed; a failed seal (the token went away) leaves a synced, unsealed log that
        the next lifecycle command seals."""
        sealed = False
        try:
            self.log.sign_off(self.signer, self.cert, list(self.chain.certs))
            sealed = True
        except ProvlineError as exc:
            note(f"lifecycle log not sealed: {exc.line()}")
        finally:
            self.log.close()
            os.close(self._lock)
        return sealed


def events_since(path: Path, offset: int) -> Iterator[dict[str, Any]]:
    """The log's records from byte ``offset`` on (an operation's own events, on resume)."""
    with path.open("rb") as handle:
        handle.seek(offset)
        for raw in handle:
            if raw.endswith(b"\n"):
                yield json.loads(raw)


def lock(directory: Path) -> int:
    """Hold the lifecycle directory: one lifecycle command per station at a time."""
    return locks.hold(
        directory,
        f"{directory} is in use by another lifecycle command",
        "one lifecycle command per station at a time",
    )
