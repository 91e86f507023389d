"""DPS and IoT Hub over MQTT, mapped onto the same handlers as HTTPS so both transports
accept and refuse exactly the same devices (docs/dps.md §6; Microsoft Learn, "Communicate
with DPS using the MQTT protocol" and "Communicate with an IoT hub using the MQTT protocol").

DPS: the registration ID is the client id and the username is
``{idScope}/registrations/{registrationId}/api-version=…``; a register or status request is
answered on ``$dps/registrations/res/{status}/?$rid={rid}[&retry-after={s}]`` with the body
HTTPS would return, so a bad chain is a ``res/401`` with error 401002.

IoT Hub: the device ID is the client id and the username ``{hub}/{deviceId}/?api-version=…``;
the chain is judged at CONNECT (return code 5 when it does not authenticate the identity),
telemetry is ``devices/{deviceId}/messages/events/{property bag}`` at QoS 0 or 1.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any, Protocol
from urllib.parse import unquote

from cryptography import x509

from . import mqtt
from .server import Faults, Request, Response, error

REGISTER_PREFIX = "$dps/registrations/PUT/iotdps-register/"
STATUS_PREFIX = "$dps/registrations/GET/iotdps-get-operationstatus/"
RESPONSE_FILTER = "$dps/registrations/res/#"
MAX_MESSAGE = 256 * 1024


class Services(Protocol):
    """What the emulator offers the MQTT side (implemented by :class:`.app.Emulator`)."""

    id_scope: str
    hub_names: set[str]  # the host names a hub username may carry

    def device_api(self, request: Request) -> Response: ...

    def faults(self) -> Faults: ...

    def hub_device(
        self, device_id: str, chain: list[x509.Certificate]
    ) -> dict[str, Any] | None: ...

    def record_telemetry(
        self, device_id: str, body: bytes, properties: dict[str, str], transport: str
    ) -> None: ...

    def set_connection_state(self, device_id: str, connected: bool) -> None: ...


def _query(topic: str) -> list[tuple[str, str]]:
    """The raw ``key=value`` pairs after ``?`` (values kept as sent: ``$rid`` is echoed)."""
    _, _, query = topic.partition("?")
    pairs = []
    for item in query.split("&"):
        if item:
            key, _, value = item.partition("=")
            pairs.append((key, value))
    return pairs


class DpsSession:
    """One device's DPS connection: register and operation-status requests."""

    def __init__(
        self, services: Services, registration_id: str, api: str, chain: list[x509.Certificate]
    ) -> None:
        self._services = services
        self._rid = registration_id
        self._api = api
        self._chain = chain

    def _request(self, method: str, tail: list[str], body: bytes) -> Request:
        return Request(
            method=method,
            path=[self._services.id_scope, "registrations", self._rid, *tail],
            query={"api-version": self._api},
            headers={},
            body=body,
            chain=self._chain,
        )

    def publish(self, message: mqtt.Message) -> list[tuple[str, bytes]] | None:
        query = dict(_query(message.topic))
        request_id = query.get("$rid")
        if request_id is None:
            return None
        if message.topic.startswith(REGISTER_PREFIX):
            # C# sends no body without a custom payload; the ID is the connection's
            body = message.payload.strip() or json.dumps({"registrationId": self._rid}).encode()
            request = self._request("PUT", ["register"], body)
        elif message.topic.startswith(STATUS_PREFIX) and "operationId" in query:
            request = self._request("GET", ["operations", unquote(query["operationId"])], b"")
        else:
            return None  # DPS serves only the documented topics
        faults = self._services.faults()
        if faults.latency_ms:
            time.sleep(faults.latency_ms / 1000)
        if faults.drop_rate and random.random() < faults.drop_rate:
            return None
        if faults.error_rate and random.random() < faults.error_rate:
            response = error(503, 503001, "injected fault", {"Retry-After": "1"})
        else:
            response = self._services.device_api(request)
        topic = f"$dps/registrations/res/{response.status}/?$rid={request_id}"
        retry_after = {k.lower(): v for k, v in response.headers.items()}.get("retry-after")
        if retry_after:
            topic += f"&retry-after={retry_after}"
        return [(topic, json.dumps(response.body).encode())]

    def subscribe(self, topic_filter: str, qos: int) -> int:
        return min(qos, 1) if topic_filter == RESPONSE_FILTER else mqtt.SUBACK_FAILURE

    def closed(self) -> None:
        return


class HubSession:
    """One device's IoT Hub connection: device-to-cloud telemetry."""

    def __init__(self, services: Services, device_id: str, transport: str) -> None:
        self._services = services
        self._device_id = device_id
        self._transport = transport
        self._prefix = f"devices/{device_id}/messages/events/"
        services.set_connection_state(device_id, True)

    def publish(self, message: mqtt.Message) -> list[tuple[str, bytes]] | None:
        if not message.topic.startswith(self._prefix) or len(message.payload) > MAX_MESSAGE:
            return None  # IoT Hub closes the connection on anything else
        faults = self._services.faults()
        if faults.latency_ms:
            time.sleep(faults.latency_ms / 1000)
        if faults.drop_rate and random.random() < faults.drop_rate:
            return None
        properties = {
            unquote(k): unquote(v) for k, v in _query("?" + message.topic[len(self._prefix) :])
        }
        services = self._services
        services.record_telemetry(self._device_id, message.payload, properties, self._transport)
        return []

    def subscribe(self, topic_filter: str, qos: int) -> int:
        return mqtt.SUBACK_FAILURE  # cloud-to-device, methods and twins are not emulated

    def closed(self) -> None:
        self._services.set_connection_state(self._device_id, False)


def router(services: Services, dps: bool, hub: bool, websocket: bool = False) -> mqtt.Router:
    """CONNECT → the DPS or IoT Hub session the username asks for, if this listener serves
    it (a client that mixes up the two hosts is refused, as it is by Azure)."""
    transport = "mqtt-ws" if websocket else "mqtt"

    def route(
        connect: mqtt.Connect, chain: list[x509.Certificate]
    ) -> tuple[int, mqtt.Handler | None]:
        username = connect.username or ""
        if not chain or connect.password is not None:
            return mqtt.NOT_AUTHORIZED, None  # X.509 only: SAS tokens are not emulated
        if dps and "/registrations/" in username:
            return _dps(services, connect, chain)
        if hub and "/?api-version=" in username:
            return _hub(services, connect, chain, transport)
        return mqtt.BAD_USERNAME_OR_PASSWORD, None

    return route


def _dps(
    services: Services, connect: mqtt.Connect, chain: list[x509.Certificate]
) -> tuple[int, mqtt.Handler | None]:
    scope, _, rest = (connect.username or "").partition("/registrations/")
    registration_id, _, params = rest.partition("/")
    if scope != services.id_scope:
        return mqtt.NOT_AUTHORIZED, None
    if registration_id != connect.client_id:
        return mqtt.IDENTIFIER_REJECTED, None
    api = dict(_query("?" + params)).get("api-version", "")
    return mqtt.ACCEPTED, DpsSession(services, registration_id, api, chain)


def _hub(
    services: Services, connect: mqtt.Connect, chain: list[x509.Certificate], transport: str
) -> tuple[int, mqtt.Handler | None]:
    host, _, rest = (connect.username or "").partition("/")
    device_id, _, _ = rest.partition("/?")
    if host.lower() not in services.hub_names:
        return mqtt.NOT_AUTHORIZED, None
    if device_id != connect.client_id:
        return mqtt.IDENTIFIER_REJECTED, None
    if services.hub_device(device_id, chain) is None:
        return mqtt.NOT_AUTHORIZED, None
    return mqtt.ACCEPTED, HubSession(services, device_id, transport)
