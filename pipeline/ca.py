"""Certificate builders for the CA hierarchy: root, intermediate, proof-of-possession, audit
signer and device leaves.

Pure functions of keys, names and times: the keys may be software keys or HSM signers from
:mod:`pipeline.hsm`; nothing here touches files or tokens.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import CAError, InputError
from .keyprofile import KeyProfile

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

BACKDATE = dt.timedelta(minutes=5)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def random_serial() -> int:
    """159 random bits: positive, at most 20 octets (RFC 5280 §4.1.2.2), never zero."""
    return secrets.randbits(159) or 1


def parse_name(text: str) -> x509.Name:
    try:
        name = x509.Name.from_rfc4514_string(text)
    except ValueError as exc:
        raise InputError(f"subject {text!r} is not an RFC 4514 name: {exc}",
                         rule="subject like 'CN=Root,O=Acme'") from exc
    if not name.get_attributes_for_oid(NameOID.COMMON_NAME):
        raise InputError(f"subject {text!r} has no CN", rule="CA subjects carry a CN")
    return name


def signing_hash(key: PrivateKey | PublicKey) -> hashes.HashAlgorithm:
    """The hash used with a signing key: SHA-384 for P-384, SHA-256 for P-256 and RSA."""
    public = key.public_key() if hasattr(key, "public_key") else key
    return KeyProfile.of_public_key(public).hash()


def _ski(public: PublicKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(public)


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


_CA_USAGE = x509.KeyUsage(
    digital_signature=False, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
    encipher_only=False, decipher_only=False,
)
_SIGNING_USAGE = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
    encipher_only=False, decipher_only=False,
)


def build_root(key: PrivateKey, subject: x509.Name, days: int,
               now: dt.datetime | None = None) -> x509.Certificate:
    now = now or utcnow()
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(public)
        .serial_number(random_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .add_extension(_ski(public), critical=False)
        .sign(key, signing_hash(key))
    )


def _not_after_within(issuer: x509.Certificate, start: dt.datetime, days: int,
                      what: str) -> dt.datetime:
    not_after = start + dt.timedelta(days=days)
    if not_after > issuer.not_valid_after_utc:
        raise CAError(
            f"{what} would end {not_after:%Y-%m-%d}, after its issuer "
            f"({issuer.not_valid_after_utc:%Y-%m-%d})",
            rule="validity inside the issuer's",
        )
    return not_after


def build_intermediate(public: PublicKey, subject: x509.Name, root_cert: x509.Certificate,
                       root_key: PrivateKey, days: int,
                       now: dt.datetime | None = None) -> x509.Certificate:
    now = now or utcnow()
    return (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(root_cert.subject)
        .public_key(public)
        .serial_number(random_serial())
        .not_valid_before(max(now - BACKDATE, root_cert.not_valid_before_utc))
        .not_valid_after(_not_after_within(root_cert, now, days, "the intermediate"))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .add_extension(_ski(public), critical=False)
        .add_extension(_aki(root_cert), critical=False)
        .sign(root_key, signing_hash(root_key))
    )


def build_pop(code: str, ca_cert: x509.Certificate, ca_key: PrivateKey,
              now: dt.datetime | None = None) -> x509.Certificate:
    """The proof-of-possession certificate DPS / IoT Hub / IoT Central ask for: subject CN is
    the verification code they show, signed by the CA's own key. Its key is throwaway."""
    if not code or len(code) > 64:
        raise InputError("verification code must have 1 to 64 characters", rule="CN length")
    now = now or utcnow()
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, code)]))
        .issuer_name(ca_cert.subject)
        .public_key(leaf_key.public_key())
        .serial_number(random_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + dt.timedelta(days=30), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_aki(ca_cert), critical=False)
        .sign(ca_key, signing_hash(ca_key))
    )


def build_audit_signer(public: PublicKey, subject: x509.Name, issuer_cert: x509.Certificate,
                       issuer_key: PrivateKey, days: int,
                       now: dt.datetime | None = None) -> x509.Certificate:
    """Certificate of the station's audit-log signing key (digitalSignature + nonRepudiation)."""
    now = now or utcnow()
    usage = x509.KeyUsage(
        digital_signature=True, content_commitment=True, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
        encipher_only=False, decipher_only=False,
    )
    return (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(issuer_cert.subject)
        .public_key(public)
        .serial_number(random_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(_not_after_within(issuer_cert, now, days, "the audit certificate"))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(_ski(public), critical=False)
        .add_extension(_aki(issuer_cert), critical=False)
        .sign(issuer_key, signing_hash(issuer_key))
    )


@dataclass
class Issuer:
    """The issuing CA as the leaf builder needs it, computed once per process."""

    cert: x509.Certificate
    key: PrivateKey
    chain_pem: bytes  # issuer and every CA above it, root last
    hash: hashes.HashAlgorithm = field(init=False)
    aki: x509.AuthorityKeyIdentifier = field(init=False)

    def __post_init__(self) -> None:
        self.hash = signing_hash(self.key)
        self.aki = _aki(self.cert)
        if self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != self.cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise CAError("the issuer key does not match the issuer certificate",
                          rule="issuer key matches issuer certificate")


_LEAF_USAGE = _SIGNING_USAGE
_CLIENT_AUTH = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
_NOT_CA = x509.BasicConstraints(ca=False, path_length=None)


def build_leaf(public: PublicKey, registration_id: str, issuer: Issuer, *, serial: int,
               validity_days: int, now: dt.datetime | None = None) -> x509.Certificate:
    """The device leaf (design.md "Issuance"): CN = registration ID; notBefore = now - 5 min;
    notAfter = min(profile, issuer notAfter); CA:FALSE; digitalSignature; clientAuth."""
    now = now or utcnow()
    not_after = min(now + dt.timedelta(days=validity_days), issuer.cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, registration_id)]))
        .issuer_name(issuer.cert.subject)
        .public_key(public)
        .serial_number(serial)
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(_NOT_CA, critical=True)
        .add_extension(_LEAF_USAGE, critical=True)
        .add_extension(_CLIENT_AUTH, critical=False)
        .add_extension(_ski(public), critical=False)
        .add_extension(issuer.aki, critical=False)
        .sign(issuer.key, issuer.hash)
    )


def build_crl(issuer: x509.Certificate, key: PrivateKey, serials: list[int],
              days: int = 30, now: dt.datetime | None = None) -> x509.CertificateRevocationList:
    """A CRL revoking ``serials`` (void serials that a crash left unaccounted)."""
    now = now or utcnow()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(days=days))
        .add_extension(_aki(issuer), critical=False)
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    return builder.sign(key, signing_hash(key))


# ---------------------------------------------------------------------------------------
# Reading certificates


def thumbprints(cert: x509.Certificate) -> dict[str, str]:
    """SHA-1 (what IoT Hub shows) and SHA-256 (what DPS shows), upper-case hex."""
    der = cert.public_bytes(serialization.Encoding.DER)
    return {
        "sha1": hashlib.sha1(der).hexdigest().upper(),
        "sha256": hashlib.sha256(der).hexdigest().upper(),
    }


def load_cert(path: str | bytes, *, where: str = "") -> x509.Certificate:
    return load_certs(path, where=where)[0]


def load_certs(path: str | bytes, *, where: str = "") -> list[x509.Certificate]:
    from pathlib import Path

    try:
        data = Path(path).read_bytes() if isinstance(path, str) else path
        certs = x509.load_pem_x509_certificates(data)
    except FileNotFoundError as exc:
        raise InputError(f"certificate file {path} does not exist", where=where,
                         rule="certificate paths exist") from exc
    except ValueError as exc:
        raise InputError(f"{path} holds no PEM certificate", where=where,
                         rule="PEM certificates") from exc
    return certs


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def common_name(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def signed_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    """Whether ``parent``'s key signed ``child`` (and the names chain)."""
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False
