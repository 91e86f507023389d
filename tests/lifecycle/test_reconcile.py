"""Reconcile against the emulator: every kind of drift is planted through the service APIs,
found, and ``--fix`` repairs what provline owns and only reports the rest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pipeline.batch.signing import open_station_keys
from pipeline.ca.builders import build_leaf, random_serial
from pipeline.ca.certs import pem
from pipeline.registration.device import DeviceClient
from pipeline.registration.endpoints import ConnectionString, resolve

from ..support import CA, Emu, Hsm, provline
from .support import batch, enrollment, hub_identity, load, register, station_file

pytestmark = pytest.mark.integration


def _hub(e: Emu) -> tuple[httpx.Client, str]:
    cs = ConnectionString.parse(e.info["hub_connection_string"])
    client = httpx.Client(
        base_url=f"https://{cs.host}",
        verify=e.tls(),
        params={"api-version": "2021-04-12"},
        headers={"Authorization": cs.token()},
    )
    return client, cs.host


def _drift(report: dict[str, Any]) -> set[tuple[str, str | None, str]]:
    return {(d["kind"], d.get("registration_id"), d["where"]) for d in report["drift"]}


def test_reconcile_finds_and_fixes_drift(
    hsm_env: Hsm, ca_env: CA, emu: Emu, tmp_path: Path, passphrase: str
) -> None:
    path = station_file(tmp_path, hsm_env, ca_env, emu)
    station = load(path)
    ind = batch(tmp_path, station, "rc", "rc-", 4, "individual")
    grp = batch(tmp_path, station, "rg", "rg-", 3, "group")
    batch(tmp_path, station, "rh", "rh-", 2, "hub")
    env = {**hsm_env.env(), "PROVLINE_TEST_PASSPHRASE": passphrase}
    for bundle in (ind / "rc-0001", ind / "rc-0003", grp / "rg-0001"):
        assert register(station, bundle)[0] == "assigned"
    clean = provline("reconcile", "--station", str(path), "--json", env=env)
    assert json.loads(clean.stdout)["drift"] == []
    for rid in ("rc-0002", "rc-0003", "rg-0002"):
        provline("revoke", "--device", rid, "--station", str(path), env=env)

    # a certificate of provline's CA that no inventory entry issued, enrolled and registered
    keys = open_station_keys(station)
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue = {
        rid: build_leaf(
            rogue_key.public_key(), rid, keys.issuer, serial=random_serial(), validity_days=5
        )
        for rid in ("rogue-01", "rg-rogue")
    }
    with emu.service() as svc:
        # 1. a revoked device's enrollment enabled again
        current = svc.get("/enrollments/rc-0002").json()
        body = {
            "registrationId": "rc-0002",
            "provisioningStatus": "enabled",
            "attestation": {
                "type": "x509",
                "x509": {
                    "clientCertificates": {
                        "primary": {
                            "certificate": (ind / "rc-0002" / "device.cert.pem").read_text()
                        }
                    }
                },
            },
        }
        assert (
            svc.put(
                "/enrollments/rc-0002", json=body, headers={"If-Match": current["etag"]}
            ).status_code
            == 200
        )
        # 2. the disabled enrollment that blocks a revoked group device deleted
        assert svc.delete("/enrollments/rg-0002", headers={"If-Match": "*"}).status_code == 204
        # 3. an enrollment whose certificate no inventory entry issued (names provline's CA)
        rogue_body = {
            "registrationId": "rogue-01",
            "attestation": {
                "type": "x509",
                "x509": {
                    "clientCertificates": {
                        "primary": {"certificate": pem(rogue["rogue-01"]).decode()}
                    }
                },
            },
        }
        assert svc.put("/enrollments/rogue-01", json=rogue_body).status_code == 200
        # 4. provline's enrollment of a live device swapped for another certificate
        other = (emu.dir / "server-ca.pem").read_text()
        current = svc.get("/enrollments/rc-0004").json()
        swapped = {**body, "registrationId": "rc-0004"}
        swapped["attestation"]["x509"]["clientCertificates"]["primary"]["certificate"] = other
        assert (
            svc.put(
                "/enrollments/rc-0004", json=swapped, headers={"If-Match": current["etag"]}
            ).status_code
            == 200
        )
        # 5. provline's enrollment of a live device deleted
        assert svc.delete("/enrollments/rc-0001", headers={"If-Match": "*"}).status_code == 204
    # 6. a revoked device's IoT Hub identity enabled again
    hub, _ = _hub(emu)
    with hub:
        identity = hub.get("/devices/rc-0003").json()
        identity["status"] = "enabled"
        assert (
            hub.put("/devices/rc-0003", json=identity, headers={"If-Match": "*"}).status_code == 200
        )
        # 7. a hub-mode device's identity deleted
        assert hub.delete("/devices/rh-0001", headers={"If-Match": "*"}).status_code == 204
    # 8. a device registered through provline's group with a certificate it did not issue
    rogue_dir = tmp_path / "rogue"
    rogue_dir.mkdir()
    (rogue_dir / "chain.pem").write_bytes(pem(rogue["rg-rogue"]) + ca_env.chain.read_bytes())
    (rogue_dir / "key.pem").write_bytes(
        rogue_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    device = DeviceClient(resolve(station.dps), rogue_dir / "chain.pem", rogue_dir / "key.pem")
    try:
        assert device.register("rg-rogue", deadline=30)["status"] == "assigned"
    finally:
        device.close()

    proc = provline("reconcile", "--station", str(path), "--json", env=env, check=False)
    assert proc.returncode == 5, proc.stderr
    report = json.loads(proc.stdout)
    assert _drift(report) == {
        ("revoked_enabled", "rc-0002", "dps enrollment"),
        ("revoked_enabled", "rg-0002", "dps enrollment"),
        ("revoked_enabled", "rc-0003", "iot hub"),
        ("unknown_certificate", "rogue-01", "dps enrollment"),
        ("unknown_certificate", "rc-0004", "dps enrollment"),
        ("thumbprint_mismatch", "rc-0004", "dps enrollment"),
        ("missing_from_dps", "rc-0001", "dps enrollment"),
        ("missing_from_hub", "rh-0001", "iot hub"),
        ("unknown_certificate", "rg-rogue", "dps registration"),
    }, report["drift"]
    table = provline("reconcile", "--station", str(path), env=env, check=False).stdout
    assert "revoked_enabled" in table and "9 drift, 0 fixed, 9 remaining" in table

    proc = provline("reconcile", "--fix", "--station", str(path), "--json", env=env, check=False)
    assert proc.stdout, proc.stderr
    fixed = json.loads(proc.stdout)
    assert proc.returncode == 5  # the report-only drift remains
    assert {
        (d["kind"], d.get("registration_id")) for d in fixed["drift"] if d.get("fixed") == "fixed"
    } == {
        ("revoked_enabled", "rc-0002"),
        ("revoked_enabled", "rg-0002"),
        ("revoked_enabled", "rc-0003"),
        ("thumbprint_mismatch", "rc-0004"),
        ("missing_from_dps", "rc-0001"),
        ("missing_from_hub", "rh-0001"),
    }
    assert enrollment(emu, "rc-0002")["provisioningStatus"] == "disabled"
    assert enrollment(emu, "rg-0002")["provisioningStatus"] == "disabled"
    assert register(station, grp / "rg-0002")[0] == "disabled"
    assert hub_identity(emu, "rc-0003")["status"] == "disabled"
    assert hub_identity(emu, "rh-0001")["authentication"]["type"] == "certificateAuthority"
    restored = enrollment(emu, "rc-0001")
    assert restored is not None and restored["initialTwin"]["tags"] == {"line": "L"}
    assert register(station, ind / "rc-0001")[0] == "assigned"
    assert register(station, ind / "rc-0004")[0] == "assigned"
    assert enrollment(emu, "rogue-01") is not None  # never deleted: not provline's

    after = json.loads(
        provline("reconcile", "--station", str(path), "--json", env=env, check=False).stdout
    )
    assert _drift(after) == {
        ("unknown_certificate", "rogue-01", "dps enrollment"),
        ("unknown_certificate", "rg-rogue", "dps registration"),
    }
    life = station.output / ".lifecycle"
    verified = json.loads(
        provline("audit", "verify", str(life), "--root", str(ca_env.root), "--json").stdout
    )
    assert verified["operations"] == {"revoke": 3, "reconcile": 1}
