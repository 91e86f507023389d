"""Stopping a run on SIGINT (Ctrl-C) or SIGTERM (``timeout``, systemd, CI runners) at a safe
point.

Python raises KeyboardInterrupt wherever the interpreter happens to be, which could be
between writing an audit line and recording it. While a run is active its handlers only
note the signal; the orchestrator checks at its safe points (between chunks, while waiting
for workers, between registration calls) and raises :class:`~pipeline.errors.Interrupted`
there. The run then stops its workers after the devices in hand, records what they did,
marks itself aborted, seals the log, writes the report and releases the batch lock. Later
signals are ignored while it does so (SIGKILL still stops it at once, and a resume is safe).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

from ..errors import Interrupted

_HANDLED = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

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

    def requested(self) -> bool:
        return self.received is not None

    def check(self) -> None:
        """Raise Interrupted if a stop was asked for (call at a safe point)."""
        if self.received is not None:
            raise Interrupted(self.received.name, 128 + int(self.received))
