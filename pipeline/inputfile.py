"""Opening input files (manifests, station configs, certificates, secrets) in bounded time
and memory: regular files only, never more than a stated number of bytes.

A path an operator or another team's script supplies may name a directory, a device that
never ends (``/dev/zero``), a FIFO that blocks until someone writes, or a file of gigabytes.
Each is refused with one line before a byte of it is parsed. Limits are in docs/limits.md.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from pathlib import Path

from .errors import InputError

KIB = 1024
MIB = 1024 * KIB

# Group and other permission bits: a private file (secret, key) has none (README "Station
# config", like ssh's rule for private keys).
_NOT_PRIVATE = 0o077


def size_text(n: int) -> str:
    """A byte count for a message: 16 MiB, 64 KiB, 300 bytes."""
    for unit, size in (("MiB", MIB), ("KiB", KIB)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n:,} bytes"


def open_input(
    path: Path | str, *, limit: int, what: str, where: str = "", private: bool = False
) -> io.BufferedReader:
    """``path`` opened for reading, checked first: it exists, is a regular file (after
    symlinks), is at most ``limit`` bytes, and, when ``private``, has no group or other
    permission bits. Opened without blocking, so a FIFO cannot hang the check. The caller
    reads it through :class:`Bounded` (or :func:`read_input`) so a file that grows after the
    check is still cut at ``limit``."""
    name = str(path)
    if "\0" in name:
        raise InputError(f"{what} path {name!r} contains a NUL byte", where=where, rule="paths")
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise InputError(
            f"{what} {name} does not exist", where=where, rule="input files exist"
        ) from exc
    except OSError as exc:
        raise InputError(
            f"{what} {name} cannot be opened: {_reason(exc)}", where=where, rule="readable files"
        ) from exc
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise InputError(
                f"{what} {name} is a directory", where=where, rule="input files are regular files"
            )
        if not stat.S_ISREG(info.st_mode):
            raise InputError(
                f"{what} {name} is not a regular file (a device, FIFO or socket)",
                where=where,
                rule="input files are regular files",
            )
        if info.st_size > limit:
            raise InputError(
                f"{what} {name} is {info.st_size:,} bytes",
                where=where,
                rule=f"a {what} is at most {size_text(limit)}",
            )
        if private and info.st_mode & _NOT_PRIVATE:
            raise InputError(
                f"{what} {name} is accessible to group or others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); chmod 600 it",
                where=where,
                rule="secret files are private (0600), as ssh requires of keys",
            )
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return io.BufferedReader(io.FileIO(fd, "rb", closefd=True))


class Bounded:
    """Reads from an opened input and refuses to go past ``limit`` bytes (a file that grew
    after it was checked)."""

    def __init__(
        self, handle: io.BufferedReader, path: Path | str, *, limit: int, what: str, where: str
    ) -> None:
        self.handle = handle
        self.path = path
        self.limit = limit
        self.what = what
        self.where = where
        self.consumed = 0

    def readline(self, size: int) -> bytes:
        return self._count(self.handle.readline(size))

    def read(self, size: int = -1) -> bytes:
        room = self.limit + 1 - self.consumed
        return self._count(self.handle.read(room if size < 0 else min(size, room)))

    def _count(self, data: bytes) -> bytes:
        self.consumed += len(data)
        if self.consumed > self.limit:
            raise InputError(
                f"{self.what} {self.path} grew past {size_text(self.limit)} while it was read",
                where=self.where,
                rule=f"a {self.what} is at most {size_text(self.limit)}",
            )
        return data

    def close(self) -> None:
        self.handle.close()


def read_input(
    path: Path | str, *, limit: int, what: str, where: str = "", private: bool = False
) -> bytes:
    """The bytes of ``path`` after the checks of :func:`open_input`."""
    handle = open_input(path, limit=limit, what=what, where=where, private=private)
    reader = Bounded(handle, path, limit=limit, what=what, where=where)
    try:
        return reader.read()
    except OSError as exc:
        raise InputError(
            f"{what} {path} cannot be read: {_reason(exc)}", where=where, rule="readable files"
        ) from exc
    finally:
        reader.close()


def _reason(exc: OSError) -> str:
    if exc.errno == errno.EACCES:
        return "permission denied"
    return exc.strerror or type(exc).__name__
