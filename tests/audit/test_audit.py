"""The signed audit log: sealing, offline verification, and every kind of tampering."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import subprocess
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

from ..support import CA, ROOT, Hsm, openssl, provline, write_station

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
    _fails(batch, ca_env, "report.json", "differs from the SHA-256 the log recorded")


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


# ------------------------------------------------------------- the seal covers the report
REPORT_EDITS = {
    "failures": lambda r: r["failures"].append(
        {"registration_id": "au-0001", "state": "failed", "reason": "edited"}
    ),
    "exit_code": lambda r: r.update(exit_code=5),
    "complete": lambda r: r.update(complete=False),
    "devices": lambda r: r.update(devices=59),
    "product": lambda r: r.update(product="another product"),
    "station": lambda r: r.update(station="another-station"),
    "custody": lambda r: r.update(custody="pkcs8"),
    "failures_total": lambda r: r.update(failures_total=3),
    "operator": lambda r: r.update(operator="someone else"),
    "void_serials": lambda r: r["void_serials"].append(
        {"registration_id": "au-0002", "serial": "0A", "reason": "edited"}
    ),
}


@pytest.mark.parametrize("field", sorted(REPORT_EDITS))
def test_every_report_field_is_covered_by_the_seal(
    sealed: Path, ca_env: CA, tmp_path: Path, field: str
) -> None:
    batch = _copy(sealed, tmp_path)
    report = json.loads((batch / "report.json").read_text())
    assert field in report
    REPORT_EDITS[field](report)
    (batch / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    _fails(batch, ca_env, "report.json", "differs from the SHA-256 the log recorded")


def test_report_txt_is_covered_by_the_seal(sealed: Path, ca_env: CA, tmp_path: Path) -> None:
    batch = _copy(sealed, tmp_path)
    text = (batch / "report.txt").read_text()
    assert "audit log: sealed" in text
    (batch / "report.txt").write_text(text.replace("devices: 60", "devices: 59"))
    _fails(batch, ca_env, "report.txt", "differs from the SHA-256 the log recorded")


def test_the_report_event_is_the_line_before_the_seal(sealed: Path) -> None:
    events = [json.loads(line) for line in (sealed / "audit.jsonl").open()]
    assert [e["event"] for e in events[-3:]] == ["run_end", "report", "seal"]
    files = events[-2]["data"]["files"]
    for name in ("report.json", "report.txt"):
        assert files[name] == hashlib.sha256((sealed / name).read_bytes()).hexdigest()
    assert events[-2]["data"]["exit_code"] == 0 and events[-2]["data"]["complete"] is True


def test_without_a_root_it_is_unanchored(sealed: Path, ca_env: CA) -> None:
    root_sha256 = (
        hashlib.sha256(
            x509.load_pem_x509_certificate(ca_env.root.read_bytes()).public_bytes(
                serialization.Encoding.DER
            )
        )
        .hexdigest()
        .upper()
    )
    proc = provline("audit", "verify", str(sealed), check=False)
    assert proc.returncode == 61, proc.stderr
    assert "VERIFIED" not in proc.stdout
    assert "audit log checks passed, UNANCHORED" in proc.stdout
    assert f"the root the log names, CN=Test Root,O=provline (sha256 {root_sha256})" in (
        proc.stdout.replace("O=provline,CN=Test Root", "CN=Test Root,O=provline")
    )
    assert "UNANCHORED: every check passed" in proc.stderr and "Give --root" in proc.stderr
    document = json.loads(provline("audit", "verify", str(sealed), "--json", check=False).stdout)
    assert document["format"] == "provline.audit-verify/1"
    assert document["verified"] is False and document["anchored"] is False
    assert document["checks_passed"] is True
    assert document["root_named_by_log"]["sha256"] == root_sha256
    anchored = json.loads(_verify(sealed, ca_env, "--json").stdout)
    assert anchored["verified"] is True and anchored["anchored"] is True
    assert anchored["report_sealed"] is True


def _readme_block(heading: str, index: int = 0) -> str:
    """The ``index``-th ```sh block after ``heading`` in the README (the tests run what the
    auditor is told to run)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading) :]
    blocks = section.split("```sh\n")[1:]
    return blocks[index].split("```", 1)[0]


def test_the_readme_hash_chain_check_needs_no_python(sealed: Path, tmp_path: Path) -> None:
    script = _readme_block("#### Checking the hash chain without Python")
    good = subprocess.run(["sh", "-c", script], cwd=sealed, capture_output=True, text=True)
    lines = len((sealed / "audit.jsonl").read_bytes().splitlines())
    assert good.returncode == 0 and good.stdout.strip() == f"hash chain OK: {lines} lines"
    batch = _copy(sealed, tmp_path)
    raw = _lines(batch)
    assert b'"time":"2' in raw[30]
    raw[30] = raw[30].replace(b'"time":"2', b'"time":"3')
    (batch / "audit.jsonl").write_bytes(b"".join(raw))
    bad = subprocess.run(["sh", "-c", script], cwd=batch, capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stdout.strip() == "audit.jsonl:32: sequence or hash chain broken"


def test_the_readme_openssl_commands_check_the_seal_and_the_signer(
    sealed: Path, ca_env: CA, tmp_path: Path
) -> None:
    batch = _copy(sealed, tmp_path)
    shutil.copy(ca_env.root, batch / "root.cert.pem")
    script = _readme_block("#### Checking the hash chain without Python", 1)
    proc = subprocess.run(["sh", "-c", script], cwd=batch, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "CMS Verification successful" in proc.stderr
    assert "signer.pem: OK" in proc.stdout
    seal = json.loads(_lines(batch)[-1])["data"]
    fingerprint = next(line for line in proc.stdout.splitlines() if "Fingerprint=" in line)
    assert fingerprint.split("=", 1)[1].replace(":", "") == seal["signer_sha256"]
    report_line = json.loads(_lines(batch)[-2])
    for name in ("report.json", "report.txt"):
        assert f"{report_line['data']['files'][name]}  {name}" in proc.stdout
    (batch / "audit.jsonl").write_bytes((batch / "audit.jsonl").read_bytes() + b"\n")
    tampered = subprocess.run(["sh", "-c", script], cwd=batch, capture_output=True, text=True)
    assert "CMS Verification successful" not in tampered.stderr


def test_a_log_from_before_the_report_event_still_verifies(
    sealed: Path, ca_env: CA, hsm_env: Hsm, tmp_path: Path
) -> None:
    """An older provline logged no report event: the log verifies, the report is compared
    with the log only and said not to be covered by the seal."""
    from pipeline.audit.log import GENESIS, AuditLog, encode
    from pipeline.batch.signing import open_signer

    batch = _copy(sealed, tmp_path)
    records = [json.loads(line) for line in _lines(batch) if b'"event":"report"' not in line]
    prev, out = GENESIS, []
    for seq, record in enumerate(records, start=1):
        line = encode({**record, "seq": seq, "prev": prev})
        prev = hashlib.sha256(line).hexdigest()
        out.append(line + b"\n")
    (batch / "audit.jsonl").write_bytes(b"".join(out))
    station = load_station(
        write_station(tmp_path / "s.yaml", hsm_env, ca_env, output=tmp_path / "unused")
    )
    assert station.audit is not None
    log = AuditLog(batch / "audit.jsonl")
    log.seal(
        open_signer(station, station.audit.key),
        x509.load_pem_x509_certificate(ca_env.audit_cert.read_bytes()),
        [x509.load_pem_x509_certificate(ca_env.intermediate.read_bytes())],
    )
    log.close()
    verified = _verify(batch, ca_env, "--json")
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["report_sealed"] is False
    assert "NOT covered by the seal" in _verify(batch, ca_env).stdout
    report = json.loads((batch / "report.json").read_text())
    report["counts"]["bundled"] = 59
    (batch / "report.json").write_text(json.dumps(report))
    _fails(batch, ca_env, "report.json", "device states")
