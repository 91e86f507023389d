"""A worker's bundle writer: one thread that renders and stores the bundles of the chunk in
hand while the worker's main thread keeps the HSM busy with the next devices.

The two kinds of work overlap because neither holds the GIL for long: python-pkcs11 releases
it inside every PKCS#11 call, and file system calls release it too. The main thread alone
talks to the HSM (python-pkcs11 and SoftHSM2 are used from one thread per process); this
thread touches only files.

The queue between them is bounded (:data:`DEPTH` devices), so a slow disk holds the signer
back instead of letting signed bundles pile up in memory, and the main thread's time spent
waiting on a full queue says that the disk, not the HSM, set the pace. Ordering is unchanged:
a device is handed over only after its serial is in the synced signing ledger and its
certificate is signed; the chunk's one filesystem sync runs after :meth:`BundleWriter.finish`
has returned, so the worker still reports only bundles that are durable. ``finish`` is
called whatever happens to the chunk (a stop, an HSM error, a full disk), so no write is in
progress once the worker has reported or raised.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import StorageError
from ..files import is_storage_error, storage_error
from .bundle import BundleDirectory, RenderedBundle
from .records import IssuedBundle, NotIssued

DEPTH = 32  # devices signed and waiting for the writer, at most


@dataclass
class WriteJob:
    index: int  # the device's place in its chunk: outcomes are reported in chunk order
    registration_id: str
    serial: str
    render: Callable[[], RenderedBundle]


@dataclass
class WriterOutcome:
    issued: list[tuple[int, IssuedBundle]] = field(default_factory=list)
    not_issued: list[tuple[int, NotIssued]] = field(default_factory=list)
    seconds: float = 0.0  # the thread's time rendering and storing


class BundleWriter:
    """Renders and stores queued bundles in a thread of its own, in queue order."""

    def __init__(self, directory: BundleDirectory, depth: int = DEPTH) -> None:
        self._directory = directory
        self._queue: queue.Queue[WriteJob | None] = queue.Queue(maxsize=depth)
        self.outcome = WriterOutcome()
        self.failure: StorageError | None = None  # the disk is unusable: nothing more is written
        self._thread = threading.Thread(target=self._run, name="bundle-writer", daemon=True)
        self._thread.start()
        self._finished = False

    def put(self, job: WriteJob) -> float:
        """Queue ``job``; returns the seconds spent waiting for room (the disk's backlog)."""
        started = time.perf_counter()
        self._queue.put(job)
        return time.perf_counter() - started

    def finish(self) -> float:
        """Write what is queued, stop the thread; returns the seconds waited for it. Raises
        the storage failure that stopped the thread, if any."""
        started = time.perf_counter()
        if not self._finished:
            self._finished = True
            self._queue.put(None)
            self._thread.join()
        waited = time.perf_counter() - started
        if self.failure is not None:
            raise self.failure
        return waited

    def _run(self) -> None:
        clock = time.perf_counter
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self.failure is not None:
                continue  # the disk failed: the rest stay unwritten (the ledger voids them)
            started = clock()
            try:
                bundle = job.render()
                self._directory.store(bundle)
                self.outcome.issued.append((job.index, bundle.issued))
            except StorageError as exc:
                self.failure = exc
            except OSError as exc:
                if is_storage_error(exc):
                    self.failure = storage_error(exc, exc.filename or self._directory.path)
                else:
                    self._failed(job, exc)
            except Exception as exc:  # one device failed; the rest of the chunk goes on
                self._failed(job, exc)
            self.outcome.seconds += clock() - started

    def _failed(self, job: WriteJob, exc: Exception) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        self.outcome.not_issued.append(
            (job.index, NotIssued(job.registration_id, job.serial, True, reason))
        )
