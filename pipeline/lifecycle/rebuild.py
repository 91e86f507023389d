"""``provline inventory rebuild`` and ``provline inventory sync``.

**rebuild** makes the station inventory again from signed material only: every batch
directory under the station's ``output`` is verified (:func:`pipeline.audit.verify.
verify_batch`) and then read from its audit log (serials, thumbprints, custody, registration
outcomes, voids) and its ``device.json`` files (device id, SHA-1, notAfter), whose hashes the
log recorded; then the station lifecycle log, verified too, is replayed on top (revocations,
shut-outs, renewals, promotions, CRL numbers). Nothing is replaced unless everything
verifies (exit 6 naming the first problem). The new database is written beside the old and
renamed over it.

**sync** records batches from their journals, as ``provline run`` does when it ends (for a
run that was killed before it could).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cryptography import x509

from ..audit.lifecycle_verify import is_lifecycle_log, verify_lifecycle
from ..audit.verify import verify_batch
from ..ca.certs import load_cert
from ..config.station import Station
from ..errors import InputError
from ..layout import AUDIT_LOG, DEVICE_CERT, DEVICE_JSON
from ..vocabulary import REGISTRATION_STATES, AuditEvent, DeviceState
from .crl import sync_batch
from .inventory import Inventory, issuer_key_id
from .log import lock
from .operation import OPEN, Handler, Operation
from .paths import crl_path, inventory_path, lifecycle_dir
from .promote import PROMOTE_HANDLERS
from .reconcile import HANDLERS as RECONCILE_HANDLERS
from .renew import RENEW_HANDLERS
from .revoke import HANDLERS as REVOKE_HANDLERS


def sync(station: Station, batch_dirs: list[Path]) -> dict[str, Any]:
    inventory = Inventory.of(station)
    try:
        counts = {str(b): sync_batch(station, b, inventory) for b in batch_dirs}
        return {"inventory": str(inventory.path), "certificates": counts}
    finally:
        inventory.close()


def rebuild(
    station: Station, root: Path | None = None, note: Callable[[str], None] = print
) -> dict[str, Any]:
    anchor = load_cert(str(root or station.ca.root_cert), where="--root")
    directory = lifecycle_dir(station)
    directory.mkdir(parents=True, exist_ok=True)
    held = lock(directory)
    try:
        target = inventory_path(station)
        _refuse_open_operation(target)
        batches = sorted(_batches(station.output), key=_started)
        lifecycle = is_lifecycle_log(directory)
        for batch_dir in batches:
            verify_batch(batch_dir, anchor)
        if lifecycle:
            verify_lifecycle(directory, anchor)
        temp = target.with_name(f".{target.name}.rebuild")
        for leftover in _db_files(temp):
            leftover.unlink(missing_ok=True)
        inventory = Inventory.open(temp)
        try:
            certificates = 0
            for batch_dir in batches:
                certificates += _add_batch(station, batch_dir, inventory)
            replayed = _replay(station, directory, inventory) if lifecycle else 0
            counts = inventory.counts()
            inventory.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            inventory.close()
        for old in _db_files(target):
            old.unlink(missing_ok=True)
        for suffix in ("-wal", "-shm"):
            Path(f"{temp}{suffix}").unlink(missing_ok=True)
        os.replace(temp, target)
        note(f"inventory rebuilt from {len(batches)} verified batches")
        return {
            "inventory": str(target),
            "verified_batches": [b.name for b in batches],
            "lifecycle_events_replayed": replayed,
            **counts,
        }
    finally:
        os.close(held)


def _db_files(path: Path) -> list[Path]:
    return [path, Path(f"{path}-wal"), Path(f"{path}-shm")]


def _refuse_open_operation(path: Path) -> None:
    if not path.exists():
        return
    inventory = Inventory.open(path)
    try:
        row = inventory.db.execute(
            "SELECT id, kind FROM operations WHERE state = ?", (OPEN,)
        ).fetchone()
    finally:
        inventory.close()
    if row:
        raise InputError(
            f"lifecycle operation {row[0]} ({row[1]}) is unfinished: its journal would be lost",
            rule=f"finish it first: provline {row[1]} --resume",
        )


def _batches(output: Path) -> Iterator[Path]:
    if not output.is_dir():
        return
    for path in output.iterdir():
        if path.is_dir() and not path.name.startswith(".") and (path / AUDIT_LOG).is_file():
            yield path


def _started(batch_dir: Path) -> str:
    with (batch_dir / AUDIT_LOG).open("rb") as handle:
        first = json.loads(handle.readline() or b"{}")
    return f"{first.get('time', '')}/{batch_dir.name}"


def _add_batch(station: Station, batch_dir: Path, inventory: Inventory) -> int:
    """A verified batch, read from its log and its logged device.json files."""
    meta: dict[str, str] = {"batch_id": batch_dir.name, "registration": "none"}
    current: dict[str, str] = {}  # rid -> serial of its bundle
    states: dict[str, str] = {}
    outcomes: dict[str, dict[str, Any]] = {}
    voids: list[tuple[str, str]] = []
    with (batch_dir / AUDIT_LOG).open("rb") as handle:
        for raw in handle:
            record = json.loads(raw)
            event, rid = record.get("event"), str(record.get("registration_id") or "")
            data = record.get("data") or {}
            if event == AuditEvent.BATCH_START:
                meta.update(
                    batch_id=data.get("batch_id", batch_dir.name),
                    custody=data.get("custody", ""),
                    key_profile=data.get("key_profile", ""),
                )
            elif event == AuditEvent.ISSUED:
                current[rid], states[rid] = data["serial"], DeviceState.BUNDLED.value
                meta.setdefault("custody", data.get("custody", ""))
            elif event == AuditEvent.VOID:
                voids.append((rid, data["serial"]))
                if current.get(rid) == data["serial"]:
                    del current[rid]
            elif event in REGISTRATION_STATES:
                states[rid] = REGISTRATION_STATES[AuditEvent(event)].value
                outcomes[rid] = data
                if data.get("mode"):
                    meta["registration"] = data["mode"]
    rows: list[tuple[str, str, str, str | None, str | None]] = []
    issuer = ""
    for rid, serial in current.items():
        info = json.loads((batch_dir / rid / DEVICE_JSON).read_text())
        if not issuer:
            cert = x509.load_pem_x509_certificate((batch_dir / rid / DEVICE_CERT).read_bytes())
            issuer = issuer_key_id(cert)
        detail = {
            "sha1_thumbprint": info.get("sha1_thumbprint"),
            "sha256_thumbprint": info.get("sha256_thumbprint"),
            "not_after": info.get("not_after"),
        }
        if rid in outcomes:
            detail["registration"] = outcomes[rid]
        rows.append((rid, str(info.get("device_id", rid)), states[rid], serial, json.dumps(detail)))
    if not issuer:
        from ..ca.chain import load_chain

        issuer = issuer_key_id(load_chain(station).issuer)
    return inventory.add_batch(station.name, batch_dir, meta, rows, voids, issuer)


def _replay(station: Station, directory: Path, inventory: Inventory) -> int:
    """The lifecycle log's events on top of the batches (the same handlers that applied them
    the first time; with no operation journal their step bookkeeping is a no-op)."""
    handlers: dict[AuditEvent, Handler] = {
        **REVOKE_HANDLERS,
        **RENEW_HANDLERS,
        **PROMOTE_HANDLERS,
        **RECONCILE_HANDLERS,
    }
    applied = 0
    with (directory / AUDIT_LOG).open("rb") as handle, inventory.tx():
        for raw in handle:
            record = json.loads(raw)
            event = AuditEvent(record["event"])
            data = record.get("data") or {}
            if event is AuditEvent.CRL_ISSUED:
                inventory.record_crl(
                    data["issuer"],
                    int(data["number"]),
                    crl_path(station, data["issuer"]),
                    data["sha256"],
                    int(data["entries"]),
                    data["this_update"],
                    data["next_update"],
                )
                applied += 1
                continue
            handler = handlers.get(event)
            if handler is None or not data.get("op"):
                continue
            op = Operation(str(data["op"]), "", {}, OPEN, "", 0)
            handler(inventory, op, str(record.get("registration_id") or ""), data)
            applied += 1
    return applied
