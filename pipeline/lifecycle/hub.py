"""IoT Hub identities as lifecycle operations need them, through azure-iot-hub's
IoTHubRegistryManager: read an identity, disable it (every other field kept, the etag
checked), point a self-signed identity at new thumbprints, re-create a CA identity.

Synchronous, like the SDK; callers run it in threads behind their pacing
(:class:`pipeline.lifecycle.service.Services`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..registration.hub import HubRegistry, service_error


@dataclass(frozen=True)
class Identity:
    device_id: str
    status: str  # enabled | disabled
    auth_type: str  # sas | selfSigned | certificateAuthority
    thumbprints: tuple[str | None, str | None]  # selfSigned: primary, secondary (SHA-1)
    etag: str


class HubIdentities(HubRegistry):
    """The registry client of registration, plus what lifecycle operations do to identities."""

    def serves(self, assigned_hub: str | None) -> bool:
        """Whether ``assigned_hub`` (a DPS registration's) is this hub (ports ignored)."""
        if not assigned_hub:
            return True
        return assigned_hub.split(":")[0].lower() == self.host.split(":")[0].lower()

    def get(self, device_id: str) -> Identity | None:
        device = self.device(device_id)
        return None if device is None else _identity(device)

    def set_status(self, device_id: str, status: str) -> str:
        """``status`` on an existing identity, every other field kept; returns what was done:
        ``disabled`` / ``enabled``, ``already`` or ``absent``."""
        device = self.device(device_id)
        if device is None:
            return "absent"
        if device.status == status:
            return "already"
        device.status = status
        self._put(device)
        return status

    def set_thumbprints(self, device_id: str, primary: str, secondary: str | None) -> str:
        """Point a self-signed identity at new SHA-1 thumbprints (a promoted renewal).
        Returns ``updated``, ``already``, ``absent`` or ``not_self_signed``."""
        device = self.device(device_id)
        if device is None:
            return "absent"
        auth = device.authentication
        if auth is None or auth.type != "selfSigned":
            return "not_self_signed"
        current = (
            auth.x509_thumbprint.primary_thumbprint,
            auth.x509_thumbprint.secondary_thumbprint,
        )
        if current == (primary, secondary):
            return "already"
        auth.x509_thumbprint.primary_thumbprint = primary
        auth.x509_thumbprint.secondary_thumbprint = secondary
        self._put(device)
        return "updated"

    def create_ca_identity(self, device_id: str, status: str = "enabled") -> None:
        try:
            self._manager.create_device_with_certificate_authority(device_id, status)
        except Exception as exc:
            raise service_error(exc) from exc

    def _put(self, device: Any) -> None:
        etag = str(device.etag or "*")
        quoted = etag if etag.startswith('"') else f'"{etag}"'
        try:
            self._manager.protocol.devices.create_or_update_identity(
                device.device_id, device, quoted
            )
        except Exception as exc:
            raise service_error(exc) from exc


def _identity(device: Any) -> Identity:
    auth = device.authentication
    prints: tuple[str | None, str | None] = (None, None)
    if auth is not None and auth.x509_thumbprint is not None:
        prints = (
            auth.x509_thumbprint.primary_thumbprint,
            auth.x509_thumbprint.secondary_thumbprint,
        )
    return Identity(
        device.device_id,
        str(device.status),
        str(auth.type if auth is not None else ""),
        prints,
        str(device.etag or ""),
    )
