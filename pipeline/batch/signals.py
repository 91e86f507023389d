"""Stopping a run on SIGINT (Ctrl-C) or SIGTERM (``timeout``, systemd, CI runners) at a safe
point.

Python raises KeyboardInterrupt wherever the interpreter happens to be, which could be
between writing an audit line and recording it. While a run is active its handlers only
note the signal; the orchestrator checks at its safe points (between chunks, while waiting
for workers, between registration calls) and raises :class:`~pipeline.errors.Interrupted`
there. The run then stops its workers after the devices in hand, records what they did,
marks itself aborted, seals the log, writes the report and releases the batch lock. Later
signals are ignored while it does so (SIGKILL still stops it at once, and a resume is safe).

Worker processes must not die of the same Ctrl-C (a terminal sends it to the whole process
group) or SIGTERM (systemd sends it to the whole cgroup), not even while they are still
starting: :meth:`StopSignals.deferred` makes them start with both signals ignored (an
ignored disposition survives ``exec``) while the orchestrator keeps them blocked, so the
kernel holds them pending for :meth:`StopSignals.check` instead of dropping them.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from multiprocessing import resource_tracker
from types import FrameType, TracebackType
from typing import Any

from ..errors import Interrupted

_HANDLED = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._deferring = False

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in _HANDLED:
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """While worker processes may be started: children start ignoring SIGINT and
        SIGTERM; this process holds them pending (threads started meanwhile block them too)
        and :meth:`check` picks them up."""
        if not self._previous:  # not the main thread: nothing was installed
            yield
            return
        # multiprocessing starts its resource tracker on first use and unblocks SIGINT and
        # SIGTERM when it does: start it now, before they are blocked.
        resource_tracker.ensure_running()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
        self._deferring = True
        try:
            self._take_pending()  # before SIG_IGN would discard one that is pending
            for sig in _HANDLED:
                signal.signal(sig, signal.SIG_IGN)
            yield
        finally:
            self._take_pending()
            self._deferring = False
            for sig in _HANDLED:
                signal.signal(sig, self._note)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def _take_pending(self) -> None:
        pending = signal.sigpending() & set(_HANDLED)
        for sig in pending:
            signal.sigtimedwait([sig], 0)
            self._note(sig, None)

    def requested(self) -> bool:
        if self._deferring:
            self._take_pending()
        return self.received is not None

    def check(self) -> None:
        """Raise Interrupted if a stop was asked for (call at a safe point)."""
        if self.requested():
            assert self.received is not None
            raise Interrupted(self.received.name, 128 + int(self.received))
