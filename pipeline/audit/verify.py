"""Offline verification of a sealed batch, for auditors: no HSM, no network, no journal.

Checks, in order, stopping at the first failure with what and where:

1. the detached CMS signature ``audit.jsonl.p7s`` (over its signed attributes) and the
   signer's certificate chain up to the trusted root;
2. the hash chain and the sequence of ``audit.jsonl``, read once as a stream (names the first
   bad line), while hashing it;
3. that the signature's message digest is this exact file, and that the log ends with the
   ``seal`` event the signature was made for;
4. that every bundle file on disk has the SHA-256 the log recorded for it, and that no bundle
   file is unrecorded;
5. that every serial ever intended ends ``issued``, ``void``, ``unused`` or ``released``
   (a released serial never reached a signer: it is never issued, voided or unused later);
6. that ``report.json`` and ``report.txt`` are the files the ``report`` event, the line just
   before the seal, recorded (so the seal covers every field of both), and that
   ``report.json`` agrees with the log. A log written by an older provline has no
   ``report`` event: its report is only compared with the log (``report_sealed`` false).

Without a trusted root the signer is checked against the root the log itself names (the
self-signed certificate in the signature whose fingerprint ``batch_start`` recorded): every
check runs, but nothing outside the batch vouches for it, and :attr:`Summary.anchored` is
false (``provline audit verify`` says UNANCHORED and exits 61).

Serials are compared as numbers (:mod:`pipeline.serials`): an older provline wrote them
with an odd number of hex digits.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography import x509

from ..ca.certs import thumbprints
from ..errors import AuditError
from ..layout import AUDIT_LOG, DEVICE_JSON, REPORT, REPORT_TEXT
from ..serials import canonical_serial
from ..vocabulary import (
    REGISTRATION_STATES,
    REWORK_STATES,
    AuditEvent,
    DeviceState,
    SerialState,
)
from .sealed import check_recorded_files, read_sealed


@dataclass
class Summary:
    batch_id: str = ""
    station: str = ""
    product: str = ""
    signer: str = ""
    anchored: bool = False  # checked against a root given by the caller, not the log's own
    trust_anchor: dict[str, str] = field(default_factory=dict)  # subject, sha256
    report_sealed: bool = False  # report.json and report.txt are covered by the seal
    first_time: str = ""
    last_time: str = ""
    lines: int = 0
    ca_sha256: dict[str, str] = field(default_factory=dict)
    devices: dict[str, int] = field(default_factory=dict)
    serials: dict[str, int] = field(default_factory=dict)
    failures: list[dict[str, str]] = field(default_factory=list)
    voids: list[dict[str, str]] = field(default_factory=list)
    files_checked: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


Observer = Callable[[int, dict[str, Any]], None]


def verify_batch(batch_dir: Path, root: x509.Certificate | None = None) -> Summary:
    """Verify ``batch_dir``; raise :class:`AuditError` naming the first problem. The log is
    read once, as a stream: memory grows with the number of devices, not of log lines."""
    return verify_and_replay(batch_dir, root)[0]


def verify_and_replay(
    batch_dir: Path, root: x509.Certificate | None = None, observe: Observer | None = None
) -> tuple[Summary, Replay]:
    """:func:`verify_batch`, also returning the replayed device and serial states;
    ``observe`` sees every record (with its line number) in the same single pass, before the
    signature over the whole log is known to match: use what it gathered only once this
    returns."""
    log_path = batch_dir / AUDIT_LOG
    if not log_path.is_file() or log_path.stat().st_size == 0:
        raise AuditError(
            "no audit log, or an empty one", where=str(log_path), rule="a sealed batch"
        )
    with log_path.open("rb") as handle:
        first = json.loads(handle.readline() or b"{}")
    start = first.get("data", {}) if first.get("event") == "batch_start" else {}
    summary = Summary(
        batch_id=start.get("batch_id", ""),
        station=start.get("station", ""),
        product=start.get("product", ""),
        ca_sha256=start.get("ca_sha256", {}),
    )
    replay = Replay(log_path)

    def feed(number: int, record: dict[str, Any]) -> None:
        replay.feed(number, record)
        if observe is not None:
            observe(number, record)

    sealed = read_sealed(batch_dir, root, summary.ca_sha256, feed)
    seal = sealed.seal
    summary.signer = seal.signer.subject.rfc4514_string()
    summary.anchored = root is not None
    summary.trust_anchor = {
        "subject": seal.anchor.subject.rfc4514_string(),
        "sha256": thumbprints(seal.anchor).sha256,
    }
    summary.lines, summary.first_time, summary.last_time = (
        sealed.lines,
        sealed.first_time,
        sealed.last_time,
    )

    summary.files_checked = _check_files(batch_dir, replay.files)
    _check_serials(replay.serials, log_path)
    summary.devices = _count(replay.state.values())
    summary.serials = _count(s for s, _ in replay.serials.values())
    summary.voids = [
        {"registration_id": r, "serial": s}
        for s, (st, r) in replay.serials.items()
        if st is SerialState.VOID
    ]
    summary.failures = replay.failures()
    summary.report_sealed = _check_report_files(batch_dir, replay, summary.lines, log_path)
    _check_report(batch_dir, summary)
    return summary, replay


class Replay:
    """Replays events: final state per device, the files of each device's current bundle,
    (state, device) per serial, and each device's last registration outcome. A serial may be
    voided or released without a logged intent: the journal commits intents just before the
    log does, and nothing is signed in between."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.state: dict[str, DeviceState] = {}
        self.files: dict[str, dict[str, str]] = {}
        self.current: dict[str, str] = {}  # device -> serial of its current bundle
        self.serials: dict[str, tuple[SerialState, str]] = {}
        self.reasons: dict[str, str] = {}
        self.sha256: dict[str, str] = {}  # device -> SHA-256 thumbprint of its current leaf
        self.outcomes: dict[str, tuple[AuditEvent, dict[str, Any]]] = {}  # registration
        self.run_started = 0  # line of the last batch_start or resume
        self.reports = 0  # report events seen
        self.report: tuple[int, dict[str, Any]] | None = None  # the last one: line, data

    def feed(self, number: int, record: dict[str, Any]) -> None:
        try:
            event = AuditEvent(record["event"])
        except ValueError:
            return  # an event this verifier does not interpret; the hash chain covers it
        raw = record.get("data")
        data: dict[str, Any] = raw if isinstance(raw, dict) else {}
        rid, serial = str(record.get("registration_id") or ""), _serial(data.get("serial"))
        state, serials = self.state, self.serials
        if event in (AuditEvent.BATCH_START, AuditEvent.RESUME):
            self.run_started = number
        elif event is AuditEvent.REPORT:
            self.reports += 1
            self.report = (number, data)
        elif event is AuditEvent.INTENT:
            serials[serial] = (SerialState.INTENT, rid)
            state[rid] = DeviceState.INTENT
        elif event is AuditEvent.ISSUED:
            if serial not in serials or serials[serial][0] is not SerialState.INTENT:
                raise AuditError(
                    f"serial {serial} issued without an open intent",
                    where=f"{self.path}:{number}",
                    rule="intent before signing",
                )
            serials[serial] = (SerialState.ISSUED, rid)
            self.sha256[rid] = str(data.get("sha256_thumbprint") or "")
            state[rid], self.files[rid], self.current[rid] = (
                DeviceState.BUNDLED,
                data["files"],
                serial,
            )
        elif event in (AuditEvent.VOID, AuditEvent.UNUSED):
            if serials.get(serial, (None, ""))[0] is SerialState.RELEASED:
                raise AuditError(
                    f"serial {serial} is {event} but was released (never reached a signer)",
                    where=f"{self.path}:{number}",
                    rule="a released serial is never signed",
                )
            serials[serial] = (SerialState(event.value), rid)
            if self.current.get(rid) == serial:
                del self.current[rid], self.files[rid]
                self.sha256.pop(rid, None)
            current = state.get(rid)
            if current is None or not current.has_bundle or rid not in self.current:
                state[rid] = (
                    DeviceState.FAILED if event is AuditEvent.UNUSED else DeviceState.PLANNED
                )
        elif event is AuditEvent.RELEASED:
            prior = serials.get(serial, (SerialState.INTENT, rid))[0]
            if prior not in (SerialState.INTENT, SerialState.RELEASED):
                raise AuditError(
                    f"serial {serial} released after it ended {prior}",
                    where=f"{self.path}:{number}",
                    rule="only an open intent is released",
                )
            serials[serial] = (SerialState.RELEASED, rid)
            current = state.get(rid)
            if current is None or not current.has_bundle or rid not in self.current:
                state[rid] = DeviceState.PLANNED
        elif event is AuditEvent.FAILED:
            state[rid] = DeviceState.FAILED
            self.reasons[rid] = data.get("reason", "")
        elif event in REGISTRATION_STATES:
            current = state.get(rid)
            if current is None or not current.has_bundle:
                raise AuditError(
                    f"{event} for {rid}, which has no bundle",
                    where=f"{self.path}:{number}",
                    rule="register after bundling",
                )
            state[rid] = REGISTRATION_STATES[event]
            self.outcomes[rid] = (event, data)
            if event is not AuditEvent.REGISTERED:
                self.reasons[rid] = data.get("reason", "")

    def failures(self) -> list[dict[str, str]]:
        return [
            {"registration_id": r, "state": self.state[r].value, "reason": why}
            for r, why in self.reasons.items()
            if self.state.get(r) in REWORK_STATES
        ]


def _serial(value: Any) -> str:
    """A logged serial as a key: the number, whatever digits an older provline wrote."""
    text = str(value or "")
    try:
        return canonical_serial(text)
    except ValueError:
        return text


def _check_report_files(batch_dir: Path, replay: Replay, lines: int, log: Path) -> bool:
    """report.json and report.txt must be the files the ``report`` event just before the
    seal recorded. Returns False for a log an older provline wrote (no report event at all):
    its report is only compared with the log."""
    if not replay.reports:
        return False
    found = replay.report
    if found is None or found[0] != lines - 1 or found[0] < replay.run_started:
        raise AuditError(
            "the last run did not log its report just before the seal (report.json and "
            "report.txt are not covered by the seal)",
            where=f"{log}:{lines}",
            rule="the seal covers the report",
        )
    recorded = found[1].get("files")
    recorded = recorded if isinstance(recorded, dict) else {}
    for name in (REPORT, REPORT_TEXT):
        path = batch_dir / name
        if name not in recorded:
            raise AuditError(
                f"the report event records no hash of {name}",
                where=f"{log}:{found[0]}",
                rule="the seal covers the report",
            )
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as exc:
            raise AuditError(
                f"cannot read it: {exc.strerror}", where=str(path), rule="report files"
            ) from exc
        if digest != recorded[name]:
            raise AuditError(
                f"differs from the SHA-256 the log recorded at line {found[0]} (changed after "
                "sealing)",
                where=str(path),
                rule="the seal covers the report",
            )
    return True


def _check_files(batch_dir: Path, files: dict[str, dict[str, str]]) -> int:
    checked = 0
    for rid, recorded in files.items():
        checked += check_recorded_files(batch_dir / rid, recorded, "bundle")
    for directory in batch_dir.iterdir():
        if directory.is_dir() and directory.name not in files and any(directory.iterdir()):
            bundle = directory / DEVICE_JSON
            if bundle.exists():
                raise AuditError(
                    "bundle not recorded in the log",
                    where=str(directory),
                    rule="bundles match the log",
                )
    return checked


def _check_serials(serials: dict[str, tuple[SerialState, str]], path: Path) -> None:
    for serial, (state, rid) in serials.items():
        if state is SerialState.INTENT:
            raise AuditError(
                f"serial {serial} of {rid} ends as an intent (neither issued, void nor released)",
                where=str(path),
                rule="every serial accounted for",
            )


def _check_report(batch_dir: Path, summary: Summary) -> None:
    path = batch_dir / REPORT
    if not path.is_file():
        raise AuditError("no report", where=str(path), rule="report agrees with the log")
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AuditError(
            f"not a readable JSON report: {exc}", where=str(path), rule="report agrees with the log"
        ) from exc
    if not isinstance(report, dict):
        raise AuditError("not a JSON object", where=str(path), rule="report agrees with the log")
    checks = {
        "batch_id": (report.get("batch_id"), summary.batch_id),
        "station": (report.get("station"), summary.station),
        "product": (report.get("product"), summary.product),
        "serials": (report.get("serials"), summary.serials),
        "device states": (
            {k: v for k, v in report.get("counts", {}).items() if k != DeviceState.PLANNED},
            {k: v for k, v in summary.devices.items() if k != DeviceState.PLANNED},
        ),
        "void serials": (
            sorted(_serial(v.get("serial")) for v in report.get("void_serials", [])),
            sorted(v["serial"] for v in summary.voids),
        ),
    }
    for what, (reported, logged) in checks.items():
        if reported != logged:
            raise AuditError(
                f"{what}: report says {reported}, the log says {logged}",
                where=str(path),
                rule="report agrees with the log",
            )


def _count(values: Iterable[StrEnum]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value.value] = counts.get(value.value, 0) + 1
    return counts
