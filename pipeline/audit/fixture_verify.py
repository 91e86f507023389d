"""Offline verification of the key-delivery logs (docs/key-delivery.md): a programming
fixture's log and a station's ceremony log. Both are a directory holding ``audit.jsonl``
(first line ``log_start``, naming the kind) and its detached CMS seal ``audit.jsonl.p7s``;
``provline audit verify DIR`` sends such a directory here and a batch to
:func:`pipeline.audit.verify.verify_batch`, whose behaviour this module does not change.

Checks, stopping at the first failure with what and where:

1. the CMS signature and the signer's chain to the root (``--root``, or a root whose
   SHA-256 the log itself recorded);
2. the hash chain and the sequence, line by line;
3. that the signature covers exactly this file and the log ends with its ``seal`` line,
   which names the signer;
4. for a fixture log: every delivery names a device and a serial and used a transport key
   the fixture imported earlier in the same log.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from ..errors import AuditError
from ..layout import AUDIT_LOG
from ..vocabulary import AuditEvent, LogKind
from .sealed import read_sealed


@dataclass
class LogSummary:
    kind: str = ""
    name: str = ""
    signer: str = ""
    first_time: str = ""
    last_time: str = ""
    lines: int = 0
    events: dict[str, int] = field(default_factory=dict)
    transport_keys: list[str] = field(default_factory=list)  # check values handed or imported
    fixtures: list[str] = field(default_factory=list)  # trusted (station) / this fixture
    deliveries: int = 0
    devices: int = 0  # distinct devices delivered
    refusals: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def lines_for_terminal(self, root: Path | None) -> list[str]:
        out = [
            f"{self.kind} log {self.name}: VERIFIED",
            f"signer      {self.signer}",
            f"time span   {self.first_time} .. {self.last_time} ({self.lines} lines)",
            "trust       " + (str(root) if root else "root named by the log (give --root)"),
            "events      " + "  ".join(f"{k}: {v}" for k, v in sorted(self.events.items())),
            "transport   " + (", ".join(self.transport_keys) or "-"),
        ]
        if self.kind == LogKind.FIXTURE:
            out.append(
                f"deliveries  {self.deliveries} ({self.devices} devices), {self.refusals} refused"
            )
        else:
            out.append("fixtures    " + (", ".join(self.fixtures) or "-"))
        return out


def delivery_log_kind(directory: Path) -> LogKind | None:
    """The kind a directory's log declares in its ``log_start`` line, or ``None`` (no log,
    or a batch log, which starts with ``batch_start``)."""
    path = directory / AUDIT_LOG
    if not directory.is_dir() or not path.is_file():
        return None
    with path.open("rb") as handle:
        first = handle.readline()
    try:
        record = json.loads(first)
        if record.get("event") != AuditEvent.LOG_START:
            return None
        return LogKind(record["data"]["kind"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def is_delivery_log(directory: Path) -> bool:
    return delivery_log_kind(directory) is not None


def _recorded_roots(path: Path) -> dict[str, str]:
    """Root fingerprints the log recorded (log_start's ca_sha256, transport_imported's
    root_sha256): the anchors trusted when no --root is given."""
    roots: dict[str, str] = {}
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                record = json.loads(raw)
                data = record.get("data") or {}
            except (ValueError, AttributeError):
                continue  # the hash-chain pass names the bad line
            if not isinstance(data, dict):
                continue
            for key, value in (data.get("ca_sha256") or {}).items():
                roots[f"{number}:{key}"] = str(value)
            if data.get("root_sha256"):
                roots[f"{number}:root"] = str(data["root_sha256"])
    return roots


def verify_delivery_log(directory: Path, root: x509.Certificate | None = None) -> LogSummary:
    """Verify a fixture or station ceremony log; raise :class:`AuditError` naming the first
    problem."""
    log_path = directory / AUDIT_LOG
    if not log_path.is_file() or log_path.stat().st_size == 0:
        raise AuditError("no log, or an empty one", where=str(log_path), rule="a sealed log")
    summary = LogSummary()
    imported: set[str] = set()
    devices: set[str] = set()

    def feed(number: int, record: dict[str, Any]) -> None:
        where = f"{log_path}:{number}"
        event = str(record.get("event"))
        raw = record.get("data")
        data: dict[str, Any] = raw if isinstance(raw, dict) else {}
        if number == 1:
            if event != AuditEvent.LOG_START or data.get("kind") not in set(LogKind):
                raise AuditError(
                    "the first line is not log_start with a known kind",
                    where=where,
                    rule="delivery logs start with log_start",
                )
            summary.kind, summary.name = str(data["kind"]), str(data.get("name", ""))
        summary.events[event] = summary.events.get(event, 0) + 1
        if event == AuditEvent.TRANSPORT_IMPORTED:
            value = str(data.get("transport_key", {}).get("check_value", ""))
            imported.add(value)
            summary.transport_keys.append(value)
        elif event == AuditEvent.TRANSPORT_HANDOVER:
            handed = data.get("transport_key", {}).get("check_value", "")
            summary.transport_keys.append(f"{handed} to {data.get('fixture', '')}")
        elif event == AuditEvent.FIXTURE_TRUSTED:
            summary.fixtures.append(
                f"{data.get('fixture', '')} {data.get('unwrap_key_sha256', '')}"
            )
        elif event == AuditEvent.DELIVERED:
            _check_delivery(record, data, imported, where)
            summary.deliveries += 1
            devices.add(str(record["registration_id"]))
        elif event == AuditEvent.DELIVERY_REFUSED:
            summary.refusals += 1

    sealed = read_sealed(directory, root, _recorded_roots(log_path), feed)
    summary.signer = sealed.seal.signer.subject.rfc4514_string()
    summary.lines, summary.first_time, summary.last_time = (
        sealed.lines,
        sealed.first_time,
        sealed.last_time,
    )
    summary.devices = len(devices)
    return summary


def _check_delivery(
    record: dict[str, Any], data: dict[str, Any], imported: set[str], where: str
) -> None:
    if not record.get("registration_id") or not data.get("serial"):
        raise AuditError(
            "a delivery without a device or serial", where=where, rule="deliveries name a device"
        )
    if data.get("transport_key_check_value") not in imported:
        raise AuditError(
            f"a delivery with transport key {data.get('transport_key_check_value')}, which "
            "this fixture never imported",
            where=where,
            rule="deliveries use imported transport keys",
        )
