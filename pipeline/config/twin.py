"""Tags and desired properties: JSON values within IoT Hub's device twin limits.

They become the twin of each device (a DPS enrollment's ``initialTwin``, an IoT Hub
identity's twin) and are stored as JSON in the journal, so they are checked here, once, before
anything is written: a value YAML can express but JSON cannot (a date, ``!!binary``, a
non-string key, NaN) or one IoT Hub would refuse must never pass ``provline validate``.

The limits are IoT Hub's (Microsoft Learn, "Understand and use device twins in IoT Hub"):
keys up to 1 KB without control characters, ``.``, ``$`` or space; string values up to 4 KB;
integers within -2^52 .. 2^52 - 1; objects nested at most 10 deep; tags at most 8 KB and
desired properties at most 32 KB, counted as IoT Hub counts them (key and string lengths in
UTF-8 bytes, 8 per number, 4 per boolean). The walk stops at the first problem or once the
budget is spent, so a value built from aliases is never expanded (docs/limits.md).
"""

from __future__ import annotations

import datetime as dt
import math
import unicodedata
from typing import Any

from ..errors import shown
from ..inputfile import KIB

MAX_TAGS_BYTES = 8 * KIB
MAX_DESIRED_BYTES = 32 * KIB
MAX_DEPTH = 10
MAX_KEY_BYTES = KIB
MAX_STRING_BYTES = 4 * KIB
MIN_INT, MAX_INT = -(2**52), 2**52 - 1
RULE = "tags and desired properties are JSON within IoT Hub's twin limits (docs/limits.md)"

LIMITS = {"tags": MAX_TAGS_BYTES, "desired": MAX_DESIRED_BYTES}


class _Over(Exception):
    def __init__(self, why: str) -> None:
        self.why = why


def key_problem(key: str) -> str | None:
    """Why ``key`` cannot be a twin property name, or None."""
    if not key:
        return "an empty key"
    if _bytes(key) > MAX_KEY_BYTES:
        return f"key {shown(key)} is longer than 1 KB"
    for ch in key:
        if ch in ".$ " or unicodedata.category(ch) == "Cc":
            return f"key {shown(key)} holds {shown(ch)} (no control characters, '.', '$' or space)"
    return None


def problem(section: str, value: Any) -> str | None:
    """The first reason ``value`` (the whole ``tags`` or ``desired`` mapping) cannot be that
    twin section, or None. Bounded: visits at most as many values as the section has bytes."""
    if not isinstance(value, dict):
        return f"{section} must be a mapping, not {shown(value)}"
    walk = _Walk(section, LIMITS[section])
    try:
        walk.visit(value, section, 1)
    except _Over as over:
        return over.why
    return None


def strings_problem(section: str, values: dict[str, str]) -> str | None:
    """:func:`problem` for a flat section of strings whose keys were checked already with
    :func:`key_problem` (a CSV row's ``tag.*`` or ``desired.*`` cells): the fast path."""
    size = 0
    for key, value in values.items():
        length = len(value) if value.isascii() else _bytes(value)
        if length > MAX_STRING_BYTES:
            return f"{section}.{key} is a string of {length:,} bytes (at most 4 KB)"
        size += _bytes(key) + length
    if size > LIMITS[section]:
        return f"{section} are larger than {LIMITS[section] // KIB} KB as IoT Hub counts them"
    return None


class _Walk:
    def __init__(self, section: str, limit: int) -> None:
        self.section = section
        self.limit = limit
        self.size = 0  # IoT Hub's count
        self.values = 0  # values visited: bounds the walk even where the count does not grow

    def visit(self, value: Any, path: str, depth: int) -> None:
        self.values += 1
        if self.values > self.limit:
            raise _Over(f"{self.section} hold more than {self.limit:,} values")
        if isinstance(value, dict):
            if depth > MAX_DEPTH:
                raise _Over(f"{path} is nested deeper than {MAX_DEPTH} levels")
            for key, item in value.items():
                if not isinstance(key, str):
                    raise _Over(f"{path} has the non-string key {shown(key)}")
                if why := key_problem(key):
                    raise _Over(f"{path}: {why}")
                self.count(_bytes(key))
                self.visit(item, f"{path}.{key}", depth + 1)
        elif isinstance(value, list):
            if depth > MAX_DEPTH:
                raise _Over(f"{path} is nested deeper than {MAX_DEPTH} levels")
            for index, item in enumerate(value):
                self.visit(item, f"{path}[{index}]", depth + 1)
        elif isinstance(value, str):
            if _bytes(value) > MAX_STRING_BYTES:
                raise _Over(f"{path} is a string of {_bytes(value):,} bytes (at most 4 KB)")
            self.count(_bytes(value))
        elif isinstance(value, bool):
            self.count(4)
        elif value is None:
            pass
        elif isinstance(value, int):
            if not MIN_INT <= value <= MAX_INT:
                raise _Over(f"{path} = {shown(value)} is outside IoT Hub's integers (±2^52)")
            self.count(8)
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise _Over(f"{path} = {value!r} is not a JSON number")
            self.count(8)
        else:
            raise _Over(f"{path} is {_kind(value)}, which JSON cannot hold (quote it)")

    def count(self, size: int) -> None:
        self.size += size
        if self.size > self.limit:
            raise _Over(
                f"{self.section} are larger than {self.limit // KIB} KB as IoT Hub counts them"
            )


def _bytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _kind(value: Any) -> str:
    if isinstance(value, dt.datetime | dt.date):
        return f"a date ({value.isoformat()})"
    if isinstance(value, bytes):
        return f"binary data ({len(value)} bytes)"
    if isinstance(value, set | frozenset):
        return "a set"
    return f"a {type(value).__name__}"
