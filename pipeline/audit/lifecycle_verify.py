"""Offline verification of a station lifecycle log (docs/lifecycle.md), for auditors: the
``audit.jsonl`` / ``audit.jsonl.p7s`` pair in a station's lifecycle directory, which
``provline audit verify <lifecycle dir>`` checks instead of a batch.

Checks, stopping at the first failure with what and where:

1. the detached CMS signature and the signer's chain to the trusted root, the hash chain and
   sequence, that the signature covers this exact file and that it ends with ``seal``
   (the same checks as a batch log, :mod:`.verify`);
2. that it starts with ``station_log_start``;
3. that every renewal serial logged as an intent ends ``renewed`` or ``renewal_void``, and
   that no serial is renewed twice;
4. that every renewal bundle file on disk has the SHA-256 the log recorded, and that no
   renewal bundle holds a file the log does not;
5. that the latest CRL of each issuing CA is the file the log recorded (SHA-256) and lists
   every serial the log revoked, retired or voided for that CA before it was issued.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from ..errors import AuditError
from ..layout import AUDIT_LOG, CRL_DIR, DEVICE_JSON, RENEWALS_DIR
from ..serials import canonical_serial, serial_hex
from ..vocabulary import AuditEvent
from .sealed import check_recorded_files, read_sealed


@dataclass
class LifecycleSummary:
    station: str = ""
    signer: str = ""
    first_time: str = ""
    last_time: str = ""
    lines: int = 0
    ca_sha256: dict[str, str] = field(default_factory=dict)
    operations: dict[str, int] = field(default_factory=dict)
    unfinished: list[str] = field(default_factory=list)
    revoked_devices: int = 0
    renewals: dict[str, int] = field(default_factory=dict)
    promoted: int = 0
    crls: list[dict[str, Any]] = field(default_factory=list)
    files_checked: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def is_lifecycle_log(directory: Path) -> bool:
    """Whether ``directory`` holds a station lifecycle log (its first event says so)."""
    path = directory / AUDIT_LOG
    if not path.is_file():
        return False
    with path.open("rb") as handle:
        try:
            first = json.loads(handle.readline() or b"{}")
        except ValueError:
            return False
    return isinstance(first, dict) and first.get("event") == AuditEvent.STATION_LOG_START


def verify_lifecycle(directory: Path, root: x509.Certificate | None = None) -> LifecycleSummary:
    """Verify the lifecycle log in ``directory``; raise :class:`AuditError` naming the first
    problem."""
    log_path = directory / AUDIT_LOG
    if not log_path.is_file() or log_path.stat().st_size == 0:
        raise AuditError("no lifecycle log", where=str(log_path), rule="a sealed log")
    with log_path.open("rb") as handle:
        first = json.loads(handle.readline() or b"{}")
    if first.get("event") != AuditEvent.STATION_LOG_START:
        raise AuditError(
            "the log does not start with station_log_start",
            where=f"{log_path}:1",
            rule="a station lifecycle log",
        )
    summary = LifecycleSummary(
        station=first["data"].get("station", ""), ca_sha256=first["data"].get("ca_sha256", {})
    )
    replay = _Replay(log_path)
    sealed = read_sealed(directory, root, summary.ca_sha256, replay.feed)
    summary.signer = sealed.seal.signer.subject.rfc4514_string()
    summary.lines, summary.first_time, summary.last_time = (
        sealed.lines,
        sealed.first_time,
        sealed.last_time,
    )
    replay.check_serials()
    summary.files_checked = _check_renewals(directory, replay.bundles)
    summary.crls = _check_crls(directory, replay)
    summary.operations = replay.operations
    summary.unfinished = sorted(replay.started - replay.ended)
    summary.revoked_devices = len(replay.revoked_devices)
    summary.renewals = {
        "issued": sum(1 for s in replay.intents.values() if s[0] == "renewed"),
        "void": sum(1 for s in replay.intents.values() if s[0] == "void"),
    }
    summary.promoted = replay.promoted
    return summary


class _Replay:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.operations: dict[str, int] = {}
        self.started: set[str] = set()
        self.ended: set[str] = set()
        self.intents: dict[str, tuple[str, str, str]] = {}  # serial -> (state, rid, line)
        self.bundles: dict[tuple[str, str], dict[str, str]] = {}  # (op, rid) -> files
        self.revoked_devices: set[str] = set()
        self.off_service: dict[str, dict[str, int]] = {}  # issuer -> serial -> line number
        self.crls: dict[str, tuple[int, dict[str, Any]]] = {}  # issuer -> (line, data)
        self.promoted = 0

    def feed(self, number: int, record: dict[str, Any]) -> None:
        try:
            event = AuditEvent(record["event"])
        except ValueError:
            return  # an event this verifier does not interpret; the hash chain covers it
        raw = record.get("data")
        data: dict[str, Any] = raw if isinstance(raw, dict) else {}
        rid = str(record.get("registration_id") or "")
        op = str(data.get("op") or "")
        where = f"{self.path}:{number}"
        if event is AuditEvent.OPERATION_START:
            kind = str(data.get("kind", ""))
            self.operations[kind] = self.operations.get(kind, 0) + 1
            self.started.add(op)
        elif event is AuditEvent.OPERATION_END:
            self.ended.add(op)
        elif event is AuditEvent.REVOKED:
            self.revoked_devices.add(rid)
            for item in data.get("serials", []):
                self._off(str(item.get("issuer")), str(item.get("serial")), number)
        elif event is AuditEvent.RENEWAL_INTENT:
            serial = str(data["serial"])
            if serial in self.intents:
                raise AuditError(
                    f"serial {serial} intended twice", where=where, rule="one intent per serial"
                )
            self.intents[serial] = ("intent", rid, where)
        elif event is AuditEvent.RENEWED:
            serial = str(data["serial"])
            if self.intents.get(serial, ("",))[0] != "intent":
                raise AuditError(
                    f"serial {serial} renewed without an open intent",
                    where=where,
                    rule="intent before signing",
                )
            self.intents[serial] = ("renewed", rid, where)
            self.bundles[op, rid] = dict(data.get("files", {}))
        elif event is AuditEvent.RENEWAL_VOID:
            serial = str(data["serial"])
            if self.intents.get(serial, ("",))[0] != "intent":
                raise AuditError(
                    f"serial {serial} voided without an open intent",
                    where=where,
                    rule="intent before signing",
                )
            self.intents[serial] = ("void", rid, where)
            self._off(str(data.get("issuer")), serial, number)
        elif event is AuditEvent.PROMOTED:
            self.promoted += 1
            if data.get("retired"):
                self._off(str(data.get("issuer")), str(data["retired"]), number)
        elif event is AuditEvent.CRL_ISSUED:
            self.crls[str(data.get("issuer"))] = (number, data)

    def _off(self, issuer: str, serial: str, number: int) -> None:
        self.off_service.setdefault(issuer, {})[serial] = number

    def check_serials(self) -> None:
        for serial, (state, rid, where) in self.intents.items():
            if state == "intent":
                raise AuditError(
                    f"renewal serial {serial} of {rid} ends as an intent (neither renewed nor "
                    "void): resume the renewal",
                    where=where,
                    rule="every serial accounted for",
                )


def _check_renewals(directory: Path, bundles: dict[tuple[str, str], dict[str, str]]) -> int:
    checked = 0
    base = directory / RENEWALS_DIR
    for (op, rid), recorded in bundles.items():
        checked += check_recorded_files(base / op / rid, recorded, "renewal")
    if base.is_dir():
        for op_dir in base.iterdir():
            for bundle in op_dir.iterdir() if op_dir.is_dir() else ():
                if (op_dir.name, bundle.name) not in bundles and (bundle / DEVICE_JSON).exists():
                    raise AuditError(
                        "renewal bundle not recorded in the log",
                        where=str(bundle),
                        rule="bundles match the log",
                    )
    return checked


def _check_crls(directory: Path, replay: _Replay) -> list[dict[str, Any]]:
    """The latest CRL of each issuer is the logged file and lists what the log took out of
    service before it."""
    out = []
    for issuer, (number, data) in sorted(replay.crls.items()):
        path = directory / CRL_DIR / str(data.get("file"))
        where = str(path)
        if not path.is_file():
            raise AuditError(
                "the latest logged CRL is missing", where=where, rule="CRLs match the log"
            )
        content = path.read_bytes()
        if hashlib.sha256(content).hexdigest() != data.get("sha256"):
            raise AuditError(
                "the CRL differs from the one the log recorded (its latest issue)",
                where=where,
                rule="CRLs match the log",
            )
        crl = x509.load_pem_x509_crl(content)
        listed = {serial_hex(r.serial_number) for r in crl}
        for serial, line in replay.off_service.get(issuer, {}).items():
            if line < number and canonical_serial(serial) not in listed:
                raise AuditError(
                    f"serial {serial}, taken out of service at line {line}, is not on the CRL "
                    f"issued at line {number}",
                    where=where,
                    rule="the CRL lists every revocation before it",
                )
        out.append(
            {
                "issuer": issuer,
                "number": data.get("number"),
                "entries": len(listed),
                "this_update": data.get("this_update"),
                "file": str(path),
            }
        )
    return out
