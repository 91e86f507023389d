"""The records a batch passes between its parts: a device waiting to be issued, the key
reference and the durable bundle a worker reports, and a device it could not issue.

``to_json``/``from_json`` are the JSON edge: the journal stores these as JSON and
``device.json`` carries the key reference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..ca.certs import Thumbprints
from ..vocabulary import Custody


@dataclass(frozen=True)
class PendingDevice:
    """A planned device, as the journal hands it to the issue stage."""

    idx: int
    registration_id: str
    device_id: str
    extra: dict[str, Any]  # tags and desired properties, for device.json
    retry: bool  # a serial was planned for it before: a retained key may already exist


@dataclass(frozen=True)
class KeyReference:
    """Where a device's private key is, as ``device.json`` → ``key`` says it."""

    custody: Custody
    file: str | None = None  # the private file in the bundle (wrapped, pkcs8)
    format: str | None = None
    transport_key: str | None = None  # wrapped: URI of the key that unwraps the blob
    transport_key_check_value: str | None = None  # hex; how it was made: the method below
    transport_key_check_method: str | None = None  # CKA_CHECK_VALUE | wrap-check-v1
    wrap_mechanism: str | None = None  # wrapped: the C_WrapKey mechanism, e.g. CKM_AES_KEY_WRAP_KWP
    uri: str | None = None  # retain: RFC 7512 URI of the key in the token
    pkcs12: str | None = None  # pkcs8 with pkcs12: the .pfx file
    csr_sha256: str | None = None  # device: SHA-256 of the DER CSR the leaf certifies

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KeyReference:
        return cls(**{**data, "custody": Custody(data["custody"])})


@dataclass(frozen=True)
class IssuedBundle:
    """A device whose certificate is signed and whose bundle is durable on disk."""

    registration_id: str
    serial: str  # upper-case hex
    thumbprints: Thumbprints
    public_key_sha256: str
    not_after: str  # ISO 8601, UTC
    key: KeyReference
    files: dict[str, str] = field(default_factory=dict)  # file name -> SHA-256 hex
    key_generated: bool = True  # False when an existing token key was reused

    def to_json(self) -> dict[str, Any]:
        """The journal's ``detail`` of a bundled device."""
        return {
            "serial": self.serial,
            "sha1_thumbprint": self.thumbprints.sha1,
            "sha256_thumbprint": self.thumbprints.sha256,
            "public_key_sha256": self.public_key_sha256,
            "not_after": self.not_after,
            "key": self.key.to_json(),
            "files": self.files,
            "key_generated": self.key_generated,
        }

    def audit_data(self) -> dict[str, Any]:
        """The ``issued`` audit event: key, certificate and the hash of every bundle file."""
        return {
            "serial": self.serial,
            "sha256_thumbprint": self.thumbprints.sha256,
            "public_key_sha256": self.public_key_sha256,
            "key_generated": self.key_generated,
            "custody": self.key.custody.value,
            "files": self.files,
        }


@dataclass(frozen=True)
class NotIssued:
    """A device the worker could not issue; its serial is void if it may have been signed."""

    registration_id: str
    serial: str
    signed: bool  # the certificate may exist: void it; otherwise the serial is unused
    reason: str
