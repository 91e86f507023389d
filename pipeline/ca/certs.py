"""Reading certificates: loading, thumbprints, names, and the checks every stage shares
(is it a CA, did this key sign it, does this key belong to it)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from ..errors import InputError, ProvlineError
from ..inputfile import MIB, read_input
from ..keyprofile import PrivateKey, PublicKey

MAX_CERT_FILE_BYTES = MIB  # a chain is a few KiB; a bundle of trust anchors well under 1 MiB


@dataclass(frozen=True)
class Thumbprints:
    """Upper-case hex of the DER certificate: SHA-1 is what IoT Hub shows, SHA-256 what DPS
    shows (Microsoft Learn, "X.509 certificate attestation")."""

    sha1: str
    sha256: str


def thumbprints(cert: x509.Certificate) -> Thumbprints:
    der = cert.public_bytes(serialization.Encoding.DER)
    return Thumbprints(
        hashlib.sha1(der).hexdigest().upper(), hashlib.sha256(der).hexdigest().upper()
    )


def spki_der(key: PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_key_sha256(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's SubjectPublicKeyInfo: names a device key in the log."""
    return hashlib.sha256(spki_der(cert.public_key())).hexdigest()  # type: ignore[arg-type]


def key_matches(key: PrivateKey | PublicKey, cert: x509.Certificate) -> bool:
    """Whether ``key`` (a private key, software or HSM, or a public key) is ``cert``'s."""
    public = key.public_key() if isinstance(key, PrivateKey) else key
    return spki_der(public) == spki_der(cert.public_key())  # type: ignore[arg-type]


def require_key_matches(
    key: PrivateKey | PublicKey,
    cert: x509.Certificate,
    what: str,
    error: type[ProvlineError] = InputError,
    where: str = "",
) -> None:
    if not key_matches(key, cert):
        raise error(
            f"{what} does not match its certificate",
            where=where,
            rule="a key matches its certificate",
        )


def load_cert(path: str | Path, *, where: str = "") -> x509.Certificate:
    return load_certs(path, where=where)[0]


def load_certs(path: str | Path, *, where: str = "") -> list[x509.Certificate]:
    """The PEM certificates in ``path``, read in bounded time and memory (a directory, a
    device such as /dev/zero or a file over :data:`MAX_CERT_FILE_BYTES` is refused)."""
    data = read_input(path, limit=MAX_CERT_FILE_BYTES, what="certificate file", where=where)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        what = "is empty" if not data.strip() else "holds no readable PEM certificate"
        raise InputError(f"{path} {what}", where=where, rule="PEM certificates") from exc


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
