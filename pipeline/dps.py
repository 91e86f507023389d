"""Clients for Azure IoT Hub DPS and IoT Hub (reference/dps-protocol.md):

* :class:`DpsService`: the DPS service API (async httpx, SAS from a connection string):
  individual enrollments, enrollment groups, bulk operations, queries, registration states,
  and the CA-certificate calls used for proof of possession;
* :class:`DeviceClient`: the device side over mTLS (register, poll, telemetry), seed 004's flow;
* :class:`HubRegistry`: IoT Hub identities through azure-iot-hub's IoTHubRegistryManager.

Errors become :class:`ServiceError` carrying the HTTP status, the 6-digit code and any
``Retry-After``, so the caller's retry policy can tell transient from permanent.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import hmac
import json
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import httpx

from .errors import InputError
from .station import DpsConfig

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
            raise InputError(f"{where} has no {', '.join(sorted(missing))}",
                             rule="HostName=…;SharedAccessKeyName=…;SharedAccessKey=…")
        return cls(parts["hostname"], parts["sharedaccesskeyname"], parts["sharedaccesskey"])

    def token(self, ttl: int = 3600) -> str:
        """SharedAccessSignature over the host (DOC-ACCESS): HMAC-SHA256 with the decoded key
        of ``quote_plus(sr) + "\\n" + expiry``."""
        expiry = int(time.time() + ttl)
        to_sign = f"{quote_plus(self.host)}\n{expiry}".encode()
        digest = hmac.new(base64.b64decode(self.key), to_sign, hashlib.sha256).digest()
        sig = quote(base64.b64encode(digest).decode(), safe="")
        return (f"SharedAccessSignature sr={quote_plus(self.host)}&sig={sig}&se={expiry}"
                f"&skn={quote_plus(self.key_name)}")


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
            raise InputError(f"{path} does not exist: is the emulator running?",
                             rule="dps.emulator_dir names a started emulator") from exc
    service = config.service_endpoint or values.get("dps_service_endpoint")
    cs_text = config.connection_string.read() if config.connection_string else \
        values.get("service_connection_string")
    if not service or not cs_text:
        raise InputError("no DPS service endpoint or connection string",
                         rule="dps.service_endpoint + dps.connection_string, or dps.emulator_dir")
    hub_text = config.hub_connection_string.read() if config.hub_connection_string else \
        values.get("hub_connection_string")
    tls = config.tls_ca_file or (Path(values["tls_ca_file"]) if values.get("tls_ca_file")
                                 else None)
    return Endpoints(
        service=service.rstrip("/"), device=config.device_endpoint or
        values.get("dps_device_endpoint"), id_scope=config.id_scope or values.get("id_scope"),
        service_cs=ConnectionString.parse(cs_text, "dps.connection_string"),
        hub_cs=ConnectionString.parse(hub_text, "dps.hub_connection_string") if hub_text
        else None, tls_ca_file=tls)


def attested_thumbprint(body: dict[str, Any] | None, section: str) -> str:
    """The SHA-256 thumbprint (upper case) of the primary certificate an enrollment
    (``clientCertificates``) or group (``signingCertificates``) attests; "" if none."""
    info = ((body or {}).get("attestation", {}).get("x509", {}).get(section, {})
            .get("primary", {}).get("info", {}))
    return str(info.get("sha256Thumbprint", "")).upper()


class ServiceError(Exception):
    def __init__(self, status: int, code: int | None, message: str,
                 retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}" + (f" {code}" if code else "") + f": {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    @property
    def transient(self) -> bool:
        return self.status == 429 or self.status >= 500


def _error(response: httpx.Response) -> ServiceError:
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    retry = response.headers.get("retry-after")
    code = body.get("errorCode") if isinstance(body.get("errorCode"), int) else None
    return ServiceError(response.status_code, code,
                        str(body.get("message") or body.get("Message") or response.reason_phrase),
                        float(retry) if retry and retry.replace(".", "").isdigit() else None)


class DpsService:
    """The DPS service API. One instance per stage; the SAS token is renewed before expiry."""

    def __init__(self, endpoints: Endpoints, timeout: float = 30.0,
                 max_connections: int = 16) -> None:
        self._cs = endpoints.service_cs
        self._token = ""
        self._token_expires = 0.0
        self._client = httpx.AsyncClient(
            base_url=endpoints.service, verify=endpoints.tls(), timeout=timeout,
            params={"api-version": SERVICE_API},
            limits=httpx.Limits(max_connections=max_connections))

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _call(self, method: str, path: str, *, json_body: Any = None,
                    headers: dict[str, str] | None = None, ok: tuple[int, ...] = (200,)
                    ) -> httpx.Response:
        if time.time() > self._token_expires - 300:
            self._token = self._cs.token(3600)
            self._token_expires = time.time() + 3600
        response = await self._client.request(
            method, path, json=json_body,
            headers={"Authorization": self._token, "Accept": "application/json",
                     **(headers or {})})
        if response.status_code not in ok:
            raise _error(response)
        return response

    async def _get_or_none(self, path: str) -> dict[str, Any] | None:
        try:
            return (await self._call("GET", path)).json()
        except ServiceError as exc:
            if exc.status == 404:
                return None
            raise

    async def get(self, kind: str, key: str) -> dict[str, Any] | None:
        return await self._get_or_none(f"/{kind}/{quote(key, safe='')}")

    async def put(self, kind: str, key: str, body: dict[str, Any],
                  etag: str | None = None) -> dict[str, Any]:
        headers = {"If-Match": etag} if etag else None
        return (await self._call("PUT", f"/{kind}/{quote(key, safe='')}", json_body=body,
                                 headers=headers)).json()

    async def bulk(self, kind: str, mode: str, items: list[dict[str, Any]]) -> dict[str, Any]:
        field = "enrollments" if kind == "enrollments" else "enrollmentGroups"
        return (await self._call("POST", f"/{kind}",
                                 json_body={"mode": mode, field: items})).json()

    async def query(self, kind: str, page_size: int = 100) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        continuation = None
        while True:
            headers = {"x-ms-max-item-count": str(page_size)}
            if continuation:
                headers["x-ms-continuation"] = continuation
            response = await self._call("POST", f"/{kind}/query",
                                        json_body={"query": "SELECT *"}, headers=headers)
            items += response.json()
            continuation = response.headers.get("x-ms-continuation")
            if not continuation:
                return items

    async def registration(self, key: str) -> dict[str, Any] | None:
        return await self.get("registrations", key)

    # CA certificates: on Azure these are ARM calls; the emulator serves them here.
    async def upload_ca(self, name: str, pem: str) -> dict[str, Any]:
        existing = await self._get_or_none(f"/certificates/{name}")
        headers = {"If-Match": existing["etag"]} if existing else None
        return (await self._call("PUT", f"/certificates/{name}", headers=headers, json_body={
            "properties": {"certificate": pem}})).json()

    async def verification_code(self, name: str, etag: str) -> tuple[str, str]:
        body = (await self._call("POST", f"/certificates/{name}/generateVerificationCode",
                                 headers={"If-Match": etag})).json()
        return body["properties"]["verificationCode"], body["etag"]

    async def verify_ca(self, name: str, etag: str, pem: str) -> dict[str, Any]:
        return (await self._call("POST", f"/certificates/{name}/verify",
                                 headers={"If-Match": etag},
                                 json_body={"certificate": pem})).json()

    async def certificates(self) -> list[dict[str, Any]]:
        return (await self._call("GET", "/certificates")).json()["value"]


class DeviceClient:
    """The device side of DPS and IoT Hub over mTLS (what a device does after flashing)."""

    def __init__(self, endpoints: Endpoints, cert_file: Path, key_file: Path,
                 key_password: str | None = None, timeout: float = 30.0) -> None:
        if not endpoints.device or not endpoints.id_scope:
            raise InputError("no DPS device endpoint or ID scope",
                             rule="dps.device_endpoint + dps.id_scope, or dps.emulator_dir")
        ctx = endpoints.tls()
        ctx.load_cert_chain(str(cert_file), str(key_file), password=key_password)
        self._endpoints = endpoints
        self._client = httpx.Client(verify=ctx, timeout=timeout)

    def close(self) -> None:
        self._client.close()

    def register(self, registration_id: str, deadline: float = 60.0) -> dict[str, Any]:
        """PUT register, then poll the operation until it is no longer ``assigning``."""
        base = (f"{self._endpoints.device}/{self._endpoints.id_scope}/registrations/"
                f"{quote(registration_id, safe='')}")
        params = {"api-version": DEVICE_API}
        response = self._client.put(f"{base}/register", params=params,
                                    json={"registrationId": registration_id})
        if response.status_code not in (200, 202):
            raise _error(response)
        body = response.json()
        give_up = time.monotonic() + deadline
        while body.get("status") in ("assigning", "unassigned"):
            time.sleep(max(1.0, float(response.headers.get("retry-after") or 2)))
            if time.monotonic() > give_up:
                raise ServiceError(408, None, "registration still assigning at the deadline")
            response = self._client.get(f"{base}/operations/{body['operationId']}",
                                        params=params)
            if response.status_code == 429:
                continue
            if response.status_code not in (200, 202):
                raise _error(response)
            body = response.json()
        return body

    def send_telemetry(self, hub: str, device_id: str, payload: dict[str, Any]) -> int:
        response = self._client.post(
            f"https://{hub}/devices/{quote(device_id, safe='')}/messages/events",
            params={"api-version": HUB_TELEMETRY_API}, json=payload)
        if response.status_code != 204:
            raise _error(response)
        return response.status_code


class CurlDevice:
    """The same device flow for a key that never leaves the HSM (retain custody): curl with
    OpenSSL's PKCS#11 engine (Debian libengine-pkcs11-openssl) signs the TLS handshake inside
    the token. The PIN reaches the engine through a 0600 file (``pin-source``), never argv."""

    def __init__(self, endpoints: Endpoints, cert_file: Path, key_uri: str, module: str,
                 pin: str, softhsm2_conf: str | None = None, timeout: float = 30.0) -> None:
        import shutil
        import tempfile

        if not endpoints.device or not endpoints.id_scope:
            raise InputError("no DPS device endpoint or ID scope",
                             rule="dps.device_endpoint + dps.id_scope, or dps.emulator_dir")
        if shutil.which("curl") is None or not glob.glob(ENGINE_GLOB):
            raise InputError("the retain device check needs curl and the OpenSSL PKCS#11 "
                             "engine", rule="run `make setup` (curl, libengine-pkcs11-openssl)")
        self._endpoints = endpoints
        self._dir = tempfile.TemporaryDirectory(prefix="provline-pin-")
        pin_file = Path(self._dir.name) / "pin"
        pin_file.touch(mode=0o600)
        pin_file.write_text(pin)  # no newline: libp11 reads the file as is
        uri = key_uri.split("?")[0]
        self._args = ["curl", "-s", "-S", "-D", "-", "--max-time", str(timeout), "--engine",
                      "pkcs11", "--key-type", "ENG", "--key", f"{uri};pin-source=file:{pin_file}",
                      "--cert", str(cert_file), "-H", "Content-Type: application/json"]
        if endpoints.tls_ca_file:
            self._args += ["--cacert", str(endpoints.tls_ca_file)]
        import os

        self._env = {**os.environ, "PKCS11_MODULE_PATH": module}
        if softhsm2_conf:
            self._env["SOFTHSM2_CONF"] = softhsm2_conf

    def close(self) -> None:
        self._dir.cleanup()

    def _request(self, method: str, url: str, body: Any = None) -> tuple[int, dict[str, str],
                                                                         Any]:
        import subprocess

        args = [*self._args, "-X", method, url]
        if body is not None:
            args += ["--data-binary", json.dumps(body)]
        out = subprocess.run(args, capture_output=True, text=True, env=self._env, check=False)
        if out.returncode != 0:
            raise ServiceError(0, None, f"curl: {out.stderr.strip()[-200:]}")
        head, _, payload = out.stdout.replace("\r\n", "\n").partition("\n\n")
        lines = head.splitlines()
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(":") for line in lines[1:])}
        status = int(lines[0].split()[1])
        data = json.loads(payload) if payload.strip() else None
        if status >= 300:
            data = data if isinstance(data, dict) else {}
            raise ServiceError(status, data.get("errorCode"), str(data.get("message", "")),
                               float(headers["retry-after"]) if "retry-after" in headers
                               else None)
        return status, headers, data

    def register(self, registration_id: str, deadline: float = 60.0) -> dict[str, Any]:
        base = (f"{self._endpoints.device}/{self._endpoints.id_scope}/registrations/"
                f"{quote(registration_id, safe='')}")
        _, headers, body = self._request("PUT", f"{base}/register?api-version={DEVICE_API}",
                                         {"registrationId": registration_id})
        give_up = time.monotonic() + deadline
        while body.get("status") in ("assigning", "unassigned"):
            time.sleep(max(1.0, float(headers.get("retry-after") or 2)))
            if time.monotonic() > give_up:
                raise ServiceError(408, None, "registration still assigning at the deadline")
            _, headers, body = self._request(
                "GET", f"{base}/operations/{body['operationId']}?api-version={DEVICE_API}")
        return body

    def send_telemetry(self, hub: str, device_id: str, payload: dict[str, Any]) -> int:
        status, _, _ = self._request(
            "POST", f"https://{hub}/devices/{quote(device_id, safe='')}/messages/events"
            f"?api-version={HUB_TELEMETRY_API}", payload)
        return status


ENGINE_GLOB = "/usr/lib/*/engines-3/pkcs11.so"


class HubRegistry:
    """IoT Hub identities through azure-iot-hub (sync; the stage runs it in threads)."""

    def __init__(self, endpoints: Endpoints) -> None:
        if endpoints.hub_cs is None:
            raise InputError("no IoT Hub connection string",
                             rule="dps.hub_connection_string, or dps.emulator_dir")
        import os

        if endpoints.tls_ca_file:  # msrest/requests reads its trust store from here
            os.environ["REQUESTS_CA_BUNDLE"] = str(endpoints.tls_ca_file)
        from azure.iot.hub import IoTHubRegistryManager

        cs = endpoints.hub_cs
        self._manager = IoTHubRegistryManager.from_connection_string(
            f"HostName={cs.host};SharedAccessKeyName={cs.key_name};SharedAccessKey={cs.key}")

    def ensure_ca_identity(self, device_id: str) -> str:
        """'registered' when created or already a CA identity; 'conflict' otherwise."""
        from msrest.exceptions import HttpOperationError

        try:
            self._manager.create_device_with_certificate_authority(device_id, "enabled")
            return "registered"
        except HttpOperationError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status != 409:
                retry = exc.response.headers.get("Retry-After") if exc.response else None
                raise ServiceError(status, None, str(exc),
                                   float(retry) if retry else None) from exc
        existing = self._manager.get_device(device_id)
        return "registered" if existing.authentication.type == "certificateAuthority" \
            else "conflict"

