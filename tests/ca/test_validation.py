"""RFC 5280 path validation of device chains (pipeline.ca.validation): software keys, no HSM."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pipeline.ca.validation import PathError, extend_path, validate_client_path

NOW = dt.datetime.now(dt.UTC)
Key = ec.EllipticCurvePrivateKey


def _cert(
    cn: str,
    key: Key,
    issuer: x509.Certificate | None,
    issuer_key: Key,
    *,
    ca: bool,
    path_length: int | None = None,
    eku: list[x509.ObjectIdentifier] | None = None,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(minutes=5))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.KeyUsage(not ca, False, False, False, False, ca, ca, False, False), critical=True
        )
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    if not ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage(eku or [ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _key() -> Key:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def pki() -> dict[str, object]:
    root_key, inter_key, leaf_key = _key(), _key(), _key()
    root = _cert("root", root_key, None, root_key, ca=True)
    inter = _cert("issuing", inter_key, root, root_key, ca=True, path_length=0)
    leaf = _cert("dev-001", leaf_key, inter, inter_key, ca=False)
    return {
        "root": root,
        "inter": inter,
        "leaf": leaf,
        "inter_key": inter_key,
        "leaf_key": leaf_key,
    }


def test_a_device_chain_validates_to_the_root_or_to_the_issuing_ca(pki: dict[str, object]) -> None:
    root, inter, leaf = pki["root"], pki["inter"], pki["leaf"]
    assert isinstance(leaf, x509.Certificate) and isinstance(inter, x509.Certificate)
    assert isinstance(root, x509.Certificate)
    assert validate_client_path(leaf, [inter, root], [root]) == [leaf, inter, root]
    short = validate_client_path(leaf, [inter, root], [inter])
    assert short == [leaf, inter]
    assert extend_path(short, [leaf, inter, root]) == [leaf, inter, root]


def test_a_leaf_that_signs_a_leaf_is_refused(pki: dict[str, object]) -> None:
    root, inter, leaf, leaf_key = pki["root"], pki["inter"], pki["leaf"], pki["leaf_key"]
    assert isinstance(leaf, x509.Certificate) and isinstance(leaf_key, ec.EllipticCurvePrivateKey)
    assert isinstance(root, x509.Certificate) and isinstance(inter, x509.Certificate)
    rogue = _cert("dev-rogue", _key(), leaf, leaf_key, ca=False)
    assert rogue.verify_directly_issued_by(leaf) is None  # every signature is fine
    with pytest.raises(PathError, match="basicConstraints"):
        validate_client_path(rogue, [leaf, inter, root], [root])


def test_path_length_and_client_auth_are_enforced(pki: dict[str, object]) -> None:
    root, inter, inter_key = pki["root"], pki["inter"], pki["inter_key"]
    assert isinstance(inter, x509.Certificate) and isinstance(root, x509.Certificate)
    assert isinstance(inter_key, ec.EllipticCurvePrivateKey)
    sub_key = _key()
    sub = _cert("sub", sub_key, inter, inter_key, ca=True)  # pathLen 0 forbids this CA
    below = _cert("dev-002", _key(), sub, sub_key, ca=False)
    with pytest.raises(PathError, match="path length"):
        validate_client_path(below, [sub, inter], [root])
    server_only = _cert(
        "dev-003", _key(), inter, inter_key, ca=False, eku=[ExtendedKeyUsageOID.SERVER_AUTH]
    )
    with pytest.raises(PathError, match="EKU"):
        validate_client_path(server_only, [inter], [root])


def test_self_signed_device_is_its_own_anchor_and_nothing_else(pki: dict[str, object]) -> None:
    root = pki["root"]
    assert isinstance(root, x509.Certificate)
    key = _key()
    selfie = _cert("dev-self", key, None, key, ca=False)
    assert validate_client_path(selfie, [], [selfie]) == [selfie]
    with pytest.raises(PathError):
        validate_client_path(selfie, [], [root])
    with pytest.raises(PathError, match="no trust anchor"):
        validate_client_path(selfie, [], [])


def test_an_expired_chain_is_refused(pki: dict[str, object]) -> None:
    root, inter, leaf = pki["root"], pki["inter"], pki["leaf"]
    assert isinstance(leaf, x509.Certificate) and isinstance(inter, x509.Certificate)
    assert isinstance(root, x509.Certificate)
    with pytest.raises(PathError):
        validate_client_path(leaf, [inter], [root], at=NOW + dt.timedelta(days=60))
