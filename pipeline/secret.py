"""Where a secret comes from: ``env:NAME`` or ``file:PATH``.

Configs and command lines carry only these references, never the secret itself, so a
secret never lands in argv (visible in ``ps``), a log line or a report. A value that is not
a reference may be the secret typed in the wrong place, so it is never echoed back. A secret
file must be private (no group or other permission bits, like ssh's private keys) and small.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .inputfile import KIB, read_input

MAX_SECRET_BYTES = 64 * KIB  # PINs, passphrases, connection strings are far smaller
SECRET_RULE = "secrets come from env vars or files"


@dataclass(frozen=True)
class SecretRef:
    kind: str  # "env" | "file"
    name: str  # variable name or file path

    @classmethod
    def parse(cls, text: str, *, base: Path | None = None, where: str = "") -> SecretRef:
        kind, sep, name = text.partition(":")
        if not sep or kind not in ("env", "file") or not name or "\0" in name:
            # Not echoed: a value where a source is expected may be the secret itself.
            raise InputError(
                "not a secret source: expected env:NAME or file:PATH "
                "(the value is not shown: it may be the secret itself)",
                where=where,
                rule=SECRET_RULE,
            )
        if kind == "file" and base is not None and not os.path.isabs(name):
            name = str((base / name).resolve())
        return cls(kind, name)

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"

    def problem(self) -> str | None:
        """Why the secret cannot be read now, or None when it can."""
        if self.kind == "env":
            if os.environ.get(self.name):
                return None
            return f"environment variable {self.name} is not set"
        try:
            info = os.stat(self.name)
        except FileNotFoundError:
            return f"secret file {self.name} does not exist"
        except (OSError, ValueError) as exc:
            return f"secret file {self.name} cannot be read: {exc}"
        if not stat.S_ISREG(info.st_mode):
            return f"secret file {self.name} is not a regular file"
        if info.st_mode & 0o077:
            return (
                f"secret file {self.name} is accessible to group or others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); chmod 600 it"
            )
        if info.st_size > MAX_SECRET_BYTES:
            return f"secret file {self.name} is {info.st_size:,} bytes (at most 64 KiB)"
        if not os.access(self.name, os.R_OK):
            return f"secret file {self.name} is not readable"
        return None

    def check(self, *, where: str = "") -> None:
        """Raise :class:`InputError` if the secret cannot be read now."""
        issue = self.problem()
        if issue:
            raise InputError(issue, where=where, rule=SECRET_RULE)

    def read(self, *, where: str = "") -> str:
        self.check(where=where)
        if self.kind == "env":
            return os.environ[self.name]
        data = read_input(
            self.name, limit=MAX_SECRET_BYTES, what="secret file", where=where, private=True
        )
        try:
            return data.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise InputError(
                f"secret file {self.name} is not UTF-8 text", where=where, rule=SECRET_RULE
            ) from exc
