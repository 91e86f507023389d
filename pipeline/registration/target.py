"""What the registration stage works on and what it reports, per device."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from ..layout import DEVICE_CERT
from ..vocabulary import DeviceState, RegistrationMode


@dataclass(frozen=True)
class Target:
    """A bundled device to register."""

    registration_id: str
    device_id: str
    tags: dict[str, Any]
    desired: dict[str, Any]
    bundle: Path

    @property
    def leaf(self) -> x509.Certificate:
        """Read when needed, so a large batch's certificates are never all in memory."""
        return x509.load_pem_x509_certificate((self.bundle / DEVICE_CERT).read_bytes())

    @property
    def leaf_pem(self) -> str:
        return (self.bundle / DEVICE_CERT).read_text()


def load_targets(batch_dir: Path, rows: list[tuple[str, str, str]]) -> list[Target]:
    """Targets from the journal's (registration id, device id, extra JSON) rows."""
    targets = []
    for rid, did, extra in rows:
        info = json.loads(extra)
        targets.append(
            Target(rid, did, info.get("tags", {}), info.get("desired", {}), batch_dir / rid)
        )
    return targets


@dataclass(frozen=True)
class RegistrationOutcome:
    """How one device's registration ended: registered, conflict or register_failed. The
    journal and the audit log record :meth:`detail`."""

    registration_id: str
    state: DeviceState
    mode: RegistrationMode
    reason: str = ""
    enrollment: str | None = None  # individual: the enrollment's registration id
    group: str | None = None  # group: the enrollment group id
    device_id: str | None = None  # hub: the identity
    already: bool = False  # an identical enrollment existed (a retried call that had landed)
    replaced: str | None = None  # --replace: SHA-256 thumbprint of the enrollment replaced

    def detail(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode.value}
        for key in ("enrollment", "group", "device_id", "replaced"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.already:
            out["already"] = True
        if self.reason:
            out["reason"] = self.reason
        return out
