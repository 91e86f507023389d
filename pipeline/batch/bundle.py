"""Per-device bundles, the output contract flashers, CI and auditors read (README "Output
contract"):

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
from dataclasses import replace
from pathlib import Path
from typing import Any

from cryptography import x509

from ..ca.certs import pem, public_key_sha256, thumbprints
from ..files import write_atomic
from ..layout import DEVICE_CERT, DEVICE_JSON, FULL_CHAIN
from ..serials import serial_hex
from .records import IssuedBundle, KeyReference

FORMAT_VERSION = 1


def write_bundle(
    batch_dir: Path,
    *,
    batch_id: str,
    registration_id: str,
    device_id: str,
    cert: x509.Certificate,
    chain_pem: bytes,
    private_files: dict[str, bytes],
    key: KeyReference,
    extra: dict[str, Any],
    key_generated: bool = True,
) -> IssuedBundle:
    """Write one device's bundle and return what the journal and audit log record of it."""
    directory = batch_dir / registration_id
    directory.mkdir(exist_ok=True)
    leaf = pem(cert)
    hashes: dict[str, str] = {}
    for name, data in {DEVICE_CERT: leaf, FULL_CHAIN: leaf + chain_pem}.items():
        write_atomic(directory / name, data)
        hashes[name] = hashlib.sha256(data).hexdigest()
    for name, data in private_files.items():
        write_atomic(directory / name, data, private=True)
        hashes[name] = hashlib.sha256(data).hexdigest()
    issued = IssuedBundle(
        registration_id=registration_id,
        serial=serial_hex(cert.serial_number),
        thumbprints=thumbprints(cert),
        public_key_sha256=public_key_sha256(cert),
        not_after=cert.not_valid_after_utc.isoformat(),
        key=key,
        files=hashes,
        key_generated=key_generated,
    )
    detail = issued.to_json()
    del detail["key_generated"]  # device.json describes the bundle, not how the run went
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
    return replace(issued, files={**hashes, DEVICE_JSON: hashlib.sha256(data).hexdigest()})
