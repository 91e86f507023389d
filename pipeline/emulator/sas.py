"""Shared Access Signature tokens as DPS and IoT Hub verify them (docs/dps.md, "Service API")."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from urllib.parse import quote_plus, unquote


class SasError(Exception):
    pass


def _normalise(resource: str) -> str:
    resource = resource.lower()
    for scheme in ("https://", "http://"):
        if resource.startswith(scheme):
            resource = resource[len(scheme) :]
    return resource.rstrip("/")


def verify(
    header: str | None, audience: str, keys: dict[str, str], now: float | None = None
) -> str:
    """Check an Authorization header; return the policy name or raise :class:`SasError`.
    Accepts the encodings real clients produce: any field order, upper- or lower-case
    percent-escapes, an unescaped ``/`` in ``sig``, a scheme or trailing ``/`` in ``sr``."""
    prefix = "SharedAccessSignature "
    if not header or not header.startswith(prefix):
        raise SasError("no SharedAccessSignature")
    raw: dict[str, str] = {}
    for part in header[len(prefix) :].split("&"):
        name, _, value = part.partition("=")
        raw[name.strip()] = value.strip()
    missing = {"sr", "sig", "se"} - raw.keys()
    if missing:
        raise SasError(f"missing {', '.join(sorted(missing))}")
    try:
        expiry = int(raw["se"])
    except ValueError as exc:
        raise SasError("se is not a number") from exc
    if expiry <= (now or time.time()):
        raise SasError("token expired")
    policy = unquote(raw.get("skn", ""))
    if policy not in keys:
        raise SasError(f"unknown policy {policy!r}")
    resource = unquote(raw["sr"])
    if not _normalise(resource).startswith(_normalise(audience)):
        raise SasError("sr does not name this service")
    signature = unquote(raw["sig"]).encode()
    key = base64.b64decode(keys[policy])
    for signed in {
        quote_plus(resource),
        raw["sr"],
        raw["sr"].lower(),
        quote_plus(resource).lower(),
    }:
        digest = hmac.new(key, f"{signed}\n{raw['se']}".encode(), hashlib.sha256).digest()
        if hmac.compare_digest(base64.b64encode(digest), signature):
            return policy
    raise SasError("signature mismatch")
