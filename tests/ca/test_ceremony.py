"""The CA hierarchy: builders in pipeline.ca and the `provline ca` commands."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from pkcs11 import ObjectClass

from pipeline import ca, hsm
from pipeline.errors import CAError
from pipeline.keyprofile import KeyProfile
from pipeline.secret import SecretRef

from ..support import CA, MODULE, Hsm, openssl, provline

pytestmark = pytest.mark.integration


def _issuer(h: Hsm, c: CA) -> ca.Issuer:
    token = hsm.open_token(MODULE, h.token, SecretRef("file", str(h.pin_file)), str(h.conf))
    return ca.Issuer(
        ca.load_cert(str(c.intermediate)), token.signer(label="intermediate"), c.chain.read_bytes()
    )


def test_root_and_intermediate_profiles(ca_env: CA) -> None:
    root, inter = ca.load_cert(str(ca_env.root)), ca.load_cert(str(ca_env.intermediate))
    for cert, pathlen in ((root, None), (inter, 0)):
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        assert bc.critical and bc.value.ca and bc.value.path_length == pathlen
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
        assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    aki = inter.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert (
        aki.key_identifier
        == root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    )
    assert root.not_valid_before_utc <= inter.not_valid_before_utc
    assert inter.not_valid_after_utc <= root.not_valid_after_utc
    assert ca_env.chain.read_bytes() == ca.pem(inter) + ca.pem(root)


def test_hsm_signed_leaf_chain_passes_openssl_verify(
    hsm_env: Hsm, ca_env: CA, tmp_path: Path
) -> None:
    issuer = _issuer(hsm_env, ca_env)
    device_key = KeyProfile.EC_P256.generate_software_key()
    leaf = ca.build_leaf(
        device_key.public_key(),
        "test-device-001",
        issuer,
        serial=ca.random_serial(),
        validity_days=30,
    )
    leaf_path = tmp_path / "leaf.pem"
    leaf_path.write_bytes(ca.pem(leaf))
    proc = openssl(
        "verify",
        "-CAfile",
        str(ca_env.root),
        "-untrusted",
        str(ca_env.intermediate),
        "-purpose",
        "sslclient",
        str(leaf_path),
    )
    assert proc.returncode == 0, proc.stderr
    assert b": OK" in proc.stdout
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_leaf_not_after_is_capped_by_the_issuer(hsm_env: Hsm, ca_env: CA) -> None:
    issuer = _issuer(hsm_env, ca_env)
    key = KeyProfile.EC_P256.generate_software_key()
    leaf = ca.build_leaf(key.public_key(), "capped", issuer, serial=5, validity_days=36500)
    assert leaf.not_valid_after_utc == issuer.cert.not_valid_after_utc


def test_issuer_refuses_a_key_that_does_not_match(ca_env: CA) -> None:
    other = KeyProfile.EC_P256.generate_software_key()
    with pytest.raises(CAError):
        ca.Issuer(ca.load_cert(str(ca_env.intermediate)), other, b"")


def test_pop_certificate_has_the_code_as_cn_and_verifies(
    hsm_env: Hsm, ca_env: CA, tmp_path: Path
) -> None:
    out = tmp_path / "pop.pem"
    provline(
        "ca",
        "pop",
        "--code",
        "8F2C1A7E9B3D4C5E",
        "--ca-cert",
        str(ca_env.intermediate),
        "--ca-key",
        ca_env.issuer_key_uri,
        "--out",
        str(out),
        "--pin-source",
        f"file:{hsm_env.pin_file}",
        env=hsm_env.env(),
    )
    pop = ca.load_cert(str(out))
    assert ca.common_name(pop) == "8F2C1A7E9B3D4C5E"
    pop.verify_directly_issued_by(ca.load_cert(str(ca_env.intermediate)))
    proc = openssl(
        "verify", "-CAfile", str(ca_env.root), "-untrusted", str(ca_env.intermediate), str(out)
    )
    assert proc.returncode == 0, proc.stderr
    # and for the root, whose key is in its own token
    root_out = tmp_path / "root-pop.pem"
    provline(
        "ca",
        "pop",
        "--code",
        "ROOTCODE42",
        "--ca-cert",
        str(ca_env.root),
        "--ca-key",
        ca_env.root_key_uri,
        "--out",
        str(root_out),
        env=hsm_env.env(),
    )
    ca.load_cert(str(root_out)).verify_directly_issued_by(ca.load_cert(str(ca_env.root)))


def test_root_in_encrypted_pkcs8_file(hsm_env: Hsm, tmp_path: Path) -> None:
    env = {**hsm_env.env(), "ROOT_PASS": "correct horse battery"}
    key_file = tmp_path / "root.key.pem"
    provline(
        "ca",
        "init-root",
        "--out",
        str(tmp_path),
        "--key-file",
        str(key_file),
        "--passphrase-source",
        "env:ROOT_PASS",
        "--days",
        "100",
        env=env,
    )
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert b"ENCRYPTED PRIVATE KEY" in key_file.read_bytes()
    key = serialization.load_pem_private_key(key_file.read_bytes(), b"correct horse battery")
    root = ca.load_cert(str(tmp_path / "root.cert.pem"))
    assert key.public_key() == root.public_key()
    # an intermediate asking for more validity than the root has fails and leaves no key
    before = _private_labels(hsm_env)
    proc = provline(
        "ca",
        "init-intermediate",
        "--out",
        str(tmp_path / "i"),
        "--root-cert",
        str(tmp_path / "root.cert.pem"),
        "--root-key",
        str(key_file),
        "--passphrase-source",
        "env:ROOT_PASS",
        "--token",
        hsm_env.token,
        "--pin-source",
        f"file:{hsm_env.pin_file}",
        "--label",
        "too-long",
        "--days",
        "1000",
        env=env,
        check=False,
    )
    assert proc.returncode == 4, proc.stderr
    assert "validity inside the issuer" in proc.stderr
    assert _private_labels(hsm_env) == before
    assert not (tmp_path / "i").exists()
    # a wrong passphrase is one line, exit 2
    bad = provline(
        "ca",
        "pop",
        "--code",
        "X1",
        "--ca-cert",
        str(tmp_path / "root.cert.pem"),
        "--ca-key",
        str(key_file),
        "--passphrase-source",
        "env:NOPE",
        "--out",
        str(tmp_path / "p.pem"),
        env={**env, "NOPE": "wrong-pass"},
        check=False,
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def _private_labels(h: Hsm) -> list[str]:
    token = hsm.open_token(MODULE, h.token, SecretRef("file", str(h.pin_file)), str(h.conf))
    return sorted(o.label for o in token.objects(ObjectClass.PRIVATE_KEY))


def test_show_prints_thumbprints_and_key_uri(hsm_env: Hsm, ca_env: CA) -> None:
    proc = provline(
        "ca",
        "show",
        str(ca_env.intermediate),
        "--token",
        hsm_env.token,
        "--json",
        "--pin-source",
        f"file:{hsm_env.pin_file}",
        env=hsm_env.env(),
    )
    info = json.loads(proc.stdout)
    fp = openssl("x509", "-in", str(ca_env.intermediate), "-noout", "-fingerprint", "-sha256")
    assert info["sha256_thumbprint"] == fp.stdout.decode().split("=")[1].strip().replace(":", "")
    fp1 = openssl("x509", "-in", str(ca_env.intermediate), "-noout", "-fingerprint", "-sha1")
    assert info["sha1_thumbprint"] == fp1.stdout.decode().split("=")[1].strip().replace(":", "")
    assert info["key"].startswith(f"pkcs11:token={hsm_env.token};object=intermediate;id=%")
    assert info["ca"] is True


def test_audit_certificate_chains_to_the_root(ca_env: CA) -> None:
    proc = openssl(
        "verify",
        "-CAfile",
        str(ca_env.root),
        "-untrusted",
        str(ca_env.intermediate),
        "-purpose",
        "any",
        str(ca_env.audit_cert),
    )
    assert proc.returncode == 0, proc.stderr
    usage = ca.load_cert(str(ca_env.audit_cert)).extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.value.digital_signature and usage.value.content_commitment


def test_crl_revokes_serials(hsm_env: Hsm, ca_env: CA) -> None:
    issuer = _issuer(hsm_env, ca_env)
    crl = ca.build_crl(issuer.cert, issuer.key, [7, 11])
    assert crl.is_signature_valid(issuer.cert.public_key())  # type: ignore[arg-type]
    assert {r.serial_number for r in crl} == {7, 11}
