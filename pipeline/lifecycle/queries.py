"""Read-only questions to the station inventory: ``provline find``, ``provline expiring``,
``provline inventory show``."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from ..config.station import Station
from ..errors import InputError
from .inventory import Found, Inventory
from .operation import OPEN

_DURATION = re.compile(r"^(\d+)\s*([dwh]?)$")


def parse_duration(text: str) -> dt.timedelta:
    """``90d``, ``12w``, ``36h`` or a number of days."""
    match = _DURATION.match(text.strip().lower())
    if not match:
        raise InputError(
            f"{text!r} is not a duration", where="--within", rule="N, Nd (days), Nw or Nh"
        )
    number, unit = int(match.group(1)), match.group(2) or "d"
    return {"d": dt.timedelta(days=number), "w": dt.timedelta(weeks=number)}.get(
        unit, dt.timedelta(hours=number)
    )


def find(station: Station, query: str) -> list[Found]:
    inventory = Inventory.of(station, create=False)
    try:
        return inventory.find(query)
    finally:
        inventory.close()


def expiring(station: Station, within: dt.timedelta) -> list[dict[str, Any]]:
    """Active certificates whose notAfter falls within ``within`` from now, soonest first,
    each with whether a renewal is already staged."""
    cutoff = (dt.datetime.now(dt.UTC) + within).isoformat()
    inventory = Inventory.of(station, create=False)
    try:
        return [
            {
                "registration_id": cert.registration_id,
                "device_id": cert.device_id,
                "batch_id": cert.batch_id,
                "serial": cert.serial,
                "not_after": cert.not_after,
                "custody": cert.custody,
                "renewal_staged": staged,
            }
            for cert, staged in inventory.expiring(cutoff)
        ]
    finally:
        inventory.close()


def show(station: Station) -> dict[str, Any]:
    inventory = Inventory.of(station, create=False)
    try:
        row = inventory.db.execute(
            "SELECT id, kind, phase FROM operations WHERE state = ?", (OPEN,)
        ).fetchone()
        return {
            "inventory": str(inventory.path),
            **inventory.counts(),
            "crls": inventory.crls(),
            "unfinished_operation": {"id": row[0], "kind": row[1], "phase": row[2]}
            if row
            else None,
        }
    finally:
        inventory.close()
