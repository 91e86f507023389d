"""Device-custody batches end to end (`provline run`, real SoftHSM2, real openssl): CSRs made
by the openssl CLI for every key profile and by cryptography; a 1,000-device batch killed at
durable steps and resumed; bad CSRs refused before anything is signed."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
from pathlib import Path

import pytest
from cryptography import x509
from pkcs11 import ObjectClass

from pipeline import hsm
from pipeline.secret import SecretRef

from ..support import (
    CA,
    MODULE,
    Hsm,
    group_gone,
    openssl,
    provline,
    serial_states,
    start_run,
)
from .support import (
    check_bundle,
    crypto_csr,
    device_station,
    openssl_csr,
    openssl_key,
    openssl_verify,
    software_key,
    write_csrs,
)

pytestmark = pytest.mark.integration


def _run(manifest: Path, station: Path, h: Hsm, *args: str, check: bool = True) -> str:
    return provline(
        "run", str(manifest), "--station", str(station), "--quiet", *args, env=h.env(), check=check
    ).stderr


def _verified(batch: Path, c: CA) -> None:
    done = provline("audit", "verify", str(batch), "--root", str(c.root), check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("profile", ["ec-p256", "ec-p384", "rsa-2048", "rsa-3072"])
def test_openssl_csrs_of_every_profile(
    hsm_env: Hsm, ca_env: CA, tmp_path: Path, profile: str
) -> None:
    """A vendor's CSRs (openssl genpkey + req): PEM with the CN, DER without a CN, and one
    asking for a CA certificate with a SAN: all get the station's leaf, for their key."""
    station = device_station(tmp_path, hsm_env, ca_env)
    csrs, keys = tmp_path / "csrs", tmp_path / "keys"
    csrs.mkdir()
    keys.mkdir()
    tag = profile.replace("-", "")
    rids = [f"{tag}-pem", f"{tag}-der", f"{tag}-ext"]
    for rid in rids:
        openssl_key(keys / f"{rid}.key.pem", profile)
    openssl_csr(keys / f"{rids[0]}.key.pem", csrs / f"{rids[0]}.pem", f"/O=Vendor/CN={rids[0]}")
    openssl_csr(keys / f"{rids[1]}.key.pem", csrs / f"{rids[1]}.der", "/O=Vendor", True)
    openssl_csr(
        keys / f"{rids[2]}.key.pem",
        csrs / f"{rids[2]}.csr",
        f"/CN={rids[2]}",
        False,
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "subjectAltName=DNS:evil.example",
        "-addext",
        "keyUsage=critical,keyCertSign",
    )
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        f"batch_id: lot-{tag}\nkey_profile: {profile}\ncsr_dir: csrs\n"
        + "devices:\n"
        + "".join(f"  - {{registration_id: {rid}}}\n" for rid in rids)
    )
    _run(manifest, station, hsm_env)
    batch = tmp_path / "out" / f"lot-{tag}"
    for rid, name in zip(rids, (f"{rids[0]}.pem", f"{rids[1]}.der", f"{rids[2]}.csr"), strict=True):
        leaf = check_bundle(batch, rid, (csrs / name).read_bytes())
        names = [e.oid._name for e in leaf.extensions]
        assert "subjectAltName" not in names  # requested extensions are ignored
        # openssl agrees: the leaf's public key is the CSR's
        csr_key = openssl(
            "req",
            "-in",
            str(csrs / name),
            "-inform",
            "DER" if name.endswith(".der") else "PEM",
            "-pubkey",
            "-noout",
        )
        leaf_key = openssl("x509", "-in", str(batch / rid / "device.cert.pem"), "-pubkey", "-noout")
        assert csr_key.returncode == 0 and csr_key.stdout == leaf_key.stdout
    openssl_verify(ca_env, [batch / rid / "device.cert.pem" for rid in rids])
    # the full chain is leaf, issuing CA, root: a device's TLS stack can use it as is
    chain = x509.load_pem_x509_certificates((batch / rids[0] / "full-chain.cert.pem").read_bytes())
    assert [c.subject.rfc4514_string() for c in chain][1:] == [
        "CN=Test Issuing CA,O=provline",
        "CN=Test Root,O=provline",
    ]
    _verified(batch, ca_env)
    events = [json.loads(line) for line in (batch / "audit.jsonl").open()]
    issued = [e for e in events if e["event"] == "issued"]
    assert {e["data"]["custody"] for e in issued} == {"device"}
    assert all(e["data"]["key_generated"] is False for e in issued)


KILLS = [
    "commit.intents:2",  # a chunk reserved, nothing signed
    "logged.results:2",  # a chunk logged issued, not committed
    "commit.results:4",  # chunks committed
    "audit.flush:9",  # somewhere in between
]


def test_1000_cryptography_csrs_killed_and_resumed(
    own_tokens: tuple[Hsm, CA], tmp_path: Path
) -> None:
    hsm_env, ca_env = own_tokens
    station = device_station(tmp_path, hsm_env, ca_env, extra="")
    station.write_text(station.read_text().replace("chunk_size: 64", "chunk_size: 50"))
    rids = [f"k-{n:04d}" for n in range(1, 1001)]
    write_csrs(tmp_path / "csrs", rids[:990])
    for rid in rids[990:995]:  # DER under .der, PEM under .pem: both are read
        (tmp_path / "csrs" / f"{rid}.der").write_bytes(
            crypto_csr(software_key("ec-p256"), rid, der=True)
        )
    for rid in rids[995:]:
        (tmp_path / "csrs" / f"{rid}.pem").write_bytes(crypto_csr(software_key("ec-p256"), None))
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "batch_id: lot-1k\ncsr_dir: csrs\ngenerator: {prefix: k-, digits: 4, count: 1000}\n"
    )
    batch = tmp_path / "out" / "lot-1k"
    for point in KILLS:
        run = start_run(
            manifest, station, "--quiet", env=hsm_env.env(), logs=tmp_path / "logs", crash_at=point
        )
        code = run.wait()
        assert code == -signal.SIGKILL, f"{point}: exit {code}\n{run.stderr}"
        assert group_gone(run.proc.pid)
        assert "Traceback" not in run.stderr
    final = start_run(manifest, station, "--json", env=hsm_env.env(), logs=tmp_path / "logs")
    assert final.wait() == 0, final.stderr
    report = json.loads(final.stdout)
    assert report["counts"] == {"bundled": 1000} and report["complete"]
    db = sqlite3.connect(batch / "journal.sqlite")
    issued = dict(
        db.execute(
            "SELECT registration_id, COUNT(*) FROM serials WHERE state = 'issued' "
            "GROUP BY registration_id"
        )
    )
    assert issued == dict.fromkeys(rids, 1)
    assert db.execute("SELECT COUNT(*) FROM requests").fetchone() == (1000,)
    db.close()
    states = serial_states(batch)
    assert set(states.values()) <= {"issued", "void", "released"}
    assert sorted(s for s, st in states.items() if st == "void") == sorted(
        v["serial"] for v in report["void_serials"]
    )
    for rid in rids:
        name = next(p for p in (tmp_path / "csrs").glob(f"{rid}.*"))
        check_bundle(batch, rid, name.read_bytes())
    openssl_verify(ca_env, [batch / rid / "device.cert.pem" for rid in rids])
    _verified(batch, ca_env)


def _token_objects(h: Hsm) -> int:
    token = hsm.open_token(MODULE, h.token, SecretRef("file", str(h.pin_file)), str(h.conf))
    return sum(
        1
        for kind in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY, ObjectClass.SECRET_KEY)
        for _ in token.objects(kind)
    )


def test_bad_csrs_are_refused_before_anything_is_signed(
    hsm_env: Hsm, ca_env: CA, tmp_path: Path
) -> None:
    station = device_station(tmp_path, hsm_env, ca_env)
    first = tmp_path / "first"
    first.mkdir()
    earlier_key = software_key("ec-p256")
    (first / "e-1.csr").write_bytes(crypto_csr(earlier_key, "e-1"))
    write_csrs(first, ["e-2"])
    (tmp_path / "first.yaml").write_text(
        "batch_id: lot-a\ncsr_dir: first\ngenerator: {prefix: e-, digits: 1, count: 2}\n"
    )
    _run(tmp_path / "first.yaml", station, hsm_env)

    bad = tmp_path / "bad"
    write_csrs(bad, ["b-ok1", "b-ok2"])
    broken = bytearray(crypto_csr(software_key("ec-p256"), "b-sig", der=True))
    broken[-3] ^= 1
    (bad / "b-sig.der").write_bytes(bytes(broken))
    (bad / "b-cn.csr").write_bytes(crypto_csr(software_key("ec-p256"), "someone-else"))
    small = tmp_path / "rsa1024.key"
    openssl_key(small, "rsa-1024")
    openssl_csr(small, bad / "b-rsa.csr", "/CN=b-rsa")
    twin = software_key("ec-p256")
    (bad / "b-twin1.csr").write_bytes(crypto_csr(twin, "b-twin1"))
    (bad / "b-twin2.csr").write_bytes(crypto_csr(twin, "b-twin2"))
    (bad / "b-again.csr").write_bytes(crypto_csr(earlier_key, "b-again"))  # the key of lot-a's e-1
    (bad / "b-junk.csr").write_bytes(b"\x89PNG\r\n\x1a\n not a csr \x1b[2J")
    shutil.copy(tmp_path / "out" / "lot-a" / "e-2" / "device.cert.pem", bad / "b-cert.pem")
    rids = [
        "b-ok1",
        "b-ok2",
        "b-sig",
        "b-cn",
        "b-rsa",
        "b-twin1",
        "b-twin2",
        "b-again",
        "b-junk",
        "b-cert",
    ]
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(
        "batch_id: lot-b\ncsr_dir: bad\ndevices:\n"
        + "".join(f"  - {{registration_id: {r}}}\n" for r in rids)
    )
    objects = _token_objects(hsm_env)
    inventory = tmp_path / "out" / ".lifecycle" / "inventory.sqlite"
    before = inventory.read_bytes()
    expected = {
        "b-sig": "signature does not verify",
        "b-cn": "CN 'someone-else' is not the registration ID b-cn",
        "b-rsa": "RSA-1024",
        "b-twin2": "its key is also the key of b-twin1 in this batch",
        "b-again": "certified for e-1 in lot-a",
        "b-junk": "not PEM and not DER",
        "b-cert": "a certificate, not a certificate signing request",
    }
    for command in ("validate", "plan", "run"):
        done = provline(
            command, str(manifest), "--station", str(station), env=hsm_env.env(), check=False
        )
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        lines = done.stderr.splitlines()
        assert len(lines) == len(expected), (command, lines)
        for rid, says in expected.items():
            assert any(
                f"bad.yaml:{4 + rids.index(rid)}: {rid}: " in line and says in line
                for line in lines
            ), (rid, lines)
        assert all(line.startswith("error: ") and line.isprintable() for line in lines)
    assert not (tmp_path / "out" / "lot-b").exists()
    assert not list((tmp_path / "out").glob(".lot-b*"))
    assert _token_objects(hsm_env) == objects
    assert inventory.read_bytes() == before


def test_a_csr_changed_between_runs_is_refused_on_resume(
    hsm_env: Hsm, ca_env: CA, tmp_path: Path
) -> None:
    station = device_station(tmp_path, hsm_env, ca_env)
    write_csrs(tmp_path / "csrs", ["r-1", "r-2", "r-3"])
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "batch_id: lot-r\ncsr_dir: csrs\ngenerator: {prefix: r-, digits: 1, count: 3}\n"
    )
    run = start_run(
        manifest,
        station,
        "--quiet",
        env=hsm_env.env(),
        logs=tmp_path / "logs",
        crash_at="commit.intents:1",
    )
    assert run.wait() == -signal.SIGKILL
    write_csrs(tmp_path / "csrs", ["r-2"])  # the vendor sent another CSR meanwhile
    done = provline("run", str(manifest), "--station", str(station), env=hsm_env.env(), check=False)
    assert done.returncode == 2
    assert (
        "r-2: CSR" in done.stderr
        and "differs from the one batch lot-r was started with" in done.stderr
    )
