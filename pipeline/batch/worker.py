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

import contextlib
import ctypes
import ctypes.util
import functools
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
from .bundle import BundleDirectory, render_bundle
from .custody import KeyMaker, key_maker
from .ledger import WINDOW, LedgerWriter
from .records import IssuedBundle, NotIssued
from .signing import open_station_keys
from .writer import BundleWriter, WriteJob

# Worker seconds per step, summed over a chunk (report.json -> stages.issue.worker_seconds).
# Main thread: keys (key pair, wrap), issue (leaf signed), ledger (marking serials, synced),
# queue_wait (blocked: the writer's queue was full, so the disk set the pace), drain (waiting
# at the chunk's end for the writer), sync (the chunk's filesystem sync). Writer thread:
# bundle (rendering and storing bundles, overlapped with the main thread's steps).
STEPS = ("keys", "issue", "ledger", "queue_wait", "bundle", "drain", "sync")
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
    bundles: BundleDirectory
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
        bundles=BundleDirectory(batch_dir),
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
    """Sign every device of the chunk in this (the main) thread and hand each to the bundle
    writer thread (:mod:`.writer`); once the writer has written them all, sync once and
    report. The writer is finished before this returns or raises, so no bundle is being
    written while the orchestrator records or settles the chunk."""
    if _startup_error is not None:
        raise _startup_error
    assert _worker is not None, "init_worker was not called"
    w = _worker
    result = ChunkResult(seconds=dict.fromkeys(STEPS, 0.0))
    seconds = result.seconds
    clock = time.perf_counter
    writer = BundleWriter(w.bundles)
    failed: list[tuple[int, NotIssued]] = []  # devices that failed before reaching the writer
    try:
        marked_until = 0
        for index, item in enumerate(items):
            if writer.failure is not None:
                break  # the disk failed: finish() raises it; the ledger settles the rest
            if _stopping(w):
                result.unstarted = [(i.registration_id, i.serial) for i in items[index:]]
                break
            if index >= marked_until:  # durably mark the next window before signing any of it
                t0 = clock()
                marked_until = index + WINDOW
                w.ledger.mark(i.serial for i in items[index:marked_until])
                seconds["ledger"] += clock() - t0
            job = _sign(w, index, item, failed, seconds)
            if job is not None:
                seconds["queue_wait"] += writer.put(job)
    except BaseException:
        with contextlib.suppress(ProvlineError):
            writer.finish()  # what is signed and queued is written (settling may recover it)
        raise
    seconds["drain"] += writer.finish()  # raises the writer's storage failure, if any
    seconds["bundle"] += writer.outcome.seconds
    result.issued = [bundle for _, bundle in sorted(writer.outcome.issued, key=_first)]
    result.not_issued = [n for _, n in sorted(failed + writer.outcome.not_issued, key=_first)]
    t0 = clock()
    sync_filesystem(w.batch_dir)
    seconds["sync"] += clock() - t0
    return result


def _first(pair: tuple[int, Any]) -> int:
    return int(pair[0])


def _sign(
    w: _Worker,
    index: int,
    item: ChunkItem,
    failed: list[tuple[int, NotIssued]],
    seconds: dict[str, float],
) -> WriteJob | None:
    """The device's key and signed certificate, as a job for the writer; None when this
    device failed (recorded in ``failed``). An unusable token or disk raises."""
    clock = time.perf_counter
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
        files = dict(key.files)
        if key.with_certificate is not None:
            files.update(key.with_certificate(cert, w.chain))
        t2 = clock()
    except (HsmError, StorageError):
        raise  # the token or the disk is unusable: stop the batch; the ledger settles it
    except OSError as exc:
        if is_storage_error(exc):
            raise storage_error(exc, exc.filename or w.batch_dir) from exc
        failed.append((index, _not_issued(item, signed, exc)))
        return None
    except Exception as exc:  # one device failed; the rest of the chunk goes on
        failed.append((index, _not_issued(item, signed, exc)))
        return None
    seconds["keys"] += t1 - t0
    seconds["issue"] += t2 - t1
    render = functools.partial(
        render_bundle,
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
    return WriteJob(index, item.registration_id, item.serial, render)


def _not_issued(item: ChunkItem, signed: bool, exc: Exception) -> NotIssued:
    return NotIssued(item.registration_id, item.serial, signed, f"{type(exc).__name__}: {exc}")
