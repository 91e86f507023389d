"""Settling open intents: what a stopped run left between "reserved" and "recorded".

An open intent is a serial the journal reserved whose outcome it never recorded (a kill, a
worker that died, a stop). Each one ends one of three ways:

* **recovered** (``issued``): a worker signed it and wrote its whole bundle: ``device.json``
  carries the serial and every file it lists has the SHA-256 it records (and, in retain
  custody, the key is in the token). The bundle is synced and then recorded like any other,
  so a kill costs no revocation for the work that was in fact finished.
* **void**: it may have been signed (the signing ledger lists it, or a bundle file carries
  it) but its bundle is incomplete: revoke it; its leftover files are removed.
* **released**: it never reached a signer: nothing to revoke.

The log may already say ``issued`` for a recovered serial (the run was killed between
logging a chunk and committing it): :func:`logged_issued` finds those in the log's tail, so
the event is not written twice and the files are checked against what the log recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from ..ca.certs import Thumbprints
from ..layout import AUDIT_LOG, DEVICE_CERT, DEVICE_JSON
from ..serials import canonical_serial, same_serial, serial_hex
from ..vocabulary import AuditEvent
from . import ledger
from .records import IssuedBundle, KeyReference

KeyPresent = Callable[[KeyReference], bool]  # retain custody: is the key in the token?


@dataclass
class Settlement:
    recovered: list[IssuedBundle] = field(default_factory=list)
    logged: set[str] = field(default_factory=set)  # recovered serials the log already has
    void: list[tuple[str, str]] = field(default_factory=list)  # (registration_id, serial)
    released: list[tuple[str, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.recovered or self.void or self.released)


def classify(
    batch_dir: Path,
    dangling: list[tuple[str, str]],
    *,
    ledger_kept: bool,
    key_present: KeyPresent,
) -> Settlement:
    """Decide how each open (registration_id, serial) ends. ``ledger_kept``: the runs that
    reserved them marked serials before signing (otherwise every one may have been signed)."""
    out = Settlement()
    if not dangling:
        return out
    serials = {serial for _, serial in dangling}
    marked = ledger.marked(batch_dir, serials) if ledger_kept else serials
    signed = [
        (rid, serial)
        for rid, serial in dangling
        if serial in marked or on_disk(batch_dir / rid, serial)
    ]
    logged = logged_issued(batch_dir / AUDIT_LOG, {serial for _, serial in signed})
    for rid, serial in dangling:
        if (rid, serial) not in signed:
            out.released.append((rid, serial))
            continue
        bundle = complete_bundle(batch_dir / rid, rid, serial, logged.get(serial))
        if bundle is not None and key_present(bundle.key):
            out.recovered.append(bundle)
            if serial in logged:
                out.logged.add(serial)
        else:
            out.void.append((rid, serial))
    return out


def on_disk(directory: Path, serial: str) -> bool:
    """Whether a bundle file in ``directory`` carries ``serial`` (it was certainly signed)."""
    info = _json(directory / DEVICE_JSON)
    if info is not None and same_serial(info.get("serial"), serial):
        return True
    try:
        cert = x509.load_pem_x509_certificate((directory / DEVICE_CERT).read_bytes())
    except (OSError, ValueError):
        return False
    return same_serial(serial_hex(cert.serial_number), serial)


def complete_bundle(
    directory: Path, rid: str, serial: str, logged_files: dict[str, str] | None
) -> IssuedBundle | None:
    """The bundle in ``directory`` if it is whole and for ``serial``: device.json names the
    serial and every file it lists is there with the SHA-256 it records (the ones the log
    recorded, when the log already has it)."""
    info = _json(directory / DEVICE_JSON)
    if info is None or info.get("serial") != serial or info.get("registration_id") != rid:
        return None
    try:
        files = {str(k): str(v) for k, v in info["files"].items()}
        for name, digest in files.items():
            if _sha256(directory / name) != digest:
                return None
        files[DEVICE_JSON] = _sha256(directory / DEVICE_JSON)
        if logged_files is not None and logged_files != files:
            return None
        return IssuedBundle(
            registration_id=rid,
            serial=serial,
            thumbprints=Thumbprints(info["sha1_thumbprint"], info["sha256_thumbprint"]),
            public_key_sha256=info["public_key_sha256"],
            not_after=info["not_after"],
            key=KeyReference.from_json(info["key"]),
            files=files,
        )
    except (OSError, KeyError, TypeError, ValueError, AttributeError):
        return None


def logged_issued(log: Path, serials: set[str]) -> dict[str, dict[str, str]]:
    """Serial → recorded files, for the ``issued`` events of ``serials`` in the log. Read
    backwards, stopping once the intent of every one of them has been passed (they are the
    last few chunks of the log)."""
    found: dict[str, dict[str, str]] = {}
    waiting = {_key(s): s for s in serials}  # an older provline wrote odd-length serials
    if not waiting or not log.exists():
        return found
    issued, intent = f'"event":"{AuditEvent.ISSUED}"'.encode(), f'"event":"{AuditEvent.INTENT}"'
    for line in _lines_backwards(log):
        if issued in line or intent.encode() in line:
            record = json.loads(line)
            key = _key(str(record.get("data", {}).get("serial", "")))
            if key in waiting and record["event"] == AuditEvent.ISSUED:
                found.setdefault(waiting[key], record["data"].get("files", {}))
            elif record["event"] == AuditEvent.INTENT:
                waiting.pop(key, None)
                if not waiting:
                    break
    return found


def _key(serial: str) -> str:
    try:
        return canonical_serial(serial)
    except ValueError:
        return serial


def _lines_backwards(path: Path, block: int = 1 << 20) -> Iterator[bytes]:
    with path.open("rb") as handle:
        end = handle.seek(0, os.SEEK_END)
        rest = b""
        while end > 0:
            start = max(0, end - block)
            handle.seek(start)
            data = handle.read(end - start) + rest
            lines = data.split(b"\n")
            rest = lines[0] if start > 0 else b""
            for line in reversed(lines if start == 0 else lines[1:]):
                if line:
                    yield line
            end = start


def _json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
