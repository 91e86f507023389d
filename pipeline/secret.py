"""Where a secret comes from: ``env:NAME`` or ``file:PATH``.

Configs and command lines carry only these references, never the secret itself, so a
secret never lands in argv (visible in ``ps``), a log line or a report.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError


@dataclass(frozen=True)
class SecretRef:
    kind: str  # "env" | "file"
    name: str  # variable name or file path

    @classmethod
    def parse(cls, text: str, *, base: Path | None = None, where: str = "") -> SecretRef:
        kind, sep, name = text.partition(":")
        if not sep or kind not in ("env", "file") or not name:
            raise InputError(
                f"secret source {text!r} is not env:NAME or file:PATH",
                where=where,
                rule="secrets come from env vars or files",
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
        path = Path(self.name)
        if not path.is_file():
            return f"secret file {path} does not exist"
        if not os.access(path, os.R_OK):
            return f"secret file {path} is not readable"
        return None

    def read(self, *, where: str = "") -> str:
        issue = self.problem()
        if issue:
            raise InputError(issue, where=where, rule="secrets come from env vars or files")
        if self.kind == "env":
            return os.environ[self.name]
        return Path(self.name).read_text().rstrip("\r\n")
