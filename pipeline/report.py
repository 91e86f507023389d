"""``report.json`` and its human summary ``report.txt``: counts, per-stage time and throughput,
failures with reasons, void serials to revoke, and the exit code (design.md "Errors")."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from .errors import CAError, RegistrationError
from .files import write_atomic
from .journal import Journal
from .manifest import Manifest
from .station import Station

REPORT_NAME = "report.json"
SUMMARY_NAME = "report.txt"


def build_report(manifest: Manifest, station: Station, journal: Journal,
                 stages: dict[str, dict[str, Any]], *, resumed: bool,
                 this_run: dict[str, int], aborted: str | None) -> dict[str, Any]:
    counts = journal.counts()
    failures = journal.failures()
    if aborted:
        exit_code = 1
    elif counts.get("failed"):
        exit_code = CAError.exit_code
    elif counts.get("conflict") or counts.get("register_failed"):
        exit_code = RegistrationError.exit_code
    else:
        exit_code = 0
    return {
        "batch_id": manifest.batch_id,
        "product": manifest.product,
        "manifest": str(manifest.path),
        "manifest_sha256": manifest.sha256,
        "station": station.name,
        "custody": station.custody.policy.value,
        "key_profile": manifest.key_profile.value,
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "resumed": resumed,
        "devices": journal.total(),
        "counts": counts,
        "serials": journal.serial_counts(),
        "this_run": this_run,
        "stages": stages,
        "failures": failures,
        "void_serials": journal.voids(),
        "aborted": aborted,
        "complete": set(counts) <= ({"registered"} if manifest.registration.value != "none"
                                    else {"bundled"}),
        "exit_code": exit_code,
    }


def summary(report: dict[str, Any]) -> str:
    issue = report["stages"].get("issue", {})
    lines = [
        f"batch {report['batch_id']} on station {report['station']} "
        f"({report['custody']} custody, {report['key_profile']})"
        + (" — resumed" if report["resumed"] else ""),
        f"devices: {report['devices']}  "
        + "  ".join(f"{k}: {v}" for k, v in sorted(report["counts"].items())),
        "serials: " + "  ".join(f"{k}: {v}" for k, v in sorted(report["serials"].items())),
    ]
    if issue.get("devices"):
        lines.append(f"this run: {issue['devices']} devices in {issue['seconds']:.1f}s "
                     f"({issue['devices_per_s']:.0f} devices/s, {issue['workers']} workers)")
    register = report["stages"].get("register", {})
    if register.get("devices"):
        lines.append(f"registered: {register['devices']} devices in {register['seconds']:.1f}s "
                     f"({register['calls']} calls, {register['retries']} retries)")
    seal = report["stages"].get("seal", {})
    lines.append("audit log: " + ("sealed" if seal.get("sealed") else "NOT sealed"))
    for failure in report["failures"][:20]:
        lines.append(f"{failure['state']}: {failure['registration_id']}: {failure['reason']}")
    if report["void_serials"]:
        lines.append(f"void serials to revoke: {len(report['void_serials'])} "
                     "(see report.json void_serials)")
    if report["aborted"]:
        lines.append(f"aborted: {report['aborted']} — run the same command again to resume")
    return "\n".join(lines) + "\n"


def write_report(batch_dir: Path, report: dict[str, Any]) -> None:
    data = json.dumps(report, indent=2, sort_keys=True, default=str).encode() + b"\n"
    write_atomic(batch_dir / REPORT_NAME, data, fsync=True)
    write_atomic(batch_dir / SUMMARY_NAME, summary(report).encode(), fsync=True)
