"""``provline renew --promote``: make each device's staged renewal its certificate
(docs/lifecycle.md).

The individual enrollment gets the renewal as primary and loses the old certificate (one
``updateIfMatchETag`` bulk write per 10 devices), the self-signed IoT Hub identity DPS made
follows (the new SHA-1 thumbprint only), the renewal becomes ``active`` and the old
certificate ``retired``: listed on the issuing CA's CRL as ``superseded``. Enrollment groups and
IoT Hub CA identities need no change. DPS does not check CRLs: a retired certificate of a group
device still chains to the group's CA, so DPS keeps accepting it until it expires (revoke the
device to shut it out). Journaled and resumable like every lifecycle operation
(:mod:`.operation`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from typing import Any

from ..config.station import Station
from ..errors import ValidationFailed
from ..registration.service import short_reason
from ..vocabulary import AuditEvent, CertificateStatus, RegistrationMode
from . import enrollments
from .crl import SUPERSEDED, issue_crl
from .enrollments import Outcome, Pems
from .inventory import Inventory, utc_now
from .operation import Handler, Lifecycle, Operation, move, precheck, resumes
from .renew import (
    CRL,
    DONE,
    HUB,
    PROMOTE,
    RenewResult,
    on_crl_done,
    on_step_failed,
    summarise,
)
from .service import Services, chunks, require_endpoints
from .targets import MAX_PROBLEMS, Targets, fingerprint, target_ids


def _on_promoted(inv: Inventory, op: Operation, rid: str, data: dict[str, Any]) -> None:
    inv.set_certificate_status(data["serial"], CertificateStatus.ACTIVE)
    if data.get("retired"):
        inv.set_certificate_status(
            data["retired"], CertificateStatus.RETIRED, SUPERSEDED, data["at"]
        )
    after = HUB if data.get("device_id") else DONE
    move(
        inv,
        op,
        rid,
        when=(PROMOTE,),
        to=after,
        detail={k: data[k] for k in ("device_id", "assigned_hub") if data.get(k)},
    )


def _on_hub_updated(inv: Inventory, op: Operation, rid: str, data: dict[str, Any]) -> None:
    move(inv, op, rid, when=(HUB,), to=DONE, detail={"hub": data["how"]})


PROMOTE_HANDLERS: dict[AuditEvent, Handler] = {
    AuditEvent.PROMOTED: _on_promoted,
    AuditEvent.HUB_IDENTITY_UPDATED: _on_hub_updated,
    AuditEvent.LIFECYCLE_STEP_FAILED: on_step_failed,
    AuditEvent.CRL_ISSUED: on_crl_done,
}


def promote(
    station: Station,
    targets: Targets,
    *,
    resume: bool = False,
    operations_per_minute: int | None = None,
    operator: str | None = None,
    note: Callable[[str], None] = print,
) -> RenewResult:
    """Make each device's staged renewal its certificate and retire the old one."""
    plan: list[tuple[str, str, dict[str, Any]]] = []
    args: dict[str, Any] = {}
    if not resume:
        rids = target_ids(station, targets)
        args = {"devices": len(rids), "targets_sha256": fingerprint(rids)}
        resume = resumes(station, PROMOTE, args)
        if not resume:
            plan = _promotion_plan(station, rids)
    precheck(station, PROMOTE, args, resume)
    if resume or any(d.get("mode") == RegistrationMode.INDIVIDUAL for _, _, d in plan):
        require_endpoints(station)
    lc = Lifecycle(station, PROMOTE_HANDLERS, operator)
    try:
        op = lc.start(PROMOTE, args, plan, PROMOTE, resume=resume)
        result = RenewResult(op.id, PROMOTE, "open", resumed=op.resumed)
        if lc.items(op, PROMOTE):
            asyncio.run(_promote(lc, op, operations_per_minute))
        if lc.items(op, HUB):
            asyncio.run(_promote_hub(lc, op, operations_per_minute))
        if op.phase in (PROMOTE, CRL):
            lc.set_phase(op, CRL)
            result.crl = issue_crl(station, lc.inventory, lc.log, op.id)
            lc.set_phase(op, DONE)
        summarise(lc, op, result)
        result.state = lc.finish(
            op,
            {
                "devices": result.devices,
                "promoted": result.enrolled,
                "failed": len(result.failures),
            },
        )
        return result
    finally:
        lc.close(note)


def _promotion_plan(station: Station, rids: list[str]) -> list[tuple[str, str, dict[str, Any]]]:
    inventory = Inventory.of(station, create=False)
    plan: list[tuple[str, str, dict[str, Any]]] = []
    problems: list[str] = []
    try:
        for rid in rids:
            device = inventory.device(rid)
            live = inventory.certificates_of(
                rid, (CertificateStatus.ACTIVE, CertificateStatus.STAGED)
            )
            staged = [c for c in live if c.status is CertificateStatus.STAGED]
            active = [c for c in live if c.status is CertificateStatus.ACTIVE]
            if device is None or device.revoked:
                problems.append(f"{rid}: revoked: nothing to promote")
            elif not staged:
                problems.append(f"{rid}: no staged renewal to promote (provline renew first)")
            else:
                plan.append(
                    (
                        rid,
                        PROMOTE,
                        {
                            "new": staged[-1].serial,
                            "sha256": staged[-1].sha256,
                            "sha1": staged[-1].sha1,
                            "old": active[-1].serial if active else None,
                            "issuer": active[-1].issuer if active else None,
                            "mode": device.mode.value,
                        },
                    )
                )
    finally:
        inventory.close()
    if problems:
        more = len(problems) - MAX_PROBLEMS
        raise ValidationFailed(
            problems[:MAX_PROBLEMS] + ([f"... and {more} more"] if more > 0 else [])
        )
    return plan


async def _promote(lc: Lifecycle, op: Operation, operations_per_minute: int | None) -> None:
    pems = Pems(lc.inventory)
    items = dict(lc.items(op, PROMOTE))
    at = utc_now()

    def promoted(rid: str, **extra: Any) -> tuple[AuditEvent, str | None, dict[str, Any]]:
        detail = items[rid]
        return (
            AuditEvent.PROMOTED,
            rid,
            {
                "serial": detail["new"],
                "retired": detail.get("old"),
                "issuer": detail.get("issuer"),
                "at": at,
                **extra,
            },
        )

    others = [rid for rid, d in items.items() if d["mode"] != RegistrationMode.INDIVIDUAL]
    for part in chunks(others, 500):
        lc.commit(op, [promoted(rid, enrollment="none") for rid in part])
    individual = {rid: d for rid, d in items.items() if d["mode"] == RegistrationMode.INDIVIDUAL}
    if not individual:
        return

    def primary(rid: str) -> enrollments.Change:
        new_sha = individual[rid]["sha256"]

        def change(current: dict[str, Any] | None) -> dict[str, Any] | str | None:
            if current is None:
                return "the device has no individual enrollment (provline reconcile reports it)"
            if enrollments.slot_thumbprints(current) == {"primary": new_sha}:
                return None
            new = pems.get(new_sha)
            if new is None:
                return "the renewal's bundle is missing"
            status = str(current.get("provisioningStatus") or "enabled")
            return enrollments.body(rid, current, {"primary": new}, status)

        return change

    def done(outcomes: list[Outcome]) -> None:
        events: list[tuple[AuditEvent, str | None, dict[str, Any]]] = []
        for o in outcomes:
            if o.failed:
                events.append(
                    (
                        AuditEvent.LIFECYCLE_STEP_FAILED,
                        o.registration_id,
                        {"where": PROMOTE, "reason": o.reason},
                    )
                )
                continue
            state = o.registration or {}
            where = {}
            if state.get("status") == "assigned" and state.get("deviceId"):
                where = {"device_id": state["deviceId"], "assigned_hub": state.get("assignedHub")}
            events.append(promoted(o.registration_id, enrollment=o.how, **where))
        lc.commit(op, events)

    svc = Services(lc.station, operations_per_minute)
    try:
        await enrollments.apply(svc, {rid: primary(rid) for rid in individual}, done)
    finally:
        await svc.aclose()


async def _promote_hub(lc: Lifecycle, op: Operation, operations_per_minute: int | None) -> None:
    """The self-signed identity DPS made follows the enrollment: the new thumbprint only."""
    items = lc.items(op, HUB)
    svc = Services(lc.station, operations_per_minute)

    async def update(job: list[tuple[str, dict[str, Any]]]) -> None:
        events: list[tuple[AuditEvent, str | None, dict[str, Any]]] = []
        for rid, detail in job:
            if not svc.has_hub or not svc.hub.serves(detail.get("assigned_hub")):
                events.append(
                    (
                        AuditEvent.LIFECYCLE_STEP_FAILED,
                        rid,
                        {"where": HUB, "reason": "no connection string for its hub"},
                    )
                )
                continue
            try:
                how = await svc.hub_call(
                    partial(svc.hub.set_thumbprints, detail["device_id"], detail["sha1"], None), 2
                )
                events.append(
                    (
                        AuditEvent.HUB_IDENTITY_UPDATED,
                        rid,
                        {"device_id": detail["device_id"], "how": how},
                    )
                )
            except Exception as exc:  # the SDK raises several kinds; each fails this device
                events.append(
                    (
                        AuditEvent.LIFECYCLE_STEP_FAILED,
                        rid,
                        {"where": HUB, "reason": short_reason(exc)},
                    )
                )
        lc.commit(op, events)

    try:
        await svc.each(chunks(items, 10), update)
    finally:
        await svc.aclose()
