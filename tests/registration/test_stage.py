"""The registration stage against the emulator (real HTTPS on loopback)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.config.manifest import load_manifest
from pipeline.config.station import load_station
from pipeline.errors import RegistrationRefused
from pipeline.registration.stage import RegisterOptions
from pipeline.run import run_batch

from ..support import CA, Emu, Hsm, provline, start_emulator, write_station

pytestmark = pytest.mark.integration


def _station(tmp: Path, h: Hsm, c: CA, e: Emu, custody: str = "wrapped") -> Path:
    return write_station(
        tmp / "s.yaml",
        h,
        c,
        custody=custody,
        output=tmp / "out",
        extra=f"dps:\n  emulator_dir: {e.dir}\n  operations_per_minute: 6000\n",
    )


def _manifest(tmp: Path, batch: str, prefix: str, count: int, mode: str) -> Path:
    path = tmp / f"{batch}.yaml"
    path.write_text(
        f"batch_id: {batch}\nregistration: {mode}\n"
        f"generator: {{prefix: {prefix}, digits: 4, count: {count}, "
        "tags: {line: B}}\n"
    )
    return path


def _enrollments(e: Emu) -> list[dict[str, Any]]:
    with e.service() as svc:
        items, token = [], None
        while True:
            headers = {"x-ms-max-item-count": "100"}
            if token:
                headers["x-ms-continuation"] = token
            page = svc.post("/enrollments/query", json={"query": "SELECT *"}, headers=headers)
            items += page.json()
            token = page.headers.get("x-ms-continuation")
            if not token:
                return items


def _thumbprint(batch: Path, rid: str) -> str:
    return json.loads((batch / rid / "device.json").read_text())["sha256_thumbprint"]


def test_individual_enrols_every_device_exactly_once(
    hsm_env: Hsm, ca_env: CA, emu: Emu, tmp_path: Path
) -> None:
    station = load_station(_station(tmp_path, hsm_env, ca_env, emu))
    manifest = load_manifest(_manifest(tmp_path, "ind", "ind-", 45, "individual"))
    result = run_batch(manifest, station, register=RegisterOptions(upload_ca=True))
    assert result.exit_code == 0, result.report
    assert result.report.counts == {"registered": 45}
    enrolled = {e["registrationId"]: e for e in _enrollments(emu)}
    assert sorted(enrolled) == [f"ind-{n:04d}" for n in range(1, 46)]
    for rid, enrollment in enrolled.items():
        info = enrollment["attestation"]["x509"]["clientCertificates"]["primary"]["info"]
        assert info["sha256Thumbprint"] == _thumbprint(result.batch_dir, rid)
        assert enrollment["initialTwin"]["tags"] == {"line": "B"}
    assert result.report.stages["register"].calls >= 5  # 5 bulk calls of <= 10
    again = run_batch(manifest, station)
    assert again.report.stages["register"].to_json() == {"seconds": 0.0, "devices": 0}
    assert len(_enrollments(emu)) == 45
    assert (
        provline("audit", "verify", str(result.batch_dir), "--root", str(ca_env.root)).returncode
        == 0
    )


def test_group_mode_makes_one_group(hsm_env: Hsm, ca_env: CA, emu: Emu, tmp_path: Path) -> None:
    station = load_station(_station(tmp_path, hsm_env, ca_env, emu))
    manifest = load_manifest(_manifest(tmp_path, "grp", "grp-", 30, "group"))
    # DPS trusts a group's devices only through a CA verified by proof of possession
    result = run_batch(manifest, station, register=RegisterOptions(upload_ca=True))
    assert result.exit_code == 0 and result.report.counts == {"registered": 30}
    with emu.service() as svc:
        groups = svc.post("/enrollmentGroups/query", json={"query": "SELECT *"}).json()
    assert len(groups) == 1 and groups[0]["provisioningStatus"] == "enabled"
    signing = groups[0]["attestation"]["x509"]["signingCertificates"]["primary"]["info"]
    assert signing["subjectName"] == "CN=Test Issuing CA, O=provline"
    assert _enrollments(emu) == []
    second = run_batch(load_manifest(_manifest(tmp_path, "grp2", "grq-", 5, "group")), station)
    assert second.exit_code == 0
    with emu.service() as svc:
        assert len(svc.post("/enrollmentGroups/query", json={"query": "SELECT *"}).json()) == 1


def test_hub_mode_makes_identities(
    hsm_env: Hsm, ca_env: CA, emu: Emu, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    station = load_station(_station(tmp_path, hsm_env, ca_env, emu))
    manifest = load_manifest(_manifest(tmp_path, "hub", "hub-", 12, "hub"))
    result = run_batch(manifest, station)
    assert result.exit_code == 0 and result.report.counts == {"registered": 12}
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", emu.info["tls_ca_file"])
    from azure.iot.hub import IoTHubRegistryManager

    manager = IoTHubRegistryManager.from_connection_string(emu.info["hub_connection_string"])
    for n in (1, 12):
        device = manager.get_device(f"hub-{n:04d}")
        assert device.authentication.type == "certificateAuthority"


def test_faults_and_a_tight_quota_still_register_everything_once(
    hsm_env: Hsm, ca_env: CA, emu: Emu, tmp_path: Path
) -> None:
    (emu.dir / "faults.json").write_text(json.dumps({"error_rate": 0.25, "drop_rate": 0.1}))
    station = load_station(_station(tmp_path, hsm_env, ca_env, emu))
    # 120 devices: about 20 calls (pre-issue check, CA upload and proof, 12 bulk), so that
    # none meeting a fault is about a 1-in-1,500 chance
    manifest = load_manifest(_manifest(tmp_path, "flaky", "fl-", 120, "individual"))
    options = RegisterOptions(upload_ca=True, operations_per_minute=300, concurrency=4)
    result = run_batch(manifest, station, register=options)
    (emu.dir / "faults.json").write_text("{}")
    assert result.report.counts == {"registered": 120}, result.report.failures
    # the faults hit the pre-issue check and CA proof (plan) and registration alike
    stages = result.report.stages
    assert (stages["plan"].retries or 0) + (stages["register"].retries or 0) > 0
    enrolled = _enrollments(emu)
    assert len(enrolled) == len({e["registrationId"] for e in enrolled}) == 120


def test_emulator_stopped_mid_stage_then_resumed(
    hsm_env: Hsm, ca_env: CA, emu: Emu, tmp_path: Path
) -> None:
    station = load_station(_station(tmp_path, hsm_env, ca_env, emu))
    manifest = load_manifest(_manifest(tmp_path, "outage", "out-", 80, "individual"))

    def stop_soon() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(_enrollments(emu)) < 20:
            time.sleep(0.05)
        emu.stop()

    stopper = threading.Thread(target=stop_soon)
    stopper.start()
    slow = RegisterOptions(
        upload_ca=True, operations_per_minute=60, concurrency=2, device_deadline=3
    )
    first = run_batch(manifest, station, register=slow)
    stopper.join()
    assert first.exit_code == 5
    counts = first.report.counts
    assert counts.get("registered", 0) >= 20 and counts.get("register_failed", 0) > 0
    restarted = start_emulator(emu.dir)
    try:
        second = run_batch(manifest, station, register=RegisterOptions(upload_ca=True))
        assert second.exit_code == 0 and second.report.counts == {"registered": 80}
        enrolled = _enrollments(restarted)
        assert sorted(e["registrationId"] for e in enrolled) == [
            f"out-{n:04d}" for n in range(1, 81)
        ]
    finally:
        restarted.stop()


def test_conflicting_enrollment_is_reported_not_overwritten(
    hsm_env: Hsm, ca_env: CA, emu: Emu, tmp_path: Path
) -> None:
    other = (emu.dir / "server-ca.pem").read_text()  # any other certificate
    with emu.service() as svc:
        put = svc.put(
            "/enrollments/cf-0002",
            json={
                "registrationId": "cf-0002",
                "attestation": {
                    "type": "x509",
                    "x509": {"clientCertificates": {"primary": {"certificate": other}}},
                },
            },
        )
        assert put.status_code == 200
        before = put.json()["etag"]
    station = load_station(_station(tmp_path, hsm_env, ca_env, emu))
    manifest = load_manifest(_manifest(tmp_path, "conflict", "cf-", 3, "individual"))
    # refused before anything is signed: the batch is never created
    with pytest.raises(RegistrationRefused) as info:
        run_batch(manifest, station, register=RegisterOptions(upload_ca=True))
    assert info.value.exit_code == 51
    assert "cf-0002: already enrolled in DPS" in info.value.line()
    assert not (tmp_path / "out").exists()
    with emu.service() as svc:
        assert svc.get("/enrollments/cf-0002").json()["etag"] == before
    assert len(_enrollments(emu)) == 1
    replaced = run_batch(manifest, station, register=RegisterOptions(replace=True, upload_ca=True))
    assert replaced.exit_code == 0 and replaced.report.counts == {"registered": 3}


def test_preflight_refuses_chains_dps_would_reject(
    hsm_env: Hsm, ca_env: CA, emu: Emu, tmp_path: Path
) -> None:
    station_path = _station(tmp_path, hsm_env, ca_env, emu)
    manifest = _manifest(tmp_path, "pre", "pre-", 3, "individual")
    # the CA was never verified by proof of possession on this DPS: devices would get 401002,
    # so the run refuses before it signs anything
    with pytest.raises(RegistrationRefused) as info:
        run_batch(load_manifest(manifest), load_station(station_path))
    assert "proof of possession" in info.value.line()
    assert _enrollments(emu) == []
    assert not (tmp_path / "out").exists()
    proc = provline(
        "run", str(manifest), "--station", str(station_path), env=hsm_env.env(), check=False
    )
    assert proc.returncode == 51, proc.stderr
    assert "is verified by proof of possession" in proc.stderr and "--upload-ca" in proc.stderr
    assert not (tmp_path / "out").exists()
    proc = provline(
        "run",
        str(manifest),
        "--station",
        str(station_path),
        "--upload-ca",
        env=hsm_env.env(),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(_enrollments(emu)) == 3


def test_device_check_registers_and_sends_telemetry(
    hsm_env: Hsm, ca_env: CA, emu: Emu, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROVLINE_TEST_PASSPHRASE", "device-check-passphrase")
    station_path = _station(tmp_path, hsm_env, ca_env, emu, custody="pkcs8")
    manifest = _manifest(tmp_path, "smoke", "sm-", 8, "group")
    env = {**hsm_env.env(), "PROVLINE_TEST_PASSPHRASE": "device-check-passphrase"}
    proc = provline(
        "run", str(manifest), "--station", str(station_path), "--upload-ca", "--smoke", "3", env=env
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("sm-")]
    assert [line.split(":")[0] for line in lines] == ["sm-0001", "sm-0005", "sm-0008"]
    assert all(
        ": assigned hub 127.0.0.1:" in line and "telemetry sent" in line for line in lines
    ), proc.stdout
    check = provline(
        "verify-device",
        str(tmp_path / "out" / "smoke"),
        "--station",
        str(station_path),
        "--device",
        "sm-0002",
        "--json",
        env=env,
    )
    document = json.loads(check.stdout)
    assert document["format"] == "provline.verify-device/1"
    [result] = document["devices"]
    assert result["status"] == "assigned" and result["device_id"] == "sm-0002"
    with emu.service() as svc:
        state = svc.get("/registrations/sm-0002").json()
    assert state["status"] == "assigned" and state["x509"]["enrollmentGroupId"].startswith(
        "provline-"
    )


def test_plan_diffs_manifest_journal_and_dps(
    hsm_env: Hsm, ca_env: CA, emu: Emu, tmp_path: Path
) -> None:
    station_path = _station(tmp_path, hsm_env, ca_env, emu)
    manifest = _manifest(tmp_path, "planned", "pl-", 6, "individual")
    args = ("plan", str(manifest), "--station", str(station_path), "--json")
    before = json.loads(provline(*args, "--upload-ca", env=hsm_env.env()).stdout)
    assert before["format"] == "provline.plan/1" and before["exit_code"] == 0
    assert before["journal"] == {"new": 6} and before["would_issue"] == 6
    assert before["would_register"] == 6
    assert before["target"]["lookups"]["missing"] == 6
    assert before["target"]["ca"] == "will_upload"
    assert before["target"]["id_scope"] == emu.info["id_scope"]
    assert not (tmp_path / "out").exists()  # no side effect
    run_batch(
        load_manifest(manifest),
        load_station(station_path),
        register=RegisterOptions(upload_ca=True),
    )
    with emu.service() as svc:  # someone else enrols pl-0003 with another certificate
        svc.delete("/enrollments/pl-0003", headers={"If-Match": "*"})
        svc.put(
            "/enrollments/pl-0003",
            json={
                "registrationId": "pl-0003",
                "attestation": {
                    "type": "x509",
                    "x509": {
                        "clientCertificates": {
                            "primary": {"certificate": (emu.dir / "server-ca.pem").read_text()}
                        }
                    },
                },
            },
        )
    # the batch is registered: run registers nothing, so plan asks DPS nothing (drift in
    # registered devices is reconcile's business)
    after = json.loads(provline(*args, env=hsm_env.env()).stdout)
    assert after["journal"] == {"registered": 6} and after["would_issue"] == 0
    assert after["would_register"] == 0 and after["already_registered"] == 6
    assert after["target"] is None and after["exit_code"] == 0
    # a new lot reusing two of those registration IDs would conflict
    reuse = tmp_path / "reuse.yaml"
    reuse.write_text(
        "batch_id: reuse\nregistration: individual\n"
        "devices: [{registration_id: pl-0003}, {registration_id: pl-0004}, "
        "{registration_id: pl-0009}]\n"
    )
    refused = provline(
        "plan", str(reuse), "--station", str(station_path), "--json", env=hsm_env.env(), check=False
    )
    assert refused.returncode == 51, refused.stderr
    plan = json.loads(refused.stdout)
    assert plan["target"]["lookups"] == {
        "missing": 1,
        "same_certificate": 0,
        "other_certificate": 0,
        "not_issued_yet": 2,
    }
    assert [c["registration_id"] for c in plan["target"]["conflicts"]["listed"]] == [
        "pl-0003",
        "pl-0004",
    ]


def test_device_check_of_retained_keys_signs_inside_the_hsm(
    hsm_env: Hsm, ca_env: CA, emu: Emu, tmp_path: Path
) -> None:
    station_path = _station(tmp_path, hsm_env, ca_env, emu, custody="retain")
    manifest = _manifest(tmp_path, "retained", "rtk-", 3, "group")
    provline("run", str(manifest), "--station", str(station_path), "--upload-ca", env=hsm_env.env())
    check = provline(
        "verify-device",
        str(tmp_path / "out" / "retained"),
        "--station",
        str(station_path),
        "--count",
        "2",
        "--json",
        env=hsm_env.env(),
    )
    results = json.loads(check.stdout)["devices"]
    assert [r["registration_id"] for r in results] == ["rtk-0001", "rtk-0003"]
    assert all(r["status"] == "assigned" and r["telemetry"] == "sent" for r in results)
    assert hsm_env.pin_file.read_text().strip() not in check.stdout + check.stderr
