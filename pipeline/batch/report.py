"""``report.json`` and its human summary ``report.txt``: counts, per-stage time and throughput,
failures with reasons, void serials to revoke, released reservations, token objects the
cleanup removed, why a run stopped, who ran it against which registration target, and the
exit code (README "Exit codes"): the same code the process exits with.

Both files are written before the log is sealed, and the ``report`` audit event records
their SHA-256 (:func:`report_event`), so the seal covers every field an auditor reads
(``provline audit verify`` checks them). Lists are never cut silently: ``report.json``
lists the first :data:`JSON_FAILURES` failures and says how many there are in all and how
to list every one (``provline status BATCH --list rework``); ``report.txt`` does the same
after :data:`SUMMARY_FAILURES`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config.manifest import Manifest
from ..config.station import Station
from ..errors import UNEXPECTED_EXIT_CODE, CAError, RegistrationError, escape
from ..files import write_atomic
from ..layout import REPORT, REPORT_TEXT
from ..stats import StageStats
from ..vocabulary import REWORK_STATES, DeviceState, RegistrationMode, SerialState
from .journal import Journal

REPORT_FORMAT = "provline.report/1"
SUMMARY_FAILURES = 20  # failures listed in report.txt
JSON_FAILURES = 1000  # failures listed in report.json
REWORK = "rework"  # `provline status BATCH --list rework`: failed, conflict, register_failed


@dataclass
class Report:
    batch_id: str
    product: str
    manifest: str
    manifest_sha256: str
    station: str
    custody: str
    key_profile: str
    finished: str
    resumed: bool
    devices: int
    counts: dict[str, int]
    serials: dict[str, int]
    this_run: dict[str, int]
    stages: dict[str, StageStats]
    failures: list[dict[str, str]] = field(default_factory=list)  # the first JSON_FAILURES
    failures_total: int = 0
    failures_left_out: int = 0
    failures_full_list: str = ""  # the command that lists every one
    operator: str | None = None
    registration: dict[str, Any] | None = None  # the target the run checked, or None
    void_serials: list[dict[str, str]] = field(default_factory=list)
    orphans_removed: list[dict[str, str]] = field(default_factory=list)  # this run's cleanup
    aborted: str | None = None
    complete: bool = False
    exit_code: int = 0
    format: str = REPORT_FORMAT  # docs/ci.md

    def to_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["stages"] = {name: stats.to_json() for name, stats in self.stages.items()}
        return data


def build_report(
    manifest: Manifest,
    station: Station,
    journal: Journal,
    stages: dict[str, StageStats],
    *,
    resumed: bool,
    this_run: dict[str, int],
    aborted: str | None,
    exit_code: int | None = None,
    orphans_removed: list[dict[str, str]] | None = None,
    operator: str | None = None,
    registration: dict[str, Any] | None = None,
) -> Report:
    """``exit_code`` is the code of the error that stopped the run (or failed its sealing);
    without one it follows from the device states."""
    counts = journal.counts()
    failures = journal.failures(JSON_FAILURES)
    rework = sum(counts.get(state, 0) for state in REWORK_STATES)
    if exit_code is None:
        exit_code = _exit_code(counts, aborted)
    done = (
        DeviceState.BUNDLED
        if manifest.registration is RegistrationMode.NONE
        else DeviceState.REGISTERED
    )
    batch_dir = station.output / manifest.batch_id
    return Report(
        batch_id=manifest.batch_id,
        product=manifest.product,
        manifest=str(manifest.path),
        manifest_sha256=manifest.sha256,
        station=station.name,
        custody=station.custody.policy.value,
        key_profile=manifest.key_profile.value,
        finished=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        resumed=resumed,
        devices=journal.total(),
        counts=counts,
        serials=journal.serial_counts(),
        this_run=this_run,
        stages=stages,
        failures=failures,
        failures_total=rework,
        failures_left_out=rework - len(failures),
        failures_full_list=f"provline status {batch_dir} --list {REWORK}" if rework else "",
        operator=operator,
        registration=registration,
        void_serials=journal.voids(),
        orphans_removed=list(orphans_removed or []),
        aborted=aborted,
        complete=set(counts) <= {done.value},
        exit_code=exit_code,
    )


def _exit_code(counts: dict[str, int], aborted: str | None) -> int:
    if aborted:
        return UNEXPECTED_EXIT_CODE
    if counts.get(DeviceState.FAILED):
        return CAError.exit_code
    if counts.get(DeviceState.CONFLICT) or counts.get(DeviceState.REGISTER_FAILED):
        return RegistrationError.exit_code
    return 0


def summary(report: Report) -> str:
    issue = report.stages.get("issue", StageStats())
    lines = [
        f"batch {report.batch_id} on station {report.station} "
        f"({report.custody} custody, {report.key_profile})"
        + (" — resumed" if report.resumed else "")
        + (f", operator {escape(report.operator)}" if report.operator else ""),
        f"devices: {report.devices}  "
        + "  ".join(f"{k}: {v}" for k, v in sorted(report.counts.items())),
        "serials: " + "  ".join(f"{k}: {v}" for k, v in sorted(report.serials.items())),
    ]
    if issue.devices:
        lines.append(
            f"this run: {issue.devices} devices in {issue.seconds:.1f}s "
            f"({issue.devices_per_s or 0:.0f} devices/s, {issue.workers} workers)"
        )
    register = report.stages.get("register", StageStats())
    if register.devices:
        lines.append(
            f"registered: {register.devices} devices in {register.seconds:.1f}s "
            f"({register.calls} calls, {register.retries} retries)"
        )
    seal = report.stages.get("seal", StageStats())
    lines.append("audit log: " + ("sealed" if seal.sealed else "NOT sealed"))
    if report.registration is not None:
        target = report.registration
        lines.append(
            f"registration: {target['mode']} at {target['service_endpoint']}"
            + (f" (ID scope {target['id_scope']})" if target.get("id_scope") else "")
            + f", CA {target['ca']}"
        )
    for failure in report.failures[:SUMMARY_FAILURES]:
        lines.append(f"{failure['state']}: {failure['registration_id']}: {failure['reason']}")
    left_out = report.failures_total - min(len(report.failures), SUMMARY_FAILURES)
    if left_out > 0:
        listed = min(len(report.failures), JSON_FAILURES)
        lines.append(
            f"... and {left_out:,} more of {report.failures_total:,} devices that need rework "
            f"(report.json lists {listed:,}; `{report.failures_full_list}` lists every one)"
        )
    if report.this_run.get("recovered"):
        lines.append(
            f"recovered: {report.this_run['recovered']} bundles a stopped run had finished "
            "(whole on disk) recorded as issued"
        )
    if report.void_serials:
        lines.append(
            f"void serials to revoke: {len(report.void_serials)} (see report.json void_serials)"
        )
    released = report.serials.get(SerialState.RELEASED, 0)
    if released:
        lines.append(
            f"released reservations: {released} (never reached a signer: nothing to revoke)"
        )
    if report.orphans_removed:
        lines.append(f"token cleanup: {len(report.orphans_removed)} orphaned key objects removed")
        for orphan in report.orphans_removed[:SUMMARY_FAILURES]:
            lines.append(
                f"  removed {orphan['object']} key {orphan['label'] or '(no label)'}: "
                f"{orphan['why']}"
            )
    if report.aborted:
        lines.append(f"aborted: {report.aborted} — run the same command again to resume")
    if report.exit_code:
        lines.append(f"exit code: {report.exit_code}")
    return "\n".join(lines) + "\n"


def write_report(batch_dir: Path, report: Report) -> dict[str, str]:
    """Write report.json and report.txt (synced); returns the SHA-256 of each by name."""
    data = json.dumps(report.to_json(), indent=2, sort_keys=True, default=str).encode() + b"\n"
    text = summary(report).encode()
    write_atomic(batch_dir / REPORT, data, fsync=True)
    write_atomic(batch_dir / REPORT_TEXT, text, fsync=True)
    return {REPORT: hashlib.sha256(data).hexdigest(), REPORT_TEXT: hashlib.sha256(text).hexdigest()}


def report_event(report: Report, files: dict[str, str]) -> dict[str, Any]:
    """The ``report`` audit event: the files' hashes, so the seal covers them, and the
    outcome an auditor reads first."""
    return {
        "files": files,
        "exit_code": report.exit_code,
        "complete": report.complete,
        "aborted": report.aborted,
    }
