"""Kill -9 in the middle of a 2,000-device revocation and of a 2,000-device renewal, then run
the same command again: nothing lost, nothing done twice, the lifecycle log verifies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from pipeline.config.station import Station
from pipeline.lifecycle.paths import lifecycle_dir
from pipeline.serials import serial_hex

from ..support import CA, PROVLINE, ROOT, Emu, Hsm, provline
from .support import batch, load, log_events, station_file

pytestmark = pytest.mark.integration
DEVICES = 2000


def _enrollments(e: Emu) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    with e.service() as svc:
        token = None
        while True:
            headers = {"x-ms-max-item-count": "1000"}
            if token:
                headers["x-ms-continuation"] = token
            page = svc.post("/enrollments/query", json={"query": "SELECT *"}, headers=headers)
            items += page.json()
            token = page.headers.get("x-ms-continuation")
            if not token:
                return items


def _kill_when(args: list[str], env: dict[str, str], ready: Callable[[], bool]) -> None:
    """Start provline, SIGKILL it once ``ready()`` holds (it must not finish first)."""
    proc = subprocess.Popen(
        [*PROVLINE, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 300
    try:
        while not ready():
            assert proc.poll() is None, f"finished before the kill: {proc.communicate()}"
            assert time.monotonic() < deadline, "never reached the kill point"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def _verify(station: Station, ca: CA, env: dict[str, str]) -> dict[str, Any]:
    proc = provline(
        "audit", "verify", str(lifecycle_dir(station)), "--root", str(ca.root), "--json", env=env
    )
    verified: dict[str, Any] = json.loads(proc.stdout)
    return verified


def test_kill_during_a_2000_device_revocation(
    hsm_env: Hsm, ca_env: CA, emu: Emu, tmp_path: Path
) -> None:
    path = station_file(tmp_path, hsm_env, ca_env, emu, custody="wrapped", pace=6000)
    station = load(path)
    batch(tmp_path, station, "big", "big-", DEVICES, "individual")
    env = hsm_env.env()
    args = ["revoke", "--batch", "big", "--reason", "keyCompromise", "--station", str(path)]

    def some_disabled() -> bool:
        disabled = sum(e["provisioningStatus"] == "disabled" for e in _enrollments(emu))
        return 30 <= disabled < DEVICES

    _kill_when([*args, "--operations-per-minute", "900"], env, some_disabled)
    life = lifecycle_dir(station)
    unsealed = provline("audit", "verify", str(life), "--root", str(ca_env.root), check=False)
    assert unsealed.returncode == 6  # killed: the log is not sealed yet
    other = provline("reconcile", "--fix", "--station", str(path), env=env, check=False)
    assert other.returncode == 2 and "unfinished" in other.stderr  # no side effect either

    proc = provline(*args, "--json", env=env)  # the same command again resumes it
    result = json.loads(proc.stdout)
    assert result["resumed"] and result["exit_code"] == 0 and result["devices"] == DEVICES
    assert all(e["provisioningStatus"] == "disabled" for e in _enrollments(emu))
    for event in ("revoked", "enrollment_disabled", "hub_identity_disabled"):
        per_device = Counter(r["registration_id"] for r in log_events(life, event))
        assert len(per_device) == DEVICES and set(per_device.values()) == {1}, event
    assert len(log_events(life, "resume")) == 1
    [crl_file] = (life / "crl").glob("*.crl.pem")
    assert len(list(x509.load_pem_x509_crl(crl_file.read_bytes()))) == DEVICES
    verified = _verify(station, ca_env, env)
    assert verified["revoked_devices"] == DEVICES and verified["unfinished"] == []


def test_kill_during_a_2000_device_renewal(
    hsm_env: Hsm, ca_env: CA, emu: Emu, tmp_path: Path
) -> None:
    path = station_file(tmp_path, hsm_env, ca_env, emu, custody="wrapped", pace=6000)
    station = load(path)
    batch(tmp_path, station, "ren", "ren-", DEVICES, "individual")
    env = hsm_env.env()
    args = ["renew", "--batch", "ren", "--station", str(path)]
    renewals = lifecycle_dir(station) / "renewals"

    def some_renewed() -> bool:
        bundles = sum(1 for _ in renewals.glob("*/*/device.json"))
        return 300 <= bundles < DEVICES

    _kill_when(args, env, some_renewed)
    proc = provline(*args, "--json", env=env)
    result = json.loads(proc.stdout)
    assert result["resumed"] and result["exit_code"] == 0
    assert result["issued"] == DEVICES and result["enrolled"] == DEVICES
    life = lifecycle_dir(station)
    renewed = {r["registration_id"]: r["data"] for r in log_events(life, "renewed")}
    assert len(renewed) == len(log_events(life, "renewed")) == DEVICES  # once per device
    intents = Counter(r["data"]["serial"] for r in log_events(life, "renewal_intent"))
    voids = {r["data"]["serial"] for r in log_events(life, "renewal_void")}
    assert set(intents.values()) == {1}
    assert set(intents) == {d["serial"] for d in renewed.values()} | voids
    assert len(voids) == result["voided"]
    if voids:  # serials that may have been signed but never delivered are revoked
        [crl_file] = (life / "crl").glob("*.crl.pem")
        listed = {
            serial_hex(r.serial_number) for r in x509.load_pem_x509_crl(crl_file.read_bytes())
        }
        assert voids <= listed
    enrolled = {e["registrationId"]: e for e in _enrollments(emu)}
    for rid, data in renewed.items():
        slots = enrolled[rid]["attestation"]["x509"]["clientCertificates"]
        assert slots["secondary"]["info"]["sha256Thumbprint"] == data["sha256_thumbprint"]
        device = json.loads((Path(result["directory"]) / rid / "device.json").read_text())
        assert device["serial"] == data["serial"]
    verified = _verify(station, ca_env, env)
    assert verified["renewals"] == {"issued": DEVICES, "void": len(voids)}
    assert verified["files_checked"] == DEVICES * 4
