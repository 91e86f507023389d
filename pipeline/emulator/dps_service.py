"""The DPS service API (SAS): individual enrollments, enrollment groups, bulk operations,
queries, registration records, and CA certificates with proof of possession (a stand-in for
ARM)."""

from __future__ import annotations

import secrets
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from . import certs
from .base import (
    BULK_LIMIT,
    EmulatorBase,
    rfc7231,
    utc_now,
)
from .server import (
    Request,
    Response,
    error,
)
from .state import new_etag


class DpsServiceApi(EmulatorBase):
    def service_api(self, request: Request) -> Response:
        if request.path[:1] == ["certificates"]:
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

    def _store(
        self, kind: str, key: str, stored: dict[str, Any], existing: dict[str, Any] | None
    ) -> dict[str, Any]:
        now = utc_now()
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
            "created": existing["created"] if existing else rfc7231(),
            "updated": rfc7231(),
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
        record.update(isVerified=True, etag=new_etag(), updated=rfc7231())
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
                "expiry": rfc7231(cert.not_valid_after_utc),
                "thumbprint": certs.thumbprint(cert, "sha1"),
                "isVerified": record["isVerified"],
                "created": record["created"],
                "updated": record["updated"],
            },
        }
