"""The emulator: three TLS listeners (DPS device endpoint, DPS service endpoint, IoT Hub),
MQTT and MQTT over WebSockets, quotas and faults, around the service parts in
:mod:`.dps_service`, :mod:`.dps_device` and :mod:`.hub`. Behaviour follows the wire facts in
docs/dps.md; the choices made where public sources are silent are listed in
docs/emulator.md."""

from __future__ import annotations

import base64
import json
import os
import secrets
import threading
from pathlib import Path
from typing import Any

from ..files import write_atomic
from . import certs, mqtt, mqttapi
from .base import (
    STANDARD_HTTPS_PORT,
    STANDARD_MQTT_PORT,
    TELEMETRY_LOG,
    Config,
    host_port,
)
from .dps_device import DpsDeviceApi
from .dps_service import DpsServiceApi
from .hub import IotHubApi
from .server import (
    Faults,
    Request,
    Response,
    WebSocketHandler,
    Window,
    serve,
    serve_mqtt,
    tls_context,
)
from .state import State


class Emulator(DpsServiceApi, DpsDeviceApi, IotHubApi):
    def __init__(self, data_dir: Path, config: Config, faults: Faults | None = None) -> None:
        self.dir = data_dir.resolve()  # emulator.json names absolute paths
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.state = State(self.dir / "state.sqlite")
        self._faults = faults or Faults()
        self._faults_mtime = 0.0
        self._keys = self._load_keys()
        self.ops = Window(config.operations_per_minute, config.quota_window_seconds)
        self.registrations = Window(config.registrations_per_minute, config.quota_window_seconds)
        self._polls: dict[str, list[float]] = {}
        self._operations: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._telemetry_lock = threading.Lock()
        self._servers: list[Any] = []
        self.id_scope = config.id_scope
        self.hub_names: set[str] = set()

    # -- lifecycle --------------------------------------------------------------------
    def _load_keys(self) -> dict[str, str]:
        path = self.dir / "keys.json"
        if path.exists():
            return dict(json.loads(path.read_text()))
        keys = {
            name: base64.b64encode(secrets.token_bytes(32)).decode()
            for name in ("provisioningserviceowner", "iothubowner")
        }
        path.write_text(json.dumps(keys))
        path.chmod(0o600)
        return keys

    def faults(self) -> Faults:
        path = self.dir / "faults.json"
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return self._faults
        if mtime != self._faults_mtime:
            self._faults_mtime = mtime
            self._faults = Faults(**json.loads(path.read_text()))
        return self._faults

    def start(self) -> dict[str, str]:
        """Bind every listener, write ``emulator.json`` (absolute paths) and return it.

        DPS (device endpoint, service API) listens on ``host``, IoT Hub on ``hub_host``; the
        device-facing side of each speaks HTTPS and MQTT over WebSockets on one port and MQTT
        on another. With ``standard_ports`` these are 443 and 8883, as the device SDKs
        require, and ``assignedHub`` is the bare hub host; with free ports it carries the
        port, since no client could reach the hub otherwise. Services that land on the same
        address and port share one listener, routed by path (HTTPS) or username (MQTT)."""
        c = self.config
        hub_host = c.hub_host or c.host
        https, hub_https, mqtt_port = c.port, c.hub_port, c.mqtt_port
        if c.standard_ports:
            https = hub_https = STANDARD_HTTPS_PORT
            mqtt_port = STANDARD_MQTT_PORT
        ca_file, cert_file, key_file = certs.server_identity(self.dir, [c.host, hub_host])
        ctx = tls_context(cert_file, key_file)
        try:
            return self._bind(ctx, ca_file, c.host, hub_host, https, hub_https, mqtt_port)
        except BaseException:
            self.stop()
            raise

    def _bind(
        self,
        ctx: Any,
        ca_file: Path,
        host: str,
        hub_host: str,
        https: int,
        hub_https: int,
        mqtt_port: int,
    ) -> dict[str, str]:
        c = self.config
        service = serve(host, c.service_port, ctx, self.service_api, self.faults)
        self._servers.append(service)
        shared = host == hub_host and https == hub_https and https != 0
        device = serve(
            host,
            https,
            ctx,
            self._shared_route if shared else self.device_api,
            self.faults,
            self._websocket(dps=True, hub=shared),
        )
        self._servers.append(device)
        hub = device
        if not shared:
            hub = serve(
                hub_host, hub_https, ctx, self.hub_api, self.faults, self._websocket(False, True)
            )
            self._servers.append(hub)
        mqtt_shared = host == hub_host and mqtt_port != 0
        dps_mqtt = serve_mqtt(host, mqtt_port, ctx, mqttapi.router(self, True, mqtt_shared))
        self._servers.append(dps_mqtt)
        hub_mqtt = dps_mqtt
        if not mqtt_shared:
            hub_mqtt = serve_mqtt(hub_host, mqtt_port, ctx, mqttapi.router(self, False, True))
            self._servers.append(hub_mqtt)
        self.service_host = host_port(host, service.server_port)
        self.hub_host = host_port(hub_host, hub.server_port)
        self.hub_names = {self.hub_host.lower(), hub_host.lower()}
        device_port = device.server_port
        info = {
            "dps_device_endpoint": f"https://{host_port(host, device_port)}",
            "dps_service_endpoint": f"https://{self.service_host}",
            "management_endpoint": f"https://{self.service_host}",
            "id_scope": c.id_scope,
            "service_connection_string": (
                f"HostName={self.service_host};SharedAccessKeyName=provisioningserviceowner;"
                f"SharedAccessKey={self._keys['provisioningserviceowner']}"
            ),
            "hub_hostname": self.hub_host,
            "hub_connection_string": f"HostName={self.hub_host};SharedAccessKeyName=iothubowner;"
            f"SharedAccessKey={self._keys['iothubowner']}",
            "tls_ca_file": str(ca_file.resolve()),
            "pid": str(os.getpid()),
            # the device SDKs' view: hosts without ports, and where MQTT listens
            "dps_host": host,
            "hub_host": hub_host,
            "dps_mqtt_port": str(dps_mqtt.server_address[1]),
            "hub_mqtt_port": str(hub_mqtt.server_address[1]),
            "dps_websocket_port": str(device_port),
            "hub_websocket_port": str(hub.server_port),
            "standard_ports": str(
                device_port == hub.server_port == STANDARD_HTTPS_PORT
                and dps_mqtt.server_address[1] == STANDARD_MQTT_PORT
            ).lower(),
            "data_dir": str(self.dir.resolve()),
            "telemetry_log": str((self.dir / TELEMETRY_LOG).resolve()),
        }
        self.device_endpoint = info["dps_device_endpoint"]
        write_atomic(self.dir / "emulator.json", json.dumps(info, indent=2).encode(), private=True)
        return info

    def _shared_route(self, request: Request) -> Response:
        """DPS device endpoint and IoT Hub on one address and port: told apart by path."""
        if request.path[:1] == [self.config.id_scope]:
            return self.device_api(request)
        return self.hub_api(request)

    def _websocket(self, dps: bool, hub: bool) -> WebSocketHandler:
        router = mqttapi.router(self, dps, hub, websocket=True)
        return lambda stream, chain: mqtt.serve_session(stream, chain, router)

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers = []

    # -- authorisation ------------------------------------------------------------------
