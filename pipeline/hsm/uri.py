"""PKCS#11 URIs (RFC 7512): how configs, bundles and logs name a key in a token.

Pure: no module is loaded here. ``pin-value`` is refused, so a URI is always safe to log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

from ..errors import InputError

_URI_TYPES = ("private", "public", "cert", "secret-key", "data")
_PATH_ATTRS = ("token", "manufacturer", "serial", "model", "object", "type", "id")
_QUERY_ATTRS = ("module-path", "module-name", "pin-source")


@dataclass(frozen=True)
class Pkcs11Uri:
    """An RFC 7512 URI naming a key. ``pin-value`` is refused: a URI must be safe to log."""

    token: str | None = None
    object: str | None = None
    type: str | None = None
    id: bytes | None = None
    module_path: str | None = None
    pin_source: str | None = None
    extra: tuple[tuple[str, str], ...] = field(default=())

    @classmethod
    def parse(cls, text: str) -> Pkcs11Uri:
        if not text.startswith("pkcs11:"):
            raise InputError(f"{text!r} is not a PKCS#11 URI", rule="RFC 7512: starts with pkcs11:")
        body = text[len("pkcs11:") :]
        path, _, query = body.partition("?")
        values: dict[str, Any] = {}
        extra: list[tuple[str, str]] = []
        for part in filter(None, path.split(";")):
            name, eq, value = part.partition("=")
            if not eq:
                raise InputError(f"{text!r}: attribute {part!r} has no value", rule="RFC 7512")
            if name == "id":
                values["id"] = unquote(value, encoding="latin-1").encode("latin-1")
            elif name in _PATH_ATTRS:
                values[name] = unquote(value)
            else:
                extra.append((name, unquote(value)))
        for part in filter(None, query.split("&")):
            name, _, value = part.partition("=")
            if name == "pin-value":
                raise InputError(
                    f"{_redact(text)}: pin-value is not accepted",
                    rule="PINs come from env vars or files, never a URI",
                )
            if name in _QUERY_ATTRS:
                values[name.replace("-", "_")] = unquote(value)
            else:
                extra.append((name, unquote(value)))
        if values.get("type") and values["type"] not in _URI_TYPES:
            raise InputError(f"{text!r}: unknown type {values['type']!r}", rule="RFC 7512 types")
        return cls(extra=tuple(extra), **values)

    def __str__(self) -> str:
        path = []
        for name in ("token", "manufacturer", "serial", "model", "object"):
            value = getattr(self, name, None)
            if value is not None:
                path.append(f"{name}={quote(value, safe='')}")
        if self.id is not None:
            path.append("id=" + "".join(f"%{b:02X}" for b in self.id))
        if self.type:
            path.append(f"type={self.type}")
        path += [f"{k}={quote(v, safe='')}" for k, v in self.extra]
        query = []
        if self.module_path:
            query.append(f"module-path={quote(self.module_path, safe='/')}")
        if self.pin_source:
            query.append(f"pin-source={quote(self.pin_source, safe='/:')}")
        return "pkcs11:" + ";".join(path) + ("?" + "&".join(query) if query else "")


def _redact(text: str) -> str:
    head, _, query = text.partition("?")
    kept = [p for p in query.split("&") if p and not p.startswith("pin-value=")]
    return head + ("?" + "&".join(kept) if kept else "")
