"""CSR checks (pipeline/ca/csr.py): every request a device or a careless upstream system may
send, and what the station answers. Pure: no files, no HSM."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.ca.csr import MAX_CSR_BYTES, check_request, decode_request
from pipeline.errors import InputError
from pipeline.keyprofile import KeyProfile

from .support import crypto_csr, software_key

P256 = KeyProfile.EC_P256


def refused(data: bytes, rid: str | None = "dev-1", profile: KeyProfile = P256) -> str:
    with pytest.raises(InputError) as caught:
        check_request(data, rid, profile)
    line = caught.value.line()
    assert "\n" not in line and line.isprintable()
    return line


@pytest.mark.parametrize("profile", list(KeyProfile))
@pytest.mark.parametrize("der", [False, True])
def test_every_profile_accepted_pem_and_der(profile: KeyProfile, der: bool) -> None:
    key = software_key(profile.value)
    data = crypto_csr(key, "dev-1", der=der)
    checked = check_request(data, "dev-1", profile)
    der_bytes = (
        data if der else x509.load_pem_x509_csr(data).public_bytes(serialization.Encoding.DER)
    )
    assert checked.der == der_bytes
    assert checked.csr_sha256 == hashlib.sha256(der_bytes).hexdigest()
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert checked.public_key_sha256 == hashlib.sha256(spki).hexdigest()
    assert checked.registration_id == "dev-1" and checked.profile is profile


def test_same_request_same_digest_as_pem_and_der() -> None:
    key = software_key("ec-p256")
    request = x509.load_pem_x509_csr(crypto_csr(key, "dev-1"))
    pem = request.public_bytes(serialization.Encoding.PEM)
    der = request.public_bytes(serialization.Encoding.DER)
    assert (
        check_request(pem, "dev-1", P256).csr_sha256 == check_request(der, "dev-1", P256).csr_sha256
    )


def test_old_new_certificate_request_label() -> None:
    pem = crypto_csr(software_key("ec-p256"), "dev-1").replace(
        b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST"
    )
    assert check_request(pem, "dev-1", P256).registration_id == "dev-1"


def test_absent_cn_takes_the_registration_id_and_needs_one() -> None:
    data = crypto_csr(software_key("ec-p256"), None)
    assert check_request(data, "dev-7", P256).registration_id == "dev-7"
    assert "no subject CN and no registration ID" in refused(data, None)


def test_cn_names_the_device_when_no_id_is_given() -> None:
    assert (
        check_request(crypto_csr(software_key("ec-p256"), "modem-9"), None, P256).registration_id
        == "modem-9"
    )
    assert "is not a registration ID" in refused(
        crypto_csr(software_key("ec-p256"), "Not_Valid"), None
    )


def test_wrong_cn_and_two_cns() -> None:
    assert "CN 'dev-2' is not the registration ID dev-1" in refused(
        crypto_csr(software_key("ec-p256"), "dev-2")
    )
    key = software_key("ec-p256")
    two = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, "dev-1"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "dev-2"),
                ]
            )
        )
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    assert "2 CNs" in refused(two)


def test_other_subject_attributes_and_requested_extensions_do_not_matter() -> None:
    key = software_key("ec-p256")
    data = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Vendor"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "dev-1"),
                ]
            )
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("evil.example")]), critical=False)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    assert check_request(data, "dev-1", P256).registration_id == "dev-1"


def test_broken_signature_is_no_proof_of_possession() -> None:
    der = bytearray(crypto_csr(software_key("ec-p256"), "dev-1", der=True))
    der[-3] ^= 0x01  # inside the signature value
    assert "signature does not verify" in refused(bytes(der))


def test_a_key_signed_by_another_key_is_refused() -> None:
    """A CSR carrying one key but signed with another: the signature does not verify."""
    mine, other = software_key("ec-p256"), software_key("ec-p256")
    genuine = x509.load_pem_x509_csr(crypto_csr(mine, "dev-1"))
    forged = x509.load_pem_x509_csr(crypto_csr(other, "dev-1"))
    # splice: the other request's body with the first request's signature
    body = genuine.tbs_certrequest_bytes
    der = forged.public_bytes(serialization.Encoding.DER)
    spliced = der.replace(forged.tbs_certrequest_bytes, body)
    assert spliced != der
    assert "signature" in refused(spliced) or "DER" in refused(spliced)


@pytest.mark.parametrize(
    ("key", "says", "rule"),
    [
        (lambda: rsa.generate_private_key(65537, 1024), "RSA-1024", "under 2048 bits"),
        (lambda: rsa.generate_private_key(3, 2048), "public exponent 3", "key profile"),
        (lambda: rsa.generate_private_key(65537, 4096), "RSA-4096", "key profile"),
        (lambda: ec.generate_private_key(ec.SECP521R1()), "EC secp521r1", "key profile"),
        (lambda: ec.generate_private_key(ec.SECP256K1()), "EC secp256k1", "key profile"),
    ],
)
def test_keys_outside_the_profiles(key: object, says: str, rule: str) -> None:
    data = crypto_csr(key(), "dev-1")  # type: ignore[operator]
    line = refused(data, profile=KeyProfile.RSA_2048 if "RSA" in says else P256)
    assert says in line and rule in line


def test_a_key_of_another_profile_than_the_batch() -> None:
    line = refused(crypto_csr(software_key("ec-p384"), "dev-1"))
    assert "EC secp384r1, the batch's key profile is ec-p256" in line
    line = refused(crypto_csr(software_key("rsa-2048"), "dev-1"), profile=KeyProfile.RSA_3072)
    assert "RSA-2048, the batch's key profile is rsa-3072" in line


def test_ed25519_is_not_a_profile() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    data = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-1")]))
        .sign(key, None)
        .public_bytes(serialization.Encoding.PEM)
    )
    assert "Ed25519" in refused(data)


def test_sha1_signatures_are_refused() -> None:
    """A request signed with ECDSA-SHA1 (built with asn1crypto: cryptography no longer
    makes SHA-1 signatures): the signature verifies, the hash is too weak."""
    from asn1crypto import csr as asn1_csr

    key = software_key("ec-p256")
    request = asn1_csr.CertificationRequest.load(crypto_csr(key, "dev-1", der=True))
    tbs = request["certification_request_info"]
    signature = key.sign(tbs.dump(), ec.ECDSA(hashes.SHA1()))  # type: ignore[union-attr, call-arg]
    weak = asn1_csr.CertificationRequest(
        {
            "certification_request_info": tbs,
            "signature_algorithm": {"algorithm": "sha1_ecdsa"},
            "signature": signature,
        }
    ).dump()
    assert "signed with SHA1" in refused(weak)


def _certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    import datetime as dt

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-1")])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


def test_a_certificate_where_a_csr_belongs() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(key)
    assert "a certificate, not a certificate signing request" in refused(
        cert.public_bytes(serialization.Encoding.PEM)
    )
    assert "a certificate (DER)" in refused(cert.public_bytes(serialization.Encoding.DER))


def test_private_keys_are_named_never_shown() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    for data in (pem, der):
        line = refused(data)
        assert "a private key" in line and "never leaves" in line
        body = pem.decode().splitlines()[1]
        assert body[:16] not in line and der.hex()[:16] not in line


def test_a_public_key_is_not_a_request() -> None:
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert "a public key" in refused(pem)


def test_two_requests_or_a_request_with_a_key() -> None:
    one = crypto_csr(software_key("ec-p256"), "dev-1")
    assert "2 CSRs" in refused(one + one)
    key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert "together with a private key" in refused(one + key)


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"", "empty"),
        (b"   \n", "empty"),
        (b"hello, I am a CSR", "not PEM and not DER"),
        (b"\x30\x03\x02\x01\x00", "DER that is not a CSR"),
        (
            b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "damaged",
        ),
        (b"\x00" * (MAX_CSR_BYTES + 1), "at most 16 KiB"),
    ],
)
def test_garbage(data: bytes, says: str) -> None:
    assert says in refused(data)


def test_a_request_of_another_version_is_one_line_pem_or_der() -> None:
    """cryptography raises InvalidVersion (not ValueError) for a version other than v1."""
    der = bytearray(crypto_csr(software_key("ec-p256"), "dev-1", der=True))
    version = der.index(b"\x02\x01\x00")  # CertificationRequestInfo.version INTEGER 0
    der[version + 2] = 0x12
    assert "unknown version 18" in refused(bytes(der))
    pem = (  # the same bytes as PEM take the PEM path
        b"-----BEGIN CERTIFICATE REQUEST-----\n"
        + base64.encodebytes(bytes(der))
        + b"-----END CERTIFICATE REQUEST-----\n"
    )
    assert "unknown version 18" in refused(pem)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_any_bytes_give_a_request_or_one_line(data: bytes) -> None:
    try:
        decode_request(data)
    except InputError as exc:
        assert exc.line().isprintable()


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=400), st.integers(min_value=0, max_value=255))
def test_any_flipped_byte_is_caught_or_harmless(position: int, value: int) -> None:
    """Damage anywhere in a DER request: refused, or still the same key with a valid
    signature (a change the signature does not cover, such as the outer length form)."""
    key = software_key("ec-p256")
    der = bytearray(crypto_csr(key, "dev-1", der=True))
    position %= len(der)
    der[position] = value
    try:
        checked = check_request(bytes(der), "dev-1", P256)
    except InputError:
        return
    assert checked.public_key.public_numbers() == key.public_key().public_numbers()
