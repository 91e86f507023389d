"""The second PKCS#11 implementation: openCryptoki's software token (Debian opencryptoki 3.8:
RSA only, no EC, no AES key wrap, no CKA_CHECK_VALUE, no CKM_SHA256_RSA_PKCS, PINs of 4-8).

Everything runs as subprocesses inside the private mount namespace of the session's
pkcsslotd (tests/support.py, ``start_opencryptoki``): the CA ceremonies, `provline hsm check`,
an RSA batch in retain custody end to end with a resume, and the clean refusals of what the
token cannot do (EC keys, wrapped custody, the transport key)."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from ..support import Ock, openssl

pytestmark = pytest.mark.integration

PASSPHRASE = "ock-root-passphrase"


@dataclass
class OckCA:
    dir: Path
    chain: Path
    root: Path
    audit_cert: Path


def _objects(ock: Ock) -> list[str]:
    out = ock.python(
        "from pkcs11 import Attribute\n"
        "for o in session.get_objects({}):\n"
        "    print(int(o.object_class), o[Attribute.LABEL], bytes(o[Attribute.ID]).hex())\n"
    )
    return sorted(out.splitlines())


@pytest.fixture(scope="module")
def ock_ca(ock_env: Ock, tmp_path_factory: pytest.TempPathFactory) -> OckCA:
    """Root key in an encrypted PKCS#8 file, RSA-2048 issuing and audit keys in the token."""
    out = tmp_path_factory.mktemp("ock-ca")
    pass_file = out / "root-pass"
    pass_file.write_text(PASSPHRASE)
    pass_file.chmod(0o600)
    ock = ock_env
    ock.provline(
        "ca",
        "init-root",
        "--out",
        str(out),
        "--key-file",
        str(out / "root.key.pem"),
        "--passphrase-source",
        f"file:{pass_file}",
        "--subject",
        "CN=OCK Test Root",
    )
    common = ["--module", ock.module, "--token", ock.token, "--pin-source", f"file:{ock.pin_file}"]
    ock.provline(
        "ca",
        "init-intermediate",
        "--out",
        str(out),
        "--root-cert",
        str(out / "root.cert.pem"),
        "--root-key",
        str(out / "root.key.pem"),
        "--passphrase-source",
        f"file:{pass_file}",
        "--profile",
        "rsa-2048",
        "--subject",
        "CN=OCK Issuing CA",
        *common,
    )
    ock.provline(
        "ca",
        "audit-key",
        "--out",
        str(out),
        "--issuer-cert",
        str(out / "intermediate.cert.pem"),
        "--issuer-key",
        f"pkcs11:token={ock.token};object=intermediate;type=private",
        "--profile",
        "rsa-2048",
        *common,
    )
    return OckCA(out, out / "chain.pem", out / "root.cert.pem", out / "audit.cert.pem")


def _station(path: Path, ock: Ock, c: OckCA, custody: str, profiles: str = "[rsa-2048]") -> Path:
    path.write_text(f"""\
station: ock-station
hsm:
  module: {ock.module}
  token: {ock.token}
  pin: file:{ock.pin_file}
ca:
  chain: {c.chain}
  issuer_key: pkcs11:token={ock.token};object=intermediate;type=private
  root_cert: {c.root}
custody:
  policy: {custody}
  transport_key: pkcs11:token={ock.token};object=transport;type=secret-key
audit:
  key: pkcs11:token={ock.token};object=audit;type=private
  cert: {c.audit_cert}
output: {path.parent / "out"}
key_profiles: {profiles}
workers: 2
chunk_size: 4
""")
    return path


def _manifest(path: Path, batch_id: str, count: int, profile: str = "rsa-2048") -> Path:
    path.write_text(
        f"batch_id: {batch_id}\nkey_profile: {profile}\nvalidity_days: 30\n"
        f"generator: {{prefix: {batch_id}-, digits: 3, count: {count}}}\n"
    )
    return path


def test_hsm_check_on_opencryptoki(ock_env: Ock, ock_ca: OckCA, tmp_path: Path) -> None:
    retain = _station(tmp_path / "retain.yaml", ock_env, ock_ca, "retain")
    proc = ock_env.provline("hsm", "check", "--station", str(retain))
    print(proc.stdout)  # the table, for the record (pytest -s)
    text = proc.stdout
    assert "known as: openCryptoki" in text and "PIN 4..8 characters" in text
    assert "CKM_RSA_PKCS (PKCS#1 v1.5, SHA-256 on the host)" in text  # no SHA256_RSA_PKCS
    assert "CKM_RSA_PKCS_KEY_PAIR_GEN (RSA-2048 key pair)" in text
    assert "MISSING" not in text
    wrapped = _station(tmp_path / "wrapped.yaml", ock_env, ock_ca, "wrapped", "[rsa-2048, ec-p256]")
    refused = ock_env.provline("hsm", "check", "--station", str(wrapped), check=False)
    print(refused.stdout)
    assert refused.returncode == 34
    assert (
        "MISSING: generate device key pairs (custody wrapped, key profile ec-p256): "
        "CKM_EC_KEY_PAIR_GEN (0x1040) not offered"
    ) in refused.stdout
    assert (
        "MISSING: wrap device keys (RFC 5649) (custody wrapped): CKM_AES_KEY_WRAP_KWP (0x210B) "
        "not offered; CKM_AES_KEY_WRAP_PAD (0x210A) is RFC 5649 only on SoftHSM2"
    ) in refused.stdout
    data = json.loads(
        ock_env.provline("hsm", "check", "--station", str(wrapped), "--json", check=False).stdout
    )
    assert data["ok"] is False and data["token"]["max_pin"] == 8


def test_what_the_token_cannot_do_is_refused_and_leaves_no_object(
    ock_env: Ock, ock_ca: OckCA, tmp_path: Path
) -> None:
    before = _objects(ock_env)
    common = ["--module", ock_env.module, "--token", ock_env.token]
    common += ["--pin-source", f"file:{ock_env.pin_file}"]
    transport = ock_env.provline("ca", "transport-key", *common, check=False)
    assert transport.returncode == 34, transport.stderr
    assert "CKM_AES_KEY_WRAP_KWP (0x210B) not offered" in transport.stderr
    audit = ock_env.provline(
        "ca",
        "audit-key",
        "--out",
        str(tmp_path / "ca"),
        "--issuer-cert",
        str(ock_ca.dir / "intermediate.cert.pem"),
        "--issuer-key",
        f"pkcs11:token={ock_env.token};object=intermediate;type=private",
        "--label",
        "audit-ec",
        "--profile",
        "ec-p256",
        *common,
        check=False,
    )
    assert audit.returncode == 34, audit.stderr
    assert (
        "generate the key pair (audit key (ec-p256)): CKM_EC_KEY_PAIR_GEN (0x1040)" in audit.stderr
    )
    for proc in (transport, audit):
        assert "Traceback" not in proc.stderr
        assert all(line.startswith("error: ") for line in proc.stderr.strip().splitlines())
    assert _objects(ock_env) == before
    assert not (tmp_path / "ca").exists()
    # a batch of EC keys, and wrapped custody, are refused before any side effect
    retain = _station(tmp_path / "retain.yaml", ock_env, ock_ca, "retain", "[rsa-2048, ec-p256]")
    ec = ock_env.provline(
        "run",
        str(_manifest(tmp_path / "ec.yaml", "ec", 3, "ec-p256")),
        "--station",
        str(retain),
        check=False,
    )
    assert ec.returncode == 34 and "CKM_EC_KEY_PAIR_GEN (0x1040) not offered" in ec.stderr
    wrapped = _station(tmp_path / "wrapped.yaml", ock_env, ock_ca, "wrapped")
    wr = ock_env.provline(
        "run", str(_manifest(tmp_path / "wr.yaml", "wr", 3)), "--station", str(wrapped), check=False
    )
    assert wr.returncode == 34 and "wrap device keys (RFC 5649)" in wr.stderr, wr.stderr
    assert not (tmp_path / "out").exists()
    assert _objects(ock_env) == before


def test_rsa_retain_batch_end_to_end_with_resume(
    ock_env: Ock, ock_ca: OckCA, tmp_path: Path
) -> None:
    ock = ock_env
    # another application's keys on the same token: a private-only key and a pair
    ock.python(
        "from pkcs11 import KeyType\n"
        "pub, priv = session.generate_keypair(\n"
        "    KeyType.RSA, 2048, store=True, label='imported-ca', id=b'imp')\n"
        "pub.destroy()\n"
        "session.generate_keypair(KeyType.RSA, 2048, store=True, label='other-app', id=b'other')\n"
    )
    foreign = [line for line in _objects(ock) if "imported-ca" in line or "other-app" in line]
    assert len(foreign) == 3
    station = _station(tmp_path / "s.yaml", ock, ock_ca, "retain")
    manifest = _manifest(tmp_path / "m.yaml", "ock", 10)
    first = json.loads(
        ock.provline("run", str(manifest), "--station", str(station), "--json").stdout
    )
    assert first["counts"] == {"bundled": 10} and first["exit_code"] == 0
    batch = tmp_path / "out" / "ock"
    rids = [f"ock-{n:03d}" for n in range(1, 11)]
    proc = openssl(
        "verify",
        "-CAfile",
        str(ock_ca.root),
        "-untrusted",
        str(ock_ca.dir / "intermediate.cert.pem"),
        "-purpose",
        "sslclient",
        *[str(batch / rid / "full-chain.cert.pem") for rid in rids],
    )
    assert proc.returncode == 0 and proc.stdout.decode().count(": OK") == 10, proc.stderr
    info = json.loads((batch / "ock-003" / "device.json").read_text())
    assert info["key"]["custody"] == "retain" and "token=ock-station" in info["key"]["uri"]
    # the retained key signs in the token (raw CKM_RSA_PKCS) and matches the certificate
    signature = ock.python(
        "import sys; sys.path.insert(0, '.')\n"
        "from cryptography.hazmat.primitives import hashes\n"
        "from cryptography.hazmat.primitives.asymmetric import padding\n"
        "from pipeline import hsm\n"
        "from pipeline.secret import SecretRef\n"
        f"uri = hsm.Pkcs11Uri.parse({info['key']['uri']!r})\n"
        f"_, signer = hsm.resolve_signer(uri, module_path={ock.module!r}, "
        "pin=SecretRef('env', 'PROVLINE_PIN'))\n"
        "print(signer.sign(b'challenge', padding.PKCS1v15(), hashes.SHA256()).hex())\n"
    )
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    cert = x509.load_pem_x509_certificate((batch / "ock-003" / "device.cert.pem").read_bytes())
    cert.public_key().verify(  # type: ignore[union-attr,call-arg]
        bytes.fromhex(signature.strip()), b"challenge", padding.PKCS1v15(), hashes.SHA256()
    )
    # a kill mid-device: intent journaled, no durable bundle, half a key pair in the token
    db = sqlite3.connect(batch / "journal.sqlite")
    serial = db.execute("SELECT serial FROM devices WHERE registration_id = 'ock-004'").fetchone()
    db.execute("UPDATE devices SET state = 'intent' WHERE registration_id = 'ock-004'")
    db.execute("UPDATE serials SET state = 'intent' WHERE serial = ?", serial)
    db.commit()
    db.close()
    (batch / "ock-004" / "device.json").unlink()  # the bundle was not complete
    ock.python(
        "from pkcs11 import Attribute, ObjectClass\n"
        "half = {Attribute.LABEL: 'ock-004', Attribute.CLASS: ObjectClass.PRIVATE_KEY}\n"
        "for o in list(session.get_objects(half)):\n"
        "    o.destroy()\n"
    )
    second = json.loads(
        ock.provline("run", str(manifest), "--station", str(station), "--json").stdout
    )
    assert second["counts"] == {"bundled": 10} and second["serials"] == {"issued": 10, "void": 1}
    events = [json.loads(line) for line in (batch / "audit.jsonl").open()]
    removed = [e["data"] for e in events if e["event"] == "orphan_removed"]
    assert removed == [{"object": "public", "label": "ock-004", "why": "no private half"}]
    kept = [e["data"] for e in events if e["event"] == "orphan_kept"]
    assert {
        "object": "private",
        "label": "imported-ca",
        "why": "no public half, not made by this batch",
    } in kept
    assert [
        line for line in _objects(ock) if "imported-ca" in line or "other-app" in line
    ] == foreign
    verified = ock.provline("audit", "verify", str(batch), "--root", str(ock_ca.root))
    assert verified.returncode == 0
