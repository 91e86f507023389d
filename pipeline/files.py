"""Atomic file writes and group-commit durability.

A file is written to a temporary name in the same directory and renamed into place, so a
reader (or a resumed run) sees either nothing or the whole file. Durability is separate:
:func:`sync_filesystem` makes everything written so far durable with one call, which is what
lets a batch sync once per chunk of bundles instead of once per file.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

PRIVATE = 0o600
PUBLIC = 0o644

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def write_atomic(path: Path, data: bytes, *, private: bool = False, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` via a temp file and rename; 0600 when ``private``.
    The temp file is created with its final mode, so private bytes are never world-readable."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE if private else PUBLIC)
    try:
        try:
            os.write(fd, data)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:  # e.g. the disk is full: leave nothing half-written behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    if fsync:
        sync_directory(path.parent)


def sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_filesystem(anywhere: Path) -> None:
    """syncfs(2) on the filesystem holding ``anywhere``: data and directory entries of every
    file written so far become durable in one call."""
    fd = os.open(anywhere, os.O_RDONLY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs failed: {os.strerror(err)}", str(anywhere))
    finally:
        os.close(fd)
