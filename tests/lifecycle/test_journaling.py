"""Operation journaling without an HSM: applying an operation's logged events again, in
order, changes nothing that is already applied (what makes resume exactly-once)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.lifecycle import renew, revoke
from pipeline.lifecycle.enrollments import body, slot_thumbprints
from pipeline.lifecycle.inventory import Inventory
from pipeline.lifecycle.operation import Operation, item, move
from pipeline.lifecycle.queries import parse_duration
from pipeline.vocabulary import AuditEvent, CertificateStatus

ISSUER = "CD" * 20


def _setup(tmp_path: Path, kind: str, step: str) -> tuple[Inventory, Operation]:
    inventory = Inventory.open(tmp_path / "inventory.sqlite")
    detail = {"sha1_thumbprint": "A" * 40, "sha256_thumbprint": "B" * 64, "not_after": "2030"}
    inventory.add_batch(
        "st",
        tmp_path / "b",
        {"batch_id": "b", "registration": "individual", "custody": "wrapped"},
        [("d-1", "d-1", "registered", "0A", json.dumps(detail))],
        [],
        ISSUER,
    )
    op = Operation(f"{kind}-1", kind, {}, "open", step, 0)
    with inventory.tx():
        inventory.db.execute(
            "INSERT INTO operations VALUES (?, ?, '{}', 'open', ?, 0, 0, NULL)",
            (op.id, kind, step),
        )
        inventory.db.execute(
            "INSERT INTO op_items VALUES (?, 'd-1', ?, ?)", (op.id, step, json.dumps({"old": "0A"}))
        )
    return inventory, op


def _snapshot(inventory: Inventory) -> list[Any]:
    return [
        inventory.db.execute("SELECT * FROM op_items").fetchall(),
        inventory.db.execute(
            "SELECT serial, status, reason, revoked_at FROM certificates ORDER BY serial"
        ).fetchall(),
        inventory.db.execute("SELECT registration_id, state, dps, hub FROM devices").fetchall(),
    ]


def _replay(inventory: Inventory, op: Operation, handlers: Any, events: list[Any]) -> None:
    with inventory.tx():
        for event, rid, data in events:
            handlers[event](inventory, op, rid, {**data, "op": op.id})


def test_revocation_events_applied_twice_change_nothing(tmp_path: Path) -> None:
    inventory, op = _setup(tmp_path, "revoke", revoke.RECORD)
    events = [
        (
            AuditEvent.REVOKED,
            "d-1",
            {"reason": "keyCompromise", "at": "T", "serials": [{"serial": "0A", "issuer": ISSUER}]},
        ),
        (AuditEvent.ENROLLMENT_DISABLED, "d-1", {"how": "updated", "device_id": "hub-d-1"}),
        (AuditEvent.HUB_IDENTITY_DISABLED, "d-1", {"how": "disabled", "device_id": "hub-d-1"}),
    ]
    _replay(inventory, op, revoke.HANDLERS, events)
    once = _snapshot(inventory)
    _replay(inventory, op, revoke.HANDLERS, events)
    assert _snapshot(inventory) == once
    step, detail = item(inventory, op, "d-1")  # type: ignore[misc]
    assert step == revoke.DONE and detail["serials"] == [{"serial": "0A", "issuer": ISSUER}]
    device = inventory.device("d-1")
    assert (
        device is not None
        and device.revoked
        and (device.dps, device.hub) == ("disabled", "disabled")
    )
    assert device.hub_device_id == "hub-d-1"


def test_renewal_events_replayed_in_order_end_in_the_same_state(tmp_path: Path) -> None:
    inventory, op = _setup(tmp_path, "renew", renew.ISSUE)
    renewed = {
        "serial": "0C",
        "issuer": ISSUER,
        "sha1_thumbprint": "C" * 40,
        "sha256_thumbprint": "D" * 64,
        "not_after": "2031",
        "custody": "wrapped",
        "key_profile": "ec-p256",
        "bundle": "/r/d-1",
    }
    events = [  # intent, killed before the bundle was durable, voided, intent again, renewed
        (AuditEvent.RENEWAL_INTENT, "d-1", {"serial": "0B"}),
        (AuditEvent.RENEWAL_VOID, "d-1", {"serial": "0B", "issuer": ISSUER, "at": "T"}),
        (AuditEvent.RENEWAL_INTENT, "d-1", {"serial": "0C"}),
        (AuditEvent.RENEWED, "d-1", renewed),
    ]
    _replay(inventory, op, renew.RENEW_HANDLERS, events[:2])  # what the database had
    _replay(inventory, op, renew.RENEW_HANDLERS, events)  # resume: everything again
    once = _snapshot(inventory)
    _replay(inventory, op, renew.RENEW_HANDLERS, events)
    assert _snapshot(inventory) == once
    step, detail = item(inventory, op, "d-1")  # type: ignore[misc]
    assert step == renew.ENROLL and detail["new"] == "0C"
    statuses = {c.serial: c.status for c in inventory.certificates_of("d-1")}
    assert statuses == {
        "0A": CertificateStatus.ACTIVE,
        "0B": CertificateStatus.VOID,
        "0C": CertificateStatus.STAGED,
    }


def test_move_only_moves_forward_from_the_steps_given(tmp_path: Path) -> None:
    inventory, op = _setup(tmp_path, "revoke", revoke.DPS)
    assert move(inventory, op, "d-1", when=(revoke.DPS,), to=revoke.HUB, detail={"x": 1})
    assert not move(inventory, op, "d-1", when=(revoke.DPS,), to=revoke.DONE)
    assert not move(inventory, op, "nobody", when=(revoke.DPS,), to=revoke.DONE)
    assert item(inventory, op, "d-1") == (revoke.HUB, {"old": "0A", "x": 1})


def test_enrollment_bodies_keep_what_is_writable() -> None:
    current = {
        "registrationId": "d-1",
        "deviceId": "dev",
        "initialTwin": {"tags": {"a": 1}},
        "etag": "e",
        "createdDateTimeUtc": "t",
        "registrationState": {"status": "assigned"},
        "attestation": {
            "type": "x509",
            "x509": {"clientCertificates": {"primary": {"info": {"sha256Thumbprint": "ab"}}}},
        },
    }
    assert slot_thumbprints(current) == {"primary": "AB"} and slot_thumbprints(None) == {}
    out = body("d-1", current, {"primary": "P", "secondary": "S"}, "disabled")
    assert out["deviceId"] == "dev" and out["initialTwin"] == {"tags": {"a": 1}}
    assert "etag" not in out and "registrationState" not in out and "createdDateTimeUtc" not in out
    assert out["provisioningStatus"] == "disabled"
    assert out["attestation"]["x509"]["clientCertificates"] == {
        "primary": {"certificate": "P"},
        "secondary": {"certificate": "S"},
    }


def test_durations() -> None:
    assert parse_duration("90d").days == 90 and parse_duration("2w").days == 14
    assert parse_duration("36h").total_seconds() == 36 * 3600 and parse_duration("7").days == 7
