"""The signed, hash-chained audit log (README "Audit").

``audit.jsonl`` holds one JSON object per line: ``seq``, ``time`` (UTC), ``event``,
``registration_id``, ``data`` and ``prev`` (SHA-256 hex of the previous line's bytes, without
its newline; 64 zeros for the first line). A resumed run continues the same chain.

Durability rule: the orchestrator syncs the log before it commits the journal transaction
that depends on the same events, so the journal never knows more than the log. A flush is
all or nothing: when the disk is full (or a write fails) the bytes already written by that
flush are cut off again, the pending lines are dropped and the chain continues from the last
durable line, so the file never holds a torn line and the caller commits nothing.

Sealing writes ``audit.jsonl.p7s``, a detached CMS SignedData over the whole file made by the
station's audit key inside the HSM, with the signer's certificate chain embedded (built with
asn1crypto so the log is hashed in blocks, not loaded whole):

    openssl cms -verify -binary -inform DER -in audit.jsonl.p7s -content audit.jsonl \\
        -CAfile root.cert.pem -purpose any
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from asn1crypto import algos, cms
from asn1crypto import x509 as asn1x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

from ..ca.builders import signing_hash
from ..ca.certs import thumbprints
from ..crashpoint import crash_point
from ..errors import AuditError, StorageError
from ..files import STORAGE_RULE, storage_error, write_all, write_atomic
from ..keyprofile import PrivateKey
from ..layout import AUDIT_SEAL
from ..vocabulary import AuditEvent

GENESIS = "0" * 64
Event = tuple[AuditEvent, str | None, dict[str, Any]]  # (event, registration id, data)


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
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise storage_error(exc, path) from exc
        self._size = os.fstat(self._fd).st_size  # bytes known durable
        self._durable = (self.seq, self.prev)  # chain state of the last durable line
        self._broken: StorageError | None = None  # a failed write could not be cut off
        self._pending: list[bytes] = []
        self.seconds = 0.0  # time spent logging and sealing, for the report

    def append(
        self,
        event: AuditEvent,
        registration_id: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        self.extend([(event, registration_id, data or {})])

    def extend(self, events: Sequence[Event]) -> None:
        """Append several events; they share one timestamp (they happen together)."""
        started = time.perf_counter()
        now = _now()
        seq, prev, lines = self.seq, self.prev, []
        for event, registration_id, data in events:
            seq += 1
            line = encode(
                {
                    "seq": seq,
                    "time": now,
                    "event": str(event),
                    "registration_id": registration_id,
                    "data": data,
                    "prev": prev,
                }
            )
            prev = hashlib.sha256(line).hexdigest()
            lines.append(line + b"\n")
        self._pending += lines
        self.seq, self.prev = seq, prev
        self.seconds += time.perf_counter() - started

    def flush(self, *, sync: bool = True) -> None:
        """Write (and sync) the pending lines, all or nothing (raises StorageError)."""
        if self._broken is not None:
            raise self._broken
        started = time.perf_counter()
        data = b"".join(self._pending)
        try:
            write_all(self._fd, data)
            if sync:
                os.fsync(self._fd)
        except OSError as exc:
            raise self._undo(exc) from exc
        except BaseException:  # interrupted between write and sync: undo, then go on raising
            self._undo(OSError(0, "interrupted"))
            raise
        self._size += len(data)
        self._pending.clear()
        self._durable = (self.seq, self.prev)
        self.seconds += time.perf_counter() - started
        crash_point("audit.flush")

    def _undo(self, exc: OSError) -> StorageError:
        """Cut off what the failed flush wrote; forget its lines."""
        error = storage_error(exc, self.path)
        self._pending.clear()
        self.seq, self.prev = self._durable
        try:
            os.ftruncate(self._fd, self._size)
            os.fsync(self._fd)
        except OSError:
            # The file may end with a torn line: refuse further writes in this run; the next
            # run cuts the torn tail off (and logs that it did).
            self._broken = StorageError(
                f"{error.what}; a torn line could not be cut off",
                where=str(self.path),
                rule=STORAGE_RULE,
            )
            return self._broken
        return error

    def close(self) -> None:
        """Flush what is pending (best effort when the log is already failing) and close."""
        try:
            if self._pending:
                self.flush()
        finally:
            os.close(self._fd)

    def sign_off(
        self, signer: PrivateKey, cert: x509.Certificate, chain: list[x509.Certificate]
    ) -> Path:
        """End a session of writing: a ``seal`` line naming the signer, then :meth:`seal`.
        Every provline log ends this way when it is sealed, so a verifier can tell a sealed
        log from one cut short after a signature."""
        self.append(
            AuditEvent.SEAL,
            data={
                "signer": cert.subject.rfc4514_string(),
                "signer_sha256": thumbprints(cert).sha256,
            },
        )
        return self.seal(signer, cert, chain)

    def seal(
        self, signer: PrivateKey, cert: x509.Certificate, chain: list[x509.Certificate]
    ) -> Path:
        """Sign the whole log (detached CMS, DER) with the HSM-held audit key. The log is
        hashed in blocks, so sealing a million-device batch needs no more memory than a small
        one (cryptography's PKCS7SignatureBuilder would need the whole file in memory)."""
        self.flush()
        started = time.perf_counter()
        algorithm = signing_hash(signer)
        digest = hashes.Hash(algorithm)
        with self.path.open("rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
        der = detached_cms(
            digest.finalize(), algorithm, signer, cert, [c for c in chain if c != cert]
        )
        out = self.path.with_name(AUDIT_SEAL)
        write_atomic(out, der, fsync=True)
        self.seconds += time.perf_counter() - started
        return out


def detached_cms(
    digest: bytes,
    algorithm: hashes.HashAlgorithm,
    signer: PrivateKey,
    cert: x509.Certificate,
    extra_certs: list[x509.Certificate],
) -> bytes:
    """RFC 5652 SignedData without content: signed attributes contentType, signingTime and
    messageDigest, signer identified by issuer and serial, certificates embedded."""
    name = algorithm.name
    attributes = sorted(
        (
            cms.CMSAttribute({"type": "content_type", "values": ["data"]}),
            cms.CMSAttribute(
                {
                    "type": "signing_time",
                    "values": [cms.Time({"utc_time": dt.datetime.now(dt.UTC)})],
                }
            ),
            cms.CMSAttribute({"type": "message_digest", "values": [digest]}),
        ),
        key=lambda a: a.dump(),
    )  # DER sorts the elements of a SET OF
    signed_attrs = cms.CMSAttributes(attributes)
    to_sign = signed_attrs.dump()
    if isinstance(signer, ec.EllipticCurvePrivateKey):
        signature = signer.sign(to_sign, ec.ECDSA(algorithm))
        signature_algorithm = f"{name}_ecdsa"
    else:
        signature = signer.sign(to_sign, padding.PKCS1v15(), algorithm)
        signature_algorithm = f"{name}_rsa"
    certs = [
        asn1x509.Certificate.load(c.public_bytes(serialization.Encoding.DER))
        for c in [cert, *extra_certs]
    ]
    signer_info = cms.SignerInfo(
        {
            "version": "v1",
            "sid": cms.SignerIdentifier(
                {
                    "issuer_and_serial_number": cms.IssuerAndSerialNumber(
                        {"issuer": certs[0].issuer, "serial_number": certs[0].serial_number}
                    )
                }
            ),
            "digest_algorithm": algos.DigestAlgorithm({"algorithm": name}),
            "signed_attrs": signed_attrs,
            "signature_algorithm": algos.SignedDigestAlgorithm({"algorithm": signature_algorithm}),
            "signature": signature,
        }
    )
    signed_data = cms.SignedData(
        {
            "version": "v1",
            "digest_algorithms": [algos.DigestAlgorithm({"algorithm": name})],
            "encap_content_info": {"content_type": "data"},
            "certificates": [cms.CertificateChoices({"certificate": c}) for c in certs],
            "signer_infos": [signer_info],
        }
    )
    return bytes(cms.ContentInfo({"content_type": "signed_data", "content": signed_data}).dump())


def _tail(path: Path) -> tuple[int, str, int]:
    """(last seq, hash of last line, bytes of a torn last line removed) of an existing log.
    A line cut short by a crash was never synced, so nothing depends on it: it is cut off."""
    if not path.exists() or path.stat().st_size == 0:
        return 0, GENESIS, 0
    with path.open("r+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        block = 1 << 16
        while True:  # read back from the end until the last whole line is in view
            start = max(0, size - block)
            handle.seek(start)
            data = handle.read(size - start)
            if start == 0 or data.count(b"\n") >= 2:
                break
            block *= 2
        torn = 0
        if not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            torn = len(data) - cut
            handle.truncate(start + cut)
            os.fsync(handle.fileno())
            data = data[:cut]
    if not data:
        return 0, GENESIS, torn
    last = data[data.rfind(b"\n", 0, len(data) - 1) + 1 : -1]
    try:
        seq = int(json.loads(last)["seq"])
    except (ValueError, KeyError) as exc:
        raise AuditError(
            f"{path}: the last line is not an audit record", rule="audit lines are JSON records"
        ) from exc
    return seq, hashlib.sha256(last).hexdigest(), torn
