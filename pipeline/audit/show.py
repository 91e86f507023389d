"""``provline audit show``: what happened in a batch, as an auditor reads it, from its verified
audit log only (README "Audit").

The log is verified first (:func:`pipeline.audit.verify.verify_and_replay`, the same checks
as ``provline audit verify``); nothing is shown from a log that does not verify. Then, from
the same single pass: every run (started or resumed, when, on which station and host, by
which operator, against which DPS endpoint and ID scope; the CA uploads and proofs of
possession it made; what it issued, voided, released and registered; whether it was
aborted and why, or killed; its exit code and whether it sealed the log), the failures with
their reasons, the void serials, and one row per device (registration ID, device ID,
serial, thumbprints, state, registration outcome) for ``--json`` and ``--csv``. A device's
SHA-1 thumbprint and device ID come from its ``device.json``, whose hash the log records.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from cryptography import x509

from ..errors import escape
from ..layout import DEVICE_JSON
from ..vocabulary import AuditEvent
from .verify import Replay, Summary, verify_and_replay

SHOW_FORMAT = "provline.audit-show/1"
SHOWN = 20  # failures and void serials printed in the text view (--json and --csv: all)
CSV_COLUMNS = (
    "registration_id",
    "device_id",
    "state",
    "serial",
    "sha1_thumbprint",
    "sha256_thumbprint",
    "registration",
    "registration_outcome",
    "enrollment",
    "reason",
)
_COUNTED = {
    AuditEvent.ISSUED: "issued",
    AuditEvent.FAILED: "failed",
    AuditEvent.VOID: "void",
    AuditEvent.UNUSED: "unused",
    AuditEvent.RELEASED: "released",
    AuditEvent.REGISTERED: "registered",
    AuditEvent.REGISTRATION_CONFLICT: "conflict",
    AuditEvent.REGISTRATION_FAILED: "register_failed",
    AuditEvent.ORPHAN_REMOVED: "orphans_removed",
    AuditEvent.ORPHAN_KEPT: "orphans_kept",
}


@dataclass
class Run:
    """One run of the batch, from its batch_start or resume event to the next one."""

    number: int
    kind: str  # start | resume
    started: str
    ended: str | None = None
    station: str = ""
    host: str = ""
    tool: str = ""
    operator: str | None = None
    registration: dict[str, Any] | None = None
    settled: dict[str, Any] = field(default_factory=dict)  # resume: what it settled
    counts: dict[str, int] = field(default_factory=dict)  # events of this run
    ca: list[dict[str, Any]] = field(default_factory=list)  # uploads, proofs of possession
    aborted: str | None = None
    ended_by: str = "killed"  # run_end | killed (no run_end: the next run settled it)
    exit_code: int | None = None
    complete: bool | None = None
    sealed: str = "no"  # yes | skipped | no
    torn_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class History:
    summary: Summary
    batch_dir: Path
    start: dict[str, Any]
    runs: list[Run]
    replay: Replay

    def to_json(self, devices: bool = True) -> dict[str, Any]:
        s = self.summary
        data: dict[str, Any] = {
            "format": SHOW_FORMAT,
            "verified": s.anchored,  # every check passed, against a root the caller gave
            "checks_passed": True,
            "anchored": s.anchored,
            "trust_anchor": s.trust_anchor,
            "report_sealed": s.report_sealed,
            "batch_id": s.batch_id,
            "batch_dir": str(self.batch_dir),
            "product": s.product,
            "station": s.station,
            "manifest": self.start.get("manifest"),
            "manifest_sha256": self.start.get("manifest_sha256"),
            "custody": self.start.get("custody"),
            "key_profile": self.start.get("key_profile"),
            "ca_sha256": s.ca_sha256,
            "signer": s.signer,
            "time_span": [s.first_time, s.last_time],
            "runs": [r.to_json() for r in self.runs],
            "devices": s.devices,
            "serials": s.serials,
            "failures": s.failures,
            "void_serials": s.voids,
        }
        if devices:
            data["device_rows"] = list(self.device_rows())
        return data

    def device_rows(self) -> Iterator[dict[str, str]]:
        """One row per device the log names, in the order it first names them."""
        replay = self.replay
        for rid, state in replay.state.items():
            serial = replay.current.get(rid, "")
            info = _device_json(self.batch_dir / rid) if serial else {}
            event, outcome = replay.outcomes.get(rid, (None, {}))
            reason = replay.reasons.get(rid, "") if state.value != "registered" else ""
            yield {
                "registration_id": rid,
                "device_id": str(info.get("device_id") or outcome.get("device_id") or ""),
                "state": state.value,
                "serial": serial,
                "sha1_thumbprint": str(info.get("sha1_thumbprint") or ""),
                "sha256_thumbprint": replay.sha256.get(rid, ""),
                "registration": str(outcome.get("mode") or ""),
                "registration_outcome": _OUTCOMES.get(event, "") if event else "",
                "enrollment": str(
                    outcome.get("enrollment")
                    or outcome.get("group")
                    or outcome.get("device_id")
                    or ""
                ),
                "reason": reason,
            }

    def write_csv(self, out: TextIO) -> int:
        writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        rows = 0
        for row in self.device_rows():
            writer.writerow(row)
            rows += 1
        return rows

    def lines(self) -> list[str]:
        s = self.summary
        trust = (
            f"VERIFIED, anchored to {s.trust_anchor.get('subject')} "
            f"(sha256 {s.trust_anchor.get('sha256')})"
            if s.anchored
            else f"UNANCHORED: every check passed against the root the log names, "
            f"{s.trust_anchor.get('subject')} (sha256 {s.trust_anchor.get('sha256')}); "
            "give --root to anchor it"
        )
        out = [
            f"batch {s.batch_id} (product {s.product or '-'}) on station {s.station}: audit log "
            + trust,
            f"manifest   {self.start.get('manifest')} sha256 {self.start.get('manifest_sha256')}; "
            f"{self.start.get('devices')} devices; custody {self.start.get('custody')}, "
            f"key profile {self.start.get('key_profile')}",
        ]
        for name, fingerprint in s.ca_sha256.items():
            out.append(f"CA         {name} sha256 {fingerprint}")
        out.append(f"signer     {s.signer}")
        out.append(
            "report     "
            + (
                "report.json and report.txt covered by the seal"
                if s.report_sealed
                else "NOT covered by the seal (logged by an older provline)"
            )
        )
        for run in self.runs:
            out += _run_lines(run)
        out.append("devices    " + _pairs(s.devices))
        out.append("serials    " + _pairs(s.serials))
        for failure in s.failures[:SHOWN]:
            out.append(
                f"failed     {failure['registration_id']} ({failure['state']}): "
                f"{escape(failure['reason'])}"
            )
        if len(s.failures) > SHOWN:
            out.append(
                f"           ... and {len(s.failures) - SHOWN:,} more of {len(s.failures):,} "
                "(--csv or --json lists every device)"
            )
        for void in s.voids[:SHOWN]:
            out.append(
                f"void       {void['registration_id']} serial {void['serial']} (revoke: "
                "provline ca crl)"
            )
        if len(s.voids) > SHOWN:
            out.append(f"           ... and {len(s.voids) - SHOWN:,} more void serials (--json)")
        return out


_OUTCOMES = {
    AuditEvent.REGISTERED: "registered",
    AuditEvent.REGISTRATION_CONFLICT: "conflict",
    AuditEvent.REGISTRATION_FAILED: "register_failed",
}


def show_batch(batch_dir: Path, root: x509.Certificate | None = None) -> History:
    """Verify ``batch_dir`` (raising :class:`~pipeline.errors.AuditError` as ``audit verify``
    does) and replay its runs."""
    runs: list[Run] = []
    start: dict[str, Any] = {}

    def observe(_: int, record: dict[str, Any]) -> None:
        nonlocal start
        try:
            event = AuditEvent(str(record.get("event")))
        except ValueError:
            return
        raw = record.get("data")
        data: dict[str, Any] = raw if isinstance(raw, dict) else {}
        when = str(record.get("time", ""))
        if event in (AuditEvent.BATCH_START, AuditEvent.RESUME):
            if event is AuditEvent.BATCH_START:
                start = data
            previous = start if event is AuditEvent.RESUME else data
            runs.append(
                Run(
                    number=len(runs) + 1,
                    kind="start" if event is AuditEvent.BATCH_START else "resume",
                    started=when,
                    station=str(data.get("station") or previous.get("station") or ""),
                    host=str(data.get("host") or ""),
                    tool=str(data.get("tool") or ""),
                    operator=data.get("operator"),
                    registration=data.get("registration"),
                    settled={
                        k: data[k]
                        for k in ("recovered", "voided", "released", "retrying_failed")
                        if k in data
                    },
                )
            )
            return
        if not runs:
            return
        run = runs[-1]
        if event in _COUNTED:
            key = _COUNTED[event]
            run.counts[key] = run.counts.get(key, 0) + 1
        elif event in (AuditEvent.CA_UPLOADED, AuditEvent.CA_VERIFIED):
            run.ca.append({"event": event.value, "time": when, **data})
        elif event is AuditEvent.TORN_TAIL_REMOVED:
            run.torn_bytes += int(data.get("bytes") or 0)
        elif event is AuditEvent.ABORTED:
            run.aborted = str(data.get("reason") or "")
        elif event is AuditEvent.RUN_END:
            run.ended, run.ended_by = when, "run_end"
        elif event is AuditEvent.REPORT:
            run.exit_code = data.get("exit_code")
            run.complete = data.get("complete")
        elif event is AuditEvent.SEAL:
            run.sealed = "yes"
            run.ended = run.ended or when
        elif event is AuditEvent.SEAL_SKIPPED:
            run.sealed = "skipped"

    summary, replay = verify_and_replay(batch_dir, root, observe)
    return History(summary, batch_dir, start, runs, replay)


def _device_json(directory: Path) -> dict[str, Any]:
    """A device's device.json (its hash was checked against the log), {} if unreadable."""
    try:
        data = json.loads((directory / DEVICE_JSON).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _pairs(counts: dict[str, int]) -> str:
    return "  ".join(f"{k}: {v:,}" for k, v in sorted(counts.items())) or "-"


def _run_lines(run: Run) -> list[str]:
    head = (
        f"run {run.number:<6} {run.kind:<6} {run.started} .. {run.ended or '(no end)'}  "
        f"operator {escape(run.operator) if run.operator else '(not recorded)'}"
        f"  station {run.station}"
        + (f"  host {run.host}" if run.host else "")
        + (f"  {run.tool}" if run.tool else "")
    )
    out = [head]
    pad = " " * 11
    target = run.registration
    if target:
        out.append(
            f"{pad}registration {target.get('mode')} at {target.get('service_endpoint')}"
            + (f", ID scope {target['id_scope']}" if target.get("id_scope") else "")
            + (f", hub {target['hub']}" if target.get("hub") else "")
            + f"; CA {target.get('ca')}"
        )
    for step in run.ca:
        if step["event"] == AuditEvent.CA_UPLOADED:
            out.append(
                f"{pad}CA uploaded {step.get('time')}: {step.get('subject')} as "
                f"{step.get('name')} (sha1 {step.get('sha1_thumbprint')}) to "
                f"{step.get('service_endpoint')}"
            )
        else:
            out.append(
                f"{pad}CA verified {step.get('time')}: {step.get('name')} by "
                f"{str(step.get('method', '')).replace('_', ' ')}"
            )
    if run.settled:
        out.append(f"{pad}settled    " + _pairs({k: int(v) for k, v in run.settled.items()}))
    if run.torn_bytes:
        out.append(f"{pad}torn tail of {run.torn_bytes} bytes removed from the log")
    out.append(f"{pad}events     " + _pairs(run.counts))
    if run.aborted:
        out.append(f"{pad}aborted    {escape(run.aborted)}")
    if run.ended_by == "killed":
        out.append(f"{pad}ended      killed (no run_end): the next run settled what it left open")
    elif run.exit_code is not None:
        complete = "complete" if run.complete else "not complete"
        sealed = {"yes": "sealed", "skipped": "not sealed (no audit key)", "no": "not sealed"}
        out.append(f"{pad}ended      exit code {run.exit_code}, {complete}, {sealed[run.sealed]}")
    else:
        out.append(f"{pad}ended      {'sealed' if run.sealed == 'yes' else 'not sealed'}")
    return out
