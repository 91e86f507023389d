"""Where DPS and IoT Hub are: endpoints, ID scope, shared-access connection strings and TLS
trust, from the station's ``dps`` settings or a running emulator's ``emulator.json``.

Shared access signatures follow Microsoft Learn, "Control access to Azure IoT Hub Device
Provisioning Service" (token format and signing).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

from ..config.station import DpsConfig
from ..errors import InputError

SERVICE_API = "2021-10-01"
DEVICE_API = "2021-10-01"
HUB_TELEMETRY_API = "2020-03-13"


@dataclass(frozen=True)
class ConnectionString:
    host: str
    key_name: str
    key: str

    @classmethod
    def parse(cls, text: str, where: str = "connection string") -> ConnectionString:
        parts: dict[str, str] = {}
        for item in text.strip().split(";"):
            name, sep, value = item.partition("=")
            if sep:
                parts[name.strip().lower()] = value.strip()
        missing = {"hostname", "sharedaccesskeyname", "sharedaccesskey"} - parts.keys()
        if missing:
            raise InputError(
                f"{where} has no {', '.join(sorted(missing))}",
                rule="HostName=…;SharedAccessKeyName=…;SharedAccessKey=…",
            )
        return cls(parts["hostname"], parts["sharedaccesskeyname"], parts["sharedaccesskey"])

    def token(self, ttl: int = 3600) -> str:
        """SharedAccessSignature over the host (docs/dps.md, "Service API"): HMAC-SHA256 with
        the decoded key of ``quote_plus(sr) + "\\n" + expiry``."""
        expiry = int(time.time() + ttl)
        to_sign = f"{quote_plus(self.host)}\n{expiry}".encode()
        digest = hmac.new(base64.b64decode(self.key), to_sign, hashlib.sha256).digest()
        sig = quote(base64.b64encode(digest).decode(), safe="")
        return (
            f"SharedAccessSignature sr={quote_plus(self.host)}&sig={sig}&se={expiry}"
            f"&skn={quote_plus(self.key_name)}"
        )


@dataclass(frozen=True)
class Endpoints:
    """Where DPS and IoT Hub are, resolved from the station (or the emulator's file)."""

    service: str
    device: str | None
    id_scope: str | None
    service_cs: ConnectionString
    hub_cs: ConnectionString | None
    tls_ca_file: Path | None

    def tls(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        if self.tls_ca_file:
            ctx.load_verify_locations(cafile=str(self.tls_ca_file))
        return ctx


def resolve(config: DpsConfig) -> Endpoints:
    """Endpoints from ``dps.*`` station settings; ``dps.emulator_dir`` reads the emulator's
    emulator.json (explicit settings win)."""
    values: dict[str, Any] = {}
    if config.emulator_dir is not None:
        path = config.emulator_dir / "emulator.json"
        try:
            values = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise InputError(
                f"{path} does not exist: is the emulator running?",
                rule="dps.emulator_dir names a started emulator",
            ) from exc
    service = config.service_endpoint or values.get("dps_service_endpoint")
    cs_text = (
        config.connection_string.read()
        if config.connection_string
        else values.get("service_connection_string")
    )
    if not service or not cs_text:
        raise InputError(
            "no DPS service endpoint or connection string",
            rule="dps.service_endpoint + dps.connection_string, or dps.emulator_dir",
        )
    hub_text = (
        config.hub_connection_string.read()
        if config.hub_connection_string
        else values.get("hub_connection_string")
    )
    tls = config.tls_ca_file or (Path(values["tls_ca_file"]) if values.get("tls_ca_file") else None)
    return Endpoints(
        service=service.rstrip("/"),
        device=config.device_endpoint or values.get("dps_device_endpoint"),
        id_scope=config.id_scope or values.get("id_scope"),
        service_cs=ConnectionString.parse(cs_text, "dps.connection_string"),
        hub_cs=ConnectionString.parse(hub_text, "dps.hub_connection_string") if hub_text else None,
        tls_ca_file=tls,
    )
