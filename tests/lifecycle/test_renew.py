"""Renewal against the emulator: a device of an individual batch and one of a group batch get
new certificates (same CN, new serial, new key), register with them while the old ones still
work, and ``--promote`` retires the old ones (CRL, DPS, IoT Hub)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography import x509

from pipeline.layout import DEVICE_CERT, PKCS8_KEY
from pipeline.lifecycle.paths import lifecycle_dir

from ..support import CA, Emu, Hsm, provline
from .support import (
    batch,
    crl_rejects,
    enrollment,
    hub_identity,
    load,
    register,
    station_file,
    telemetry,
)

pytestmark = pytest.mark.integration


def _leaf(bundle: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((bundle / DEVICE_CERT).read_bytes())


def test_renew_and_promote_individual_and_group(
    hsm_env: Hsm, ca_env: CA, emu: Emu, tmp_path: Path, passphrase: str
) -> None:
    path = station_file(tmp_path, hsm_env, ca_env, emu)
    station = load(path)
    ind = batch(tmp_path, station, "rind", "rind-", 2, "individual")
    grp = batch(tmp_path, station, "rgrp", "rgrp-", 2, "group")
    env = {**hsm_env.env(), "PROVLINE_TEST_PASSPHRASE": passphrase}
    old = {b.name: b for b in (ind / "rind-0001", grp / "rgrp-0001")}
    for bundle in old.values():
        assert register(station, bundle)[0] == "assigned"

    expiring = json.loads(
        provline("expiring", "--within", "400d", "--station", str(path), "--json", env=env).stdout
    )["certificates"]
    assert {row["registration_id"] for row in expiring} == {
        "rind-0001",
        "rind-0002",
        "rgrp-0001",
        "rgrp-0002",
    }
    assert provline("expiring", "--within", "30d", "--station", str(path), env=env).stdout.endswith(
        "0 certificates expire within 30d\n"
    )

    proc = provline(
        "renew",
        "--device",
        "rind-0001",
        "--device",
        "rgrp-0001",
        "--station",
        str(path),
        "--json",
        env=env,
    )
    result = json.loads(proc.stdout)
    assert result["issued"] == 2 and result["enrolled"] == 1 and result["exit_code"] == 0
    renewed = Path(result["directory"])
    new = {rid: renewed / rid for rid in old}
    for rid, bundle in new.items():
        before, after = _leaf(old[rid]), _leaf(bundle)
        assert after.subject == before.subject and after.serial_number != before.serial_number
        assert after.public_key() != before.public_key()
        assert (bundle / PKCS8_KEY).stat().st_mode & 0o777 == 0o600
    slots = enrollment(emu, "rind-0001")["attestation"]["x509"]["clientCertificates"]
    assert set(slots) == {"primary", "secondary"}
    assert slots["secondary"]["info"]["serialNumber"].upper() == format(
        _leaf(new["rind-0001"]).serial_number, "X"
    )
    staged = json.loads(
        provline("expiring", "--within", "400d", "--station", str(path), "--json", env=env).stdout
    )["certificates"]
    assert {r["registration_id"] for r in staged if r["renewal_staged"]} == set(old)

    # the new certificate works; so does the old one, until promoted
    for rid in old:
        status, hub, device_id = register(station, new[rid])
        assert status == "assigned", (rid, status)
        assert hub and device_id and telemetry(station, new[rid], hub, device_id) == 204
        assert telemetry(station, old[rid], hub, device_id) == 204
        status, hub, device_id = register(station, old[rid])
        assert status == "assigned", (rid, status)
    identity = hub_identity(emu, "rind-0001")
    assert (
        identity is not None and identity["authentication"]["x509Thumbprint"]["secondaryThumbprint"]
    )
    # renewing again before promoting is refused, with no side effect
    proc = provline("renew", "--device", "rind-0001", "--station", str(path), env=env, check=False)
    assert proc.returncode == 2 and "promote it first" in proc.stderr

    proc = provline(
        "renew",
        "--promote",
        "--device",
        "rind-0001",
        "--device",
        "rgrp-0001",
        "--station",
        str(path),
        "--json",
        env=env,
    )
    result = json.loads(proc.stdout)
    assert result["enrolled"] == 2 and result["exit_code"] == 0
    slots = enrollment(emu, "rind-0001")["attestation"]["x509"]["clientCertificates"]
    assert list(slots) == ["primary"]
    assert slots["primary"]["info"]["serialNumber"].upper() == format(
        _leaf(new["rind-0001"]).serial_number, "X"
    )
    identity = hub_identity(emu, "rind-0001")
    assert identity is not None
    prints = identity["authentication"]["x509Thumbprint"]
    sha1 = json.loads((new["rind-0001"] / "device.json").read_text())["sha1_thumbprint"]
    assert prints["primaryThumbprint"] == sha1 and prints.get("secondaryThumbprint") is None
    status, hub, device_id = register(station, new["rind-0001"])
    assert status == "assigned" and telemetry(station, new["rind-0001"], hub, device_id) == 204
    assert register(station, old["rind-0001"])[0] == "http 401"  # DPS: no longer enrolled
    assert telemetry(station, old["rind-0001"], hub, device_id) == 401  # hub: no longer known

    # both old certificates are retired: on the CRL as superseded, the new ones are not
    [crl_file] = (lifecycle_dir(station) / "crl").glob("*.crl.pem")
    crl = x509.load_pem_x509_crl(crl_file.read_bytes())
    for rid in old:
        entry = crl.get_revoked_certificate_by_serial_number(_leaf(old[rid]).serial_number)
        assert entry is not None
        reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        assert reason is x509.ReasonFlags.superseded
        assert crl_rejects(ca_env.chain, crl_file, old[rid] / DEVICE_CERT)[0]
        assert not crl_rejects(ca_env.chain, crl_file, new[rid] / DEVICE_CERT)[0]
    found = json.loads(provline("find", "rgrp-0001", "--station", str(path), "--json").stdout)[
        "certificates"
    ]
    assert sorted(f["certificate"]["status"] for f in found) == ["active", "retired"]
    proc = provline(
        "audit",
        "verify",
        str(lifecycle_dir(station)),
        "--root",
        str(ca_env.root),
        "--json",
        env=env,
    )
    summary = json.loads(proc.stdout)
    assert summary["renewals"] == {"issued": 2, "void": 0} and summary["promoted"] == 2
    assert summary["files_checked"] == 2 * 4  # leaf, full chain, key, device.json


def test_rebuild_makes_the_same_inventory_from_signed_material(
    hsm_env: Hsm, ca_env: CA, emu: Emu, tmp_path: Path, passphrase: str
) -> None:
    path = station_file(tmp_path, hsm_env, ca_env, emu)
    station = load(path)
    ind = batch(tmp_path, station, "rb", "rb-", 3, "individual")
    batch(tmp_path, station, "rbg", "rbg-", 2, "group")
    env = {**hsm_env.env(), "PROVLINE_TEST_PASSPHRASE": passphrase}
    provline(
        "revoke",
        "--device",
        "rb-0001",
        "--reason",
        "keyCompromise",
        "--station",
        str(path),
        env=env,
    )
    provline(
        "renew", "--device", "rb-0002", "--device", "rbg-0001", "--station", str(path), env=env
    )
    provline("renew", "--promote", "--device", "rbg-0001", "--station", str(path), env=env)

    def state() -> tuple[dict[str, object], dict[str, object]]:
        shown = json.loads(
            provline("inventory", "show", "--station", str(path), "--json", env=env).stdout
        )
        found = {
            rid: json.loads(provline("find", rid, "--station", str(path), "--json").stdout)[
                "certificates"
            ]
            for rid in ("rb-0001", "rb-0002", "rb-0003", "rbg-0001", "rbg-0002")
        }
        return shown, found

    before = state()
    inventory = lifecycle_dir(station) / "inventory.sqlite"
    for name in ("inventory.sqlite", "inventory.sqlite-wal", "inventory.sqlite-shm"):
        (lifecycle_dir(station) / name).unlink(missing_ok=True)
    rebuilt = json.loads(
        provline("inventory", "rebuild", "--station", str(path), "--json", env=env).stdout
    )
    assert sorted(rebuilt["verified_batches"]) == ["rb", "rbg"]
    assert rebuilt["lifecycle_events_replayed"] > 0
    assert state() == before
    # a changed bundle file: nothing verifies, nothing is replaced
    stamp = inventory.stat().st_mtime_ns
    (ind / "rb-0003" / DEVICE_CERT).write_bytes((ind / "rb-0002" / DEVICE_CERT).read_bytes())
    proc = provline("inventory", "rebuild", "--station", str(path), env=env, check=False)
    assert proc.returncode == 6 and "differs from the hash the log recorded" in proc.stderr
    assert inventory.stat().st_mtime_ns == stamp and state() == before


def test_renew_of_a_retained_key_signs_with_a_new_token_key(
    hsm_env: Hsm, ca_env: CA, emu: Emu, tmp_path: Path
) -> None:
    path = station_file(tmp_path, hsm_env, ca_env, emu, custody="retain")
    station = load(path)
    grp = batch(tmp_path, station, "keep", "keep-", 2, "group")
    result = json.loads(
        provline(
            "renew", "--batch", "keep", "--station", str(path), "--json", env=hsm_env.env()
        ).stdout
    )
    assert result["issued"] == 2 and result["enrolled"] == 0
    for rid in ("keep-0001", "keep-0002"):
        info = json.loads((Path(result["directory"]) / rid / "device.json").read_text())
        assert info["key"]["custody"] == "retain"
        assert f"object={rid}%40{result['operation']}" in info["key"]["uri"]
        old = json.loads((grp / rid / "device.json").read_text())["key"]["uri"]
        assert old != info["key"]["uri"]
