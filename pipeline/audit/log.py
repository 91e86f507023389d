"""The signed, hash-chained audit log (README "Audit").

``audit.jsonl`` holds one JSON object per line: ``seq``, ``time`` (UTC), ``event``,
``registration_id``, ``data`` and ``prev`` (SHA-256 hex of the previous line's bytes, without
its newline; 64 zeros for the first line). A resumed run continues the same chain.

Durability rule: the orchestrator syncs the log before it commits the journal transaction
that depends on the same events, so the journal never knows more than the log.

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
from pathlib import Path
from typing import Any

from asn1crypto import algos, cms
from asn1crypto import x509 as asn1x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

from ..ca.builders import signing_hash
from ..errors import AuditError
from ..files import write_atomic
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
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._pending: list[bytes] = []
        self.seconds = 0.0  # time spent logging and sealing, for the report

    def append(
        self,
        event: AuditEvent,
        registration_id: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        self.extend([(event, registration_id, data or {})])

    def extend(self, events: list[Event]) -> None:
        """Append several events; they share one timestamp (they happen together)."""
        started = time.perf_counter()
        now = _now()
        for event, registration_id, data in events:
            self.seq += 1
            line = encode(
                {
                    "seq": self.seq,
                    "time": now,
                    "event": str(event),
                    "registration_id": registration_id,
                    "data": data,
                    "prev": self.prev,
                }
            )
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
        raise AuditError(
            f"{path}: the last line is not an audit record", rule="audit lines are JSON records"
        ) from exc
    return seq, hashlib.sha256(last).hexdigest(), torn
