"""IoT Hub device identities through azure-iot-hub's IoTHubRegistryManager: the client set-up
and the one mapping of the SDK's errors to :class:`ServiceError`, shared by registration and
the lifecycle commands (:mod:`pipeline.lifecycle.hub`)."""

from __future__ import annotations

import os
from typing import Any

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

    def device(self, device_id: str) -> Any | None:
        """The SDK's record of the identity ``device_id``, None when there is none."""
        try:
            return self._manager.get_device(device_id)
        except Exception as exc:
            error = service_error(exc)
            if error.status == 404:
                return None
            raise error from exc

    def auth_type(self, device_id: str) -> str | None:
        """The authentication type of the identity ``device_id`` (``sas``, ``selfSigned``,
        ``certificateAuthority``), None when there is none (read-only)."""
        device = self.device(device_id)
        if device is None:
            return None
        auth = device.authentication
        return str(auth.type) if auth is not None else ""

    def identities_page(
        self, continuation: str | None, page_size: int
    ) -> tuple[dict[str, str], str | None]:
        """One page of the identity registry as the twin query returns it (device id →
        authentication type) and the continuation of the next page, if any (read-only)."""
        from azure.iot.hub.models import QuerySpecification

        try:
            result = self._manager.query_iot_hub(
                QuerySpecification(query="SELECT * FROM devices"), continuation, str(page_size)
            )
        except Exception as exc:
            raise service_error(exc) from exc
        items = {str(t.device_id): str(t.authentication_type or "") for t in result.items or []}
        return items, result.continuation_token or None


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
