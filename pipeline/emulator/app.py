"""The emulated services: DPS device API, DPS service API, CA certificates with proof of
possession (a stand-in for ARM), IoT Hub registry and telemetry. Behaviour follows
the wire facts in docs/dps.md; the choices made where public sources are silent are listed in
docs/emulator.md."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..ca.validation import PathError, extend_path, is_self_signed, validate_client_path
from ..files import write_atomic
from . import certs, mqtt, mqttapi, sas
from .hubquery import QueryError
from .hubquery import parse as parse_query
from .server import (
    Faults,
    Request,
    Response,
    WebSocketHandler,
    Window,
    error,
    serve,
    serve_mqtt,
    tls_context,
)
from .state import State, new_etag

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
    # False: like Azure, whose CA certificates are Azure Resource Manager resources, the
    # service endpoint serves no /certificates (404); CAs stay verified as they were.
    certificate_api: bool = True


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _host_port(host: str, port: int) -> str:
    """``host`` alone on the standard HTTPS port, as Azure names its hosts."""
    return host if port == STANDARD_HTTPS_PORT else f"{host}:{port}"


def _hub_error(status: int, code: int, name: str, text: str) -> Response:
    body = {
        "Message": f"ErrorCode:{name};{text}",
        "ExceptionMessage": f"Tracking ID:{uuid.uuid4().hex}-G:0-TimeStamp:{_now()}",
    }
    return Response(status, body, {"iothub-errorcode": name})


class Emulator:
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
        self.service_host = _host_port(host, service.server_port)
        self.hub_host = _host_port(hub_host, hub.server_port)
        self.hub_names = {self.hub_host.lower(), hub_host.lower()}
        device_port = device.server_port
        info = {
            "dps_device_endpoint": f"https://{_host_port(host, device_port)}",
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
    def _sas(self, request: Request, audience: str, policy: str) -> Response | None:
        try:
            sas.verify(request.headers.get("authorization"), audience, {policy: self._keys[policy]})
        except sas.SasError as exc:
            return error(401, 401000, f"Unauthorized: {exc}")
        return None

    # ======================================================================= DPS service
    def service_api(self, request: Request) -> Response:
        if request.path[:1] == ["certificates"]:
            if not self.config.certificate_api:
                return error(404, 404000, "no such operation")
            return self._certificates(request)
        denied = self._sas(request, self.service_host, "provisioningserviceowner")
        if denied:
            return denied
        wait = self.ops.take()
        if wait is not None:
            return error(429, 429001, "Operations quota exceeded", {"Retry-After": str(wait)})
        p, m = request.path, request.method
        kinds = {"enrollments": "enrollment", "enrollmentGroups": "group"}
        if p and p[0] in kinds:
            kind = kinds[p[0]]
            if len(p) == 1 and m == "POST":
                return self._bulk(kind, request.json())
            if len(p) == 2 and p[1] == "query" and m == "POST":
                return self._query(
                    kind, request, "Enrollment" if kind == "enrollment" else "EnrollmentGroup"
                )
            if len(p) == 2 and m == "GET":
                found = self.state.get(kind, p[1])
                return (
                    Response(200, self._with_registration(kind, self._public(found)))
                    if found
                    else error(404, 404201, f"{p[1]} not found")
                )
            if len(p) == 2 and m == "PUT":
                return self._put_enrollment(kind, p[1], request)
            if len(p) == 2 and m == "DELETE":
                return self._delete(kind, p[1], request.headers.get("if-match"))
            if len(p) == 3 and p[2] == "attestationmechanism" and m == "POST":
                found = self.state.get(kind, p[1])
                return (
                    Response(200, self._public(found)["attestation"])
                    if found
                    else error(404, 404201, f"{p[1]} not found")
                )
        if p and p[0] == "registrations":
            if len(p) == 2 and m == "GET":
                found = self.state.get("registration", p[1])
                return (
                    Response(200, found)
                    if found
                    else error(404, 404202, f"registration {p[1]} not found")
                )
            if len(p) == 2 and m == "DELETE":
                return self._delete("registration", p[1], request.headers.get("if-match"))
            if len(p) == 3 and p[2] == "query" and m == "POST":
                return self._registration_query(p[1].lower(), request)
        return error(
            404 if m in ("GET", "PUT", "POST", "DELETE") else 405,
            404000,
            f"no such operation: {m} /{'/'.join(p)}",
        )

    def _validate(self, kind: str, key: str, body: Any) -> tuple[dict[str, Any] | None, str]:
        """(stored form, problem). The stored form keeps the certificates' info only."""
        id_field = "registrationId" if kind == "enrollment" else "enrollmentGroupId"
        if not isinstance(body, dict):
            return None, "body is not a JSON object"
        if body.get(id_field, key).lower() != key.lower():
            return None, f"{id_field} does not match the URL"
        attestation = body.get("attestation")
        if not isinstance(attestation, dict) or attestation.get("type") != "x509":
            return None, "attestation.type must be x509 (this emulator speaks X.509 only)"
        x509_att = attestation.get("x509") or {}
        section = "clientCertificates" if kind == "enrollment" else "signingCertificates"
        stored_att: dict[str, Any] = {}
        pems: dict[str, str] = {}
        if kind == "group" and x509_att.get("caReferences"):
            refs = x509_att["caReferences"]
            if not self.state.get("certificate", refs.get("primary") or ""):
                return None, f"caReferences.primary {refs.get('primary')!r} is not uploaded"
            stored_att["caReferences"] = refs
        else:
            certificates = x509_att.get(section) or {}
            if not certificates.get("primary", {}).get("certificate"):
                return None, f"attestation.x509.{section}.primary.certificate is required"
            stored_att[section] = {}
            for slot in ("primary", "secondary"):
                text = (certificates.get(slot) or {}).get("certificate")
                if not text:
                    continue
                try:
                    cert = certs.parse_uploaded(text)
                except ValueError as exc:
                    return None, f"{slot} certificate: {exc}"
                stored_att[section][slot] = {"info": certs.info(cert)}
                pems[slot] = cert.public_bytes(serialization.Encoding.PEM).decode()
        stored = {k: v for k, v in body.items() if v is not None and k != "attestation"}
        stored[id_field] = key
        stored["attestation"] = {"type": "x509", "x509": stored_att}
        stored.setdefault("provisioningStatus", "enabled")
        if stored["provisioningStatus"] not in ("enabled", "disabled"):
            return None, "provisioningStatus must be enabled or disabled"
        stored["_pems"] = pems
        return stored, ""

    def _public(self, stored: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in stored.items() if not k.startswith("_")}

    def _store(
        self, kind: str, key: str, stored: dict[str, Any], existing: dict[str, Any] | None
    ) -> dict[str, Any]:
        now = _now()
        stored["etag"] = new_etag()
        stored["createdDateTimeUtc"] = existing["createdDateTimeUtc"] if existing else now
        stored["lastUpdatedDateTimeUtc"] = now
        self.state.put(kind, key, stored)
        return stored

    @staticmethod
    def _etag_problem(if_match: str | None, existing: dict[str, Any] | None) -> Response | None:
        if if_match is None:
            return None
        wanted = if_match.strip()
        if wanted in ("*", '"*"'):
            return None if existing else error(412, 412201, "precondition failed: not found")
        if existing is None or wanted.strip('"') != existing["etag"].strip('"'):
            return error(412, 412201, "ETag in the request does not match (RFC 7232)")
        return None

    def _put_enrollment(self, kind: str, key: str, request: Request) -> Response:
        try:
            body = request.json()
        except ValueError:
            return error(400, 400004, "body is not valid JSON")
        stored, problem = self._validate(kind, key, body)
        if stored is None:
            return error(400, 400004, problem)
        with self.state.transaction():
            existing = self.state.get(kind, key)
            if_match = request.headers.get("if-match")
            if existing and if_match is None:
                return error(409, 409201, "Enrollment already exists.")
            refused = self._etag_problem(if_match, existing)
            if refused:
                return refused
            return Response(200, self._public(self._store(kind, key, stored, existing)))

    def _delete(self, kind: str, key: str, if_match: str | None) -> Response:
        with self.state.transaction():
            existing = self.state.get(kind, key)
            if existing is None:
                return error(404, 404201 if kind != "registration" else 404202, f"{key} not found")
            refused = self._etag_problem(if_match, existing)
            if refused:
                return refused
            self.state.delete(kind, key)
        return Response(204)

    def _bulk(self, kind: str, body: Any) -> Response:
        field_name = "enrollments" if kind == "enrollment" else "enrollmentGroups"
        id_field = "registrationId" if kind == "enrollment" else "enrollmentGroupId"
        items = body.get(field_name) if isinstance(body, dict) else None
        mode = body.get("mode") if isinstance(body, dict) else None
        if not isinstance(items, list) or mode not in (
            "create",
            "update",
            "updateIfMatchETag",
            "delete",
        ):
            return error(400, 400004, "bulk body needs a list and a mode")
        if len(items) > BULK_LIMIT:
            return error(400, 400004, f"at most {BULK_LIMIT} items per bulk operation")
        errors = []
        with self.state.transaction():
            for item in items:
                key = str(item.get(id_field, "")) if isinstance(item, dict) else ""
                existing = self.state.get(kind, key) if key else None
                code, status = 0, ""
                if not key:
                    code, status = 400004, f"{id_field} is required"
                elif mode == "delete":
                    if existing is None:
                        code, status = 404201, "Enrollment not found."
                    else:
                        self.state.delete(kind, key)
                else:
                    stored, problem = self._validate(kind, key, item)
                    if stored is None:
                        code, status = 400004, problem
                    elif mode == "create" and existing:
                        code, status = 409201, "Enrollment already exists."
                    elif mode == "updateIfMatchETag" and (
                        existing is None
                        or str(item.get("etag", "")).strip('"') != existing["etag"].strip('"')
                    ):
                        code, status = 412201, "ETag does not match."
                    else:
                        self._store(kind, key, stored, existing)
                if code:
                    errors.append({id_field: key, "errorCode": code, "errorStatus": status})
        return Response(200, {"isSuccessful": not errors, "errors": errors})

    def _query(self, kind: str, request: Request, item_type: str) -> Response:
        try:
            top = int(request.headers.get("x-ms-max-item-count") or 100)
            after = int(request.headers.get("x-ms-continuation") or 0)
        except ValueError:
            return error(400, 400004, "bad paging headers")
        top = max(1, min(top, 1000))
        rows = self.state.page(kind, after, top + 1)
        headers = {"x-ms-item-type": item_type, "x-ms-max-item-count": str(top)}
        if len(rows) > top:
            rows = rows[:top]
            headers["x-ms-continuation"] = str(rows[-1][0])
        return Response(
            200, [self._with_registration(kind, self._public(body)) for _, body in rows], headers
        )

    def _with_registration(self, kind: str, enrollment: dict[str, Any]) -> dict[str, Any]:
        """An individual enrollment as DPS shows it: with the ``registrationState`` of its
        registration ID once that device has registered (docs/dps.md §2.2)."""
        if kind == "enrollment":
            record = self.state.get("registration", enrollment["registrationId"])
            if record is not None:
                enrollment["registrationState"] = {
                    k: v for k, v in record.items() if k not in ("x509", "payload")
                }
        return enrollment

    def _registration_query(self, group: str, request: Request) -> Response:
        """The registration records of one enrollment group, paged like the other queries
        (``x-ms-max-item-count``, opaque ``x-ms-continuation``)."""
        try:
            top = int(request.headers.get("x-ms-max-item-count") or 100)
            after = int(request.headers.get("x-ms-continuation") or 0)
        except ValueError:
            return error(400, 400004, "bad paging headers")
        top = max(1, min(top, 1000))
        headers = {"x-ms-item-type": "DeviceRegistration", "x-ms-max-item-count": str(top)}
        found: list[tuple[int, dict[str, Any]]] = []
        while len(found) <= top and (rows := self.state.page("registration", after, 1000)):
            after = rows[-1][0]
            found += [
                (seq, r)
                for seq, r in rows
                if r.get("x509", {}).get("enrollmentGroupId", "").lower() == group
            ]
        if len(found) > top:
            found = found[:top]
            headers["x-ms-continuation"] = str(found[-1][0])
        return Response(200, [r for _, r in found], headers)

    # ---------------------------------------------------------- CA certificates + PoP
    def _certificates(self, request: Request) -> Response:
        denied = self._sas(request, self.service_host, "provisioningserviceowner")
        if denied:
            return denied
        p, m = request.path, request.method
        if len(p) == 1 and m == "GET":
            return Response(
                200, {"value": [self._cert_view(c) for c in self.state.all("certificate")]}
            )
        if len(p) < 2:
            return error(404, 404000, "no such operation")
        name = p[1]
        with self.state.transaction():
            existing = self.state.get("certificate", name)
            if len(p) == 2 and m == "GET":
                return (
                    Response(200, self._cert_view(existing))
                    if existing
                    else error(404, 404203, f"certificate {name} not found")
                )
            if len(p) == 2 and m == "PUT":
                return self._put_certificate(name, request, existing)
            if existing is None:
                return error(404, 404203, f"certificate {name} not found")
            refused = (
                self._etag_problem(request.headers.get("if-match") or "", existing)
                if m != "GET"
                else None
            )
            if refused:
                return refused
            if len(p) == 2 and m == "DELETE":
                self.state.delete("certificate", name)
                return Response(200)
            if len(p) == 3 and p[2] == "generateVerificationCode" and m == "POST":
                existing["verificationCode"] = secrets.token_hex(16).upper()
                existing["etag"] = new_etag()
                self.state.put("certificate", name, existing)
                view = self._cert_view(existing)
                view["properties"]["verificationCode"] = existing["verificationCode"]
                return Response(200, view)
            if len(p) == 3 and p[2] == "verify" and m == "POST":
                return self._verify_pop(name, request, existing)
        return error(404, 404000, "no such operation")

    def _put_certificate(
        self, name: str, request: Request, existing: dict[str, Any] | None
    ) -> Response:
        body = request.json() if request.body else {}
        props = body.get("properties", {}) if isinstance(body, dict) else {}
        if existing and self._etag_problem(request.headers.get("if-match") or "", existing):
            return error(412, 412201, "If-Match is required to update a certificate")
        try:
            cert = certs.parse_uploaded(props.get("certificate", ""))
        except ValueError as exc:
            return error(400, 400004, f"certificate: {exc}")
        if len(self.state.all("certificate")) >= 25 and not existing:
            return error(400, 400004, "at most 25 CA certificates")
        record = {
            "name": name,
            "pem": cert.public_bytes(serialization.Encoding.PEM).decode(),
            "isVerified": bool(props.get("isVerified", False)),
            "etag": new_etag(),
            "created": existing["created"] if existing else _rfc7231(),
            "updated": _rfc7231(),
        }
        self.state.put("certificate", name, record)
        return Response(200, self._cert_view(record))

    def _verify_pop(self, name: str, request: Request, record: dict[str, Any]) -> Response:
        code = record.get("verificationCode")
        if not code:
            return error(400, 400004, "generate a verification code first")
        try:
            proof = certs.parse_uploaded(str(request.json().get("certificate", "")))
        except (ValueError, AttributeError) as exc:
            return error(400, 400004, f"verification certificate: {exc}")
        ca_cert = x509.load_pem_x509_certificate(record["pem"].encode())
        if certs.common_name(proof) != code:
            return error(400, 400004, "the verification certificate's CN is not the code")
        if not certs.signed_by(proof, ca_cert) or not certs.valid_now(proof):
            return error(400, 400004, "the verification certificate is not signed by the CA")
        record.update(isVerified=True, etag=new_etag(), updated=_rfc7231())
        record.pop("verificationCode", None)
        self.state.put("certificate", name, record)
        return Response(200, self._cert_view(record))

    @staticmethod
    def _cert_view(record: dict[str, Any]) -> dict[str, Any]:
        cert = x509.load_pem_x509_certificate(record["pem"].encode())
        return {
            "name": record["name"],
            "etag": record["etag"],
            "type": "Microsoft.Devices/provisioningServices/Certificates",
            "id": f"/certificates/{record['name']}",
            "properties": {
                "subject": certs.common_name(cert),
                "expiry": _rfc7231(cert.not_valid_after_utc),
                "thumbprint": certs.thumbprint(cert, "sha1"),
                "isVerified": record["isVerified"],
                "created": record["created"],
                "updated": record["updated"],
            },
        }

    def verified_cas(self) -> list[x509.Certificate]:
        return [
            x509.load_pem_x509_certificate(r["pem"].encode())
            for r in self.state.all("certificate")
            if r.get("isVerified")
        ]

    # ======================================================================== DPS device
    def device_api(self, request: Request) -> Response:
        p, m = request.path, request.method
        if len(p) < 3 or p[0] != self.config.id_scope or p[1] != "registrations":
            return error(404, 404000, "no such operation (check the ID scope)")
        if request.query.get("api-version") not in DEVICE_API_VERSIONS:
            return error(400, 400004, "missing or unsupported api-version")
        rid = p[2]
        if len(p) == 4 and p[3] == "register" and m == "PUT":
            wait = self.registrations.take()
            if wait is not None:
                return error(
                    429, 429001, "Registrations quota exceeded", {"Retry-After": str(wait)}
                )
            return self._register(rid, request)
        if len(p) == 5 and p[3] == "operations" and m == "GET":
            return self._operation(rid, p[4], request)
        if len(p) == 3 and m == "POST":
            denied = self._authenticate_device(rid, request)
            if isinstance(denied, Response):
                return denied
            found = self.state.get("registration", rid)
            return (
                Response(200, found)
                if found
                else error(404, 404202, f"registration {rid} not found")
            )
        return error(404, 404000, "no such operation")

    def _authenticate_device(
        self, rid: str, request: Request
    ) -> Response | tuple[dict[str, Any], str, str | None]:
        """(enrollment, kind, group id) for the device whose chain is presented, or a
        401 / 401002 like DPS's. The leaf CN must be the registration ID; then an individual
        enrollment for the ID wins (its certificate must be the leaf, and the chain must
        validate to a CA verified by proof of possession unless the leaf is self-signed);
        otherwise the chain must validate (RFC 5280: a device leaf cannot sign) to a verified
        CA, and a group whose signing certificate or CA reference is in it matches, from the
        first intermediate up."""
        if not request.chain:
            return error(401, 401002, "Invalid certificate: no client certificate")
        leaf = request.chain[0]
        if certs.common_name(leaf) != rid or rid.lower() != rid:
            return error(401, 401002, "Invalid certificate: registration ID is not the CN")
        individual = self.state.get("enrollment", rid)
        if individual:
            client = individual["attestation"]["x509"].get("clientCertificates", {})
            prints = {s["info"]["sha256Thumbprint"] for s in client.values()}
            if certs.thumbprint(leaf, "sha256") not in prints:
                return error(401, 401002, "Invalid certificate: not the enrolled certificate")
            path = self._device_path(request.chain)
            if isinstance(path, str):
                return error(401, 401002, f"Invalid certificate: {path}")
            return individual, "individual", None
        path = self._device_path(request.chain)
        if isinstance(path, str):
            return error(401, 401002, f"Invalid certificate: {path}")
        for link in path[1:]:
            for group in self.state.all("group"):
                if self._group_signs(group, link):
                    return group, "group", group["enrollmentGroupId"]
        return error(401, 401002, "Unauthorized: no enrollment for this certificate")

    def _device_path(self, chain: list[x509.Certificate]) -> list[x509.Certificate] | str:
        """The presented chain validated (RFC 5280, :mod:`pipeline.ca.validation`) to a CA
        verified by proof of possession, or to the leaf itself when it is self-signed (an
        individual enrollment's own trust), and continued with the presented CAs above it;
        a reason when it does not validate."""
        leaf = chain[0]
        anchors = [leaf] if is_self_signed(leaf) else self.verified_cas()
        if not anchors:
            return "no CA certificate is verified by proof of possession"
        try:
            return extend_path(validate_client_path(leaf, chain[1:], anchors), chain)
        except PathError as exc:
            return str(exc)

    def _group_signs(self, group: dict[str, Any], link: x509.Certificate) -> bool:
        """Whether ``link`` (a CA of a validated path) is the group's signing certificate or
        the verified CA its ``caReferences`` names."""
        att = group["attestation"]["x509"]
        if "caReferences" in att:
            record = self.state.get("certificate", att["caReferences"].get("primary", ""))
            if not record or not record.get("isVerified"):
                return False
            return link == x509.load_pem_x509_certificate(record["pem"].encode())
        prints = {
            s["info"]["sha256Thumbprint"] for s in att.get("signingCertificates", {}).values()
        }
        return certs.thumbprint(link, "sha256") in prints

    def _register(self, rid: str, request: Request) -> Response:
        try:
            body = request.json()
        except ValueError:
            return error(400, 400004, "body is not valid JSON")
        if not isinstance(body, dict) or str(body.get("registrationId", "")).lower() != rid:
            return error(400, 400004, "registrationId in the body does not match the URL")
        found = self._authenticate_device(rid, request)
        if isinstance(found, Response):
            return found
        enrollment, kind, group_id = found
        operation_id = f"5.{secrets.token_hex(8)}.{uuid.uuid4()}"
        leaf = request.chain[0]
        with self._lock:
            self._operations[operation_id] = {
                "rid": rid,
                "ready": time.monotonic() + self.config.assign_seconds,
                "enrollment": enrollment,
                "kind": kind,
                "group": group_id,
                "leaf": certs.info(leaf),
                "payload": body.get("payload"),
            }
        return Response(
            202,
            {"operationId": operation_id, "status": "assigning"},
            {
                "Retry-After": str(self.config.retry_after),
                "Location": f"{self.device_endpoint}/{self.config.id_scope}/registrations/"
                f"{rid}/operations/{operation_id}",
            },
        )

    def _operation(self, rid: str, operation_id: str, request: Request) -> Response:
        now = time.monotonic()
        with self._lock:
            polls = [t for t in self._polls.get(rid, []) if now - t < 10]
            if len(polls) >= self.config.polls_per_10s:
                self._polls[rid] = polls
                return error(
                    429,
                    429001,
                    "Device polling limit exceeded",
                    {"Retry-After": str(max(1, int(10 - (now - polls[0])) + 1))},
                )
            self._polls[rid] = [*polls, now]
            operation = self._operations.get(operation_id)
        if operation is None or operation["rid"] != rid:
            return error(404, 404202, f"operation {operation_id} not found")
        denied = self._authenticate_device(rid, request)
        if isinstance(denied, Response):
            return denied
        if now < operation["ready"]:
            return Response(
                202,
                {"operationId": operation_id, "status": "assigning"},
                {"Retry-After": str(self.config.retry_after)},
            )
        state = operation.get("result") or self._assign(operation)
        operation["result"] = state
        return Response(
            200,
            {"operationId": operation_id, "status": state["status"], "registrationState": state},
        )

    def _assign(self, operation: dict[str, Any]) -> dict[str, Any]:
        rid = operation["rid"]
        # the enrollment as it is now: it may have been disabled while the device polled
        current = (
            self.state.get("enrollment", rid)
            if operation["kind"] == "individual"
            else self.state.get("group", operation["group"])
        ) or operation["enrollment"]
        now = _now()
        previous = self.state.get("registration", rid)
        state: dict[str, Any] = {
            "registrationId": rid,
            "createdDateTimeUtc": previous["createdDateTimeUtc"] if previous else now,
            "lastUpdatedDateTimeUtc": now,
            "etag": new_etag(),
            "x509": (
                {"enrollmentGroupId": operation["group"], "certificateInfo": operation["leaf"]}
                if operation["group"]
                else {}
            ),
        }
        if current.get("provisioningStatus") == "disabled":
            state.update(status="disabled")
            return state
        device_id = current.get("deviceId") or rid
        hub = self.hub_host
        state.update(
            status="assigned", substatus="initialAssignment", assignedHub=hub, deviceId=device_id
        )
        self.state.put("registration", rid, state)
        with self.state.transaction():
            device = self.state.get("device", device_id)
            if device is None:
                auth: dict[str, Any] = (
                    {"type": "certificateAuthority"}
                    if operation["group"]
                    else {
                        "type": "selfSigned",
                        "x509Thumbprint": {
                            "primaryThumbprint": operation["leaf"]["sha1Thumbprint"],
                            "secondaryThumbprint": None,
                        },
                    }
                )
                device = self._new_device(device_id, auth)
                if current.get("initialTwin"):
                    device["_twin"] = current["initialTwin"]
                self.state.put("device", device_id, device)
            elif operation["kind"] == "individual":
                self._refresh_thumbprints(device, current)
        return state

    def _refresh_thumbprints(self, device: dict[str, Any], enrollment: dict[str, Any]) -> None:
        """On a device's registration DPS updates the registry identity it made to the
        enrollment's current certificates (Microsoft Learn, "How to roll X.509 device
        certificates"): a self-signed identity gets the SHA-1 thumbprints of the primary and
        secondary certificates. Its status is left as it is."""
        auth = device.get("authentication") or {}
        if auth.get("type") != "selfSigned":
            return
        slots = enrollment["attestation"]["x509"].get("clientCertificates", {})
        prints = {
            "primaryThumbprint": (slots.get("primary") or {}).get("info", {}).get("sha1Thumbprint"),
            "secondaryThumbprint": (slots.get("secondary") or {})
            .get("info", {})
            .get("sha1Thumbprint"),
        }
        if auth.get("x509Thumbprint") != prints:
            auth["x509Thumbprint"] = prints
            device["etag"] = base64.b64encode(str(time.time_ns()).encode()).decode()
            self.state.put("device", device["deviceId"], device)

    # ============================================================================ IoT Hub
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

    def hub_api(self, request: Request) -> Response:
        p, m = request.path, request.method
        if request.query.get("api-version") not in HUB_API_VERSIONS:
            return _hub_error(400, 400004, "ArgumentInvalid", "unsupported api-version")
        if len(p) == 4 and p[0] == "devices" and p[2:] == ["messages", "events"] and m == "POST":
            return self._telemetry(p[1], request)
        if not 1 <= len(p) <= 2 or p[0] != "devices":
            return _hub_error(404, 404001, "NotFound", "no such operation")
        try:
            sas.verify(
                request.headers.get("authorization"),
                self.hub_host,
                {"iothubowner": self._keys["iothubowner"]},
            )
        except sas.SasError as exc:
            return _hub_error(401, 401002, "IotHubUnauthorizedAccess", str(exc))
        if p == ["devices"]:
            return (
                self._list_devices(request)
                if m == "GET"
                else _hub_error(405, 405001, "MethodNotAllowed", m)
            )
        if p == ["devices", "query"] and m == "POST":
            return self._query_devices(request)
        device_id = p[1]
        with self.state.transaction():
            existing = self.state.get("device", device_id)
            if m == "GET":
                return (
                    Response(200, self._public(existing))
                    if existing
                    else _hub_error(404, 404001, "DeviceNotFound", f"{device_id} not found")
                )
            if_match = request.headers.get("if-match")
            if m == "DELETE":
                if existing is None:
                    return _hub_error(404, 404001, "DeviceNotFound", f"{device_id} not found")
                if if_match not in (None, "*", '"*"') and if_match.strip('"') != existing["etag"]:
                    return _hub_error(412, 412001, "PreconditionFailed", "etag mismatch")
                self.state.delete("device", device_id)
                return Response(204)
            if m == "PUT":
                body = request.json()
                if not isinstance(body, dict) or body.get("deviceId") != device_id:
                    return _hub_error(400, 400004, "ArgumentInvalid", "deviceId mismatch")
                if existing and if_match is None:
                    return _hub_error(
                        409, 409001, "DeviceAlreadyExists", f"{device_id} already exists"
                    )
                if (
                    existing
                    and if_match not in (None, "*", '"*"')
                    and if_match.strip('"') != existing["etag"]
                ):
                    return _hub_error(412, 412001, "PreconditionFailed", "etag mismatch")
                if if_match is not None and existing is None:
                    return _hub_error(404, 404001, "DeviceNotFound", f"{device_id} not found")
                auth = body.get("authentication") or {"type": "sas"}
                if auth.get("type") not in ("sas", "selfSigned", "certificateAuthority"):
                    return _hub_error(400, 400004, "ArgumentInvalid", "authentication.type")
                device = self._new_device(device_id, auth, body.get("status") or "enabled")
                if existing:
                    device["generationId"] = existing["generationId"]
                    device["_messages"] = existing.get("_messages", 0)
                self.state.put("device", device_id, device)
                return Response(200, self._public(device))
        return _hub_error(405, 405001, "MethodNotAllowed", m)

    def _list_devices(self, request: Request) -> Response:
        """``GET /devices?top=N``: identities in creation order, at most 1000 (the service
        treats anything outside 1-1000 as 1000)."""
        try:
            top = int(request.query.get("top") or 1000)
        except ValueError:
            return _hub_error(400, 400004, "ArgumentInvalid", "top is not a number")
        top = top if 1 <= top <= 1000 else 1000
        rows = self.state.page("device", 0, top)
        return Response(200, [self._public(body) for _, body in rows])

    def _query_devices(self, request: Request) -> Response:
        """``POST /devices/query``: device twins matching ``SELECT * FROM devices [WHERE …]``,
        paged with ``x-ms-max-item-count`` / ``x-ms-continuation``."""
        try:
            body = request.json()
            predicate = parse_query(str(body.get("query", "")) if isinstance(body, dict) else "")
            top = int(request.headers.get("x-ms-max-item-count") or 100)
            after = int(request.headers.get("x-ms-continuation") or 0)
        except (ValueError, QueryError) as exc:
            return _hub_error(400, 400004, "ArgumentInvalid", f"query: {exc}")
        top = max(1, min(top, 1000))
        matches: list[dict[str, Any]] = []
        last = after
        headers = {"x-ms-item-type": "Twin"}
        while True:
            rows = self.state.page("device", last, 500)
            for seq, device in rows:
                if predicate(device):
                    if len(matches) == top:
                        headers["x-ms-continuation"] = str(last)
                        return Response(200, matches, headers)
                    matches.append(self._twin(device))
                last = seq
            if len(rows) < 500:
                return Response(200, matches, headers)

    @staticmethod
    def _twin(device: dict[str, Any]) -> dict[str, Any]:
        """A device twin as the query API returns it."""
        auth = device.get("authentication") or {}
        thumbprints = auth.get("x509Thumbprint") or {}
        initial = device.get("_twin") or {}
        return {
            "deviceId": device["deviceId"],
            "etag": "AAAAAAAAAAE=",
            "deviceEtag": device["etag"],
            "status": device["status"],
            "statusUpdateTime": device.get("statusUpdatedTime", NEVER),
            "connectionState": device.get("connectionState", "Disconnected"),
            "lastActivityTime": device.get("lastActivityTime", NEVER),
            "cloudToDeviceMessageCount": 0,
            "authenticationType": auth.get("type", "sas"),
            "x509Thumbprint": {
                "primaryThumbprint": thumbprints.get("primaryThumbprint"),
                "secondaryThumbprint": thumbprints.get("secondaryThumbprint"),
            },
            "modelId": "",
            "version": 2,
            "tags": initial.get("tags") or {},
            "properties": {
                "desired": {**((initial.get("properties") or {}).get("desired") or {})},
                "reported": {},
            },
            "capabilities": device.get("capabilities") or {"iotEdge": False},
        }

    def set_connection_state(self, device_id: str, connected: bool) -> None:
        with self.state.transaction():
            device = self.state.get("device", device_id)
            if device is not None:
                device["connectionState"] = "Connected" if connected else "Disconnected"
                device["connectionStateUpdatedTime"] = _now()
                self.state.put("device", device_id, device)

    def hub_device(self, device_id: str, chain: list[x509.Certificate]) -> dict[str, Any] | None:
        """The enabled device identity the presented chain authenticates as, or None.
        ``selfSigned``: the leaf's SHA-1 thumbprint is registered and the leaf is valid (its
        thumbprint is the trust); ``certificateAuthority``: CN = device ID and the chain
        validates (RFC 5280) to a CA verified by proof of possession."""
        device = self.state.get("device", device_id)
        if device is None or not chain or device.get("status") != "enabled":
            return None
        auth = device["authentication"]
        leaf = chain[0]
        if auth.get("type") == "selfSigned":
            prints = {v.upper() for v in (auth.get("x509Thumbprint") or {}).values() if v}
            if certs.thumbprint(leaf, "sha1") not in prints:
                return None
            try:
                validate_client_path(leaf, [], [leaf])
            except PathError:
                return None
            return device
        if auth.get("type") == "certificateAuthority" and certs.common_name(leaf) == device_id:
            anchors = self.verified_cas()
            try:
                validate_client_path(leaf, chain[1:], anchors)
            except PathError:
                return None
            return device
        return None

    def _telemetry(self, device_id: str, request: Request) -> Response:
        device = self.hub_device(device_id, request.chain)
        if device is None:
            return _hub_error(401, 401002, "IotHubUnauthorizedAccess", "Unauthorized")
        if len(request.body) > 256 * 1024:
            return _hub_error(413, 413001, "MessageTooLarge", "message too large")
        self.record_telemetry(device_id, request.body, {}, "https")
        return Response(204)

    def record_telemetry(
        self, device_id: str, body: bytes, properties: dict[str, str], transport: str
    ) -> None:
        """Count the message on the identity and append it to ``telemetry.jsonl``."""
        with self.state.transaction():
            device = self.state.get("device", device_id)
            if device is not None:
                device["_messages"] = device.get("_messages", 0) + 1
                device["_last_message"] = body.decode(errors="replace")[:1024]
                device["lastActivityTime"] = _now()
                self.state.put("device", device_id, device)
        line = {
            "time": _now(),
            "deviceId": device_id,
            "transport": transport,
            "properties": properties,
            "body": body.decode(errors="replace"),
        }
        with self._telemetry_lock, (self.dir / TELEMETRY_LOG).open("a") as out:
            out.write(json.dumps(line) + "\n")


def _rfc7231(when: dt.datetime | None = None) -> str:
    return (when or dt.datetime.now(dt.UTC)).strftime("%a, %d %b %Y %H:%M:%S GMT")
