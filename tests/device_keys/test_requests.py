"""A device-custody batch's CSRs before anything is signed (pipeline/batch/requests.py and the
manifest's csr, csr_dir and csr column): every problem at once, one line each, naming the
manifest line, the device and the file. Files only: no HSM."""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from pipeline.batch.requests import batch_requests, request_problems
from pipeline.ca.csr import MAX_CSR_BYTES
from pipeline.config.manifest import load_manifest
from pipeline.config.station import Station, load_station
from pipeline.errors import ValidationFailed
from pipeline.lifecycle.inventory import CertificateRecord, Inventory
from pipeline.vocabulary import CertificateStatus

from .support import crypto_csr, software_key, spki, write_csrs


def station(tmp: Path, custody: str = "device") -> Station:
    path = tmp / "s.yaml"
    path.write_text(
        f"station: unit\nhsm: {{token: t, pin: env:PIN}}\n"
        f"ca: {{chain: chain.pem, root_cert: root.pem, issuer_key: 'pkcs11:object=i'}}\n"
        f"custody: {{policy: {custody}, transport_key: 'pkcs11:object=t'}}\n"
        f"output: out\nkey_profiles: [ec-p256, ec-p384, rsa-2048, rsa-3072]\n"
    )
    return load_station(path)


def manifest(tmp: Path, text: str, name: str = "m.yaml") -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def problems(tmp: Path, text: str, custody: str = "device") -> list[str]:
    return request_problems(load_manifest(manifest(tmp, text)), station(tmp, custody))


def test_csr_dir_generator_and_explicit_paths_accepted(tmp_path: Path) -> None:
    write_csrs(tmp_path / "csrs", ["g-1", "g-2"])
    (tmp_path / "own.der").write_bytes(crypto_csr(software_key("ec-p256"), None, der=True))
    text = (
        "batch_id: b\ncsr_dir: csrs\ngenerator: {prefix: g-, digits: 1, count: 2}\n"
        "devices:\n  - {registration_id: own, csr: own.der}\n"
    )
    assert problems(tmp_path, text) == []
    rids = [r.registration_id for r in batch_requests(load_manifest(tmp_path / "m.yaml"))]
    assert rids == ["own", "g-1", "g-2"]


def test_csv_csr_column_relative_to_the_csv(tmp_path: Path) -> None:
    sub = tmp_path / "lot"
    write_csrs(sub / "r", ["c-1", "c-2"])
    (sub / "d.csv").write_text("registration_id,csr\nc-1,r/c-1.csr\nc-2,r/c-2.csr\n")
    mf = load_manifest(sub / "d.csv", batch_id="b")
    assert mf.csr_paths == 2 and mf.has_csrs
    assert request_problems(mf, station(tmp_path)) == []


def test_every_problem_at_once(tmp_path: Path) -> None:
    csrs = tmp_path / "csrs"
    write_csrs(csrs, ["d-1", "d-2"])
    same = (csrs / "d-1.csr").read_bytes()
    (csrs / "d-3.csr").write_bytes(crypto_csr(software_key("ec-p256"), None))
    (csrs / "d-4.csr").write_bytes(same.replace(b"CERTIFICATE REQUEST", b"CERTIFICATE REQUEST"))
    (csrs / "dup.csr").write_bytes(crypto_csr(software_key("ec-p256"), None))
    (csrs / "dup2.csr").write_bytes((csrs / "dup.csr").read_bytes())
    (csrs / "d-5.pem").write_bytes(crypto_csr(software_key("ec-p256"), "d-5"))
    (csrs / "d-5.der").write_bytes(crypto_csr(software_key("ec-p256"), "d-5", der=True))
    (csrs / "d-6.csr").mkdir()
    os.symlink("/dev/zero", csrs / "d-7.csr")
    (csrs / "d-8.csr").write_bytes(b"\0" * (MAX_CSR_BYTES + 10))
    os.mkfifo(csrs / "d-9.csr")
    (csrs / "big.csr").write_bytes(crypto_csr(software_key("rsa-2048"), "big"))
    text = (
        "batch_id: b\ncsr_dir: csrs\n"
        "generator: {prefix: d-, digits: 1, count: 9}\n"
        "devices:\n"
        "  - {registration_id: x-1, csr: csrs/dup.csr}\n"
        "  - {registration_id: x-2, csr: csrs/dup2.csr}\n"
        "  - {registration_id: big}\n"
        "  - {registration_id: gone}\n"
    )
    lines = problems(tmp_path, text)
    assert all(line.isprintable() and line.startswith(f"{tmp_path}/m.yaml:") for line in lines)
    text_of = "\n".join(lines)
    expected = [
        ("d-4", "CN 'd-1' is not the registration ID d-4"),
        ("d-5", "2 CSRs in"),
        ("d-6", "is a directory"),
        ("d-7", "not a regular file"),
        ("d-8", "is 16,394 bytes"),
        ("d-9", "not a regular file"),
        ("x-2", "its key is also the key of x-1 in this batch"),
        ("big", "RSA-2048, the batch's key profile is ec-p256"),
        ("gone", "no CSR in"),
    ]
    for rid, says in expected:
        assert any(f": {rid}: " in line and says in line for line in lines), (rid, text_of)
    assert len(lines) == len(expected), text_of
    assert not any(": d-1: " in line or ": d-2: " in line or ": d-3: " in line for line in lines)


def test_csrs_with_another_custody_and_no_csrs_with_device(tmp_path: Path) -> None:
    write_csrs(tmp_path / "csrs", ["a-1"])
    (line,) = problems(
        tmp_path, "batch_id: b\ncsr_dir: csrs\ndevices: [{registration_id: a-1}]\n", "wrapped"
    )
    assert "m.yaml:2" in line and "custody is wrapped (CSRs are for custody device)" in line
    (line,) = problems(tmp_path, "batch_id: b\ndevices: [{registration_id: a-1}]\n")
    assert "needs a CSR per device" in line
    (line,) = problems(
        tmp_path, "batch_id: b\ncsr_dir: nowhere\ndevices: [{registration_id: a-1}]\n"
    )
    assert "m.yaml:2: csr_dir" in line and "does not exist" in line


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("devices: [{registration_id: a, csr: ''}]", "csr is empty"),
        ("devices: [{registration_id: a, csr: 12}]", "csr must be a file name, not 12"),
        ('devices: [{registration_id: a, csr: "x\\u001b[2J"}]', "control character"),
        ("csr_dir: ''\ndevices: [{registration_id: a}]", "csr_dir is empty"),
        ("csr_dir: [a]\ndevices: [{registration_id: a}]", "'csr_dir' must be str"),
    ],
)
def test_manifest_csr_fields_are_checked(tmp_path: Path, text: str, says: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        load_manifest(manifest(tmp_path, f"batch_id: b\n{text}\n"))
    assert any(says in p for p in caught.value.problems), caught.value.problems


def _certificate(key: object, cn: str) -> x509.Certificate:
    signer = software_key("ec-p256")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(7)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(signer, hashes.SHA256())
    )


def test_keys_of_earlier_batches_are_refused_own_batch_is_not(tmp_path: Path) -> None:
    st = station(tmp_path)
    key = software_key("ec-p256")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "n-1.csr").write_bytes(crypto_csr(key, "n-1"))
    import hashlib

    record = CertificateRecord(
        serial="AB",
        registration_id="old-7",
        device_id="old-7",
        batch_id="lot-0",
        station="unit",
        issuer="00",
        sha1="11",
        sha256="22",
        not_after=None,
        custody="device",
        key_profile="ec-p256",
        bundle=None,
        status=CertificateStatus.ACTIVE,
        public_key_sha256=hashlib.sha256(spki(key.public_key())).hexdigest(),
    )
    inventory = Inventory.of(st)
    inventory.add_certificates([record])
    inventory.close()
    text = "batch_id: lot-1\ncsr_dir: c\ndevices: [{registration_id: n-1}]\n"
    (line,) = problems(tmp_path, text)
    assert "n-1: CSR" in line and "certified for old-7 in lot-0" in line
    # the same key recorded under this very batch (a resumed batch) is its own
    assert problems(tmp_path, text.replace("lot-1", "lot-0")) == []


def test_an_inventory_older_than_the_key_index_is_indexed_from_the_bundles(
    tmp_path: Path,
) -> None:
    st = station(tmp_path)
    key = software_key("ec-p256")
    bundle = tmp_path / "out" / "lot-0" / "old-1"
    bundle.mkdir(parents=True)
    (bundle / "device.cert.pem").write_bytes(
        _certificate(key, "old-1").public_bytes(serialization.Encoding.PEM)
    )
    path = tmp_path / "out" / ".lifecycle" / "inventory.sqlite"
    path.parent.mkdir(parents=True)
    db = sqlite3.connect(path)  # the schema before public_key_sha256
    db.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "CREATE TABLE certificates (serial TEXT PRIMARY KEY, registration_id TEXT NOT NULL, "
        "device_id TEXT NOT NULL, batch_id TEXT NOT NULL, station TEXT NOT NULL, issuer TEXT "
        "NOT NULL, sha1 TEXT, sha256 TEXT, not_after TEXT, custody TEXT, key_profile TEXT, "
        "bundle TEXT, status TEXT NOT NULL, reason TEXT, revoked_at TEXT, updated REAL NOT NULL);"
    )
    db.execute(
        "INSERT INTO certificates VALUES ('A1', 'old-1', 'old-1', 'lot-0', 'unit', '00', 'x', "
        "'y', NULL, 'pkcs8', 'ec-p256', ?, 'active', NULL, NULL, 0)",
        (str(bundle),),
    )
    db.commit()
    db.close()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "n-1.csr").write_bytes(crypto_csr(key, None))
    (line,) = request_problems(
        load_manifest(
            manifest(tmp_path, "batch_id: lot-1\ncsr_dir: c\ndevices: [{registration_id: n-1}]\n")
        ),
        st,
    )
    assert "certified for old-1 in lot-0" in line


def test_problems_stop_at_a_thousand(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    text = "batch_id: b\ncsr_dir: c\ngenerator: {prefix: z-, digits: 4, count: 1500}\n"
    lines = problems(tmp_path, text)
    assert len(lines) == 1001 and lines[-1].startswith("... checking stopped after 1000")


def test_a_csr_changed_after_it_was_checked_is_refused(tmp_path: Path) -> None:
    write_csrs(tmp_path / "c", ["a-1", "a-2"])
    mf = load_manifest(
        manifest(
            tmp_path, "batch_id: b\ncsr_dir: c\ngenerator: {prefix: a-, digits: 1, count: 2}\n"
        )
    )
    assert request_problems(mf, station(tmp_path)) == []
    (tmp_path / "c" / "a-2.csr").write_bytes(crypto_csr(software_key("ec-p256"), "a-1"))
    with pytest.raises(ValidationFailed) as caught:
        list(batch_requests(mf))
    assert (
        "a-2" in caught.value.problems[0]
        and "changed after it was checked" in caught.value.problems[0]
    )
