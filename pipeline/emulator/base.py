"""What every part of the emulator shares: its settings, the state it keeps, the helpers
the DPS service, DPS device and IoT Hub parts use (docs/emulator.md)."""

from __future__ import annotations

import base64
import datetime as dt
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from . import sas
from .server import (
    Request,
    Response,
    Window,
    error,
)
from .state import State

DEVICE_API_VERSIONS = {"2019-03-31", "2021-06-01", "2021-10-01", "2021-11-01-preview"}
HUB_API_VERSIONS = {"2020-03-13", "2021-04-12", "2020-09-30", "2021-06-30"}
BULK_LIMIT = 10


STANDARD_HTTPS_PORT = 443  # HTTPS and MQTT over WebSockets
STANDARD_MQTT_PORT = 8883
TELEMETRY_LOG = "telemetry.jsonl"
NEVER = "0001-01-01T00:00:00Z"  # what IoT Hub sends for a time that has not happened yet


@dataclass
class Config:
    host: str = "127.0.0.1"  # DPS: global device endpoint and service API
    port: int = 0  # DPS global device endpoint (HTTPS, MQTT over WebSockets); 0 = free
    service_port: int = 0  # DPS service API + CA certificates
    hub_port: int = 0  # IoT Hub (HTTPS, MQTT over WebSockets)
    hub_host: str | None = None  # IoT Hub's address (default: host); assignedHub names it
    mqtt_port: int = 0  # MQTT over TLS for DPS (on host) and IoT Hub (on hub_host); 0 = free
    standard_ports: bool = False  # 443 and 8883, as the device SDKs require
    id_scope: str = "0ne00PROVL1"
    operations_per_minute: int = 1000
    registrations_per_minute: int = 1000
    polls_per_10s: int = 5  # per device, not adjustable on the real service
    quota_window_seconds: float = 60.0  # the quotas are per minute; tests shorten this
    assign_seconds: float = 2.0  # how long a registration stays "assigning"
    retry_after: int = 3  # the Retry-After sent with 202 assigning


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def host_port(host: str, port: int) -> str:
    """``host`` alone on the standard HTTPS port, as Azure names its hosts."""
    return host if port == STANDARD_HTTPS_PORT else f"{host}:{port}"


def hub_error(status: int, code: int, name: str, text: str) -> Response:
    body = {
        "Message": f"ErrorCode:{name};{text}",
        "ExceptionMessage": f"Tracking ID:{uuid.uuid4().hex}-G:0-TimeStamp:{utc_now()}",
    }
    return Response(status, body, {"iothub-errorcode": name})


class EmulatorBase:
    """State and helpers the service parts share; :class:`pipeline.emulator.app.Emulator`
    sets every attribute."""

    dir: Path
    config: Config
    state: State
    ops: Window
    registrations: Window
    id_scope: str
    hub_names: set[str]
    hub_host: str
    service_host: str
    device_endpoint: str
    _keys: dict[str, str]
    _polls: dict[str, list[float]]
    _operations: dict[str, dict[str, Any]]
    _lock: threading.Lock
    _telemetry_lock: threading.Lock

    def _sas(self, request: Request, audience: str, policy: str) -> Response | None:
        try:
            sas.verify(request.headers.get("authorization"), audience, {policy: self._keys[policy]})
        except sas.SasError as exc:
            return error(401, 401000, f"Unauthorized: {exc}")
        return None

    def verified_cas(self) -> list[x509.Certificate]:
        return [
            x509.load_pem_x509_certificate(r["pem"].encode())
            for r in self.state.all("certificate")
            if r.get("isVerified")
        ]

    def _public(self, stored: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in stored.items() if not k.startswith("_")}

    @staticmethod
    def _new_device(
        device_id: str, auth: dict[str, Any], status: str = "enabled"
    ) -> dict[str, Any]:
        return {
            "deviceId": device_id,
            "generationId": str(time.time_ns()),
            "etag": base64.b64encode(str(time.time_ns()).encode()).decode(),
            "connectionState": "Disconnected",
            "status": status,
            "statusReason": None,
            "connectionStateUpdatedTime": NEVER,
            "statusUpdatedTime": NEVER,
            "lastActivityTime": NEVER,
            "cloudToDeviceMessageCount": 0,
            "authentication": auth,
            "capabilities": {"iotEdge": False},
            "deviceScope": None,
            "parentScopes": [],
            "_messages": 0,
        }


def rfc7231(when: dt.datetime | None = None) -> str:
    return (when or dt.datetime.now(dt.UTC)).strftime("%a, %d %b %Y %H:%M:%S GMT")
