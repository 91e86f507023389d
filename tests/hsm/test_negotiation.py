"""Capability negotiation, transport key identification, raw-mechanism fallbacks and undo on
failure, against a real SoftHSM2 token (the openCryptoki runs are in test_opencryptoki.py)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass

from pipeline import hsm
from pipeline.hsm import transport
from pipeline.keyprofile import KeyProfile
from pipeline.secret import SecretRef

from ..support import CA, MODULE, Hsm, provline, write_station

pytestmark = pytest.mark.integration


def _token(h: Hsm) -> hsm.Token:
    return hsm.open_token(MODULE, h.token, SecretRef("file", str(h.pin_file)), str(h.conf))


def _objects(token: hsm.Token) -> list[tuple[int, str, bytes]]:
    return sorted(
        (int(o.object_class), o[Attribute.LABEL] or "", bytes(o[Attribute.ID] or b""))
        for o in token.session.get_objects({})
    )


def test_hsm_check_prints_what_each_function_needs_and_what_softhsm2_offers(
    hsm_env: Hsm, ca_env: CA, tmp_path: Path
) -> None:
    station = write_station(tmp_path / "w.yaml", hsm_env, ca_env, output=tmp_path / "out")
    before = _objects(_token(hsm_env))
    proc = provline("hsm", "check", "--station", str(station), env=hsm_env.env())
    print(proc.stdout)  # the table, for the record (pytest -s)
    text = proc.stdout
    assert "known as: SoftHSM2" in text and "PIN 4..255 characters" in text
    rows = {tuple(line.split("  ")[0:1]) for line in text.splitlines()}
    assert ("sign certificates and CRLs",) in rows
    for expected in (
        "issuing CA key (ec-p256)",
        "CKM_ECDSA (SHA-256 on the host)",
        "custody wrapped, key profile ec-p384",
        "CKM_AES_KEY_WRAP_PAD (RFC 5649 (SoftHSM2's CKM_AES_KEY_WRAP_PAD))",
        "CKM_RSA_PKCS_KEY_PAIR_GEN (RSA-2048 key pair)",
        "identify the transport key",
        "CKA_CHECK_VALUE ",
    ):
        assert expected in text, (expected, text)
    assert "MISSING" not in text
    as_json = json.loads(
        provline("hsm", "check", "--station", str(station), "--json", env=hsm_env.env()).stdout
    )
    assert as_json["ok"] is True and as_json["module"]["family"] == "SoftHSM2"
    assert {f["status"] for f in as_json["functions"]} == {"ok"}
    retain = write_station(
        tmp_path / "r.yaml", hsm_env, ca_env, custody="retain", output=tmp_path / "out"
    )
    text = provline("hsm", "check", "--station", str(retain), env=hsm_env.env()).stdout
    assert "store device keys in the token" in text and "no object limit known" in text
    assert "provline verify-device, key profile ec-p256" in text
    assert _objects(_token(hsm_env)) == before  # a check creates nothing


def _unwrapped_aes_key(token: hsm.Token, value: bytes) -> object:
    """An AES key made by C_UnwrapKey (as the fixture's copy of the transport key is): on
    SoftHSM2 such a key has no CKA_CHECK_VALUE."""
    kek = token.session.generate_key(
        KeyType.AES,
        256,
        store=False,
        capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP,
        template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
    )
    blob = aes_key_wrap_with_padding(bytes(kek[Attribute.VALUE]), value)
    return kek.unwrap_key(
        ObjectClass.SECRET_KEY,
        KeyType.AES,
        blob,
        store=False,
        mechanism=Mechanism.AES_KEY_WRAP_PAD,
        capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP,
        template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
    )


def test_transport_key_without_check_value_is_identified_by_the_wrap_check(hsm_env: Hsm) -> None:
    token = _token(hsm_env)
    value = os.urandom(32)
    key = _unwrapped_aes_key(token, value)
    assert hsm.check_value(key) is None  # SoftHSM2 sets no KCV on unwrapped keys
    check = transport.identify(token.session, key, Mechanism.AES_KEY_WRAP_PAD)
    assert check.method == "wrap-check-v1" and check.mechanism == "CKM_AES_KEY_WRAP_PAD"
    # independent RFC 5649 implementation: the same blob from the key value and the public F
    assert bytes.fromhex(check.value) == aes_key_wrap_with_padding(value, transport.CHECK_KEY)
    assert transport.verify(token.session, key, check)
    other = _unwrapped_aes_key(token, os.urandom(32))
    assert not transport.verify(token.session, other, check)
    generated = token.session.generate_key(
        KeyType.AES, 256, store=False, capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP
    )
    kcv = transport.identify(token.session, generated, Mechanism.AES_KEY_WRAP_PAD)
    assert kcv.method == "CKA_CHECK_VALUE" and len(kcv.value) == 6
    assert transport.verify(token.session, generated, kcv)


def test_rsa_signs_with_raw_pkcs1_where_the_token_has_no_hashed_mechanism(hsm_env: Hsm) -> None:
    """openCryptoki 3.8 has no CKM_SHA256_RSA_PKCS; the host-made DigestInfo path gives the
    same PKCS#1 v1.5 signature (checked here on SoftHSM2 by hiding the hashed mechanism)."""
    token = _token(hsm_env)
    public_obj, private_obj = token.generate_keypair(KeyProfile.RSA_2048, persistent=False)
    public = hsm.public_key_of(public_obj)
    raw = hsm.signer_for(private_obj, public, frozenset({Mechanism.RSA_PKCS}))
    hashed = hsm.signer_for(private_obj, public, frozenset({Mechanism.SHA256_RSA_PKCS}))
    for algorithm in (hashes.SHA256(), hashes.SHA384()):
        signature = raw.sign(b"tbs", padding.PKCS1v15(), algorithm)  # type: ignore[call-arg]
        public.verify(signature, b"tbs", padding.PKCS1v15(), algorithm)  # type: ignore[union-attr]
    # PKCS#1 v1.5 is deterministic: both paths give the same bytes
    assert raw.sign(b"x", padding.PKCS1v15(), hashes.SHA256()) == hashed.sign(  # type: ignore[call-arg]
        b"x", padding.PKCS1v15(), hashes.SHA256()
    )


def test_undo_on_failure_destroys_what_the_block_created(hsm_env: Hsm) -> None:
    token = _token(hsm_env)
    before = _objects(token)
    with pytest.raises(RuntimeError), token.undo_on_failure() as created:
        token.generate_named_keypair(KeyProfile.EC_P256, "undo-me", created, "test")
        assert len(_objects(token)) == len(before) + 2
        raise RuntimeError("the ceremony failed after the key existed")
    assert _objects(token) == before


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A real full filesystem: a 64 KiB tmpfs, filled up (root only, as CI runs)."""
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {done.stderr.decode()}")
    try:
        fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _ceremony(
    h: Hsm, c: CA, command: str, out: Path, label: str
) -> subprocess.CompletedProcess[str]:
    if command == "audit-key":
        args = ["--issuer-cert", str(c.intermediate), "--issuer-key", c.issuer_key_uri]
    else:
        args = ["--root-cert", str(c.root), "--root-key", c.root_key_uri]
    return provline(
        "ca",
        command,
        "--out",
        str(out),
        *args,
        "--token",
        h.token,
        "--label",
        label,
        "--pin-source",
        f"file:{h.pin_file}",
        env=h.env(),
        check=False,
    )


@pytest.mark.parametrize("command", ["audit-key", "init-intermediate"])
def test_failed_ceremonies_leave_the_token_as_they_found_it(
    hsm_env: Hsm, ca_env: CA, tmp_path: Path, full_disk: Path, command: str
) -> None:
    token = _token(hsm_env)
    before = _objects(token)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the output directory should be")
    refused = _ceremony(hsm_env, ca_env, command, blocker / "ca", f"{command}-2")
    assert refused.returncode == 2 and "not a writable directory" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert _objects(token) == before  # refused before any key was made
    # The disk fills up after the key pair exists: the key pair is destroyed again.
    failed = _ceremony(hsm_env, ca_env, command, full_disk, f"{command}-3")
    assert failed.returncode == 7 and "no space left on device" in failed.stderr, failed.stderr
    assert "Traceback" not in failed.stderr
    assert _objects(token) == before
    assert not [p for p in full_disk.iterdir() if p.name != "filler"]


def test_transport_key_is_made_once_per_label(hsm_env: Hsm, ca_env: CA) -> None:
    args = [
        "--token",
        hsm_env.token,
        "--label",
        "transport-2",
        "--pin-source",
        f"file:{hsm_env.pin_file}",
    ]
    ok = provline("ca", "transport-key", *args, env=hsm_env.env())
    assert "(CKA_CHECK_VALUE)" in ok.stdout
    taken = provline("ca", "transport-key", *args, env=hsm_env.env(), check=False)
    assert (
        taken.returncode == 2
        and "already holds a secret key labelled 'transport-2'" in taken.stderr
    )
