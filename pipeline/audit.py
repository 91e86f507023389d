"""The signed, hash-chained audit log (design.md "Audit").

``audit.jsonl`` holds one JSON object per line: ``seq``, ``time`` (UTC), ``event``,
``registration_id``, ``data`` and ``prev`` (SHA-256 hex of the previous line's bytes, without
its newline; 64 zeros for the first line). A resumed run continues the same chain.

Durability rule: the orchestrator syncs the log before it commits the journal transaction
that depends on the same events, so the journal never knows more than the log.

Sealing writes ``audit.jsonl.p7s``, a detached CMS SignedData over the whole file made by the
station's audit key inside the HSM, with the signer's certificate chain embedded:

    openssl cms -verify -binary -inform DER -in audit.jsonl.p7s -content audit.jsonl \\
        -CAfile root.cert.pem -purpose any
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from .ca import PrivateKey, signing_hash
from .errors import AuditError
from .files import write_atomic

AUDIT_NAME = "audit.jsonl"
SEAL_NAME = "audit.jsonl.p7s"
GENESIS = "0" * 64


_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def encode(record: dict[str, Any]) -> bytes:
    """Fields in a fixed order (seq, time, event, registration_id, data, prev); the hash
    chain covers the bytes, so verification never re-serialises."""
    return _encoder.encode(record).encode()


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class AuditLog:
    """Append-only writer. Lines are buffered and written by :meth:`flush`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seq, self.prev, self.torn_bytes = _tail(path)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._pending: list[bytes] = []
        self.seconds = 0.0  # time spent logging and sealing, for the report

    def append(self, event: str, registration_id: str | None = None,
               data: dict[str, Any] | None = None) -> None:
        self.extend([(event, registration_id, data or {})])

    def extend(self, events: list[tuple[str, str | None, dict[str, Any]]]) -> None:
        """Append several events; they share one timestamp (they happen together)."""
        started = time.perf_counter()
        now = _now()
        for event, registration_id, data in events:
            self.seq += 1
            line = encode({"seq": self.seq, "time": now, "event": event,
                           "registration_id": registration_id, "data": data,
                           "prev": self.prev})
            self.prev = hashlib.sha256(line).hexdigest()
            self._pending.append(line + b"\n")
        self.seconds += time.perf_counter() - started

    def flush(self, *, sync: bool = True) -> None:
        started = time.perf_counter()
        if self._pending:
            os.write(self._fd, b"".join(self._pending))
            self._pending.clear()
        if sync:
            os.fsync(self._fd)
        self.seconds += time.perf_counter() - started

    def close(self) -> None:
        self.flush()
        os.close(self._fd)

    def seal(self, signer: PrivateKey, cert: x509.Certificate,
             chain: list[x509.Certificate]) -> Path:
        """Sign the whole log (detached CMS, DER) with the HSM-held audit key."""
        self.flush()
        started = time.perf_counter()
        data = self.path.read_bytes()
        builder = pkcs7.PKCS7SignatureBuilder().set_data(data).add_signer(
            cert, signer, signing_hash(signer))  # type: ignore[arg-type]
        for extra in chain:
            if extra != cert:
                builder = builder.add_certificate(extra)
        der = builder.sign(serialization.Encoding.DER,
                           [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary])
        out = self.path.with_name(SEAL_NAME)
        write_atomic(out, der, fsync=True)
        self.seconds += time.perf_counter() - started
        return out


def _tail(path: Path) -> tuple[int, str, int]:
    """(last seq, hash of last line, bytes of a torn last line removed) of an existing log.
    A line cut short by a crash was never synced, so nothing depends on it: it is cut off."""
    if not path.exists() or path.stat().st_size == 0:
        return 0, GENESIS, 0
    data = path.read_bytes()
    torn = 0
    if not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        torn = len(data) - cut
        with path.open("r+b") as handle:
            handle.truncate(cut)
            os.fsync(handle.fileno())
        data = data[:cut]
    if not data:
        return 0, GENESIS, torn
    last = data[data.rfind(b"\n", 0, len(data) - 1) + 1 : -1]
    try:
        seq = int(json.loads(last)["seq"])
    except (ValueError, KeyError) as exc:
        raise AuditError(f"{path}: the last line is not an audit record",
                         rule="audit lines are JSON records") from exc
    return seq, hashlib.sha256(last).hexdigest(), torn
