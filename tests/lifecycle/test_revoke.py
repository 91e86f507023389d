"""Revocation against the emulator: one device of an individual batch, one device of a group
batch, a whole batch. CRLs checked with openssl, registrations end ``disabled``, telemetry is
refused, the lifecycle log verifies offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography import x509

from pipeline.layout import AUDIT_LOG, DEVICE_CERT
from pipeline.lifecycle.paths import lifecycle_dir
from pipeline.serials import serial_hex

from ..support import CA, Emu, Hsm, openssl, provline
from .support import (
    batch,
    crl_rejects,
    enrollment,
    hub_identity,
    load,
    log_events,
    register,
    station_file,
    telemetry,
)

pytestmark = pytest.mark.integration


def test_revoke_individual_group_and_batch(
    hsm_env: Hsm, ca_env: CA, emu: Emu, tmp_path: Path, passphrase: str
) -> None:
    path = station_file(tmp_path, hsm_env, ca_env, emu)
    station = load(path)
    ind = batch(tmp_path, station, "ind", "ind-", 4, "individual")
    grp = batch(tmp_path, station, "grp", "grp-", 3, "group")
    env = {**hsm_env.env(), "PROVLINE_TEST_PASSPHRASE": passphrase}

    # both devices work before: registered, assigned, telemetry accepted
    seen = {}
    for bundle in (ind / "ind-0001", grp / "grp-0001", grp / "grp-0002"):
        status, hub, device_id = register(station, bundle)
        assert status == "assigned", status
        assert hub and device_id and telemetry(station, bundle, hub, device_id) == 204
        seen[bundle.name] = (hub, device_id)

    found = json.loads(
        provline("find", "ind-0001", "--station", str(path), "--json", env=env).stdout
    )["certificates"]
    assert [f["certificate"]["status"] for f in found] == ["active"]
    assert found[0]["certificate"]["batch_id"] == "ind"
    assert found[0]["device"]["mode"] == "individual"

    # bad input: one line each, exit 2, nothing written
    life = lifecycle_dir(station)
    for args, why in (
        (["--device", "nobody-01", "--device", "ind-0002"], "nobody-01: not in the station"),
        (["--device", "ind-0001", "--reason", "certificateHold"], "RFC 5280"),
        ([], "name the devices"),
    ):
        proc = provline("revoke", *args, "--station", str(path), env=env, check=False)
        assert proc.returncode == 2 and why in proc.stderr and "Traceback" not in proc.stderr
    assert not (life / AUDIT_LOG).exists()
    assert enrollment(emu, "ind-0002")["provisioningStatus"] == "enabled"

    # one device of the individual batch
    proc = provline(
        "revoke",
        "--device",
        "ind-0001",
        "--reason",
        "keyCompromise",
        "--station",
        str(path),
        "--json",
        env=env,
    )
    result = json.loads(proc.stdout)
    assert result["devices"] == 1 and result["certificates"] == 1 and result["exit_code"] == 0
    assert result["dps"] == {"disabled": 1} and result["hub"] == {"disabled": 1}
    assert enrollment(emu, "ind-0001")["provisioningStatus"] == "disabled"
    assert hub_identity(emu, seen["ind-0001"][1])["status"] == "disabled"
    assert register(station, ind / "ind-0001")[0] == "disabled"
    assert telemetry(station, ind / "ind-0001", *seen["ind-0001"]) == 401
    assert register(station, ind / "ind-0002")[0] == "assigned"  # its neighbours still work

    # one device of the group batch: a disabled individual enrollment blocks it
    provline(
        "revoke",
        "--device",
        "grp-0001",
        "--reason",
        "cessationOfOperation",
        "--station",
        str(path),
        env=env,
    )
    blocking = enrollment(emu, "grp-0001")
    assert blocking is not None and blocking["provisioningStatus"] == "disabled"
    client = blocking["attestation"]["x509"]["clientCertificates"]["primary"]["info"]
    leaf = x509.load_pem_x509_certificate((grp / "grp-0001" / DEVICE_CERT).read_bytes())
    assert client["serialNumber"].upper() == format(leaf.serial_number, "X")
    assert register(station, grp / "grp-0001")[0] == "disabled"
    assert telemetry(station, grp / "grp-0001", *seen["grp-0001"]) == 401
    assert register(station, grp / "grp-0002")[0] == "assigned"
    assert telemetry(station, grp / "grp-0002", *seen["grp-0002"]) == 204

    # a whole batch; the device already revoked is not revoked twice
    proc = provline(
        "revoke",
        "--batch",
        "ind",
        "--reason",
        "affiliationChanged",
        "--station",
        str(path),
        "--json",
        env=env,
    )
    result = json.loads(proc.stdout)
    assert result["devices"] == 3 and result["already"] == ["ind-0001"]
    for n in range(1, 5):
        assert enrollment(emu, f"ind-{n:04d}")["provisioningStatus"] == "disabled"
        assert register(station, ind / f"ind-{n:04d}")[0] == "disabled"

    # the CRL: cumulative, CRL Number and AKI, accepted by openssl
    [crl_file] = (life / "crl").glob("*.crl.pem")
    crl = x509.load_pem_x509_crl(crl_file.read_bytes())
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 3
    issuer = x509.load_pem_x509_certificate(ca_env.intermediate.read_bytes())
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski
    assert crl.next_update_utc is not None and (
        (crl.next_update_utc - crl.last_update_utc).days == 3
    )
    reasons = {
        serial_hex(r.serial_number): r.extensions.get_extension_for_class(
            x509.CRLReason
        ).value.reason.name
        for r in crl
    }
    serial = json.loads((ind / "ind-0001" / "device.json").read_text())["serial"]
    assert reasons[serial] == "key_compromise"
    assert len(reasons) == 5 and sorted(reasons.values()).count("affiliation_changed") == 3
    proc = openssl("crl", "-in", str(crl_file), "-CAfile", str(ca_env.chain), "-noout")
    assert proc.returncode == 0 and b"verify OK" in proc.stdout + proc.stderr
    rejected, out = crl_rejects(ca_env.chain, crl_file, grp / "grp-0001" / DEVICE_CERT)
    assert rejected and "certificate revoked" in out, out
    rejected, out = crl_rejects(ca_env.chain, crl_file, grp / "grp-0002" / DEVICE_CERT)
    assert not rejected and ": OK" in out, out

    # the lifecycle log: three operations, sealed, verifies offline; tampering is caught
    assert len(log_events(life, "revoked")) == 5
    proc = provline("audit", "verify", str(life), "--root", str(ca_env.root), "--json", env=env)
    summary = json.loads(proc.stdout)
    assert summary["operations"] == {"revoke": 3} and summary["revoked_devices"] == 5
    assert summary["crls"][0]["number"] == 3 and summary["crls"][0]["entries"] == 5
    lines = (life / AUDIT_LOG).read_bytes().splitlines(keepends=True)
    tampered = [line.replace(b"keyCompromise", b"superseded") for line in lines]
    (life / AUDIT_LOG).write_bytes(b"".join(tampered))
    proc = provline("audit", "verify", str(life), "--root", str(ca_env.root), env=env, check=False)
    assert proc.returncode == 6 and "hash chain" in proc.stderr
    (life / AUDIT_LOG).write_bytes(b"".join(lines))

    # find answers for a serial and a thumbprint too
    sha1 = json.loads((ind / "ind-0001" / "device.json").read_text())["sha1_thumbprint"]
    for query in (serial, sha1.lower()):
        found = json.loads(provline("find", query, "--station", str(path), "--json").stdout)[
            "certificates"
        ]
        assert [
            (f["certificate"]["registration_id"], f["certificate"]["status"]) for f in found
        ] == [("ind-0001", "revoked")]


def test_lifecycle_changes_name_the_operator_a_station_requires(
    hsm_env: Hsm, ca_env: CA, emu: Emu, tmp_path: Path, passphrase: str
) -> None:
    path = station_file(tmp_path, hsm_env, ca_env, emu)
    batch(tmp_path, load(path), "who", "who-", 2, "individual")
    line = f"  cert: {ca_env.audit_cert}\n"
    text = path.read_text()
    assert line in text
    path.write_text(text.replace(line, line + "  require_operator: true\n"))
    station = load(path)
    env = {k: v for k, v in hsm_env.env().items() if k != "PROVLINE_OPERATOR"}
    env["PROVLINE_TEST_PASSPHRASE"] = passphrase
    life = lifecycle_dir(station)
    for args in (
        ["revoke", "--device", "who-0001"],
        ["renew", "--device", "who-0002"],
        ["reconcile", "--fix"],
        ["ca", "crl"],
    ):
        proc = provline(*args, "--station", str(path), env=env, check=False)
        assert proc.returncode == 2, proc.stderr
        assert "this station requires the operator's name" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (life / AUDIT_LOG).exists()  # refused before the log was opened
    assert enrollment(emu, "who-0001")["provisioningStatus"] == "enabled"

    provline(
        "revoke", "--device", "who-0001", "--station", str(path), "--operator", "Ana Lima", env=env
    )
    [start] = log_events(life, "operation_start")
    assert start["data"]["operator"] == "Ana Lima" and start["data"]["kind"] == "revoke"
    provline("ca", "crl", "--station", str(path), env={**env, "PROVLINE_OPERATOR": "Bo"})
    assert log_events(life, "crl_issued")[-1]["data"]["operator"] == "Bo"
