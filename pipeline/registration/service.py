"""The DPS service API (async httpx, SAS from a connection string): individual enrollments,
enrollment groups, bulk operations, queries, registration states, and the CA-certificate
calls used for proof of possession (docs/dps.md lists the wire facts).

Errors become :class:`ServiceError` carrying the HTTP status, the 6-digit code and any
``Retry-After``, so the caller's retry policy can tell transient from permanent. This module
is the one place that maps HTTP responses to those errors.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import quote

import httpx

from .endpoints import SERVICE_API, Endpoints


def attested_thumbprint(body: dict[str, Any] | None, section: str) -> str:
    """The SHA-256 thumbprint (upper case) of the primary certificate an enrollment
    (``clientCertificates``) or group (``signingCertificates``) attests; "" if none."""
    info = (
        (body or {})
        .get("attestation", {})
        .get("x509", {})
        .get(section, {})
        .get("primary", {})
        .get("info", {})
    )
    return str(info.get("sha256Thumbprint", "")).upper()


class ServiceError(Exception):
    def __init__(
        self, status: int, code: int | None, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(f"HTTP {status}" + (f" {code}" if code else "") + f": {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    @property
    def transient(self) -> bool:
        return self.status == 429 or self.status >= 500


def json_object(response: httpx.Response) -> dict[str, Any]:
    """The response's JSON object; a body of another shape is a service error."""
    body = _json(response)
    if not isinstance(body, dict):
        raise ServiceError(response.status_code, None, "the response is not a JSON object")
    return body


def json_list(response: httpx.Response) -> list[dict[str, Any]]:
    body = _json(response)
    if not isinstance(body, list) or not all(isinstance(item, dict) for item in body):
        raise ServiceError(response.status_code, None, "the response is not a JSON list")
    return body


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise ServiceError(response.status_code, None, "the response is not JSON") from exc


def short_reason(exc: BaseException) -> str:
    """A failed call's reason for the journal, the log and the report: one bounded line."""
    text = " ".join((str(exc) or type(exc).__name__).split())
    return text if len(text) < 300 else text[:297] + "..."


def error_of(response: httpx.Response) -> ServiceError:
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    retry = response.headers.get("retry-after")
    code = body.get("errorCode") if isinstance(body.get("errorCode"), int) else None
    return ServiceError(
        response.status_code,
        code,
        str(body.get("message") or body.get("Message") or response.reason_phrase),
        float(retry) if retry and retry.replace(".", "").isdigit() else None,
    )


class DpsService:
    """The DPS service API. One instance per stage; the SAS token is renewed before expiry."""

    def __init__(
        self, endpoints: Endpoints, timeout: float = 30.0, max_connections: int = 16
    ) -> None:
        self._cs = endpoints.service_cs
        self._token = ""
        self._token_expires = 0.0
        self._client = httpx.AsyncClient(
            base_url=endpoints.service,
            verify=endpoints.tls(),
            timeout=timeout,
            params={"api-version": SERVICE_API},
            limits=httpx.Limits(max_connections=max_connections),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        headers: dict[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
    ) -> httpx.Response:
        if time.time() > self._token_expires - 300:
            self._token = self._cs.token(3600)
            self._token_expires = time.time() + 3600
        response = await self._client.request(
            method,
            path,
            json=json_body,
            headers={"Authorization": self._token, "Accept": "application/json", **(headers or {})},
        )
        if response.status_code not in ok:
            raise error_of(response)
        return response

    async def _object(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        return json_object(await self._call(method, path, **kwargs))

    async def _get_or_none(self, path: str) -> dict[str, Any] | None:
        try:
            return await self._object("GET", path)
        except ServiceError as exc:
            if exc.status == 404:
                return None
            raise

    async def get(self, kind: str, key: str) -> dict[str, Any] | None:
        return await self._get_or_none(f"/{kind}/{quote(key, safe='')}")

    async def put(
        self, kind: str, key: str, body: dict[str, Any], etag: str | None = None
    ) -> dict[str, Any]:
        headers = {"If-Match": etag} if etag else None
        return await self._object(
            "PUT", f"/{kind}/{quote(key, safe='')}", json_body=body, headers=headers
        )

    async def bulk(self, kind: str, mode: str, items: list[dict[str, Any]]) -> dict[str, Any]:
        field = "enrollments" if kind == "enrollments" else "enrollmentGroups"
        return await self._object("POST", f"/{kind}", json_body={"mode": mode, field: items})

    async def query(self, kind: str, page_size: int = 100) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        continuation = None
        while True:
            headers = {"x-ms-max-item-count": str(page_size)}
            if continuation:
                headers["x-ms-continuation"] = continuation
            response = await self._call(
                "POST", f"/{kind}/query", json_body={"query": "SELECT *"}, headers=headers
            )
            items += json_list(response)
            continuation = response.headers.get("x-ms-continuation")
            if not continuation:
                return items

    async def query_page(
        self, path: str, continuation: str | None, page_size: int, body: Any = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of a query (``/enrollments/query``, ``/enrollmentGroups/query``,
        ``/registrations/{group id}/query``) and the continuation of the next, if any. Each
        page is one call, so a caller can pace them."""
        headers = {"x-ms-max-item-count": str(page_size)}
        if continuation:
            headers["x-ms-continuation"] = continuation
        response = await self._call("POST", path, json_body=body, headers=headers)
        return json_list(response), response.headers.get("x-ms-continuation") or None

    async def registration(self, key: str) -> dict[str, Any] | None:
        return await self.get("registrations", key)

    # CA certificates: on Azure these are ARM calls; the emulator serves them here.
    async def upload_ca(self, name: str, pem: str) -> dict[str, Any]:
        existing = await self._get_or_none(f"/certificates/{name}")
        headers = {"If-Match": existing["etag"]} if existing else None
        return await self._object(
            "PUT",
            f"/certificates/{name}",
            headers=headers,
            json_body={"properties": {"certificate": pem}},
        )

    async def verification_code(self, name: str, etag: str) -> tuple[str, str]:
        body = await self._object(
            "POST", f"/certificates/{name}/generateVerificationCode", headers={"If-Match": etag}
        )
        return str(body["properties"]["verificationCode"]), str(body["etag"])

    async def verify_ca(self, name: str, etag: str, pem: str) -> dict[str, Any]:
        return await self._object(
            "POST",
            f"/certificates/{name}/verify",
            headers={"If-Match": etag},
            json_body={"certificate": pem},
        )

    async def certificates(self) -> list[dict[str, Any]]:
        value = (await self._object("GET", "/certificates")).get("value")
        if not isinstance(value, list):
            raise ServiceError(0, None, "GET /certificates did not return a value list")
        return value


def enrolled_thumbprints(endpoints: Endpoints, page_size: int = 1000) -> dict[str, str]:
    """Registration id → SHA-256 thumbprint of every individual enrollment (read-only)."""

    async def read() -> dict[str, str]:
        svc = DpsService(endpoints)
        try:
            return {
                e["registrationId"]: attested_thumbprint(e, "clientCertificates")
                for e in await svc.query("enrollments", page_size=page_size)
            }
        finally:
            await svc.aclose()

    return asyncio.run(read())
