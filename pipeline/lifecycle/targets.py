"""Which devices a lifecycle command is about: registration IDs, serials or thumbprints, a
file listing any of them, whole batches — resolved against the station inventory before
anything is changed (an unknown one is bad input: every problem at once, exit 2)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from ..config.station import Station
from ..errors import InputError, ValidationFailed
from .inventory import Inventory

MAX_PROBLEMS = 20


@dataclass(frozen=True)
class Targets:
    devices: tuple[str, ...] = ()  # registration IDs, serials or thumbprints
    batches: tuple[str, ...] = ()
    lists: tuple[Path, ...] = field(default=())  # files: one registration ID / serial a line

    def __bool__(self) -> bool:
        return bool(self.devices or self.batches or self.lists)


def resolve_targets(inventory: Inventory, targets: Targets) -> list[str]:
    """The registration IDs ``targets`` name, sorted; raises listing every unknown one."""
    if not targets:
        raise InputError(
            "name the devices: --device, --list or --batch", rule="a lifecycle command's targets"
        )
    wanted: list[tuple[str, str]] = [("--device", d) for d in targets.devices]
    for path in targets.lists:
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc.strerror}", where="--list") from exc
        for number, line in enumerate(lines, start=1):
            text = line.split("#", 1)[0].strip()
            if text:
                wanted.append((f"{path}:{number}", text))
    problems: list[str] = []
    rids: set[str] = set()
    for where, text in wanted:
        found = inventory.find(text)
        if not found:
            problems.append(f"{where}: {text}: not in the station inventory (provline find)")
        rids |= {f.certificate.registration_id for f in found}
    for batch in targets.batches:
        devices = inventory.devices_of_batch(batch)
        if not devices:
            problems.append(f"--batch: {batch}: no certificate of this batch in the inventory")
        rids |= set(devices)
    if problems:
        more = len(problems) - MAX_PROBLEMS
        raise ValidationFailed(
            problems[:MAX_PROBLEMS] + ([f"... and {more} more"] if more > 0 else [])
        )
    return sorted(rids)


def target_ids(station: Station, targets: Targets) -> list[str]:
    inventory = Inventory.of(station, create=False)
    try:
        return resolve_targets(inventory, targets)
    finally:
        inventory.close()


def fingerprint(rids: list[str]) -> str:
    """Names a set of devices in an operation's arguments (a batch may hold a million)."""
    digest = hashlib.sha256()
    for rid in rids:
        digest.update(rid.encode() + b"\n")
    return digest.hexdigest()
