"""The certificate builders with software keys: no HSM, no files. A CA is one call."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pipeline import ca
from pipeline.errors import CAError, InputError
from pipeline.keyprofile import KeyProfile

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)


def software_ca(profile: KeyProfile = KeyProfile.EC_P256, days: int = 365) -> ca.Issuer:
    """Root and issuing CA with software keys, as the HSM path builds them."""
    root_key = profile.generate_software_key()
    root = ca.build_root(root_key, ca.parse_name("CN=Unit Root"), days + 10, now=NOW)
    key = profile.generate_software_key()
    cert = ca.build_intermediate(
        key.public_key(), ca.parse_name("CN=Unit CA"), root, root_key, days, now=NOW
    )
    return ca.Issuer(cert, key, ca.pem(cert) + ca.pem(root))


@pytest.mark.parametrize("profile", list(KeyProfile))
def test_leaf_profile(profile: KeyProfile) -> None:
    issuer = software_ca(profile)
    device = profile.generate_software_key()
    leaf = ca.build_leaf(
        device.public_key(), "dev-1", issuer, serial=ca.random_serial(), validity_days=30, now=NOW
    )
    assert leaf.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-1")])
    assert leaf.not_valid_before_utc == NOW - ca.BACKDATE
    assert leaf.not_valid_after_utc == NOW + dt.timedelta(days=30)
    assert leaf.serial_number.bit_length() <= 159
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    expected = hashes.SHA384 if profile is KeyProfile.EC_P384 else hashes.SHA256
    assert isinstance(leaf.signature_hash_algorithm, expected)
    leaf.verify_directly_issued_by(issuer.cert)
    assert ca.key_matches(device, leaf) and not ca.key_matches(issuer.key, leaf)


def test_leaf_validity_is_capped_by_the_issuer() -> None:
    issuer = software_ca(days=10)
    leaf = ca.build_leaf(
        KeyProfile.EC_P256.generate_software_key().public_key(),
        "d",
        issuer,
        serial=1,
        validity_days=3650,
        now=NOW,
    )
    assert leaf.not_valid_after_utc == issuer.cert.not_valid_after_utc


def test_intermediate_is_a_ca_with_path_length_zero_and_inside_its_root() -> None:
    issuer = software_ca()
    bc = issuer.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0 and ca.is_ca(issuer.cert)
    root_key = KeyProfile.EC_P256.generate_software_key()
    root = ca.build_root(root_key, ca.parse_name("CN=Short Root"), 5, now=NOW)
    with pytest.raises(CAError, match="after its issuer"):
        ca.build_intermediate(
            root_key.public_key(), ca.parse_name("CN=X"), root, root_key, 6, now=NOW
        )


def test_issuer_refuses_a_key_that_is_not_its_certificates() -> None:
    issuer = software_ca()
    with pytest.raises(CAError):
        ca.Issuer(issuer.cert, KeyProfile.EC_P256.generate_software_key(), b"")


def test_proof_of_possession_names_the_code_and_is_signed_by_the_ca() -> None:
    issuer = software_ca()
    pop = ca.build_pop("ABC123", issuer.cert, issuer.key, now=NOW)
    assert ca.common_name(pop) == "ABC123"
    assert ca.signed_by(pop, issuer.cert)
    with pytest.raises(InputError):
        ca.build_pop("x" * 65, issuer.cert, issuer.key)


def test_crl_lists_the_serials_with_the_issuers_key_identifier() -> None:
    issuer = software_ca()
    crl = ca.build_crl(issuer.cert, issuer.key, [5, 7], now=NOW)
    assert sorted(r.serial_number for r in crl) == [5, 7]
    assert crl.is_signature_valid(issuer.cert.public_key())  # type: ignore[arg-type]
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest


def test_thumbprints_are_upper_case_hex_of_the_der() -> None:
    prints = ca.thumbprints(software_ca().cert)
    assert len(prints.sha1) == 40 and len(prints.sha256) == 64
    assert prints.sha256 == prints.sha256.upper()


@pytest.mark.parametrize("text", ["O=No Common Name", "CN", "not a name"])
def test_subjects_need_a_cn(text: str) -> None:
    with pytest.raises(InputError):
        ca.parse_name(text)
