"""IoT Hub: the registry (identities, list, query) and device telemetry."""

from __future__ import annotations

import json
from typing import Any

from cryptography import x509

from ..ca.validation import PathError, validate_client_path
from . import certs, sas
from .base import (
    HUB_API_VERSIONS,
    NEVER,
    TELEMETRY_LOG,
    EmulatorBase,
    hub_error,
    utc_now,
)
from .hubquery import QueryError
from .hubquery import parse as parse_query
from .server import (
    Request,
    Response,
)


class IotHubApi(EmulatorBase):
    def hub_api(self, request: Request) -> Response:
        p, m = request.path, request.method
        if request.query.get("api-version") not in HUB_API_VERSIONS:
            return hub_error(400, 400004, "ArgumentInvalid", "unsupported api-version")
        if len(p) == 4 and p[0] == "devices" and p[2:] == ["messages", "events"] and m == "POST":
            return self._telemetry(p[1], request)
        if not 1 <= len(p) <= 2 or p[0] != "devices":
            return hub_error(404, 404001, "NotFound", "no such operation")
        try:
            sas.verify(
                request.headers.get("authorization"),
                self.hub_host,
                {"iothubowner": self._keys["iothubowner"]},
            )
        except sas.SasError as exc:
            return hub_error(401, 401002, "IotHubUnauthorizedAccess", str(exc))
        if p == ["devices"]:
            return (
                self._list_devices(request)
                if m == "GET"
                else hub_error(405, 405001, "MethodNotAllowed", m)
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
                    else hub_error(404, 404001, "DeviceNotFound", f"{device_id} not found")
                )
            if_match = request.headers.get("if-match")
            if m == "DELETE":
                if existing is None:
                    return hub_error(404, 404001, "DeviceNotFound", f"{device_id} not found")
                if if_match not in (None, "*", '"*"') and if_match.strip('"') != existing["etag"]:
                    return hub_error(412, 412001, "PreconditionFailed", "etag mismatch")
                self.state.delete("device", device_id)
                return Response(204)
            if m == "PUT":
                body = request.json()
                if not isinstance(body, dict) or body.get("deviceId") != device_id:
                    return hub_error(400, 400004, "ArgumentInvalid", "deviceId mismatch")
                if existing and if_match is None:
                    return hub_error(
                        409, 409001, "DeviceAlreadyExists", f"{device_id} already exists"
                    )
                if (
                    existing
                    and if_match not in (None, "*", '"*"')
                    and if_match.strip('"') != existing["etag"]
                ):
                    return hub_error(412, 412001, "PreconditionFailed", "etag mismatch")
                if if_match is not None and existing is None:
                    return hub_error(404, 404001, "DeviceNotFound", f"{device_id} not found")
                auth = body.get("authentication") or {"type": "sas"}
                if auth.get("type") not in ("sas", "selfSigned", "certificateAuthority"):
                    return hub_error(400, 400004, "ArgumentInvalid", "authentication.type")
                device = self._new_device(device_id, auth, body.get("status") or "enabled")
                if existing:
                    device["generationId"] = existing["generationId"]
                    device["_messages"] = existing.get("_messages", 0)
                self.state.put("device", device_id, device)
                return Response(200, self._public(device))
        return hub_error(405, 405001, "MethodNotAllowed", m)

    def _list_devices(self, request: Request) -> Response:
        """``GET /devices?top=N``: identities in creation order, at most 1000 (the service
        treats anything outside 1-1000 as 1000)."""
        try:
            top = int(request.query.get("top") or 1000)
        except ValueError:
            return hub_error(400, 400004, "ArgumentInvalid", "top is not a number")
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
            return hub_error(400, 400004, "ArgumentInvalid", f"query: {exc}")
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
                device["connectionStateUpdatedTime"] = utc_now()
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
            return hub_error(401, 401002, "IotHubUnauthorizedAccess", "Unauthorized")
        if len(request.body) > 256 * 1024:
            return hub_error(413, 413001, "MessageTooLarge", "message too large")
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
                device["lastActivityTime"] = utc_now()
                self.state.put("device", device_id, device)
        line = {
            "time": utc_now(),
            "deviceId": device_id,
            "transport": transport,
            "properties": properties,
            "body": body.decode(errors="replace"),
        }
        with self._telemetry_lock, (self.dir / TELEMETRY_LOG).open("a") as out:
            out.write(json.dumps(line) + "\n")
