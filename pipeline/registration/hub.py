"""IoT Hub device identities through azure-iot-hub's IoTHubRegistryManager."""

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
        self._manager = IoTHubRegistryManager.from_connection_string(
            f"HostName={cs.host};SharedAccessKeyName={cs.key_name};SharedAccessKey={cs.key}"
        )

    def ensure_ca_identity(self, device_id: str) -> DeviceState:
        """Registered when created or already a CA identity; conflict otherwise."""
        from msrest.exceptions import HttpOperationError

        try:
            self._manager.create_device_with_certificate_authority(device_id, "enabled")
            return DeviceState.REGISTERED
        except HttpOperationError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status != 409:
                retry = exc.response.headers.get("Retry-After") if exc.response else None
                raise ServiceError(status, None, str(exc), float(retry) if retry else None) from exc
        existing = self._manager.get_device(device_id)
        return (
            DeviceState.REGISTERED
            if existing.authentication.type == "certificateAuthority"
            else DeviceState.CONFLICT
        )
