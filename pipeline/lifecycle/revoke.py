"""``provline revoke``: take devices out of service (docs/lifecycle.md).

For each device, in three journaled phases (:mod:`.operation`):

1. **record**: every live certificate of the device (active, or a staged renewal) becomes
   ``revoked`` with the RFC 5280 reason, in the inventory and the lifecycle log;
2. **crl**: the issuing CA's cumulative CRL is signed in the HSM and published;
3. **shut out** where the device registers, because DPS does not check CRLs:

   * DPS: a disabled individual enrollment holding the device's certificates. An individual
     enrollment is disabled in place; a device of an enrollment group gets a new, disabled
     individual enrollment for its registration ID, which DPS matches before any group
     (Microsoft Learn, "How to disenroll or revoke a device from Azure IoT Hub Device
     Provisioning Service": never delete it, or the device enrols through its group again);
     its next registration ends ``disabled``;
   * IoT Hub: the identity DPS made for it (or provline, in ``hub`` mode) is disabled, so its
     telemetry is refused. A device DPS never assigned has no identity: nothing to call.

A device whose shut-out failed (a transient outage past the retry deadline, an enrollment
holding a certificate provline did not issue) stays revoked and is reported; revoking it
again retries only what is missing, and ``provline reconcile --fix`` finds it too.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ..config.station import Station
from ..errors import RegistrationError
from ..registration.service import short_reason
from ..vocabulary import AuditEvent, CertificateStatus, RegistrationMode
from . import enrollments
from .crl import IssuedCrl, issue_crl
from .enrollments import Outcome, Pems
from .inventory import DeviceRecord, Inventory, utc_now
from .operation import Handler, Lifecycle, Operation, move, precheck, resumes
from .service import Services, chunks, require_endpoints
from .targets import Targets, fingerprint, target_ids

KIND = "revoke"
RECORD, CRL, DPS, HUB, DONE = "record", "crl", "dps", "hub", "done"
SHUTOUT = "shutout"
LIVE = (CertificateStatus.ACTIVE, CertificateStatus.STAGED)
REGISTERS_WITH_DPS = (RegistrationMode.INDIVIDUAL, RegistrationMode.GROUP)


@dataclass
class RevokeResult:
    operation: str | None
    state: str  # done | incomplete | nothing to do
    devices: int
    certificates: int = 0
    already: list[str] = field(default_factory=list)
    crl: IssuedCrl | None = None
    dps: dict[str, int] = field(default_factory=dict)
    hub: dict[str, int] = field(default_factory=dict)
    failures: list[dict[str, str]] = field(default_factory=list)
    resumed: bool = False
    dps_calls: int = 0
    hub_calls: int = 0

    @property
    def exit_code(self) -> int:
        return RegistrationError.exit_code if self.failures else 0

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "crl"}
        out["crl"] = self.crl.to_json() if self.crl else None
        out["exit_code"] = self.exit_code
        return out


def _first_step(device: DeviceRecord) -> str:
    """Where a revoked device's shut-out resumes: DPS, IoT Hub, or nothing left."""
    if device.mode in REGISTERS_WITH_DPS and device.dps in (None, "failed"):
        return DPS
    if device.mode is not RegistrationMode.NONE and device.hub in (None, "failed"):
        return HUB
    return DONE


def _after_dps(device: DeviceRecord | None) -> str:
    return HUB if device is not None and device.mode is not RegistrationMode.NONE else DONE


# -- applying events (live and on resume) ----------------------------------------------------
def _on_revoked(inv: Inventory, op: Operation, rid: str, data: dict[str, Any]) -> None:
    for serial in data["serials"]:
        inv.set_certificate_status(
            serial["serial"], CertificateStatus.REVOKED, data["reason"], data["at"]
        )
    inv.revoke_device(rid, data["reason"], data["at"])
    device = inv.device(rid)
    after = DONE
    if device is not None and device.mode in REGISTERS_WITH_DPS:
        after = DPS
    elif device is not None and device.mode is RegistrationMode.HUB:
        after = HUB
    move(inv, op, rid, when=(RECORD,), to=after, detail={"serials": data["serials"]})


def _on_crl(inv: Inventory, op: Operation, rid: str, data: dict[str, Any]) -> None:
    inv.db.execute(
        "UPDATE operations SET phase = ? WHERE id = ? AND phase = ?", (SHUTOUT, op.id, CRL)
    )


def _on_enrollment(inv: Inventory, op: Operation, rid: str, data: dict[str, Any]) -> None:
    dps = "blocked" if data["how"] == "blocked" else "disabled"
    inv.set_shut_out(rid, dps=dps, hub_device_id=data.get("device_id"))
    move(
        inv,
        op,
        rid,
        when=(DPS,),
        to=_after_dps(inv.device(rid)),
        detail={k: data[k] for k in ("assigned_hub", "device_id") if data.get(k)},
    )


def _on_hub(inv: Inventory, op: Operation, rid: str, data: dict[str, Any]) -> None:
    hub = "absent" if data["how"] == "absent" else "disabled"
    inv.set_shut_out(rid, hub=hub, hub_device_id=data.get("device_id"))
    move(inv, op, rid, when=(HUB,), to=DONE)


def _on_failed(inv: Inventory, op: Operation, rid: str, data: dict[str, Any]) -> None:
    if data["where"] == DPS:
        inv.set_shut_out(rid, dps="failed")
        move(
            inv,
            op,
            rid,
            when=(DPS,),
            to=_after_dps(inv.device(rid)),
            detail={"dps_error": data["reason"]},
        )
    else:
        inv.set_shut_out(rid, hub="failed")
        move(inv, op, rid, when=(HUB,), to=DONE, detail={"hub_error": data["reason"]})


HANDLERS: dict[AuditEvent, Handler] = {
    AuditEvent.REVOKED: _on_revoked,
    AuditEvent.CRL_ISSUED: _on_crl,
    AuditEvent.ENROLLMENT_DISABLED: _on_enrollment,
    AuditEvent.HUB_IDENTITY_DISABLED: _on_hub,
    AuditEvent.SHUT_OUT_FAILED: _on_failed,
}


# -- the command ----------------------------------------------------------------------------
def revoke(
    station: Station,
    targets: Targets,
    reason: str,
    *,
    resume: bool = False,
    operations_per_minute: int | None = None,
    operator: str | None = None,
    note: Callable[[str], None] = print,
) -> RevokeResult:
    """Revoke the devices ``targets`` names with the RFC 5280 ``reason`` (a name from
    :data:`pipeline.lifecycle.crl.REASONS`), or resume the unfinished revocation."""
    plan: list[tuple[str, str, dict[str, Any]]] = []
    already: list[str] = []
    args: dict[str, Any] = {}
    if not resume:
        rids = target_ids(station, targets)
        args = {"reason": reason, "devices": len(rids), "targets_sha256": fingerprint(rids)}
        resume = resumes(station, KIND, args)
        if not resume:
            plan, already = _plan(station, rids)
    precheck(station, KIND, args, resume)
    if not plan and not resume:
        return RevokeResult(None, "nothing to do", 0, already=already)
    if resume or any(detail.get("registers") for _, _, detail in plan):
        require_endpoints(station)
    lc = Lifecycle(station, HANDLERS, operator)
    try:
        op = lc.start(KIND, args, plan, RECORD, resume=resume)
        result = RevokeResult(op.id, "open", 0, already=already, resumed=op.resumed)
        reason = op.args.get("reason", reason)
        _record(lc, op, reason)
        if op.phase in (RECORD, CRL):
            lc.set_phase(op, CRL)
            result.crl = issue_crl(station, lc.inventory, lc.log, op.id)
            lc.set_phase(op, SHUTOUT)
        asyncio.run(_shut_out(lc, op, operations_per_minute, result))
        _summarise(lc, op, result)
        result.state = lc.finish(
            op,
            {
                "devices": result.devices,
                "certificates": result.certificates,
                "dps": result.dps,
                "hub": result.hub,
                "failed": len(result.failures),
            },
        )
        return result
    finally:
        lc.close(note)


def _plan(
    station: Station, rids: list[str]
) -> tuple[list[tuple[str, str, dict[str, Any]]], list[str]]:
    """Each device's first step: record its revocation, or only finish shutting it out."""
    plan: list[tuple[str, str, dict[str, Any]]] = []
    already: list[str] = []
    inventory = Inventory.of(station, create=False)
    try:
        for rid in rids:
            device = inventory.device(rid)
            if device is None:
                continue  # a void serial only: nothing was delivered
            step = RECORD if not device.revoked else _first_step(device)
            if step == DONE:
                already.append(rid)
            else:
                registers = device.mode is not RegistrationMode.NONE
                plan.append((rid, step, {"registers": True} if registers else {}))
    finally:
        inventory.close()
    return plan, already


def _record(lc: Lifecycle, op: Operation, reason: str) -> None:
    at = utc_now()
    for part in chunks(lc.items(op, RECORD), 500):
        events: list[tuple[AuditEvent, str | None, dict[str, Any]]] = []
        for rid, _ in part:
            device = lc.inventory.device(rid)
            serials = [
                {"serial": c.serial, "issuer": c.issuer}
                for c in lc.inventory.certificates_of(rid, LIVE)
            ]
            events.append(
                (
                    AuditEvent.REVOKED,
                    rid,
                    {
                        "reason": reason,
                        "at": at,
                        "serials": serials,
                        "batch": device.batch_id if device else None,
                    },
                )
            )
        lc.commit(op, events)


async def _shut_out(
    lc: Lifecycle, op: Operation, operations_per_minute: int | None, result: RevokeResult
) -> None:
    dps_items = lc.items(op, DPS)
    hub_items = lc.items(op, HUB)
    if not dps_items and not hub_items:
        return
    svc = Services(lc.station, operations_per_minute)
    try:
        if dps_items:
            await _disable_in_dps(lc, op, svc, [rid for rid, _ in dps_items])
        await _disable_in_hub(lc, op, svc, lc.items(op, HUB))
    finally:
        result.dps_calls, result.hub_calls = svc.calls, svc.hub_calls
        await svc.aclose()


def blocking_change(inventory: Inventory, pems: Pems, rid: str) -> enrollments.Change:
    """The change that leaves ``rid`` with a disabled individual enrollment holding the
    device's revoked certificates (at most two: primary and secondary)."""
    revoked = [
        c
        for c in reversed(inventory.certificates_of(rid, (CertificateStatus.REVOKED,)))
        if c.sha256
    ][:2]

    def change(current: dict[str, Any] | None) -> dict[str, Any] | str | None:
        slots = enrollments.slot_thumbprints(current)
        keep: dict[str, str] = {}
        for slot, thumb in slots.items():
            pem = pems.get(thumb)
            if pem is None:
                return (
                    f"the enrollment holds a certificate provline did not issue "
                    f"(sha256 {thumb}): left alone"
                )
            keep[slot] = pem
        wanted = {c.sha256 for c in revoked if c.sha256}
        disabled = current is not None and current.get("provisioningStatus") == "disabled"
        if disabled and wanted <= set(slots.values()):
            return None
        pems_out = {}
        for slot, cert in zip(enrollments.SLOTS, revoked, strict=False):
            pem = pems.get(cert.sha256 or "")
            if pem is None:
                return f"the bundle of certificate {cert.serial} is missing: cannot enrol it"
            pems_out[slot] = pem
        if not pems_out:
            pems_out = keep
        if not pems_out:
            return "no certificate of the device is known: nothing to enrol"
        return enrollments.body(rid, current, pems_out, "disabled")

    return change


async def _disable_in_dps(lc: Lifecycle, op: Operation, svc: Services, rids: list[str]) -> None:
    inventory = lc.inventory
    pems = Pems(inventory)
    devices = {rid: inventory.device(rid) for rid in rids}
    changes = {rid: blocking_change(inventory, pems, rid) for rid in rids}
    groups: dict[str | None, set[str]] = {}
    for rid, device in devices.items():
        if device is not None and device.mode is RegistrationMode.GROUP:
            groups.setdefault(device.enrollment, set()).add(rid)
    # where each group device registered: its IoT Hub identity, if DPS made one
    registered = await svc.registrations(groups) if groups else {}

    def done(outcomes: list[Outcome]) -> None:
        events: list[tuple[AuditEvent, str | None, dict[str, Any]]] = []
        for o in outcomes:
            state = o.registration or registered.get(o.registration_id) or {}
            where = _assignment(state)
            if o.failed:
                events.append(
                    (
                        AuditEvent.SHUT_OUT_FAILED,
                        o.registration_id,
                        {"where": DPS, "reason": o.reason, **where},
                    )
                )
                continue
            how = {"created": "blocked", "updated": "disabled", "already": "already"}[o.how]
            events.append(
                (
                    AuditEvent.ENROLLMENT_DISABLED,
                    o.registration_id,
                    {"how": how, "enrollment": o.registration_id, **where},
                )
            )
        lc.commit(op, events)

    await enrollments.apply(svc, changes, done)


def _assignment(state: dict[str, Any]) -> dict[str, str]:
    """assigned_hub and device_id of a registration state that was assigned."""
    if state.get("status") == "assigned" and state.get("assignedHub"):
        return {"assigned_hub": str(state["assignedHub"]), "device_id": str(state["deviceId"])}
    return {}


async def _disable_in_hub(
    lc: Lifecycle, op: Operation, svc: Services, items: list[tuple[str, dict[str, Any]]]
) -> None:
    calls: list[tuple[str, str]] = []
    settled: list[tuple[AuditEvent, str | None, dict[str, Any]]] = []
    for rid, detail in items:
        device = lc.inventory.device(rid)
        if device is None:
            continue
        hub = detail.get("assigned_hub")
        device_id = detail.get("device_id")
        if device.mode is RegistrationMode.HUB:
            device_id = device.hub_device_id or device.device_id
        elif not device_id and device.hub_device_id:
            device_id = device.hub_device_id  # known from an earlier look
        if not device_id:
            settled.append(
                (
                    AuditEvent.HUB_IDENTITY_DISABLED,
                    rid,
                    {"how": "absent", "why": "never assigned by DPS"},
                )
            )
        elif not svc.has_hub:
            settled.append(
                (
                    AuditEvent.SHUT_OUT_FAILED,
                    rid,
                    {
                        "where": HUB,
                        "reason": "the station has no IoT Hub connection string",
                        "device_id": device_id,
                    },
                )
            )
        elif not svc.hub.serves(hub):
            settled.append(
                (
                    AuditEvent.SHUT_OUT_FAILED,
                    rid,
                    {
                        "where": HUB,
                        "reason": f"assigned to {hub}: the station has no connection string",
                        "device_id": device_id,
                    },
                )
            )
        else:
            calls.append((rid, device_id))
    for part in chunks(settled, 500):
        lc.commit(op, part)

    async def disable(job: list[tuple[str, str]]) -> None:
        events: list[tuple[AuditEvent, str | None, dict[str, Any]]] = []
        for rid, device_id in job:
            try:
                how = await svc.hub_call(partial(svc.hub.set_status, device_id, "disabled"), 2)
                events.append(
                    (AuditEvent.HUB_IDENTITY_DISABLED, rid, {"how": how, "device_id": device_id})
                )
            except Exception as exc:  # the SDK raises several kinds; each fails this device
                events.append(
                    (
                        AuditEvent.SHUT_OUT_FAILED,
                        rid,
                        {"where": HUB, "reason": short_reason(exc), "device_id": device_id},
                    )
                )
        lc.commit(op, events)

    await svc.each(chunks(calls, 10), disable)


def _summarise(lc: Lifecycle, op: Operation, result: RevokeResult) -> None:
    rows = lc.inventory.db.execute(
        "SELECT registration_id, detail FROM op_items WHERE op = ?", (op.id,)
    ).fetchall()
    result.devices = len(rows)
    for rid, text in rows:
        detail = json.loads(text)
        result.certificates += len(detail.get("serials", []))
        device = lc.inventory.device(rid)
        if device is None:
            continue
        if device.dps:
            result.dps[device.dps] = result.dps.get(device.dps, 0) + 1
        if device.hub:
            result.hub[device.hub] = result.hub.get(device.hub, 0) + 1
        if device.dps == "failed" or device.hub == "failed":
            result.failures.append(
                {
                    "registration_id": rid,
                    "dps": detail.get("dps_error", device.dps or ""),
                    "hub": detail.get("hub_error", device.hub or ""),
                }
            )
