"""IoT Hub device identities through azure-iot-hub's IoTHubRegistryManager: the client set-up
and the one mapping of the SDK's errors to :class:`ServiceError`, shared by registration and
the lifecycle commands (:mod:`pipeline.lifecycle.hub`)."""

from __future__ import annotations

import os

from ..errors import InputError
from ..vocabulary import DeviceState
from .endpoints import Endpoints
from .service import ServiceError


class HubRegistry:
    """IoT Hub identities through azure-iot-hub (sync; the stage runs it in threads)."""

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

    def ensure_ca_identity(self, device_id: str) -> DeviceState:
        """Registered when created or already a CA identity; conflict otherwise."""
        try:
            self._manager.create_device_with_certificate_authority(device_id, "enabled")
            return DeviceState.REGISTERED
        except Exception as exc:
            error = service_error(exc)
            if error.status != 409:
                raise error from exc
        existing = self._manager.get_device(device_id)
        return (
            DeviceState.REGISTERED
            if existing.authentication.type == "certificateAuthority"
            else DeviceState.CONFLICT
        )


def service_error(exc: Exception) -> ServiceError:
    """The SDK's HttpOperationError (or a connection error) as the ServiceError the retry
    policy understands; anything else is not ours to translate and is raised again."""
    response = getattr(exc, "response", None)
    if response is None:
        if isinstance(exc, OSError) or type(exc).__module__.startswith("requests"):
            return ServiceError(503, None, f"connection: {type(exc).__name__}: {exc}"[:300])
        raise exc
    retry = response.headers.get("Retry-After")
    return ServiceError(
        int(response.status_code), None, str(exc)[:200], float(retry) if retry else None
    )
