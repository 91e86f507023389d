"""Progress reporting for the orchestrator: a rich bar per stage on a terminal, plain log
lines otherwise, nothing for library callers."""

from __future__ import annotations

import sys
import time
from typing import Protocol, TextIO

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
    def finish(self, stage: str) -> None: ...
    def log(self, message: str) -> None: ...
    def close(self) -> None: ...


class Silent:
    def start(self, stage: str, total: int) -> None: ...
    def advance(self, stage: str, n: int) -> None: ...
    def finish(self, stage: str) -> None: ...
    def log(self, message: str) -> None: ...
    def close(self) -> None: ...


class Lines:
    """For logs and CI: a line when a stage starts, every ``every`` seconds, and at its end."""

    def __init__(self, stream: TextIO = sys.stderr, every: float = 5.0) -> None:
        self._out = stream
        self._every = every
        self._stages: dict[str, list[float]] = {}  # stage -> [total, done, started, last]

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
            self._print(f"{stage}: {int(s[1])}/{int(s[0])} ({rate:.0f} devices/s)")

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
            console=Console(stderr=True),
        )
        self._tasks: dict[str, tuple[TaskID, float]] = {}
        self._done: dict[str, int] = {}
        self._progress.start()

    def start(self, stage: str, total: int) -> None:
        self._tasks[stage] = (
            self._progress.add_task(stage, total=total, rate=""),
            time.monotonic(),
        )
        self._done[stage] = 0

    def advance(self, stage: str, n: int) -> None:
        task, started = self._tasks[stage]
        self._done[stage] += n
        rate = self._done[stage] / max(time.monotonic() - started, 1e-9)
        self._progress.update(task, advance=n, rate=f"{rate:7.0f} devices/s")

    def finish(self, stage: str) -> None:
        self._progress.stop_task(self._tasks[stage][0])

    def log(self, message: str) -> None:
        self._progress.console.print(message, markup=False, highlight=False)

    def close(self) -> None:
        self._progress.stop()


def for_terminal(quiet: bool = False) -> ProgressSink:
    if quiet:
        return Silent()
    return Bars() if sys.stderr.isatty() else Lines()
