"""Progress reporting for the orchestrator: a rich bar per stage on a terminal, plain log
lines otherwise, JSON events (one object per line on stderr) with ``--json``, nothing for
library callers. Retries of unreachable or throttling services show their count and last
error, so a station waiting on the network is never silent."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Protocol, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class ProgressSink(Protocol):
    def start(self, stage: str, total: int) -> None: ...
    def advance(self, stage: str, n: int) -> None: ...
    def retrying(self, stage: str, retries: int, error: str) -> None:
        """A call of ``stage`` failed and will be retried: ``retries`` so far, the last
        error in one line."""
        ...

    def finish(self, stage: str) -> None: ...
    def log(self, message: str) -> None: ...
    def close(self) -> None: ...


class Silent:
    def start(self, stage: str, total: int) -> None: ...
    def advance(self, stage: str, n: int) -> None: ...
    def retrying(self, stage: str, retries: int, error: str) -> None: ...
    def finish(self, stage: str) -> None: ...
    def log(self, message: str) -> None: ...
    def close(self) -> None: ...


class Lines:
    """For logs and CI: a line when a stage starts, every ``every`` seconds, and at its end."""

    def __init__(self, stream: TextIO = sys.stderr, every: float = 5.0) -> None:
        self._out = stream
        self._every = every
        self._stages: dict[str, list[float]] = {}  # stage -> [total, done, started, last]
        self._retry: dict[str, tuple[int, str, float]] = {}  # stage -> retries, error, printed

    def _print(self, text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {text}", file=self._out, flush=True)

    def start(self, stage: str, total: int) -> None:
        now = time.monotonic()
        self._stages[stage] = [total, 0, now, now]
        self._print(f"{stage}: {total} devices")

    def advance(self, stage: str, n: int) -> None:
        s = self._stages[stage]
        s[1] += n
        now = time.monotonic()
        if now - s[3] >= self._every:
            s[3] = now
            rate = s[1] / max(now - s[2], 1e-9)
            self._print(
                f"{stage}: {int(s[1])}/{int(s[0])} ({rate:.0f} devices/s){self._note(stage)}"
            )

    def _note(self, stage: str) -> str:
        retries, error, _ = self._retry.get(stage, (0, "", 0.0))
        return f", {retries} retries, last error: {error}" if retries else ""

    def retrying(self, stage: str, retries: int, error: str) -> None:
        now = time.monotonic()
        printed = self._retry.get(stage, (0, "", -self._every))[2]
        self._retry[stage] = (retries, error, printed)
        if now - printed >= min(self._every, 1.0):
            self._retry[stage] = (retries, error, now)
            s = self._stages.get(stage, [0, 0, now, now])
            self._print(f"{stage}: {int(s[1])}/{int(s[0])}, retry {retries}, last error: {error}")

    def finish(self, stage: str) -> None:
        _, done, started, _ = self._stages[stage]
        took = time.monotonic() - started
        self._print(
            f"{stage}: done, {int(done)} devices in {took:.1f}s "
            f"({done / max(took, 1e-9):.0f} devices/s)"
        )

    def log(self, message: str) -> None:
        self._print(message)

    def close(self) -> None: ...


class Bars:
    """A rich progress bar per stage, with devices/s and ETA."""

    def __init__(self) -> None:
        self._progress = Progress(
            TextColumn("{task.description:<8}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[note]}"),
            console=Console(stderr=True),
        )
        self._tasks: dict[str, tuple[TaskID, float]] = {}
        self._done: dict[str, int] = {}
        self._progress.start()

    def start(self, stage: str, total: int) -> None:
        self._tasks[stage] = (
            self._progress.add_task(stage, total=total, rate="", note=""),
            time.monotonic(),
        )
        self._done[stage] = 0

    def advance(self, stage: str, n: int) -> None:
        task, started = self._tasks[stage]
        self._done[stage] += n
        rate = self._done[stage] / max(time.monotonic() - started, 1e-9)
        self._progress.update(task, advance=n, rate=f"{rate:7.0f} devices/s")

    def retrying(self, stage: str, retries: int, error: str) -> None:
        if stage in self._tasks:
            note = f"retry {retries}: {error}"
            self._progress.update(self._tasks[stage][0], note=note[:80])

    def finish(self, stage: str) -> None:
        self._progress.stop_task(self._tasks[stage][0])

    def log(self, message: str) -> None:
        self._progress.console.print(message, markup=False, highlight=False)

    def close(self) -> None:
        self._progress.stop()


class JsonEvents:
    """``--json``: one JSON object per line on stderr (stdout carries the report): ``start``,
    ``progress`` (at most every ``every`` seconds), ``retry`` (retries so far, last error),
    ``finish`` and ``log`` events, each with a UTC ``time``."""

    def __init__(self, stream: TextIO = sys.stderr, every: float = 2.0) -> None:
        self._out = stream
        self._every = every
        self._stages: dict[str, list[float]] = {}  # stage -> [total, done, started, last]
        self._retries: dict[str, tuple[int, str]] = {}

    def _emit(self, event: str, **fields: Any) -> None:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event}
        print(json.dumps({**record, **fields}), file=self._out, flush=True)

    def start(self, stage: str, total: int) -> None:
        now = time.monotonic()
        self._stages[stage] = [total, 0, now, now]
        self._emit("start", stage=stage, total=total)

    def advance(self, stage: str, n: int) -> None:
        s = self._stages[stage]
        s[1] += n
        now = time.monotonic()
        if now - s[3] >= self._every:
            s[3] = now
            self._emit("progress", stage=stage, done=int(s[1]), total=int(s[0]))

    def retrying(self, stage: str, retries: int, error: str) -> None:
        self._retries[stage] = (retries, error)
        s = self._stages.get(stage, [0, 0, 0, 0])
        self._emit(
            "retry", stage=stage, retries=retries, last_error=error, done=int(s[1]), total=int(s[0])
        )

    def finish(self, stage: str) -> None:
        total, done, started, _ = self._stages[stage]
        retries, error = self._retries.get(stage, (0, ""))
        self._emit(
            "finish",
            stage=stage,
            done=int(done),
            total=int(total),
            seconds=round(time.monotonic() - started, 3),
            retries=retries,
            last_error=error,
        )

    def log(self, message: str) -> None:
        self._emit("log", message=message)

    def close(self) -> None: ...


def for_terminal(quiet: bool = False, json_events: bool = False) -> ProgressSink:
    if quiet:
        return Silent()
    if json_events:
        return JsonEvents()
    return Bars() if sys.stderr.isatty() else Lines()
