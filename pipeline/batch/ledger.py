"""The signing ledger: which reserved serials may have reached a signer.

A serial is reserved (journaled and logged as an *intent*) when its chunk is queued for a
worker. A kill then leaves open intents, and each must end either ``void`` (it may have been
signed: revoke it) or ``released`` (it never reached a signer: nothing to revoke). The ledger
tells them apart. Before a worker makes the key and signs the certificate of a device it
appends that serial to ``.signing.ledger`` in the batch directory and syncs it, a window of
:data:`WINDOW` serials at a time (one ``fdatasync`` per window). So every serial that was
ever signed is durably in the ledger, whatever killed the run, power loss included; a serial
missing from it was never signed.

Workers append with ``O_APPEND`` (each window is one ``write``); only the orchestrator reads
the ledger, and clears it when no intent is open (no worker is running then).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

from ..files import storage_error, write_all
from ..layout import SIGNING_LEDGER

WINDOW = 16  # serials marked per sync: bounds the cost (one fdatasync per 16 devices)


class LedgerWriter:
    """A worker's append handle."""

    def __init__(self, batch_dir: Path) -> None:
        self.path = batch_dir / SIGNING_LEDGER
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise storage_error(exc, self.path) from exc

    def mark(self, serials: Iterable[str]) -> None:
        """Durably record that these serials may be signed from now on."""
        data = "".join(f"{s}\n" for s in serials).encode()
        try:
            write_all(self._fd, data)
            os.fdatasync(self._fd)
        except OSError as exc:  # the serials are not marked: none of them will be signed
            raise storage_error(exc, self.path) from exc

    def close(self) -> None:
        os.close(self._fd)


def marked(batch_dir: Path, serials: set[str]) -> set[str]:
    """Which of ``serials`` the ledger lists (streamed: the ledger grows with the batch)."""
    found: set[str] = set()
    path = batch_dir / SIGNING_LEDGER
    if not serials or not path.exists():
        return found
    with path.open("rb") as handle:
        for line in handle:
            serial = line.strip().decode("ascii", "replace")
            if serial in serials:
                found.add(serial)
    return found


def clear(batch_dir: Path) -> None:
    """Empty the ledger: call only when no intent is open and no worker runs."""
    with contextlib.suppress(FileNotFoundError):
        os.truncate(batch_dir / SIGNING_LEDGER, 0)
