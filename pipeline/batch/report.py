"""``report.json`` and its human summary ``report.txt``: counts, per-stage time and throughput,
failures with reasons, void serials to revoke, released reservations, token objects the
cleanup removed, why a run stopped, and the exit code (README "Exit codes"): the same code
the process exits with."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config.manifest import Manifest
from ..config.station import Station
from ..errors import UNEXPECTED_EXIT_CODE, CAError, RegistrationError
from ..files import write_atomic
from ..layout import REPORT, REPORT_TEXT
from ..stats import StageStats
from ..vocabulary import DeviceState, RegistrationMode, SerialState
from .journal import Journal

SUMMARY_FAILURES = 20  # failures listed in report.txt; report.json lists up to 1,000


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
    failures: list[dict[str, str]] = field(default_factory=list)
    void_serials: list[dict[str, str]] = field(default_factory=list)
    orphans_removed: list[dict[str, str]] = field(default_factory=list)  # this run's cleanup
    aborted: str | None = None
    complete: bool = False
    exit_code: int = 0

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
) -> Report:
    """``exit_code`` is the code of the error that stopped the run (or failed its sealing);
    without one it follows from the device states."""
    counts = journal.counts()
    if exit_code is None:
        exit_code = _exit_code(counts, aborted)
    done = (
        DeviceState.BUNDLED
        if manifest.registration is RegistrationMode.NONE
        else DeviceState.REGISTERED
    )
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
        failures=journal.failures(),
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
        + (" — resumed" if report.resumed else ""),
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
    for failure in report.failures[:SUMMARY_FAILURES]:
        lines.append(f"{failure['state']}: {failure['registration_id']}: {failure['reason']}")
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


def write_report(batch_dir: Path, report: Report) -> None:
    data = json.dumps(report.to_json(), indent=2, sort_keys=True, default=str).encode() + b"\n"
    write_atomic(batch_dir / REPORT, data, fsync=True)
    write_atomic(batch_dir / REPORT_TEXT, summary(report).encode(), fsync=True)
