"""Cumulative certificate revocation lists, one per issuing CA, signed inside the HSM by the
issuing key (RFC 5280 §5).

Each CRL lists every serial of that CA the station inventory has taken out of service:
revoked by the operator (with the RFC 5280 reason given), retired by a promoted renewal
(``superseded``) and void serials a crash left unaccounted (``superseded``: the device was
given another certificate). It carries the CRL Number (§5.2.3, strictly increasing, reserved
in the inventory before signing so a number never names two CRLs) and the Authority Key
Identifier (§5.2.1), thisUpdate and nextUpdate (``lifecycle.crl_days`` later). It is written
to ``<lifecycle dir>/crl/<issuer key id>.crl.pem``; both of these accept it:

    openssl crl -in <crl> -CAfile chain.pem -noout           # "verify OK"
    openssl verify -crl_check -CAfile chain.pem -CRLfile <crl> device.cert.pem
"""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..batch.journal import Journal
from ..batch.plan import check_operator
from ..batch.signing import open_signer
from ..ca.builders import signing_hash, utcnow
from ..ca.chain import load_chain
from ..config.station import Station
from ..errors import InputError
from ..files import write_atomic
from ..keyprofile import PrivateKey
from ..vocabulary import AuditEvent, CertificateStatus
from .inventory import Inventory, batch_issuer, issuer_key_id
from .log import StationLog
from .paths import crl_path

# RFC 5280 §5.3.1 reason names an operator may give. certificateHold is left out (provline
# never takes a revocation back) and so are the CA-level reasons.
REASONS: dict[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
}
SUPERSEDED = "superseded"


def parse_reason(text: str) -> str:
    """The RFC 5280 name of a reason given on the command line (case and dashes ignored)."""
    wanted = text.replace("-", "").replace("_", "").lower()
    for name in REASONS:
        if name.lower() == wanted:
            return name
    raise InputError(
        f"revocation reason {text!r} is not one of {', '.join(REASONS)}",
        where="--reason",
        rule="RFC 5280 §5.3.1 CRLReason",
    )


@dataclass(frozen=True)
class CrlEntry:
    serial: int
    revoked_at: dt.datetime
    reason: str | None  # RFC 5280 name; None or "unspecified": no reasonCode extension


def build_crl(
    issuer: x509.Certificate,
    key: PrivateKey,
    entries: Iterable[CrlEntry],
    number: int,
    this_update: dt.datetime,
    next_update: dt.datetime,
) -> x509.CertificateRevocationList:
    """A CRL of ``entries`` with CRL Number and AKI. The reasonCode extension is left out for
    ``unspecified``, as RFC 5280 §5.3.1 recommends. The entry list goes to the builder in one
    piece (adding entries one at a time copies the list each time)."""
    revoked = []
    for entry in entries:
        builder = (
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial)
            .revocation_date(min(entry.revoked_at, this_update))
        )
        if entry.reason and entry.reason != "unspecified":
            builder = builder.add_extension(x509.CRLReason(REASONS[entry.reason]), critical=False)
        revoked.append(builder.build())
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.CertificateRevocationListBuilder(
        issuer_name=issuer.subject,
        last_update=this_update,
        next_update=next_update,
        extensions=[
            x509.Extension(x509.CRLNumber.oid, False, x509.CRLNumber(number)),
            x509.Extension(
                x509.AuthorityKeyIdentifier.oid,
                False,
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
            ),
        ],
        revoked_certificates=revoked,
    ).sign(key, signing_hash(key))


@dataclass(frozen=True)
class IssuedCrl:
    issuer: str  # key identifier
    issuer_subject: str
    number: int
    path: Path
    entries: int
    sha256: str
    this_update: str
    next_update: str

    def to_json(self) -> dict[str, object]:
        return {**self.__dict__, "path": str(self.path)}


def issue_crl(
    station: Station,
    inventory: Inventory,
    log: StationLog | None,
    operation: str | None = None,
    days: int | None = None,
    operator: str | None = None,
) -> IssuedCrl:
    """Sign and publish the cumulative CRL of the station's issuing CA, and log it (``log``
    None: a station without an audit key, ``provline ca crl`` only)."""
    chain = load_chain(station)
    issuer = chain.issuer
    key_id = issuer_key_id(issuer)
    key = open_signer(station, station.ca.issuer_key)
    number = inventory.reserve_crl_number(key_id)
    this_update = utcnow()
    next_update = this_update + dt.timedelta(days=days or station.lifecycle.crl_days)
    entries = [
        CrlEntry(
            int(serial, 16),
            _parse_time(at) or this_update,
            reason if status == CertificateStatus.REVOKED else SUPERSEDED,
        )
        for serial, status, reason, at in inventory.on_crl(key_id)
    ]
    crl = build_crl(issuer, key, entries, number, this_update, next_update)
    pem = crl.public_bytes(serialization.Encoding.PEM)
    path = crl_path(station, key_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, pem, fsync=True)
    issued = IssuedCrl(
        key_id,
        issuer.subject.rfc4514_string(),
        number,
        path,
        len(entries),
        hashlib.sha256(pem).hexdigest(),
        this_update.strftime("%Y-%m-%dT%H:%M:%SZ"),
        next_update.strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    data: dict[str, object] = {
        "issuer": key_id,
        "issuer_subject": issued.issuer_subject,
        "number": number,
        "file": path.name,
        "sha256": issued.sha256,
        "entries": len(entries),
        "this_update": issued.this_update,
        "next_update": issued.next_update,
    }
    if operation:
        data["op"] = operation
    if operator:
        data["operator"] = operator
    if log is not None:
        log.write([(AuditEvent.CRL_ISSUED, None, data)])
    with inventory.tx():
        inventory.record_crl(
            key_id,
            number,
            path,
            issued.sha256,
            len(entries),
            issued.this_update,
            issued.next_update,
        )
    return issued


def publish_crl(
    station: Station,
    batch_dirs: list[Path],
    out: Path | None = None,
    days: int | None = None,
    note: Callable[[str], None] = print,
    operator: str | None = None,
) -> IssuedCrl:
    """``provline ca crl``: record the given batches in the inventory (their void serials
    included), then sign the cumulative CRL of the issuing CA; also copy it to ``out``."""
    operator = check_operator(station, operator)
    inventory = Inventory.of(station)
    try:
        for batch_dir in batch_dirs:
            sync_batch(station, batch_dir, inventory)
        if station.audit is None:  # CRLs still work; there is no signed log to record them in
            note("the station has no audit key: the CRL is not recorded in a lifecycle log")
            return _copy(issue_crl(station, inventory, None, days=days), out)
        log = StationLog(station)
        try:
            issued = issue_crl(station, inventory, log, days=days, operator=operator)
        finally:
            log.close(note)
    finally:
        inventory.close()
    return _copy(issued, out)


def _copy(issued: IssuedCrl, out: Path | None) -> IssuedCrl:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        temp = out.with_name(f".{out.name}.tmp")
        shutil.copyfile(issued.path, temp)
        temp.replace(out)
    return issued


def sync_batch(station: Station, batch_dir: Path, inventory: Inventory) -> int:
    """Record one batch from its journal (what ``provline run`` does at its end)."""
    journal = Journal.open(batch_dir, create=False)
    try:
        return inventory.add_batch(
            station.name,
            batch_dir,
            journal.meta(),
            journal.inventory_rows(),
            ((v["registration_id"], v["serial"]) for v in journal.voids()),
            batch_issuer(station, batch_dir, journal),
        )
    finally:
        journal.close()


def _parse_time(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
