"""Per-device bundles, the output contract flashers, CI and auditors read (design.md "Outputs"):

    <batch>/<registration-id>/device.cert.pem       leaf
    <batch>/<registration-id>/full-chain.cert.pem   leaf, issuing CA(s), root
    <batch>/<registration-id>/device.key.wrapped | device.key.pem | device.pfx
    <batch>/<registration-id>/device.json           ids, thumbprints, serial, key reference, hashes

Each file is written atomically; durability comes from one filesystem sync per chunk.
``device.json`` is written last, so its presence means the rest of the bundle is complete.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .ca import pem, thumbprints
from .files import write_atomic

DEVICE_JSON = "device.json"
CERT = "device.cert.pem"
FULL_CHAIN = "full-chain.cert.pem"
FORMAT_VERSION = 1


def public_key_sha256(cert: x509.Certificate) -> str:
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def write_bundle(batch_dir: Path, *, batch_id: str, registration_id: str, device_id: str,
                 cert: x509.Certificate, chain_pem: bytes, private_files: dict[str, bytes],
                 key_reference: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Write one device's bundle and return what the journal and audit log record of it."""
    directory = batch_dir / registration_id
    directory.mkdir(exist_ok=True)
    leaf = pem(cert)
    files: dict[str, bytes] = {CERT: leaf, FULL_CHAIN: leaf + chain_pem}
    hashes: dict[str, str] = {}
    for name, data in files.items():
        write_atomic(directory / name, data)
        hashes[name] = hashlib.sha256(data).hexdigest()
    for name, data in private_files.items():
        write_atomic(directory / name, data, private=True)
        hashes[name] = hashlib.sha256(data).hexdigest()
    prints = thumbprints(cert)
    detail: dict[str, Any] = {
        "serial": format(cert.serial_number, "X"),
        "sha1_thumbprint": prints["sha1"],
        "sha256_thumbprint": prints["sha256"],
        "public_key_sha256": public_key_sha256(cert),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "key": key_reference,
        "files": hashes,
    }
    document = {
        "format": FORMAT_VERSION,
        "batch_id": batch_id,
        "registration_id": registration_id,
        "device_id": device_id,
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "not_before": cert.not_valid_before_utc.isoformat(),
        **detail,
        **extra,
    }
    data = json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"
    write_atomic(directory / DEVICE_JSON, data)
    detail["files"] = {**hashes, DEVICE_JSON: hashlib.sha256(data).hexdigest()}
    return detail
