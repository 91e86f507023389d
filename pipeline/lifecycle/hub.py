"""IoT Hub identities as lifecycle operations need them, through azure-iot-hub's
IoTHubRegistryManager: read an identity, disable it (every other field kept, the etag
checked), point a self-signed identity at new thumbprints, re-create a CA identity.

Synchronous, like the SDK; callers run it in threads behind their pacing
(:class:`pipeline.lifecycle.service.Services`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from ..registration.endpoints import Endpoints
from ..registration.service import ServiceError


@dataclass(frozen=True)
class Identity:
    device_id: str
    status: str  # enabled | disabled
    auth_type: str  # sas | selfSigned | certificateAuthority
    thumbprints: tuple[str | None, str | None]  # selfSigned: primary, secondary (SHA-1)
    etag: str


class HubIdentities:
    def __init__(self, endpoints: Endpoints) -> None:
        if endpoints.hub_cs is None:
            raise InputError(
                "no IoT Hub connection string",
                rule="dps.hub_connection_string, or dps.emulator_dir",
            )
        if endpoints.tls_ca_file:  # msrest/requests reads its trust store from here
            os.environ["REQUESTS_CA_BUNDLE"] = str(endpoints.tls_ca_file)
        from azure.iot.hub import IoTHubRegistryManager

        cs = endpoints.hub_cs
        self.host = cs.host
        self._manager = IoTHubRegistryManager.from_connection_string(
            f"HostName={cs.host};SharedAccessKeyName={cs.key_name};SharedAccessKey={cs.key}"
        )

    def serves(self, assigned_hub: str | None) -> bool:
        """Whether ``assigned_hub`` (a DPS registration's) is this hub (ports ignored)."""
        if not assigned_hub:
            return True
        return assigned_hub.split(":")[0].lower() == self.host.split(":")[0].lower()

    def get(self, device_id: str) -> Identity | None:
        try:
            device = self._manager.get_device(device_id)
        except Exception as exc:
            error = _service_error(exc)
            if error.status == 404:
                return None
            raise error from exc
        return _identity(device)

    def set_status(self, device_id: str, status: str) -> str:
        """``status`` on an existing identity, every other field kept; returns what was done:
        ``disabled`` / ``enabled``, ``already`` or ``absent``."""
        try:
            device = self._manager.get_device(device_id)
        except Exception as exc:
            error = _service_error(exc)
            if error.status == 404:
                return "absent"
            raise error from exc
        if device.status == status:
            return "already"
        device.status = status
        self._put(device)
        return status

    def set_thumbprints(self, device_id: str, primary: str, secondary: str | None) -> str:
        """Point a self-signed identity at new SHA-1 thumbprints (a promoted renewal).
        Returns ``updated``, ``already``, ``absent`` or ``not_self_signed``."""
        try:
            device = self._manager.get_device(device_id)
        except Exception as exc:
            error = _service_error(exc)
            if error.status == 404:
                return "absent"
            raise error from exc
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
            raise _service_error(exc) from exc

    def _put(self, device: Any) -> None:
        etag = str(device.etag or "*")
        quoted = etag if etag.startswith('"') else f'"{etag}"'
        try:
            self._manager.protocol.devices.create_or_update_identity(
                device.device_id, device, quoted
            )
        except Exception as exc:
            raise _service_error(exc) from exc


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


def _service_error(exc: Exception) -> ServiceError:
    """The SDK's HttpOperationError (or a connection error) as the ServiceError the retry
    policy understands."""
    response = getattr(exc, "response", None)
    if response is None:
        if isinstance(exc, OSError) or type(exc).__module__.startswith("requests"):
            return ServiceError(503, None, f"connection: {type(exc).__name__}: {exc}"[:300])
        raise exc
    retry = response.headers.get("Retry-After")
    return ServiceError(
        int(response.status_code), None, str(exc)[:200], float(retry) if retry else None
    )
