"""Certificates in the emulator: its own server CA, the encodings DPS accepts for uploaded
certificates, X509CertificateInfo, and chain checks for device TLS."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ..ca.certs import common_name, signed_by
from ..files import write_atomic

__all__ = ["common_name", "signed_by"]  # the emulator's certificate vocabulary, in one place


def _write_pem(path: Path, data: bytes, private: bool = False) -> None:
    write_atomic(path, data, private=private)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _server_names(hosts: list[str]) -> list[x509.GeneralName]:
    """``localhost`` and 127.0.0.1 always, plus every address or name the emulator serves:
    the device SDKs check the host against the subjectAltName (an IP SAN for an IP host),
    never against the CN."""
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    addresses = {ipaddress.ip_address("127.0.0.1")}
    for host in hosts:
        try:
            addresses.add(ipaddress.ip_address(host))
        except ValueError:
            if host != "localhost":
                names.append(x509.DNSName(host))
    return names + [x509.IPAddress(a) for a in sorted(addresses, key=str)]


def _covers(cert: x509.Certificate, names: list[x509.GeneralName]) -> bool:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return set(names) <= set(san)


def server_identity(data_dir: Path, hosts: list[str] | None = None) -> tuple[Path, Path, Path]:
    """(CA file, server cert, server key) in the data directory. The CA is made once; the
    server certificate is re-issued when it does not name every host the emulator serves
    (``hosts``: its listening addresses or names)."""
    ca_file, ca_key_file, cert_file, key_file = (
        data_dir / n
        for n in ("server-ca.pem", "server-ca.key.pem", "server.cert.pem", "server.key.pem")
    )
    names = _server_names(hosts or [])
    now = dt.datetime.now(dt.UTC)
    if ca_file.exists() and ca_key_file.exists():
        ca = x509.load_pem_x509_certificate(ca_file.read_bytes())
        loaded = serialization.load_pem_private_key(ca_key_file.read_bytes(), None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        ca_key = loaded
        if cert_file.exists() and key_file.exists():
            current = x509.load_pem_x509_certificate(cert_file.read_bytes())
            if _covers(current, names) and current.not_valid_after_utc > now:
                return ca_file, cert_file, key_file
    else:
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
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        _write_pem(ca_key_file, _key_pem(ca_key), private=True)
        _write_pem(ca_file, ca.public_bytes(serialization.Encoding.PEM))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=825), ca.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    _write_pem(key_file, _key_pem(key), private=True)
    _write_pem(cert_file, cert.public_bytes(serialization.Encoding.PEM))
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
