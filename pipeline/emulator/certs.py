"""Certificates in the emulator: its own server CA, the encodings DPS accepts for uploaded
certificates, X509CertificateInfo, and chain checks for device TLS."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import ipaddress
from itertools import pairwise
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ..ca.certs import common_name, signed_by
from ..files import write_atomic

__all__ = ["common_name", "signed_by"]  # the emulator's certificate vocabulary, in one place


def server_identity(data_dir: Path) -> tuple[Path, Path, Path]:
    """(CA file, server cert, server key) in the data directory; made on first start."""
    ca_file, cert_file, key_file = (
        data_dir / n for n in ("server-ca.pem", "server.cert.pem", "server.key.pem")
    )
    if ca_file.exists() and cert_file.exists() and key_file.exists():
        return ca_file, cert_file, key_file
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "provline emulator CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    write_atomic(ca_file, ca.public_bytes(pem))
    write_atomic(cert_file, cert.public_bytes(pem))
    write_atomic(
        key_file,
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        private=True,
    )
    return ca_file, cert_file, key_file


def parse_uploaded(text: str) -> x509.Certificate:
    """DPS accepts PEM, base64 of PEM (C SDK) and base64 of DER (CLI for .cer files)."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        return x509.load_pem_x509_certificate(text.encode())
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("certificate is not PEM or base64") from exc
    if raw.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(raw)
    return x509.load_der_x509_certificate(raw)


def thumbprint(cert: x509.Certificate, algorithm: str = "sha1") -> str:
    der = cert.public_bytes(serialization.Encoding.DER)
    return hashlib.new(algorithm, der).hexdigest().upper()


def _name(name: x509.Name) -> str:
    return ", ".join(a.rfc4514_string() for a in reversed(list(name)))


def _utc(value: dt.datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


def info(cert: x509.Certificate) -> dict[str, object]:
    """X509CertificateInfo (docs/dps.md): every field required."""
    return {
        "subjectName": _name(cert.subject),
        "sha1Thumbprint": thumbprint(cert, "sha1"),
        "sha256Thumbprint": thumbprint(cert, "sha256"),
        "issuerName": _name(cert.issuer),
        "notBeforeUtc": _utc(cert.not_valid_before_utc),
        "notAfterUtc": _utc(cert.not_valid_after_utc),
        "serialNumber": format(cert.serial_number, "X"),
        "version": 3,
    }


def valid_now(cert: x509.Certificate) -> bool:
    now = dt.datetime.now(dt.UTC)
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def verified_path(chain: list[x509.Certificate]) -> list[x509.Certificate] | None:
    """The presented chain (leaf first) if each certificate is valid now and signed by the
    next one; None otherwise."""
    if not chain or not all(valid_now(c) for c in chain):
        return None
    for child, parent in pairwise(chain):
        if not signed_by(child, parent):
            return None
    return chain
