"""The signed audit log: sealing, offline verification, and every kind of tampering."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from pipeline.config.manifest import load_manifest
from pipeline.config.station import load_station
from pipeline.run import run_batch

from ..support import CA, Hsm, openssl, provline, write_station

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sealed(hsm_env: Hsm, ca_env: CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("audit")
    station = load_station(
        write_station(base / "s.yaml", hsm_env, ca_env, output=base / "out", chunk_size=16)
    )
    manifest = base / "m.yaml"
    manifest.write_text("batch_id: audited\ngenerator: {prefix: au-, digits: 4, count: 60}\n")
    result = run_batch(load_manifest(manifest), station)
    assert result.exit_code == 0
    return result.batch_dir


def _copy(batch: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(batch, tmp_path / batch.name))


def _verify(batch: Path, ca_env: CA, *extra: str):  # type: ignore[no-untyped-def]
    return provline("audit", "verify", str(batch), "--root", str(ca_env.root), *extra, check=False)


def test_sealed_batch_verifies_with_provline_and_openssl(sealed: Path, ca_env: CA) -> None:
    proc = _verify(sealed, ca_env, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["verified"] and summary["batch_id"] == "audited"
    assert summary["devices"] == {"bundled": 60} and summary["serials"] == {"issued": 60}
    assert summary["files_checked"] == 60 * 4
    assert summary["signer"] == "CN=provline audit signer"
    cms = openssl(
        "cms",
        "-verify",
        "-binary",
        "-inform",
        "DER",
        "-in",
        str(sealed / "audit.jsonl.p7s"),
        "-content",
        str(sealed / "audit.jsonl"),
        "-CAfile",
        str(ca_env.root),
        "-purpose",
        "any",
        "-out",
        "/dev/null",
    )
    assert cms.returncode == 0, cms.stderr
    events = [json.loads(line)["event"] for line in (sealed / "audit.jsonl").open()]
    assert events[0] == "batch_start" and events[-1] == "seal"
    assert events.count("intent") == events.count("issued") == 60


def _lines(batch: Path) -> list[bytes]:
    return (batch / "audit.jsonl").read_bytes().splitlines(keepends=True)


def _fails(batch: Path, ca_env: CA, *fragments: str) -> str:
    proc = _verify(batch, ca_env)
    assert proc.returncode == 6, (proc.stdout, proc.stderr)
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith("error: ")
    for fragment in fragments:
        assert fragment in line, line
    return line


def test_flipped_byte_is_found_at_its_line(sealed: Path, ca_env: CA, tmp_path: Path) -> None:
    batch = _copy(sealed, tmp_path)
    lines = _lines(batch)
    target = lines[9]
    pos = target.index(b'"serial":"') + 12
    lines[9] = target[:pos] + (b"0" if target[pos : pos + 1] != b"0" else b"1") + target[pos + 1 :]
    (batch / "audit.jsonl").write_bytes(b"".join(lines))
    _fails(batch, ca_env, "audit.jsonl:11", "hash chain")


def test_deleted_line(sealed: Path, ca_env: CA, tmp_path: Path) -> None:
    batch = _copy(sealed, tmp_path)
    lines = _lines(batch)
    del lines[20]
    (batch / "audit.jsonl").write_bytes(b"".join(lines))
    _fails(batch, ca_env, "audit.jsonl:21", "sequence continuity")


def test_swapped_lines(sealed: Path, ca_env: CA, tmp_path: Path) -> None:
    batch = _copy(sealed, tmp_path)
    lines = _lines(batch)
    lines[5], lines[6] = lines[6], lines[5]
    (batch / "audit.jsonl").write_bytes(b"".join(lines))
    _fails(batch, ca_env, "audit.jsonl:6", "sequence")


def test_truncated_log(sealed: Path, ca_env: CA, tmp_path: Path) -> None:
    batch = _copy(sealed, tmp_path)
    data = (batch / "audit.jsonl").read_bytes()
    cut = data[: data.rfind(b"\n", 0, len(data) - 1) + 1]  # drop the seal line
    (batch / "audit.jsonl").write_bytes(cut)
    _fails(batch, ca_env, "audit.jsonl.p7s", "does not cover")
    (batch / "audit.jsonl").write_bytes(data[:-40])  # cut inside the last line
    _fails(batch, ca_env, "cut short")


def test_replaced_bundle_file(sealed: Path, ca_env: CA, tmp_path: Path) -> None:
    batch = _copy(sealed, tmp_path)
    other = (batch / "au-0002" / "device.cert.pem").read_bytes()
    (batch / "au-0001" / "device.cert.pem").write_bytes(other)
    _fails(batch, ca_env, "au-0001/device.cert.pem", "differs from the hash")


def test_extra_bundle_file(sealed: Path, ca_env: CA, tmp_path: Path) -> None:
    batch = _copy(sealed, tmp_path)
    (batch / "au-0003" / "device.key.pem").write_bytes(b"not logged")
    _fails(batch, ca_env, "au-0003/device.key.pem", "not recorded")


def test_report_that_disagrees(sealed: Path, ca_env: CA, tmp_path: Path) -> None:
    batch = _copy(sealed, tmp_path)
    report = json.loads((batch / "report.json").read_text())
    report["counts"]["bundled"] = 59
    (batch / "report.json").write_text(json.dumps(report))
    _fails(batch, ca_env, "report.json", "device states")


def test_resealed_by_a_key_not_chained_to_the_root(
    sealed: Path, ca_env: CA, tmp_path: Path
) -> None:
    batch = _copy(sealed, tmp_path)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "provline audit signer")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    der = (
        pkcs7.PKCS7SignatureBuilder()
        .set_data((batch / "audit.jsonl").read_bytes())
        .add_signer(cert, key, hashes.SHA256())
        .sign(
            serialization.Encoding.DER,
            [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary],
        )
    )
    (batch / "audit.jsonl.p7s").write_bytes(der)
    _fails(batch, ca_env, "does not chain to the root")
