"""Read-only views of a batch: its journal's counts (``provline status``) and device checks of
sampled bundles (``provline verify-device``)."""

from __future__ import annotations

from pathlib import Path

from ..config.station import Station
from ..registration.device import DeviceCheck, device_check, sample
from ..registration.endpoints import resolve
from ..vocabulary import DeviceState
from .journal import Journal


def status(batch_dir: Path) -> dict[str, object]:
    journal = Journal.open(batch_dir, create=False)
    try:
        meta = journal.meta()
        return {
            "batch_id": meta.get("batch_id", "?"),
            "devices": journal.total(),
            **{f"devices.{k}": v for k, v in sorted(journal.counts().items())},
            **{f"serials.{k}": v for k, v in sorted(journal.serial_counts().items())},
        }
    finally:
        journal.close()


def check_devices(
    batch_dir: Path,
    station: Station,
    count: int,
    only: list[str] | None = None,
    key_dir: Path | None = None,
) -> list[DeviceCheck]:
    """Device checks (README "Registration") of ``only``, or of ``count`` devices sampled
    evenly over the batch's bundled and registered devices."""
    journal = Journal.open(batch_dir, create=False)
    try:
        ids = only or sample(
            list(journal.registration_ids((DeviceState.REGISTERED, DeviceState.BUNDLED))), count
        )
    finally:
        journal.close()
    return device_check(
        batch_dir,
        resolve(station.dps),
        ids,
        station.custody.pkcs8_passphrase,
        station.hsm,
        key_dir,
    )
