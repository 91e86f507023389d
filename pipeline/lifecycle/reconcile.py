"""``provline reconcile``: what the station inventory says against what DPS and IoT Hub hold.

Read (every call paced like registration, queries paged): all individual enrollments, all
enrollment groups, the registration records of provline's groups, and the IoT Hub identities
of revoked devices (those DPS assigned) and of ``hub``-mode devices. Drift:

============================  ====================================================  ========
kind                          what                                                  --fix
============================  ====================================================  ========
``revoked_enabled``           a revoked device whose enrollment is enabled, that    yes
                              no disabled enrollment blocks, or whose IoT Hub
                              identity is enabled
``unknown_certificate``       an enrollment or a registration of provline's group   no
                              whose certificate no inventory entry issued, though
                              it names provline's issuing CA or device
``missing_from_dps``          an inventory device (individual enrollment provline   yes
                              made) or provline's enrollment group that DPS lacks
``missing_from_hub``          a ``hub``-mode device whose identity is gone          yes
``thumbprint_mismatch``       provline's enrollment holds other certificates than   yes
                              the device's live ones
``group_disabled``            provline's enrollment group is disabled               no
============================  ====================================================  ========

``--fix`` repairs what provline owns — re-disables, re-creates (a disabled enrollment for a
revoked device, an enrollment with the device's live certificates, the group, the hub
identity) — logs each repair in the lifecycle log, and reports the rest. It never deletes
anything: an entry provline did not create is only reported.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from ..ca.certs import pem, thumbprints
from ..ca.chain import load_chain
from ..config.station import Station
from ..layout import DEVICE_JSON
from ..registration.service import ServiceError, short_reason
from ..vocabulary import AuditEvent, CertificateStatus, RegistrationMode
from . import enrollments
from .enrollments import Outcome, Pems
from .inventory import DeviceRecord, Inventory
from .operation import Handler, Lifecycle, Operation, precheck
from .revoke import blocking_change
from .service import Services

KIND = "reconcile"
REVOKED_ENABLED = "revoked_enabled"
UNKNOWN_CERTIFICATE = "unknown_certificate"
MISSING_FROM_DPS = "missing_from_dps"
MISSING_FROM_HUB = "missing_from_hub"
THUMBPRINT_MISMATCH = "thumbprint_mismatch"
GROUP_DISABLED = "group_disabled"
ENROLLMENT, GROUP, REGISTRATION, HUB = "dps enrollment", "dps group", "dps registration", "iot hub"


@dataclass
class Drift:
    kind: str
    registration_id: str | None
    where: str
    detail: str
    fixable: bool
    fixed: str | None = None  # "fixed", or "failed: why"

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class ReconcileReport:
    drift: list[Drift] = field(default_factory=list)
    seen: dict[str, int] = field(default_factory=dict)
    calls: int = 0
    hub_calls: int = 0
    operation: str | None = None

    @property
    def remaining(self) -> list[Drift]:
        return [d for d in self.drift if d.fixed != "fixed"]

    def to_json(self) -> dict[str, Any]:
        return {
            "drift": [d.to_json() for d in self.drift],
            "remaining": len(self.remaining),
            "fixed": len(self.drift) - len(self.remaining),
            "seen": self.seen,
            "calls": self.calls,
            "hub_calls": self.hub_calls,
            "operation": self.operation,
        }

    def table(self) -> str:
        rows = [("kind", "registration id", "where", "fix", "detail")]
        for d in self.drift:
            fix = d.fixed or ("fixable (--fix)" if d.fixable else "report only")
            rows.append((d.kind, d.registration_id or "-", d.where, fix, d.detail))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [
            "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r[:4])) + "  " + r[4]
            for r in rows
        ]
        seen = "  ".join(f"{k} {v}" for k, v in self.seen.items())
        summary = (
            f"{len(self.drift)} drift, {len(self.drift) - len(self.remaining)} fixed, "
            f"{len(self.remaining)} remaining ({seen}; {self.calls} DPS calls, "
            f"{self.hub_calls} IoT Hub calls)"
        )
        return "\n".join([*lines, summary]) + "\n" if self.drift else summary + "\n"


def _on_fixed(inv: Inventory, op: Operation, rid: str, data: dict[str, Any]) -> None:
    if data["kind"] == REVOKED_ENABLED and data["where"] == ENROLLMENT:
        inv.set_shut_out(rid, dps="blocked" if data.get("how") == "created" else "disabled")
    elif data["kind"] == REVOKED_ENABLED and data["where"] == HUB:
        inv.set_shut_out(rid, hub="disabled", hub_device_id=data.get("device_id"))


HANDLERS: dict[AuditEvent, Handler] = {AuditEvent.RECONCILE_FIXED: _on_fixed}


@dataclass
class _Device:
    record: DeviceRecord
    live: set[str]  # SHA-256 of active and staged certificates
    hub_device_id: str | None = None


class _Reconciler:
    def __init__(self, station: Station, inventory: Inventory, svc: Services) -> None:
        self.station = station
        self.inventory = inventory
        self.svc = svc
        self.report = ReconcileReport()
        self.devices: dict[str, _Device] = {
            d.registration_id: _Device(d, set(), d.hub_device_id) for d in inventory.devices()
        }
        self.issued: dict[str, tuple[str, CertificateStatus]] = {}  # sha256 -> (rid, status)
        for rid, sha256, status in inventory.db.execute(
            "SELECT registration_id, sha256, status FROM certificates WHERE sha256 IS NOT NULL"
        ):
            self.issued[sha256] = (rid, CertificateStatus(status))
            if (
                status in (CertificateStatus.ACTIVE, CertificateStatus.STAGED)
                and rid in self.devices
            ):
                self.devices[rid].live.add(sha256)
        self.issuer = load_chain(station).issuer
        self.issuer_name = self.issuer.subject.rfc4514_string()
        self.enrolled: dict[str, dict[str, Any]] = {}
        self.fix_enrollments: dict[str, tuple[Drift, enrollments.Change]] = {}
        self.fix_groups: dict[str, Drift] = {}
        self.fix_hub: list[tuple[Drift, str, str]] = []  # drift, device id, action

    def add(self, drift: Drift) -> Drift:
        self.report.drift.append(drift)
        return drift

    async def run(self) -> ReconcileReport:
        await self._enrollments()
        groups = await self._groups()
        await self._registrations(groups)
        self._missing()
        await self._hub()
        self.report.seen["inventory devices"] = len(self.devices)
        return self.report

    # -- DPS individual enrollments ----------------------------------------------------------
    async def _enrollments(self) -> None:
        pems = Pems(self.inventory)
        foreign = 0
        async for page in self.svc.pages("/enrollments/query"):
            for enrollment in page:
                rid = str(enrollment.get("registrationId", "")).lower()
                self.enrolled[rid] = enrollment
                slots = enrollments.slot_thumbprints(enrollment)
                device = self.devices.get(rid)
                unknown = [t for t in slots.values() if t not in self.issued]
                if device is None:
                    if unknown and self._names_our_ca(enrollment):
                        self.add(
                            Drift(
                                UNKNOWN_CERTIFICATE,
                                rid,
                                ENROLLMENT,
                                f"certificate sha256 {unknown[0]} names provline's issuing CA "
                                "but no inventory entry issued it",
                                False,
                            )
                        )
                    else:
                        foreign += 1
                    continue
                state = enrollment.get("registrationState") or {}
                if state.get("status") == "assigned" and state.get("deviceId"):
                    device.hub_device_id = device.hub_device_id or str(state["deviceId"])
                status = enrollment.get("provisioningStatus", "enabled")
                if device.record.revoked:
                    if status != "disabled":
                        drift = self.add(
                            Drift(
                                REVOKED_ENABLED,
                                rid,
                                ENROLLMENT,
                                "the device is revoked but its enrollment is enabled",
                                not unknown,
                            )
                        )
                        if not unknown:
                            self.fix_enrollments[rid] = (
                                drift,
                                blocking_change(self.inventory, pems, rid),
                            )
                    continue
                if unknown:
                    self.add(
                        Drift(
                            UNKNOWN_CERTIFICATE,
                            rid,
                            ENROLLMENT,
                            f"the enrollment holds certificate sha256 {unknown[0]}, which no "
                            "inventory entry issued",
                            False,
                        )
                    )
                if (
                    device.record.mode is RegistrationMode.INDIVIDUAL
                    and set(slots.values()) != device.live
                ):
                    ours = device.record.registration == "registered"
                    drift = self.add(
                        Drift(
                            THUMBPRINT_MISMATCH,
                            rid,
                            ENROLLMENT,
                            f"enrolled {sorted(slots.values())} but the device's live "
                            f"certificates are {sorted(device.live)}",
                            ours,
                        )
                    )
                    if ours:
                        self.fix_enrollments[rid] = (drift, self._restore(pems, rid, None))
        self.report.seen["enrollments"] = len(self.enrolled)
        self.report.seen["foreign enrollments"] = foreign

    def _names_our_ca(self, enrollment: dict[str, Any]) -> bool:
        certs = enrollment.get("attestation", {}).get("x509", {}).get("clientCertificates") or {}
        return any(
            ((slot or {}).get("info") or {}).get("issuerName", "").replace(", ", ",")
            == self.issuer_name.replace(", ", ",")
            for slot in certs.values()
        )

    def _restore(self, pems: Pems, rid: str, status: str | None) -> enrollments.Change:
        """The enrollment with the device's live certificates: active primary, staged
        secondary. ``status`` None keeps the enrollment's own."""
        live = [
            c
            for c in self.inventory.certificates_of(
                rid, (CertificateStatus.ACTIVE, CertificateStatus.STAGED)
            )
            if c.sha256
        ]
        live.sort(key=lambda c: c.status is not CertificateStatus.ACTIVE)
        device = self.devices[rid].record

        def change(current: dict[str, Any] | None) -> dict[str, Any] | str | None:
            slots: dict[str, str] = {}
            for slot, cert in zip(enrollments.SLOTS, live, strict=False):
                text = pems.get(cert.sha256 or "")
                if text is None:
                    return f"the bundle of certificate {cert.serial} is missing"
                slots[slot] = text
            if not slots:
                return "the device has no live certificate"
            wanted = status or str((current or {}).get("provisioningStatus") or "enabled")
            out = enrollments.body(rid, current, slots, wanted)
            if current is None:
                out["deviceId"] = device.device_id
                twin = _twin(live[0].bundle)
                if twin:
                    out["initialTwin"] = twin
            return out

        return change

    # -- groups and their registrations ------------------------------------------------------
    async def _groups(self) -> set[str]:
        ours = {
            d.record.enrollment
            for d in self.devices.values()
            if d.record.mode is RegistrationMode.GROUP and d.record.enrollment
        }
        seen: dict[str, dict[str, Any]] = {}
        async for page in self.svc.pages("/enrollmentGroups/query"):
            for group in page:
                seen[str(group.get("enrollmentGroupId", "")).lower()] = group
        self.report.seen["groups"] = len(seen)
        for gid in sorted(ours):
            group = seen.get(gid.lower())
            if group is None:
                fixable = gid == self._group_id()
                drift = self.add(
                    Drift(
                        MISSING_FROM_DPS,
                        None,
                        GROUP,
                        f"enrollment group {gid} of "
                        f"{sum(1 for d in self.devices.values() if d.record.enrollment == gid)} "
                        "devices is missing",
                        fixable,
                    )
                )
                if fixable:
                    self.fix_groups[gid] = drift
            elif group.get("provisioningStatus") == "disabled":
                self.add(
                    Drift(GROUP_DISABLED, None, GROUP, f"enrollment group {gid} is disabled", False)
                )
        return {gid for gid in ours if gid.lower() in seen}

    def _group_id(self) -> str:
        return "provline-" + thumbprints(self.issuer).sha256[:24].lower()

    async def _registrations(self, groups: set[str]) -> None:
        count = 0
        for gid in sorted(groups):
            async for page in self.svc.pages(f"/registrations/{gid}/query"):
                for record in page:
                    count += 1
                    rid = str(record.get("registrationId", "")).lower()
                    info = (record.get("x509") or {}).get("certificateInfo") or {}
                    thumb = str(info.get("sha256Thumbprint", "")).upper()
                    if thumb and thumb not in self.issued:
                        self.add(
                            Drift(
                                UNKNOWN_CERTIFICATE,
                                rid,
                                REGISTRATION,
                                f"registered through {gid} with certificate sha256 {thumb}, "
                                "which no inventory entry issued",
                                False,
                            )
                        )
                    device = self.devices.get(rid)
                    if device is not None and record.get("status") == "assigned":
                        device.hub_device_id = device.hub_device_id or record.get("deviceId")
        self.report.seen["registrations"] = count

    # -- inventory devices DPS lacks --------------------------------------------------------
    def _missing(self) -> None:
        pems = Pems(self.inventory)
        for rid, device in self.devices.items():
            record = device.record
            if rid in self.enrolled or record.mode not in (
                RegistrationMode.INDIVIDUAL,
                RegistrationMode.GROUP,
            ):
                continue
            if record.revoked:
                drift = self.add(
                    Drift(
                        REVOKED_ENABLED,
                        rid,
                        ENROLLMENT,
                        "revoked, but no disabled enrollment blocks it",
                        True,
                    )
                )
                self.fix_enrollments[rid] = (drift, blocking_change(self.inventory, pems, rid))
            elif record.mode is RegistrationMode.INDIVIDUAL and record.registration == "registered":
                drift = self.add(
                    Drift(
                        MISSING_FROM_DPS,
                        rid,
                        ENROLLMENT,
                        "provline's individual enrollment is missing",
                        True,
                    )
                )
                self.fix_enrollments[rid] = (drift, self._restore(pems, rid, "enabled"))

    # -- IoT Hub -----------------------------------------------------------------------------
    async def _hub(self) -> None:
        checks: list[tuple[str, str, bool]] = []  # rid, device id, revoked
        for rid, device in self.devices.items():
            record = device.record
            if record.mode is RegistrationMode.HUB and (
                record.revoked or record.registration == "registered"
            ):
                checks.append((rid, record.hub_device_id or record.device_id, record.revoked))
            elif record.revoked and device.hub_device_id:
                checks.append((rid, device.hub_device_id, True))
        if not checks:
            return
        if not self.svc.has_hub:
            self.add(
                Drift(
                    MISSING_FROM_HUB,
                    None,
                    HUB,
                    "the station has no IoT Hub connection string: identities not checked",
                    False,
                )
            )
            return
        seen = 0

        async def check(job: tuple[str, str, bool]) -> None:
            nonlocal seen
            rid, device_id, revoked = job
            try:
                identity = await self.svc.hub_call(partial(self.svc.hub.get, device_id))
            except (ServiceError, OSError) as exc:
                self.add(
                    Drift(
                        MISSING_FROM_HUB,
                        rid,
                        HUB,
                        f"could not read {device_id}: {short_reason(exc)}",
                        False,
                    )
                )
                return
            seen += 1
            if revoked and identity is not None and identity.status == "enabled":
                drift = self.add(
                    Drift(REVOKED_ENABLED, rid, HUB, f"identity {device_id} is enabled", True)
                )
                self.fix_hub.append((drift, device_id, "disable"))
            elif not revoked and identity is None:
                drift = self.add(
                    Drift(MISSING_FROM_HUB, rid, HUB, f"identity {device_id} is missing", True)
                )
                self.fix_hub.append((drift, device_id, "create"))

        await self.svc.each(checks, check)
        self.report.seen["hub identities"] = seen

    # -- repairs -------------------------------------------------------------------------------
    async def fix(self, lc: Lifecycle, op: Operation) -> None:
        def logged(drift: Drift, **data: Any) -> tuple[AuditEvent, str | None, dict[str, Any]]:
            drift.fixed = "fixed"
            return (
                AuditEvent.RECONCILE_FIXED,
                drift.registration_id,
                {"kind": drift.kind, "where": drift.where, "detail": drift.detail, **data},
            )

        if self.fix_enrollments:

            def done(outcomes: list[Outcome]) -> None:
                events = []
                for o in outcomes:
                    drift = self.fix_enrollments[o.registration_id][0]
                    if o.failed:
                        drift.fixed = f"failed: {o.reason}"
                    else:
                        events.append(logged(drift, how=o.how))
                lc.commit(op, events)

            changes = {rid: change for rid, (_, change) in self.fix_enrollments.items()}
            await enrollments.apply(self.svc, changes, done)
        for gid, drift in self.fix_groups.items():
            body = {
                "enrollmentGroupId": gid,
                "provisioningStatus": "enabled",
                "attestation": {
                    "type": "x509",
                    "x509": {
                        "signingCertificates": {
                            "primary": {"certificate": pem(self.issuer).decode()}
                        }
                    },
                },
            }
            try:
                await self.svc.call(partial(self.svc.dps.put, "enrollmentGroups", gid, body))
                lc.commit(op, [logged(drift, group=gid, how="created")])
            except (ServiceError, OSError) as exc:
                drift.fixed = f"failed: {short_reason(exc)}"
        for drift, device_id, action in self.fix_hub:
            try:
                if action == "disable":
                    await self.svc.hub_call(
                        partial(self.svc.hub.set_status, device_id, "disabled"), 2
                    )
                else:
                    await self.svc.hub_call(partial(self.svc.hub.create_ca_identity, device_id))
                lc.commit(op, [logged(drift, device_id=device_id, how=action)])
            except Exception as exc:  # the SDK raises several kinds; each fails this repair
                drift.fixed = f"failed: {short_reason(exc)}"


def _twin(bundle: str | None) -> dict[str, Any] | None:
    """The initial twin provline enrolled the device with (tags, desired properties), from
    its device.json."""
    if not bundle:
        return None
    try:
        info = json.loads((Path(bundle) / DEVICE_JSON).read_text())
    except (OSError, ValueError):
        return None
    tags, desired = info.get("tags") or {}, info.get("desired") or {}
    return {"tags": tags, "properties": {"desired": desired}} if tags or desired else None


def reconcile(
    station: Station,
    *,
    fix: bool = False,
    operations_per_minute: int | None = None,
    operator: str | None = None,
    note: Callable[[str], None] = print,
) -> ReconcileReport:
    """Find drift between the inventory and DPS / IoT Hub; with ``fix``, repair what
    provline owns."""
    args = {"fix": True}
    if fix:
        precheck(station, KIND, args, False)
    return asyncio.run(_reconcile(station, fix, operations_per_minute, operator, note))


async def _reconcile(
    station: Station,
    fix: bool,
    operations_per_minute: int | None,
    operator: str | None,
    note: Callable[[str], None],
) -> ReconcileReport:
    # With --fix the lifecycle log (and the HSM holding its key) is opened first: loading the
    # PKCS#11 module can leave an error in OpenSSL's queue that a TLS connection opened
    # before it would then report; connections opened after it are not affected.
    lc = Lifecycle(station, HANDLERS, operator) if fix else None
    inventory = Inventory.of(station, create=False)
    svc = Services(station, operations_per_minute)
    try:
        reconciler = _Reconciler(station, inventory, svc)
        report = await reconciler.run()
        fixable = [d for d in report.drift if d.fixable]
        if lc is not None and fixable:
            op = lc.start(KIND, {"fix": True}, [], KIND)
            await reconciler.fix(lc, op)
            failed = sum(1 for d in fixable if d.fixed != "fixed")
            lc.finish(
                op,
                {"drift": len(report.drift), "fixed": len(fixable) - failed, "failed": failed},
            )
            report.operation = op.id
        report.calls, report.hub_calls = svc.calls, svc.hub_calls
        return report
    finally:
        await svc.aclose()
        inventory.close()
        if lc is not None:
            lc.close(note)
