"""What every provline log shares, checked the same way for all of them: a batch log
(:mod:`.verify`), a station lifecycle log (:mod:`.lifecycle_verify`) and a key-delivery log
(:mod:`.fixture_verify`).

Each is ``audit.jsonl``, one JSON record per line whose ``prev`` is the SHA-256 of the line
before (its bytes as written), and ``audit.jsonl.p7s``, a detached CMS SignedData (RFC 5652)
over the whole file, made after a final ``seal`` line that names its signer.
:func:`read_sealed` checks the signature and the signer's chain, streams every record through
the hash chain to the caller's ``feed``, then checks that the signature covers exactly this
file and that it ends with its seal line.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asn1crypto import cms
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from ..ca.certs import is_ca, signed_by, thumbprints
from ..errors import AuditError
from ..layout import AUDIT_LOG, AUDIT_SEAL, TEMP_SUFFIX
from ..vocabulary import AuditEvent
from .log import GENESIS

_HASHES: dict[str, type[hashes.SHA256 | hashes.SHA384 | hashes.SHA512]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


def records(path: Path, digest: hashes.Hash) -> Iterator[tuple[int, dict[str, Any]]]:
    """Each record with its line number, after checking sequence and hash chain; every byte
    read also goes into ``digest`` (the CMS message digest)."""
    prev = GENESIS
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            digest.update(raw)
            where = f"{path}:{number}"
            if not raw.endswith(b"\n"):
                raise AuditError(
                    "the last line is cut short (truncated log)", where=where, rule="complete lines"
                )
            line = raw[:-1]
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise AuditError(
                    "not a JSON record (changed or damaged)",
                    where=where,
                    rule="audit lines are JSON records",
                ) from exc
            seq = record.get("seq") if isinstance(record, dict) else None
            if seq != number:
                raise AuditError(
                    f"sequence number {seq} where {number} was expected (a line "
                    "was deleted, inserted or moved)",
                    where=where,
                    rule="sequence continuity",
                )
            if record.get("prev") != prev:
                raise AuditError(
                    "prev does not match the hash of the line before (that line "
                    "or this one was changed)",
                    where=where,
                    rule="hash chain",
                )
            prev = hashlib.sha256(line).hexdigest()
            yield number, record


@dataclass
class Seal:
    path: Path
    signer: x509.Certificate
    algorithm: hashes.HashAlgorithm
    message_digest: bytes
    anchor: x509.Certificate  # the root the signer chain was checked against


def read_seal(p7s: Path, root: x509.Certificate | None, ca_sha256: dict[str, str]) -> Seal:
    """Parse the detached CMS, check its signature over the signed attributes and the
    signer's chain to the root. The content digest is compared after the log is read."""
    if not p7s.is_file():
        raise AuditError(
            "the batch is not sealed (no signature file)", where=str(p7s), rule="a sealed batch"
        )
    try:
        signed = cms.ContentInfo.load(p7s.read_bytes())["content"]
        certs = [x509.load_der_x509_certificate(c.chosen.dump()) for c in signed["certificates"]]
        info = signed["signer_infos"][0]
        sid = info["sid"].chosen
        attrs = info["signed_attrs"]
        digest_name = info["digest_algorithm"]["algorithm"].native
        signature = info["signature"].native
        wanted = next(a["values"][0].native for a in attrs if a["type"].native == "message_digest")
    except Exception as exc:  # asn1crypto raises many types for malformed DER
        raise AuditError(
            f"not a CMS SignedData: {exc}", where=str(p7s), rule="detached CMS signature"
        ) from exc
    if digest_name not in _HASHES:
        raise AuditError(
            f"digest {digest_name} is not accepted", where=str(p7s), rule="SHA-2 digests"
        )
    signer = next(
        (
            c
            for c in certs
            if c.serial_number == sid["serial_number"].native
            and c.issuer.public_bytes() == sid["issuer"].dump()
        ),
        None,
    )
    if signer is None:
        raise AuditError(
            "the signer's certificate is not embedded",
            where=str(p7s),
            rule="detached CMS signature",
        )
    algorithm = _HASHES[digest_name]()
    signed_bytes = b"\x31" + attrs.dump()[1:]  # signed attributes are signed as a SET OF
    key = signer.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, signed_bytes, ec.ECDSA(algorithm))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, signed_bytes, padding.PKCS1v15(), algorithm)
        else:
            raise AuditError("unsupported signer key", where=str(p7s), rule="EC or RSA signer")
    except InvalidSignature as exc:
        raise AuditError(
            "the CMS signature is invalid", where=str(p7s), rule="CMS signature"
        ) from exc
    anchor = root or _root_from_log(certs, ca_sha256, p7s)
    _check_path(signer, certs, anchor, p7s)
    return Seal(p7s, signer, algorithm, wanted, anchor)


def embedded_root(p7s: Path) -> x509.Certificate | None:
    """The self-signed certificate a seal embeds: the root a log names for itself (what an
    unanchored verification trusted). None if there is none or the file is unreadable."""
    try:
        signed = cms.ContentInfo.load(p7s.read_bytes())["content"]
        certs = [x509.load_der_x509_certificate(c.chosen.dump()) for c in signed["certificates"]]
    except Exception:  # asn1crypto raises many types for malformed DER
        return None
    return next((c for c in certs if c.subject == c.issuer), None)


def _root_from_log(
    certs: list[x509.Certificate], ca_sha256: dict[str, str], p7s: Path
) -> x509.Certificate:
    """Without --root, trust the self-signed certificate whose fingerprint the log's
    batch_start recorded (weaker: give --root to anchor the check outside the batch)."""
    logged = set(ca_sha256.values())
    for cert in certs:
        if cert.subject == cert.issuer and thumbprints(cert).sha256 in logged:
            return cert
    raise AuditError("no trust anchor: give --root", where=str(p7s), rule="signer chain")


def _check_path(
    signer: x509.Certificate, certs: list[x509.Certificate], root: x509.Certificate, p7s: Path
) -> None:
    current = signer
    for _ in range(8):
        if current == root or signed_by(current, root):
            return
        parent = next(
            (c for c in certs if c.subject == current.issuer and c != current and is_ca(c)), None
        )
        if parent is None:
            break
        if not signed_by(current, parent):
            raise AuditError(
                f"{current.subject.rfc4514_string()} is not signed by "
                f"{parent.subject.rfc4514_string()}",
                where=str(p7s),
                rule="signer chain",
            )
        current = parent
    raise AuditError(
        f"the signer {signer.subject.rfc4514_string()} does not chain to the root "
        f"{root.subject.rfc4514_string()}",
        where=str(p7s),
        rule="signer chain",
    )


Feed = Callable[[int, dict[str, Any]], None]


@dataclass(frozen=True)
class SealedLog:
    """What the common checks learnt of a log that passed them."""

    seal: Seal
    lines: int
    first_time: str
    last_time: str


def read_sealed(
    directory: Path,
    root: x509.Certificate | None,
    recorded_roots: dict[str, str],
    feed: Feed,
) -> SealedLog:
    """Check the log in ``directory`` as every provline log is checked, handing each record
    (with its line number) to ``feed`` in the same single pass; raise :class:`AuditError`
    naming the first problem. ``feed`` sees records before the signature over the whole file
    is known to match: use what it gathered only once this returns. Without ``root`` the
    signer is checked against a self-signed certificate whose SHA-256 is among
    ``recorded_roots`` (what the log says of itself)."""
    log_path = directory / AUDIT_LOG
    seal = read_seal(directory / AUDIT_SEAL, root, recorded_roots)
    digest = hashes.Hash(seal.algorithm)
    last: dict[str, Any] = {}
    first_time, lines = "", 0
    for number, record in records(log_path, digest):
        feed(number, record)
        first_time = first_time or str(record.get("time", ""))
        last, lines = record, number
    if digest.finalize() != seal.message_digest:
        raise AuditError(
            f"the signature does not cover this {AUDIT_LOG} (changed, truncated or extended "
            "after sealing)",
            where=str(seal.path),
            rule="CMS message digest",
        )
    if last.get("event") != AuditEvent.SEAL:
        raise AuditError(
            f"the log ends with {last.get('event')!r}, not the seal event",
            where=f"{log_path}:{lines}",
            rule="sealed logs end with seal",
        )
    data = last.get("data")
    if not isinstance(data, dict) or data.get("signer_sha256") != thumbprints(seal.signer).sha256:
        raise AuditError(
            "the seal event names another signer than the signature's",
            where=f"{log_path}:{lines}",
            rule="seal names its signer",
        )
    return SealedLog(seal, lines, first_time, str(last.get("time", "")))


def check_recorded_files(directory: Path, recorded: dict[str, str], kind: str) -> int:
    """That ``directory`` holds exactly the files the log recorded (name -> SHA-256), each
    with its recorded content; ``kind`` names them in errors ("bundle", "renewal"). A
    leftover temporary file of an interrupted write is not a bundle file. Returns how many
    files were checked."""
    for name, digest in recorded.items():
        path = directory / name
        if not path.is_file():
            raise AuditError(
                f"recorded {kind} file is missing", where=str(path), rule="bundles match the log"
            )
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise AuditError(
                "file differs from the hash the log recorded",
                where=str(path),
                rule="bundles match the log",
            )
    for path in directory.iterdir():
        if path.name not in recorded and not path.name.endswith(TEMP_SUFFIX):
            raise AuditError(
                f"{kind} file not recorded in the log",
                where=str(path),
                rule="bundles match the log",
            )
    return len(recorded)
