"""Atomic file writes, group-commit durability, and what a full or failing disk becomes.

A file is written to a temporary name in the same directory and renamed into place, so a
reader (or a resumed run) sees either nothing or the whole file. Durability is separate:
:func:`sync_filesystem` makes everything written so far durable with one call, which is what
lets a batch sync once per chunk of bundles instead of once per file.

A write that fails (the disk is full, the filesystem went read-only) removes its temporary
file and raises :class:`~pipeline.errors.StorageError` naming the path: nothing half-written
is left behind, and the caller's ordering rules decide what was committed.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import StorageError
from .layout import TEMP_SUFFIX

PRIVATE = 0o600
PUBLIC = 0o644

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

# errno values that mean "the storage cannot take this write", not "this one file is wrong".
STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EIO: "I/O error",
    errno.EFBIG: "file too large for the file system",
}
STORAGE_RULE = "free space or fix the storage, then run the same command again to resume"


def is_storage_error(exc: BaseException) -> bool:
    return isinstance(exc, StorageError) or (
        isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS
    )


def storage_error(exc: OSError, path: Path | str) -> StorageError:
    """The one-line error for a failed write to ``path``."""
    what = STORAGE_ERRNOS.get(exc.errno or 0) or (exc.strerror or str(exc))
    return StorageError(what, where=str(path), rule=STORAGE_RULE)


@contextlib.contextmanager
def storage_errors(path: Path | str) -> Iterator[None]:
    """An OSError inside that means the storage cannot take the write leaves as
    :class:`StorageError` naming ``path``; every other exception passes unchanged."""
    try:
        yield
    except OSError as exc:
        if exc.errno in STORAGE_ERRNOS:
            raise storage_error(exc, path) from exc
        raise


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (a write may be short when the disk fills)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:  # pragma: no cover - POSIX raises instead of returning 0 here
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def write_atomic(path: Path, data: bytes, *, private: bool = False, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` via a temp file and rename; 0600 when ``private``.
    The temp file is created with its final mode, so private bytes are never world-readable.
    On failure the temp file is removed and a storage failure becomes StorageError."""
    tmp = path.with_name(f".{path.name}{TEMP_SUFFIX}")
    with storage_errors(path):
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE if private else PUBLIC)
            try:
                write_all(fd, data)
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            if fsync:
                sync_directory(path.parent)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise


def open_directory(path: Path) -> int:
    """A descriptor of the directory ``path``, for the ``*_at`` writes below: names are then
    resolved from it, one component each, whatever the depth of ``path``."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def create_at(dir_fd: int, name: str, data: bytes, *, private: bool = False, where: Path) -> None:
    """Write ``data`` to ``name`` in the directory ``dir_fd`` in place, with no temporary name:
    only for a file whose completeness a reader learns from something written after it (a
    bundle's ``device.json`` records its hash). Created with its final mode (0600 when
    ``private``). On failure the file is removed, so nothing half-written is left, and a
    storage failure becomes StorageError naming ``where`` (the directory's path)."""
    with storage_errors(where / name):
        fd = os.open(
            name,
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
            PRIVATE if private else PUBLIC,
            dir_fd=dir_fd,
        )
        try:
            try:
                write_all(fd, data)
            finally:
                os.close(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dir_fd)
            raise


def replace_at(dir_fd: int, name: str, data: bytes, *, private: bool = False, where: Path) -> None:
    """:func:`write_atomic` relative to ``dir_fd`` (no fsync: durability is the caller's
    group commit): a reader sees no file or the whole of it."""
    tmp = f".{name}{TEMP_SUFFIX}"
    create_at(dir_fd, tmp, data, private=private, where=where)
    with storage_errors(where / name):
        try:
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise


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
            with storage_errors(anywhere):
                raise OSError(err, f"syncfs failed: {os.strerror(err)}", str(anywhere))
    finally:
        os.close(fd)


class SpaceReserve:
    """A preallocated file that keeps room for a run's last words.

    When the disk fills mid-batch the run still has to log why it stopped, seal the log and
    write its report. The run preallocates ``size`` bytes at its start (failing early, before
    any device, if even that much is not free) and gives them back (:meth:`release`) when a
    write fails for lack of space, or when the run ends.
    """

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size

    def take(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, PRIVATE)
            try:
                os.posix_fallocate(fd, 0, self.size)
            finally:
                os.close(fd)
        except OSError as exc:
            self.release()
            if exc.errno in STORAGE_ERRNOS:
                raise StorageError(
                    f"{STORAGE_ERRNOS[exc.errno or 0]}: a run needs "
                    f"{self.size // (1 << 20)} MiB free to start",
                    where=str(self.path.parent),
                    rule=STORAGE_RULE,
                ) from exc
            # A file system that cannot preallocate: run without the reserve (best effort).

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
