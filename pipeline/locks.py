"""One writer per directory: an advisory lock on ``<dir>/.lock``, taken without waiting.

``flock`` locks belong to the open file, so the kernel drops them when the process dies,
however it dies: a killed run never leaves a stale lock behind (a lock *file* may remain;
it means nothing without a holder).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .errors import InputError
from .layout import LOCK


def hold(directory: Path, busy: str, rule: str, mode: int = 0o644) -> int:
    """The open descriptor holding ``directory``'s lock (closing it releases the lock).
    Raises :class:`InputError` with ``busy`` and ``rule`` when another process holds it;
    an ``OSError`` opening the file reaches the caller unchanged."""
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise InputError(busy, rule=rule) from exc
    return fd
