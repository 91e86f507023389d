"""The auditor's and the operator's view of a resumed, partly failed batch: ``audit show``
(text, --json, --csv), ``status`` (nested JSON, --list) and the report's lists.

The batch: run 1 (operator alice, --upload-ca) is killed before it registers; a kill while a
bundle was being written is left behind (its serial must be voided); run 2 (operator bob)
resumes, settles it, and DPS stops answering part-way through registration, so most devices
end register_failed (exit 5)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.config.manifest import load_manifest
from pipeline.config.station import load_station
from pipeline.registration.stage import RegisterOptions
from pipeline.run import RunResult, run_batch

from ..support import (
    CA,
    Emu,
    Hsm,
    openssl,
    provline,
    reopen_intent,
    start_fast_emulator,
    start_run,
    write_station,
)

pytestmark = pytest.mark.integration
DEVICES = 30


@dataclass
class Lot:
    batch: Path
    emu: Emu
    void: str
    second: RunResult
    root: Path


def _enrolled(emu: Emu) -> int:
    with emu.service() as svc:
        answer = svc.post(
            "/enrollments/query", json={"query": "SELECT *"}, headers={"x-ms-max-item-count": "100"}
        )
        return len(answer.json()) if answer.status_code == 200 else 0


@pytest.fixture(scope="module")
def lot(hsm_env: Hsm, ca_env: CA, tmp_path_factory: pytest.TempPathFactory) -> Lot:
    base = tmp_path_factory.mktemp("show")
    emu = start_fast_emulator(base)
    station = write_station(
        base / "s.yaml",
        hsm_env,
        ca_env,
        output=base / "out",
        chunk_size=8,
        extra=f"dps:\n  emulator_dir: {emu.dir}\n  operations_per_minute: 6000\n",
    )
    manifest = base / "lot.yaml"
    manifest.write_text(
        "batch_id: lot\nproduct: gauge\nregistration: individual\n"
        f"generator: {{prefix: sh-, digits: 4, count: {DEVICES}}}\n"
    )
    first = start_run(
        manifest,
        station,
        "--upload-ca",
        "--operator",
        "alice",
        env=hsm_env.env(),
        logs=base / "logs",
        crash_at="register.start:1",
    )
    assert first.wait() == -9, first.stderr
    batch = base / "out" / "lot"
    void = reopen_intent(batch, "sh-0003")

    def stop_soon() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _enrolled(emu) < 3:
            time.sleep(0.2)
        emu.stop()

    stopper = threading.Thread(target=stop_soon)
    stopper.start()
    second = run_batch(
        load_manifest(manifest),
        load_station(station),
        operator="bob",
        register=RegisterOptions(
            operations_per_minute=120,
            concurrency=1,
            bulk_size=1,
            device_deadline=2,
            unreachable_deadline=1,
        ),
    )
    stopper.join()
    assert second.exit_code == 5, second.report
    assert second.report.counts.get("register_failed", 0) > 20, second.report.counts
    return Lot(batch, emu, void, second, ca_env.root)


def _show(lot: Lot, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return provline("audit", "show", str(lot.batch), *args, check=check)


def test_audit_show_tells_what_happened(lot: Lot) -> None:
    text = _show(lot, "--root", str(lot.root)).stdout
    lines = text.splitlines()
    assert lines[0].startswith("batch lot (product gauge) on station test-station: audit log ")
    assert "VERIFIED, anchored to " in lines[0]
    runs = [line for line in lines if line.startswith("run ")]
    assert runs[0].startswith("run 1      start ") and "operator alice" in runs[0]
    assert runs[1].startswith("run 2      resume") and "operator bob" in runs[1]
    assert "(no end)" in runs[0]
    assert "ended      killed (no run_end): the next run settled what it left open" in text
    dps = lot.emu.info
    target = f"registration individual at {dps['dps_service_endpoint']}, ID scope {dps['id_scope']}"
    assert sum(target in line for line in lines) == 2
    assert "CA uploaded " in text and "as provline-" in text
    assert "by proof of possession" in text
    assert "settled    recovered: 0  released: 0  retrying_failed: 0  voided: 1" in text
    failures = lot.second.report.failures_total
    assert "ended      exit code 5, not complete, sealed" in text
    assert f"register_failed: {failures}" in text
    shown = [line for line in lines if line.startswith("failed     ")]
    assert len(shown) == 20 and all("(register_failed): " in line for line in shown)
    assert f"... and {failures - 20} more of {failures} (--csv or --json lists every device)" in (
        text
    )
    assert f"void       sh-0003 serial {lot.void} (revoke: provline ca crl)" in text


def test_audit_show_json_and_csv(lot: Lot) -> None:
    document = json.loads(_show(lot, "--root", str(lot.root), "--json").stdout)
    assert document["format"] == "provline.audit-show/1" and document["verified"] is True
    first, second = document["runs"]
    assert (first["kind"], first["operator"], first["ended_by"]) == ("start", "alice", "killed")
    assert [step["event"] for step in first["ca"]] == ["ca_uploaded", "ca_verified"]
    assert first["registration"]["ca"] == "will_upload"
    assert (second["kind"], second["operator"], second["exit_code"]) == ("resume", "bob", 5)
    assert second["settled"]["voided"] == 1 and second["sealed"] == "yes"
    assert document["void_serials"] == [{"registration_id": "sh-0003", "serial": lot.void}]
    assert len(document["device_rows"]) == DEVICES

    rows = list(csv.DictReader(io.StringIO(_show(lot, "--root", str(lot.root), "--csv").stdout)))
    assert len(rows) == DEVICES
    assert list(rows[0]) == [
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
    ]
    states = {r["state"] for r in rows}
    assert states == {"registered", "register_failed"}
    for row in rows:
        info = json.loads((lot.batch / row["registration_id"] / "device.json").read_text())
        assert row["serial"] == info["serial"] and row["serial"] != lot.void
        assert row["sha1_thumbprint"] == info["sha1_thumbprint"]
        assert row["sha256_thumbprint"] == info["sha256_thumbprint"]
        assert row["registration"] == "individual"
        assert row["registration_outcome"] == row["state"]
        if row["state"] == "register_failed":
            assert row["reason"] and row["enrollment"] == ""
        else:
            assert row["reason"] == "" and row["enrollment"] == row["registration_id"]
    printed = openssl(
        "x509",
        "-serial",
        "-noout",
        "-in",
        str(lot.batch / rows[0]["registration_id"] / "device.cert.pem"),
    )
    assert printed.stdout.decode().strip() == f"serial={rows[0]['serial']}"


def test_audit_show_without_a_root_and_of_a_changed_report(lot: Lot, tmp_path: Path) -> None:
    unanchored = _show(lot).stdout.splitlines()[0]
    assert "UNANCHORED: every check passed against the root the log names" in unanchored
    assert "give --root to anchor it" in unanchored
    import shutil

    copy = Path(shutil.copytree(lot.batch, tmp_path / "lot"))
    report = json.loads((copy / "report.json").read_text())
    report["failures"] = []
    (copy / "report.json").write_text(json.dumps(report))
    refused = provline("audit", "show", str(copy), "--root", str(lot.root), check=False)
    assert refused.returncode == 6 and refused.stdout == ""
    assert "report.json: differs from the SHA-256 the log recorded" in refused.stderr


def test_the_report_says_how_many_it_left_out(lot: Lot) -> None:
    report = json.loads((lot.batch / "report.json").read_text())
    total = report["failures_total"]
    assert total == report["counts"]["register_failed"] == len(report["failures"])
    assert report["failures_left_out"] == 0
    assert report["failures_full_list"] == f"provline status {lot.batch} --list rework"
    assert report["operator"] == "bob"
    assert report["registration"]["service_endpoint"] == lot.emu.info["dps_service_endpoint"]
    text = (lot.batch / "report.txt").read_text()
    assert sum(line.startswith("register_failed: sh-") for line in text.splitlines()) == 20
    assert (
        f"... and {total - 20} more of {total} devices that need rework (report.json lists "
        f"{total}; `provline status {lot.batch} --list rework` lists every one)"
    ) in text


def test_status_is_nested_and_lists_every_device_that_needs_rework(lot: Lot) -> None:
    status = json.loads(provline("status", str(lot.batch), "--json").stdout)
    assert status["format"] == "provline.status/1"
    failed = status["devices"]["by_state"]["register_failed"]
    assert status["devices"]["total"] == DEVICES and status["devices"]["rework"] == failed
    assert status["serials"]["void"] == 1 and status["serials"]["by_state"]["void"] == 1
    assert status["seal"]["state"] == "sealed" and status["seal"]["last_event"] == "seal"
    assert status["lock"] == {"held": False}
    assert status["last_run"]["exit_code"] == 5 and status["last_run"]["operator"] == "bob"

    text = provline("status", str(lot.batch), "--list", "rework")
    listed = text.stdout.splitlines()
    assert len(listed) == failed and all(" register_failed " in line for line in listed)
    assert text.stderr.strip() == f"{failed} devices in failed, conflict, register_failed"
    document = json.loads(provline("status", str(lot.batch), "--list", "rework", "--json").stdout)
    assert document["format"] == "provline.status-list/1" and document["count"] == failed
    assert {d["state"] for d in document["devices"]} == {"register_failed"}
    rows = list(
        csv.reader(io.StringIO(provline("status", str(lot.batch), "--list", "all", "--csv").stdout))
    )
    assert rows[0] == ["registration_id", "device_id", "state", "serial", "reason"]
    assert len(rows) == DEVICES + 1
    both = provline("status", str(lot.batch), "--list", "registered,register_failed", "--json")
    assert json.loads(both.stdout)["count"] == DEVICES
    bad = provline("status", str(lot.batch), "--list", "broken", check=False)
    assert bad.returncode == 2 and "unknown state 'broken'" in bad.stderr
    assert provline("status", str(lot.batch), "--csv", check=False).returncode == 2


def test_status_names_the_lock_holder(lot: Lot) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
            str(lot.batch / ".lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        status = json.loads(provline("status", str(lot.batch), "--json").stdout)
        assert status["lock"]["held"] is True and status["lock"]["pid"] == holder.pid
        assert "fcntl" in status["lock"]["command"]
        text = provline("status", str(lot.batch)).stdout
        assert f"lock       held by pid {holder.pid}" in text
    finally:
        holder.kill()
        holder.wait()
