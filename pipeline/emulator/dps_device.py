"""The DPS device API (mTLS): register, operation status, registration lookup; device
authentication by RFC 5280 path validation to a CA verified by proof of possession."""

from __future__ import annotations

import base64
import secrets
import time
import uuid
from typing import Any

from cryptography import x509

from ..ca.validation import PathError, extend_path, is_self_signed, validate_client_path
from . import certs
from .base import (
    DEVICE_API_VERSIONS,
    EmulatorBase,
    utc_now,
)
from .server import (
    Request,
    Response,
    error,
)
from .state import new_etag


class DpsDeviceApi(EmulatorBase):
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
        now = utc_now()
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
