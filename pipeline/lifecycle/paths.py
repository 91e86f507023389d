"""Where a station's lifecycle state lives (station setting ``lifecycle``, docs/lifecycle.md):
the lifecycle directory (log, CRLs, renewals) and the inventory database."""

from __future__ import annotations

from pathlib import Path

from ..config.station import Station
from ..layout import AUDIT_LOG, CRL_DIR, INVENTORY, LIFECYCLE_DIR, RENEWALS_DIR


def lifecycle_dir(station: Station) -> Path:
    return station.lifecycle.dir or station.output / LIFECYCLE_DIR


def inventory_path(station: Station) -> Path:
    return station.lifecycle.inventory or lifecycle_dir(station) / INVENTORY


def log_path(station: Station) -> Path:
    return lifecycle_dir(station) / AUDIT_LOG


def crl_path(station: Station, issuer_key_id: str) -> Path:
    return lifecycle_dir(station) / CRL_DIR / f"{issuer_key_id}.crl.pem"


def renewals_dir(station: Station, operation: str) -> Path:
    return lifecycle_dir(station) / RENEWALS_DIR / operation
