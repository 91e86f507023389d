"""Helpers the device-key tests share: CSRs made as a device vendor makes them (the openssl
CLI) and as a device SDK makes them (cryptography), device-custody stations, and the checks
every issued device-custody bundle must pass."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from ..support import CA, Hsm, openssl, write_station

PROFILES = "[ec-p256, ec-p384, rsa-2048, rsa-3072]"
_OPENSSL_KEYGEN = {
    "ec-p256": ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
    "ec-p384": ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"],
    "ec-p521": ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-521"],
    "rsa-1024": ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"],
    "rsa-2048": ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
    "rsa-3072": ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:3072"],
}


def device_station(tmp: Path, h: Hsm, c: CA, extra: str = "", name: str = "s.yaml") -> Path:
    return write_station(
        tmp / name,
        h,
        c,
        custody="device",
        output=tmp / "out",
        extra=f"key_profiles: {PROFILES}\n{extra}",
    )


def openssl_key(path: Path, kind: str) -> Path:
    """A device key made as a vendor makes it: ``openssl genpkey``."""
    done = openssl("genpkey", *_OPENSSL_KEYGEN[kind], "-out", str(path))
    assert done.returncode == 0, done.stderr
    path.chmod(0o600)
    return path


def openssl_csr(key: Path, out: Path, subject: str, der: bool = False, *extra: str) -> Path:
    """``openssl req -new`` (SHA-256), PEM or DER."""
    args = ["req", "-new", "-key", str(key), "-subj", subject, "-sha256", "-out", str(out)]
    done = openssl(*args, *(["-outform", "DER"] if der else []), *extra)
    assert done.returncode == 0, done.stderr
    return out


def software_key(profile: str) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if profile == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if profile.startswith("rsa-"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(profile[4:]))
    return ec.generate_private_key(ec.SECP256R1())


def crypto_csr(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    cn: str | None,
    *,
    der: bool = False,
    extensions: list[x509.ExtensionType] | None = None,
    algorithm: hashes.HashAlgorithm | None = None,
) -> bytes:
    """A CSR as a device SDK makes it with cryptography."""
    names = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn is not None else []
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(names))
    for extension in extensions or []:
        builder = builder.add_extension(extension, critical=False)
    csr = builder.sign(key, algorithm or hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER if der else serialization.Encoding.PEM)


def write_csrs(directory: Path, rids: list[str], profile: str = "ec-p256") -> None:
    """One key and CSR per device, made with cryptography, ``<rid>.csr`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    for rid in rids:
        (directory / f"{rid}.csr").write_bytes(crypto_csr(software_key(profile), rid))


def spki(public: object) -> bytes:
    assert isinstance(public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def csr_der(data: bytes) -> bytes:
    if data.lstrip().startswith(b"-----"):
        return x509.load_pem_x509_csr(data).public_bytes(serialization.Encoding.DER)
    return data


def check_bundle(batch: Path, rid: str, csr: bytes) -> x509.Certificate:
    """A device-custody bundle: leaf for the CSR's key, CN = registration ID, the station's
    leaf profile, no private file, device.json naming the CSR and the key."""
    bundle = batch / rid
    assert sorted(p.name for p in bundle.iterdir()) == [
        "device.cert.pem",
        "device.json",
        "full-chain.cert.pem",
    ]
    leaf = x509.load_pem_x509_certificate((bundle / "device.cert.pem").read_bytes())
    request = x509.load_der_x509_csr(csr_der(csr))
    assert spki(leaf.public_key()) == spki(request.public_key())
    assert leaf.subject.rfc4514_string() == f"CN={rid}"
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
    info = json.loads((bundle / "device.json").read_text())
    assert info["key"]["custody"] == "device"
    assert info["key"]["csr_sha256"] == hashlib.sha256(csr_der(csr)).hexdigest()
    assert info["public_key_sha256"] == hashlib.sha256(spki(request.public_key())).hexdigest()
    assert "file" not in info["key"]
    return leaf


def openssl_verify(c: CA, leaves: list[Path]) -> None:
    """``openssl verify`` of every leaf against the root, the issuing CA untrusted."""
    for start in range(0, len(leaves), 200):
        done = subprocess.run(
            [
                "openssl",
                "verify",
                "-CAfile",
                str(c.root),
                "-untrusted",
                str(c.intermediate),
                "-purpose",
                "sslclient",
                *map(str, leaves[start : start + 200]),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.count(": OK") == len(leaves[start : start + 200])
