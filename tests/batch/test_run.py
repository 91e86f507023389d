"""The batch run end to end: real SoftHSM2, real worker processes, real files, openssl."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sqlite3
import stat
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pkcs11 import Attribute, KeyType, MechanismFlag, ObjectClass

from pipeline import hsm
from pipeline.config.manifest import load_manifest
from pipeline.config.station import load_station
from pipeline.errors import InputError, ValidationFailed
from pipeline.keyprofile import KeyProfile
from pipeline.run import run_batch
from pipeline.secret import SecretRef
from pipeline.serials import serial_hex

from ..support import (
    CA,
    MODULE,
    PROVLINE,
    ROOT,
    Hsm,
    audit_events,
    openssl,
    provline,
    write_station,
)

pytestmark = pytest.mark.integration


def _token(h: Hsm) -> hsm.Token:
    return hsm.open_token(MODULE, h.token, SecretRef("file", str(h.pin_file)), str(h.conf))


def _manifest(
    path: Path, batch_id: str, prefix: str, count: int, profile: str = "ec-p256", validity: int = 90
) -> Path:
    path.write_text(
        f"batch_id: {batch_id}\nkey_profile: {profile}\nvalidity_days: {validity}\n"
        f"generator: {{prefix: {prefix}, digits: 5, count: {count}, "
        f"tags: {{line: A}}}}\n"
    )
    return path


@pytest.fixture(scope="module")
def extractable_kek(hsm_env: Hsm, ca_env: CA) -> bytes:
    """Test-only transport key whose value the test may read, to unwrap blobs on this side."""
    token = _token(hsm_env)
    key = token.session.generate_key(
        KeyType.AES,
        256,
        label="test-kek",
        id=b"test-kek",
        store=True,
        capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP,
        template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
    )
    return bytes(key[Attribute.VALUE])


def _check_leaf_profile(
    cert: x509.Certificate, rid: str, issuer: x509.Certificate, validity_days: int
) -> None:
    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, rid)])
    assert cert.issuer == issuer.subject
    assert 0 < cert.serial_number < 2**159 and cert.serial_number.bit_length() <= 159
    now = dt.datetime.now(dt.UTC)
    assert dt.timedelta(minutes=4) < now - cert.not_valid_before_utc < dt.timedelta(minutes=10)
    span = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert span == dt.timedelta(days=validity_days, minutes=5)
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not (ku.value.key_cert_sign or ku.value.crl_sign or ku.value.key_encipherment)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(eku.value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())  # type: ignore
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert (
        aki.key_identifier
        == issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    )
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    cert.verify_directly_issued_by(issuer)


def _verify_all(batch: Path, c: CA, rids: list[str]) -> None:
    """One openssl call over every device's full chain (openssl reads each file's leaf)."""
    files = [str(batch / rid / "full-chain.cert.pem") for rid in rids]
    proc = openssl(
        "verify",
        "-CAfile",
        str(c.root),
        "-untrusted",
        str(c.intermediate),
        "-purpose",
        "sslclient",
        *files,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout.decode().count(": OK") == len(rids)
    for rid in rids[:3]:
        chain = x509.load_pem_x509_certificates((batch / rid / "full-chain.cert.pem").read_bytes())
        assert [ca_cert.subject for ca_cert in chain[1:]] == [
            x509.load_pem_x509_certificate(c.intermediate.read_bytes()).subject,
            x509.load_pem_x509_certificate(c.root.read_bytes()).subject,
        ]


def _device_json(batch: Path, rid: str) -> dict:
    return json.loads((batch / rid / "device.json").read_text())


def _bundle_files_match_device_json(batch: Path, rid: str) -> dict:
    import hashlib

    info = json.loads((batch / rid / "device.json").read_text())
    for name, digest in info["files"].items():
        assert hashlib.sha256((batch / rid / name).read_bytes()).hexdigest() == digest
    return info


def test_wrapped_batch_of_200(
    hsm_env: Hsm, ca_env: CA, extractable_kek: bytes, tmp_path: Path
) -> None:
    station = load_station(
        write_station(tmp_path / "s.yaml", hsm_env, ca_env, output=tmp_path / "out", chunk_size=32)
    )
    # point the station at the test-only extractable transport key
    text = (tmp_path / "s.yaml").read_text().replace("object=transport", "object=test-kek")
    (tmp_path / "s.yaml").write_text(text)
    station = load_station(tmp_path / "s.yaml")
    manifest = load_manifest(_manifest(tmp_path / "m.yaml", "wrapped-200", "wr-", 200))
    result = run_batch(manifest, station)
    assert result.exit_code == 0
    assert result.report.counts == {"bundled": 200}
    assert result.report.serials == {"issued": 200}
    batch = result.batch_dir
    rids = [f"wr-{n:05d}" for n in range(1, 201)]
    _verify_all(batch, ca_env, rids)
    issuer = x509.load_pem_x509_certificate(ca_env.intermediate.read_bytes())
    serials = set()
    for rid in rids:
        info = _bundle_files_match_device_json(batch, rid)
        cert = x509.load_pem_x509_certificate((batch / rid / "device.cert.pem").read_bytes())
        serials.add(cert.serial_number)
        assert info["serial"] == serial_hex(cert.serial_number) and len(info["serial"]) % 2 == 0
        assert info["tags"] == {"line": "A"}
        assert info["key"]["wrap_mechanism"] == "CKM_AES_KEY_WRAP_PAD"  # SoftHSM2: RFC 5649
        assert info["key"]["transport_key_check_method"] == "CKA_CHECK_VALUE"
        assert info["key"]["transport_key_check_value"] == hsm.check_value(
            _token(hsm_env).find(ObjectClass.SECRET_KEY, label="test-kek")
        )
        wrapped = batch / rid / "device.key.wrapped"
        assert stat.S_IMODE(wrapped.stat().st_mode) == 0o600
        if rid in rids[:20]:
            _check_leaf_profile(cert, rid, issuer, 90)
            pkcs8 = aes_key_unwrap_with_padding(extractable_kek, wrapped.read_bytes())
            length = (
                2 + pkcs8[1]
                if pkcs8[1] < 0x80
                else 2 + (pkcs8[1] & 0x7F) + int.from_bytes(pkcs8[2 : 2 + (pkcs8[1] & 0x7F)], "big")
            )
            key = serialization.load_der_private_key(pkcs8[:length], None)
            assert key.public_key() == cert.public_key()
    assert len(serials) == 200
    # serials are written as openssl prints them: an even number of hex digits
    printed = openssl("x509", "-serial", "-noout", "-in", str(batch / rids[0] / "device.cert.pem"))
    assert printed.stdout.decode().strip() == f"serial={_device_json(batch, rids[0])['serial']}"
    odd = [r for r in rids if len(format(int(_device_json(batch, r)["serial"], 16), "X")) % 2]
    assert odd, "about half of random serials have an odd number of significant hex digits"
    for rid in odd[:5]:
        shown = openssl("x509", "-serial", "-noout", "-in", str(batch / rid / "device.cert.pem"))
        assert shown.stdout.decode().strip() == f"serial={_device_json(batch, rid)['serial']}"
    journal = sqlite3.connect(batch / "journal.sqlite")
    logged = {e["data"]["serial"] for e in audit_events(batch) if e["event"] == "intent"}
    stored = {s for (s,) in journal.execute("SELECT serial FROM serials")}
    journal.close()
    assert logged == stored and all(len(s) % 2 == 0 for s in logged)
    # no device key is left in the token: wrapped keys were session objects
    labels = {o.label for o in _token(hsm_env).objects(ObjectClass.PRIVATE_KEY)}
    assert not any(label and label.startswith("wr-") for label in labels)


def test_retain_batch_of_200(hsm_env: Hsm, ca_env: CA, tmp_path: Path) -> None:
    station = load_station(
        write_station(
            tmp_path / "s.yaml", hsm_env, ca_env, custody="retain", output=tmp_path / "out"
        )
    )
    manifest = load_manifest(_manifest(tmp_path / "m.yaml", "retain-200", "rt-", 200))
    result = run_batch(manifest, station)
    assert result.exit_code == 0 and result.report.counts == {"bundled": 200}
    rids = [f"rt-{n:05d}" for n in range(1, 201)]
    _verify_all(result.batch_dir, ca_env, rids)
    token = _token(hsm_env)
    issuer = x509.load_pem_x509_certificate(ca_env.intermediate.read_bytes())
    for rid in rids[:10]:
        info = _bundle_files_match_device_json(result.batch_dir, rid)
        assert set(info["files"]) == {"device.cert.pem", "full-chain.cert.pem"}
        uri = hsm.Pkcs11Uri.parse(info["key"]["uri"])
        assert uri.object == rid and uri.token == hsm_env.token
        cert = x509.load_pem_x509_certificate(
            (result.batch_dir / rid / "device.cert.pem").read_bytes()
        )
        _check_leaf_profile(cert, rid, issuer, 90)
        assert uri.id == x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest  # type: ignore[arg-type]
        _, signer = hsm.resolve_signer(
            uri, module_path=MODULE, pin=SecretRef("file", str(hsm_env.pin_file))
        )
        challenge = os.urandom(32)
        signature = signer.sign(challenge, ec.ECDSA(hashes.SHA256()))
        cert.public_key().verify(signature, challenge, ec.ECDSA(hashes.SHA256()))  # type: ignore
        private = token.find(ObjectClass.PRIVATE_KEY, label=rid)
        assert token.attributes(
            private, [Attribute.SENSITIVE, Attribute.NEVER_EXTRACTABLE, Attribute.TOKEN]
        ) == {"SENSITIVE": True, "NEVER_EXTRACTABLE": True, "TOKEN": True}


def test_pkcs8_batch_of_200_with_pkcs12(
    hsm_env: Hsm,
    ca_env: CA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PROVLINE_TEST_PASSPHRASE", "pkcs8-test-passphrase")
    path = write_station(
        tmp_path / "s.yaml", hsm_env, ca_env, custody="pkcs8", output=tmp_path / "out"
    )
    path.write_text(
        path.read_text().replace("  pkcs8_passphrase:", "  pkcs12: true\n  pkcs8_passphrase:")
    )
    manifest = load_manifest(_manifest(tmp_path / "m.yaml", "pkcs8-200", "p8-", 200))
    result = run_batch(manifest, load_station(path))
    assert "development only" in capfd.readouterr().err
    assert result.exit_code == 0 and result.report.counts == {"bundled": 200}
    rids = [f"p8-{n:05d}" for n in range(1, 201)]
    _verify_all(result.batch_dir, ca_env, rids)
    from cryptography.hazmat.primitives.serialization import pkcs12

    for rid in rids[:5]:
        d = result.batch_dir / rid
        info = _bundle_files_match_device_json(result.batch_dir, rid)
        assert info["key"]["custody"] == "pkcs8"
        for name in ("device.key.pem", "device.pfx"):
            assert stat.S_IMODE((d / name).stat().st_mode) == 0o600
        key = serialization.load_pem_private_key(
            (d / "device.key.pem").read_bytes(), b"pkcs8-test-passphrase"
        )
        cert = x509.load_pem_x509_certificate((d / "device.cert.pem").read_bytes())
        assert key.public_key() == cert.public_key()
        p12 = pkcs12.load_pkcs12((d / "device.pfx").read_bytes(), b"pkcs8-test-passphrase")
        assert p12.cert is not None and p12.cert.certificate == cert
        assert len(p12.additional_certs) == 2
        # the documented curl flow reads the PEM key with openssl
        proc = openssl(
            "pkey",
            "-in",
            str(d / "device.key.pem"),
            "-passin",
            "env:PROVLINE_TEST_PASSPHRASE",
            "-noout",
        )
        assert proc.returncode == 0, proc.stderr


def test_one_worker_and_rerun_is_a_no_op(hsm_env: Hsm, ca_env: CA, tmp_path: Path) -> None:
    station = load_station(
        write_station(
            tmp_path / "s.yaml", hsm_env, ca_env, output=tmp_path / "out", workers=1, chunk_size=7
        )
    )
    manifest = load_manifest(_manifest(tmp_path / "m.yaml", "one-worker", "ow-", 50))
    first = run_batch(manifest, station)
    assert first.report.counts == {"bundled": 50}
    before = {p: p.stat().st_mtime_ns for p in first.batch_dir.rglob("device.cert.pem")}
    second = run_batch(manifest, station)
    assert second.report.resumed and second.report.this_run["issued"] == 0
    assert second.report.serials == {"issued": 50}
    assert before == {p: p.stat().st_mtime_ns for p in first.batch_dir.rglob("device.cert.pem")}
    proc = provline("status", str(first.batch_dir), "--json")
    assert json.loads(proc.stdout)["devices"]["by_state"] == {"bundled": 50}


def _set_state(batch: Path, rid: str, state: str) -> str:
    """The state a kill leaves while a device's bundle is being written: its serial an open
    intent, its bundle incomplete (no device.json yet)."""
    db = sqlite3.connect(batch / "journal.sqlite")
    serial = db.execute("SELECT serial FROM devices WHERE registration_id = ?", (rid,)).fetchone()
    db.execute("UPDATE devices SET state = ? WHERE registration_id = ?", (state, rid))
    db.execute("UPDATE serials SET state = 'intent' WHERE serial = ?", serial)
    db.commit()
    db.close()
    (batch / rid / "device.json").unlink()
    return serial[0]


@pytest.mark.parametrize("custody", ["wrapped", "retain"])
def test_resume_voids_undurable_intents_and_reuses_retained_keys(
    hsm_env: Hsm, ca_env: CA, tmp_path: Path, custody: str
) -> None:
    """The journal state a kill leaves between 'intent' and 'bundled': the serial is voided,
    the device issued again; a retained key is reused, a wrapped one regenerated."""
    prefix = f"rs{custody[0]}-"
    station = load_station(
        write_station(
            tmp_path / "s.yaml", hsm_env, ca_env, custody=custody, output=tmp_path / "out"
        )
    )
    manifest = load_manifest(_manifest(tmp_path / "m.yaml", f"resume-{custody}", prefix, 20))
    first = run_batch(manifest, station)
    rid = f"{prefix}00007"
    old_cert = x509.load_pem_x509_certificate(
        (first.batch_dir / rid / "device.cert.pem").read_bytes()
    )
    old_serial = _set_state(first.batch_dir, rid, "intent")
    second = run_batch(manifest, station)
    assert second.report.counts == {"bundled": 20}
    assert second.report.void_serials == [
        {
            "registration_id": rid,
            "serial": old_serial,
            "reason": "no durable bundle when the previous run stopped",
        }
    ]
    assert second.report.serials == {"issued": 20, "void": 1}
    new_cert = x509.load_pem_x509_certificate(
        (first.batch_dir / rid / "device.cert.pem").read_bytes()
    )
    assert new_cert.serial_number != old_cert.serial_number
    same_key = new_cert.public_key() == old_cert.public_key()
    assert same_key is (custody == "retain")
    events = [json.loads(line) for line in (first.batch_dir / "audit.jsonl").open()]
    issued = [e for e in events if e["event"] == "issued" and e["registration_id"] == rid]
    assert [e["data"]["key_generated"] for e in issued] == [True, custody != "retain"]
    assert any(e["event"] == "void" and e["data"]["serial"] == old_serial for e in events)
    assert (
        provline("audit", "verify", str(first.batch_dir), "--root", str(ca_env.root)).returncode
        == 0
    )


def test_kill_at_random_points_then_resume(hsm_env: Hsm, ca_env: CA, tmp_path: Path) -> None:
    """kill -9 the whole run (orchestrator and workers) mid-batch, twice, then resume."""
    station_path = write_station(
        tmp_path / "s.yaml", hsm_env, ca_env, output=tmp_path / "out", chunk_size=50
    )
    manifest_path = _manifest(tmp_path / "m.yaml", "killed", "kl-", 3000)
    batch = tmp_path / "out" / "killed"
    env = hsm_env.env()
    for wait_lines in (400, 3000):
        proc = subprocess.Popen(
            [*PROVLINE, "run", str(manifest_path), "--station", str(station_path), "--quiet"],
            env=env,
            cwd=ROOT,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        audit = batch / "audit.jsonl"
        while time.monotonic() < deadline and proc.poll() is None:
            if audit.exists() and audit.stat().st_size > wait_lines * 150:
                break
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    db = sqlite3.connect(batch / "journal.sqlite")
    bundled = db.execute("SELECT COUNT(*) FROM devices WHERE state = 'bundled'").fetchone()[0]
    db.close()
    assert 0 < bundled < 3000, "the kills did not land mid-batch"
    result = provline("run", str(manifest_path), "--station", str(station_path), "--json", env=env)
    report = json.loads(result.stdout)
    assert report["counts"] == {"bundled": 3000}, report
    serials = report["serials"]
    assert serials["issued"] == 3000 and set(serials) <= {"issued", "void", "released"}
    db = sqlite3.connect(batch / "journal.sqlite")
    assert db.execute("SELECT COUNT(DISTINCT registration_id) FROM devices").fetchone()[0] == 3000
    dirs = [p for p in batch.iterdir() if p.is_dir()]
    assert len(dirs) == 3000
    # every device has exactly one issued serial and it is the one in its bundle
    issued = dict(
        db.execute("SELECT registration_id, serial FROM serials WHERE state = 'issued'").fetchall()
    )
    assert len(issued) == 3000
    for rid in ("kl-00001", "kl-01500", "kl-03000"):
        info = json.loads((batch / rid / "device.json").read_text())
        assert info["serial"] == issued[rid]
    voids = {s for (s,) in db.execute("SELECT serial FROM serials WHERE state = 'void'")}
    assert voids == {v["serial"] for v in report["void_serials"]}
    assert not list(batch.rglob(".*.tmp"))  # a reissue rewrites and renames the same names
    _verify_all(batch, ca_env, ["kl-00001", "kl-01500", "kl-03000"])
    # the three runs form one hash chain, sealed, that verifies offline
    verified = provline("audit", "verify", str(batch), "--root", str(ca_env.root), "--json")
    summary = json.loads(verified.stdout)
    assert summary["devices"] == {"bundled": 3000}
    assert summary["serials"] == serials
    events = [json.loads(line)["event"] for line in (batch / "audit.jsonl").open()]
    assert events.count("resume") == 2 and events.count("batch_start") == 1


def test_bad_input_leaves_nothing(hsm_env: Hsm, ca_env: CA, tmp_path: Path) -> None:
    out = tmp_path / "out"
    station_path = write_station(tmp_path / "s.yaml", hsm_env, ca_env, custody="retain", output=out)
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_id: bad\ndevices: [{registration_id: ok-1}, {registration_id: BAD}]\n")
    before = sorted(o.label or "" for o in _token(hsm_env).objects(ObjectClass.PRIVATE_KEY))
    proc = provline("run", str(bad), "--station", str(station_path), env=hsm_env.env(), check=False)
    assert proc.returncode == 2 and "BAD" in proc.stderr
    assert not out.exists()
    # a retain batch whose device label is already taken in the token
    taken = tmp_path / "taken.yaml"
    taken.write_text("batch_id: taken\ndevices: [{registration_id: intermediate}]\n")
    with pytest.raises(ValidationFailed) as info:
        run_batch(load_manifest(taken), load_station(station_path))
    assert "already holds a key labelled intermediate" in info.value.problems[0]
    assert not out.exists()
    assert before == sorted(o.label or "" for o in _token(hsm_env).objects(ObjectClass.PRIVATE_KEY))


def test_resume_with_a_changed_manifest_is_refused(
    hsm_env: Hsm, ca_env: CA, tmp_path: Path
) -> None:
    station = load_station(
        write_station(tmp_path / "s.yaml", hsm_env, ca_env, output=tmp_path / "out")
    )
    run_batch(load_manifest(_manifest(tmp_path / "m.yaml", "changed", "ch-", 5)), station)
    with pytest.raises(InputError) as info:
        run_batch(load_manifest(_manifest(tmp_path / "m.yaml", "changed", "ch-", 6)), station)
    assert "manifest_sha256" in info.value.line()


def _import_private_only_key(token: hsm.Token, label: str) -> bytes:
    """An EC private key imported without its public half (as an operator imports a CA key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    key_id = f"{label}-id".encode()
    token.session.create_object(
        {
            Attribute.CLASS: ObjectClass.PRIVATE_KEY,
            Attribute.KEY_TYPE: KeyType.EC,
            Attribute.EC_PARAMS: bytes.fromhex("06082a8648ce3d030107"),
            Attribute.VALUE: key.private_numbers().private_value.to_bytes(32, "big"),
            Attribute.LABEL: label,
            Attribute.ID: key_id,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.SIGN: True,
        }
    )
    return key_id


def _labels(token: hsm.Token, object_class: ObjectClass) -> list[tuple[str, bytes]]:
    return sorted(
        (o[Attribute.LABEL] or "", bytes(o[Attribute.ID] or b""))
        for o in token.objects(object_class)
    )


def test_foreign_keys_survive_retain_runs_resumes_and_orphan_cleanup(
    hsm_env: Hsm, ca_env: CA, tmp_path: Path
) -> None:
    """Orphan removal destroys only half-made keys provline can prove it made for devices
    this batch attempted; imported keys, other applications' pairs, unlabelled objects and
    keys merely labelled like a device are reported and left alone."""
    from pipeline.batch.custody import pending_key_id

    token = _token(hsm_env)
    imported_id = _import_private_only_key(token, "fk-imported-ca")
    token.generate_keypair(KeyProfile.EC_P256, label="fk-other-app", key_id=b"other-app")
    token.generate_keypair(KeyProfile.RSA_2048)  # someone's unlabelled pair
    _, lost = token.generate_keypair(KeyProfile.EC_P256, label="fk-lost-half", key_id=b"lost")
    lost.destroy()  # someone's public-only half
    station_path = write_station(
        tmp_path / "s.yaml", hsm_env, ca_env, custody="retain", output=tmp_path / "out"
    )
    manifest = load_manifest(_manifest(tmp_path / "m.yaml", "foreign", "fk-", 6))
    foreign_before = {
        "private": [
            x for x in _labels(token, ObjectClass.PRIVATE_KEY) if not x[0].startswith("fk-0")
        ],
        "public": [
            x for x in _labels(token, ObjectClass.PUBLIC_KEY) if not x[0].startswith("fk-0")
        ],
    }
    first = run_batch(manifest, load_station(station_path))
    assert first.exit_code == 0 and first.report.counts == {"bundled": 6}

    # What a crash leaves: (a) a device whose private half is gone (public keeps its SKI id),
    # (b) a public-only half from inside C_GenerateKeyPair, still with the pending mark,
    # (c) a device whose label another application's key now carries.
    a, b, c = "fk-00002", "fk-00004", "fk-00005"
    for rid in (a, b, c):
        _set_state(first.batch_dir, rid, "intent")  # killed before the bundle was complete
    token.find(ObjectClass.PRIVATE_KEY, label=a).destroy()
    for obj in token.session.get_objects({Attribute.LABEL: b}):
        obj.destroy()
    _, half = token.generate_keypair(KeyProfile.EC_P256, label=b, key_id=pending_key_id(b))
    half.destroy()
    for obj in token.session.get_objects({Attribute.LABEL: c}):
        obj.destroy()
    foreign_c = _import_private_only_key(token, c)
    foreign_before["private"] = sorted([*foreign_before["private"], (c, foreign_c)])

    second = run_batch(manifest, load_station(station_path))
    events = [json.loads(line) for line in (first.batch_dir / "audit.jsonl").open()]
    removed = [e["data"] for e in events if e["event"] == "orphan_removed"]
    kept = [e["data"] for e in events if e["event"] == "orphan_kept"]
    assert sorted((r["object"], r["label"], r["why"]) for r in removed) == [
        ("public", a, "no private half"),
        ("public", b, "no private half"),
    ]
    assert {
        "object": "private",
        "label": "fk-imported-ca",
        "why": "no public half, not made by this batch",
    } in kept
    assert {
        "object": "public",
        "label": "fk-lost-half",
        "why": "no private half, not made by this batch",
    } in kept
    assert {
        "object": "private",
        "label": c,
        "why": "labelled like a device of this batch but not marked as provline's",
    } in kept
    assert any(k["label"] == "" and k["why"] == "no label: cannot tell who made it" for k in kept)
    # a and b got new keys; c is refused rather than touching the other key
    assert second.report.counts == {"bundled": 5, "failed": 1}
    assert "cannot prove it made" in second.report.failures[0]["reason"]
    for rid in (a, b):
        cert = x509.load_pem_x509_certificate(
            (first.batch_dir / rid / "device.cert.pem").read_bytes()
        )
        public = token.find(ObjectClass.PUBLIC_KEY, label=rid)
        assert hsm.public_key_of(public) == cert.public_key()
    # every foreign object is still there, byte for byte in label and id
    assert [
        x
        for x in _labels(token, ObjectClass.PRIVATE_KEY)
        if not x[0].startswith("fk-0") or x[0] == c
    ] == foreign_before["private"]
    assert [
        x for x in _labels(token, ObjectClass.PUBLIC_KEY) if not x[0].startswith("fk-0")
    ] == foreign_before["public"]
    assert ("fk-imported-ca", imported_id) in foreign_before["private"]
    assert (
        provline("audit", "verify", str(first.batch_dir), "--root", str(ca_env.root)).returncode
        == 0
    )

    # A new retain batch on the same token removes nothing at all.
    third = run_batch(
        load_manifest(_manifest(tmp_path / "m2.yaml", "foreign-2", "fq-", 2)),
        load_station(station_path),
    )
    events = [json.loads(line) for line in (third.batch_dir / "audit.jsonl").open()]
    assert not [e for e in events if e["event"] == "orphan_removed"]
    assert [
        x
        for x in _labels(token, ObjectClass.PRIVATE_KEY)
        if not x[0].startswith(("fk-0", "fq-")) or x[0] == c
    ] == foreign_before["private"]


def test_retain_batch_that_would_overfill_the_token_is_refused_before_it_starts(
    hsm_env: Hsm, ca_env: CA, tmp_path: Path
) -> None:
    token = _token(hsm_env)
    in_use = token.count_objects()
    path = write_station(
        tmp_path / "s.yaml", hsm_env, ca_env, custody="retain", output=tmp_path / "out"
    )
    path.write_text(
        path.read_text().replace(
            "  softhsm2_conf:", f"  max_objects: {in_use + 5}\n  softhsm2_conf:"
        )
    )
    manifest = _manifest(tmp_path / "m.yaml", "too-big", "tb-", 3)  # 6 objects, 5 free
    proc = provline("run", str(manifest), "--station", str(path), env=hsm_env.env(), check=False)
    assert proc.returncode == 34, proc.stderr
    assert "3 devices need 6 objects but only 5 are free" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
    assert token.count_objects() == in_use
    plan = provline("plan", str(manifest), "--station", str(path), env=hsm_env.env(), check=False)
    assert plan.returncode == 34
    assert "store device keys in the token" in plan.stdout and "MISSING" in plan.stdout
    assert "would refuse" in plan.stdout


def test_cli_run_json_and_exit_code(hsm_env: Hsm, ca_env: CA, tmp_path: Path) -> None:
    station_path = write_station(tmp_path / "s.yaml", hsm_env, ca_env, output=tmp_path / "out")
    proc = provline(
        "run",
        str(ROOT / "manifests" / "example.csv"),
        "--station",
        str(station_path),
        "--json",
        env=hsm_env.env(),
    )
    report = json.loads(proc.stdout)
    assert report["counts"] == {"bundled": 4} and report["exit_code"] == 0
    assert (tmp_path / "out" / "example" / "report.txt").read_text().startswith("batch example")
    stage = report["stages"]["issue"]
    assert stage["devices"] == 4 and stage["devices_per_s"] > 0


def test_a_batch_runs_once_at_a_time(hsm_env: Hsm, ca_env: CA, tmp_path: Path) -> None:
    from pipeline.batch.journal import Journal

    station = load_station(
        write_station(tmp_path / "s.yaml", hsm_env, ca_env, output=tmp_path / "out")
    )
    manifest = load_manifest(_manifest(tmp_path / "m.yaml", "locked", "lk-", 3))
    run_batch(manifest, station)
    holder = Journal.open(tmp_path / "out" / "locked", create=True)  # another run, mid-way
    try:
        with pytest.raises(InputError) as info:
            run_batch(manifest, station)
        assert "being run by another process" in info.value.line()
    finally:
        holder.close()
    assert run_batch(manifest, station).exit_code == 0


def test_crl_revokes_the_void_serials(hsm_env: Hsm, ca_env: CA, tmp_path: Path) -> None:
    station_path = write_station(tmp_path / "s.yaml", hsm_env, ca_env, output=tmp_path / "out")
    manifest = load_manifest(_manifest(tmp_path / "m.yaml", "revoked", "rv-", 5))
    first = run_batch(manifest, load_station(station_path))
    void = _set_state(first.batch_dir, "rv-00002", "intent")
    run_batch(manifest, load_station(station_path))
    crl_path = tmp_path / "void.crl.pem"
    provline(
        "ca",
        "crl",
        str(first.batch_dir),
        "--station",
        str(station_path),
        "--out",
        str(crl_path),
        env=hsm_env.env(),
    )
    crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    assert [r.serial_number for r in crl] == [int(void, 16)]
    proc = openssl("crl", "-in", str(crl_path), "-CAfile", str(ca_env.chain), "-noout")
    assert proc.returncode == 0 and b"verify OK" in proc.stderr + proc.stdout
