"""The issue stage, run in worker processes: for each device of a chunk make its key (per
custody), sign its leaf with the HSM-held intermediate, write its bundle; then make the chunk
durable with one filesystem sync.

Workers are spawned processes, each with its own PKCS#11 login (python-pkcs11 + SoftHSM2 are
not thread-safe, and login state is per process). The orchestrator journals every serial as
an intent before it hands a chunk over; the worker marks serials in the signing ledger
(:mod:`.ledger`) before it signs them.

A worker never outlives the orchestrator (it asks the kernel for SIGKILL when its parent
dies), ignores SIGINT and SIGTERM (the orchestrator stops it through ``stop``: the worker
finishes the device in hand, syncs, and reports the devices it never started), and reports
a start-up failure (PIN source gone, token missing, issuer key not found) as the same
one-line error and exit code the orchestrator would give, raised from the first chunk it is
handed. SoftHSM2's transient start-up errors are retried a bounded number of times.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509

from ..ca.builders import Issuer, build_leaf
from ..config.station import load_station, station_secret_problems
from ..errors import (
    HsmError,
    KeyNotFound,
    ModuleLoadError,
    ProvlineError,
    StorageError,
    TokenNotFound,
    ValidationFailed,
)
from ..files import is_storage_error, storage_error, sync_filesystem
from ..hsm.token import forget_sessions
from ..keyprofile import KeyProfile
from ..vocabulary import Custody
from .bundle import write_bundle
from .custody import KeyMaker, key_maker
from .ledger import WINDOW, LedgerWriter
from .records import IssuedBundle, NotIssued
from .signing import open_station_keys

STARTUP_ATTEMPTS = 5  # a transient HSM error at start-up is retried, 0.25 s doubling
_PR_SET_PDEATHSIG = 1


class StopFlag(Protocol):
    """A multiprocessing.Event, as far as a worker uses it."""

    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class IssueJob:
    """Everything a worker needs, picklable: secrets are re-read from their sources."""

    station_path: str
    batch_dir: str
    batch_id: str
    key_profile: str
    validity_days: int
    orchestrator_pid: int = 0


@dataclass(frozen=True)
class ChunkItem:
    registration_id: str
    device_id: str
    serial: str  # hex
    extra: dict[str, Any]
    retry: bool = False


@dataclass
class ChunkResult:
    issued: list[IssuedBundle] = field(default_factory=list)
    not_issued: list[NotIssued] = field(default_factory=list)
    # (registration_id, serial) of devices the worker never started (it was told to stop)
    unstarted: list[tuple[str, str]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # per worker step, summed


@dataclass
class _Worker:
    job: IssueJob
    batch_dir: Path
    issuer: Issuer
    chain: list[x509.Certificate]
    keys: KeyMaker
    ledger: LedgerWriter
    stop: StopFlag | None


_worker: _Worker | None = None
_startup_error: ProvlineError | None = None


def init_worker(job: IssueJob, stop: StopFlag | None = None) -> None:
    """Process initialiser: never raises (a raising initialiser breaks the whole pool with a
    traceback); a failure is kept and raised from :func:`issue_chunk` instead."""
    global _worker, _startup_error
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent(job.orchestrator_pid)
    for attempt in range(1, STARTUP_ATTEMPTS + 1):
        try:
            _worker = _start(job, stop)
            return
        except ProvlineError as exc:
            if not _transient(exc) or attempt == STARTUP_ATTEMPTS:
                _startup_error = exc
                return
            print(
                f"worker {os.getpid()}: {exc.line()}; retrying ({attempt}/{STARTUP_ATTEMPTS - 1})",
                file=sys.stderr,
                flush=True,
            )
        except Exception as exc:  # a bug or an unmapped library error: one line, not a crash
            _startup_error = HsmError(f"worker start-up failed: {type(exc).__name__}: {exc}")
            return
        forget_sessions()
        time.sleep(0.25 * 2 ** (attempt - 1))


def _start(job: IssueJob, stop: StopFlag | None) -> _Worker:
    station = load_station(Path(job.station_path))
    problems = station_secret_problems(station)  # the orchestrator's own check, same lines
    if problems:
        raise ValidationFailed(problems)
    keys = open_station_keys(station)
    passphrase = None
    if station.custody.policy is Custody.PKCS8 and station.custody.pkcs8_passphrase:
        passphrase = station.custody.pkcs8_passphrase.read()
    batch_dir = Path(job.batch_dir)
    return _Worker(
        job=job,
        batch_dir=batch_dir,
        issuer=keys.issuer,
        chain=list(keys.chain.certs),
        keys=key_maker(
            station.custody, keys.token, KeyProfile(job.key_profile), passphrase, batch_dir
        ),
        ledger=LedgerWriter(batch_dir),
        stop=stop,
    )


def _transient(exc: ProvlineError) -> bool:
    """HSM start-up errors that SoftHSM2 reports transiently. A wrong PIN is never retried
    (tokens count failures); nor is anything that is not an HSM error."""
    return type(exc) in (HsmError, TokenNotFound, ModuleLoadError, KeyNotFound)


def _die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL this worker when the orchestrator dies (Linux), so no worker
    goes on signing into a batch that a new run has taken over."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent and os.getppid() != parent:  # it died before the request took effect
        os._exit(1)


def _stopping(w: _Worker) -> bool:
    if w.stop is not None and w.stop.is_set():
        return True
    return bool(w.job.orchestrator_pid) and os.getppid() != w.job.orchestrator_pid


def issue_chunk(items: list[ChunkItem]) -> ChunkResult:
    if _startup_error is not None:
        raise _startup_error
    assert _worker is not None, "init_worker was not called"
    w = _worker
    result = ChunkResult(seconds={"keys": 0.0, "issue": 0.0, "bundle": 0.0, "sync": 0.0})
    clock = time.perf_counter
    marked_until = 0
    for index, item in enumerate(items):
        if _stopping(w):
            result.unstarted = [(i.registration_id, i.serial) for i in items[index:]]
            break
        if index >= marked_until:  # durably mark the next window before signing any of it
            marked_until = index + WINDOW
            w.ledger.mark(i.serial for i in items[index:marked_until])
        signed = False
        try:
            t0 = clock()
            key = w.keys.make(item.registration_id, item.retry)
            t1 = clock()
            cert = build_leaf(
                key.public,
                item.registration_id,
                w.issuer,
                serial=int(item.serial, 16),
                validity_days=w.job.validity_days,
            )
            signed = True
            t2 = clock()
            files = dict(key.files)
            if key.with_certificate is not None:
                files.update(key.with_certificate(cert, w.chain))
            issued = write_bundle(
                w.batch_dir,
                batch_id=w.job.batch_id,
                registration_id=item.registration_id,
                device_id=item.device_id,
                cert=cert,
                chain_pem=w.issuer.chain_pem,
                private_files=files,
                key=key.reference,
                extra=item.extra,
                key_generated=key.generated,
            )
            t3 = clock()
        except (HsmError, StorageError):
            raise  # the token or the disk is unusable: stop the batch; the ledger settles it
        except OSError as exc:
            if is_storage_error(exc):
                raise storage_error(exc, exc.filename or w.batch_dir) from exc
            result.not_issued.append(_not_issued(item, signed, exc))
            continue
        except Exception as exc:  # one device failed; the rest of the chunk goes on
            result.not_issued.append(_not_issued(item, signed, exc))
            continue
        result.seconds["keys"] += t1 - t0
        result.seconds["issue"] += t2 - t1
        result.seconds["bundle"] += t3 - t2
        result.issued.append(issued)
    t4 = clock()
    sync_filesystem(w.batch_dir)
    result.seconds["sync"] += clock() - t4
    return result


def _not_issued(item: ChunkItem, signed: bool, exc: Exception) -> NotIssued:
    return NotIssued(item.registration_id, item.serial, signed, f"{type(exc).__name__}: {exc}")
