"""Certificate builders for the CA hierarchy: root, intermediate, proof-of-possession, audit
signer, device leaves and CRLs.

Pure functions of keys, names and times: the keys may be software keys or HSM signers from
:mod:`pipeline.hsm`; nothing here touches files or tokens. Profiles follow RFC 5280
(section 4.2.1 for the extensions).
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import CAError, InputError
from ..keyprofile import KeyProfile, PrivateKey, PublicKey, SigningHash
from .certs import require_key_matches

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
        raise InputError(
            f"subject {text!r} is not an RFC 4514 name: {exc}", rule="subject like 'CN=Root,O=Acme'"
        ) from exc
    if not name.get_attributes_for_oid(NameOID.COMMON_NAME):
        raise InputError(f"subject {text!r} has no CN", rule="CA subjects carry a CN")
    return name


def signing_hash(key: PrivateKey | PublicKey) -> SigningHash:
    """The hash used with a signing key: SHA-384 for P-384, SHA-256 for P-256 and RSA."""
    public = key.public_key() if hasattr(key, "public_key") else key
    return KeyProfile.of_public_key(public).hash()


def _ski(public: PublicKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(public)


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def key_usage(*granted: str) -> x509.KeyUsage:
    """A KeyUsage with only the named bits set (RFC 5280, section 4.2.1.3)."""
    bits = (
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
        "encipher_only",
        "decipher_only",
    )
    unknown = set(granted) - set(bits)
    if unknown:
        raise ValueError(f"unknown key usage {sorted(unknown)}")
    return x509.KeyUsage(**{bit: bit in granted for bit in bits})


_CA_USAGE = key_usage("key_cert_sign", "crl_sign")
_SIGNING_USAGE = key_usage("digital_signature")


def build_root(
    key: PrivateKey, subject: x509.Name, days: int, now: dt.datetime | None = None
) -> x509.Certificate:
    now = now or utcnow()
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(random_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .add_extension(_ski(public), critical=False)
        .sign(key, signing_hash(key))
    )


def not_after_within(
    issuer: x509.Certificate, start: dt.datetime, days: int, what: str
) -> dt.datetime:
    not_after = start + dt.timedelta(days=days)
    if not_after > issuer.not_valid_after_utc:
        raise CAError(
            f"{what} would end {not_after:%Y-%m-%d}, after its issuer "
            f"({issuer.not_valid_after_utc:%Y-%m-%d})",
            rule="validity inside the issuer's",
        )
    return not_after


def build_intermediate(
    public: PublicKey,
    subject: x509.Name,
    root_cert: x509.Certificate,
    root_key: PrivateKey,
    days: int,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    now = now or utcnow()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(root_cert.subject)
        .public_key(public)
        .serial_number(random_serial())
        .not_valid_before(max(now - BACKDATE, root_cert.not_valid_before_utc))
        .not_valid_after(not_after_within(root_cert, now, days, "the intermediate"))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .add_extension(_ski(public), critical=False)
        .add_extension(_aki(root_cert), critical=False)
        .sign(root_key, signing_hash(root_key))
    )


def build_pop(
    code: str, ca_cert: x509.Certificate, ca_key: PrivateKey, now: dt.datetime | None = None
) -> x509.Certificate:
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


def build_audit_signer(
    public: PublicKey,
    subject: x509.Name,
    issuer_cert: x509.Certificate,
    issuer_key: PrivateKey,
    days: int,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """Certificate of the station's audit-log signing key (digitalSignature + nonRepudiation)."""
    now = now or utcnow()
    usage = key_usage("digital_signature", "content_commitment")
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject)
        .public_key(public)
        .serial_number(random_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after_within(issuer_cert, now, days, "the audit certificate"))
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
    hash: SigningHash = field(init=False)
    aki: x509.AuthorityKeyIdentifier = field(init=False)

    def __post_init__(self) -> None:
        self.hash = signing_hash(self.key)
        self.aki = _aki(self.cert)
        require_key_matches(self.key, self.cert, "the issuer key", CAError)


_LEAF_USAGE = _SIGNING_USAGE
_CLIENT_AUTH = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
_NOT_CA = x509.BasicConstraints(ca=False, path_length=None)


def build_leaf(
    public: PublicKey,
    registration_id: str,
    issuer: Issuer,
    *,
    serial: int,
    validity_days: int,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """The device leaf (README "Output contract"): CN = registration ID; notBefore = now - 5 min;
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


def build_crl(
    issuer: x509.Certificate,
    key: PrivateKey,
    serials: list[int],
    days: int = 30,
    now: dt.datetime | None = None,
) -> x509.CertificateRevocationList:
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
