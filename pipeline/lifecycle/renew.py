"""``provline renew``: new certificates before the old ones expire, without breaking a
device's connection (docs/lifecycle.md); ``--promote`` finishes the roll (:mod:`.promote`).

**renew** gives each device a new leaf: the same CN (the registration ID), a new serial, a new
key made the way the device's custody makes keys (wrapped: a new key wrapped under the
transport key; retain: a new token key labelled ``<registration id>@<operation id>``; pkcs8:
a new encrypted file), signed by the station's issuing key in the HSM, in a bundle under
``<lifecycle dir>/renewals/<operation id>/<registration id>/`` (the batch layout). The old
certificate stays valid. For an individual enrollment the new certificate goes into the
secondary slot (Microsoft Learn, "How to roll X.509 device certificates": the device
registers with either); an enrollment group needs no change (the new leaf chains to the same
CA); an IoT Hub CA identity neither. Serials are journaled and logged as intents before they
are signed, like a batch: after a kill, an intent without a durable bundle is voided (onto
the CRL) and the device gets another serial.

**promote** (:mod:`.promote`) makes the renewal the device's certificate and retires the old
one (on the CRL as ``superseded``).

Device custody (the device makes its key and sends a CSR, docs/device-keys.md): the new key
is the device's, from the CSR it sent for the renewal (``--csr-dir``: ``<registration
id>.csr``, ``.pem`` or ``.der``). Every CSR is checked before anything changes, as in a batch
(pipeline.ca.csr), and its key must be new to the station: a renewal is a key rollover. The
checked CSR is kept in the operation's plan, so a resumed renewal signs exactly it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509

from ..batch.bundle import render_bundle, write_bundle
from ..batch.custody import DeviceKey, device_key, key_maker
from ..batch.requests import find_request
from ..batch.signing import open_station_keys
from ..ca.builders import Issuer, build_leaf, random_serial
from ..ca.csr import MAX_CSR_BYTES, check_request
from ..config.station import CustodyConfig, Station
from ..errors import HsmError, InputError, RegistrationError, ValidationFailed
from ..files import sync_filesystem
from ..inputfile import read_input
from ..keyprofile import KeyProfile
from ..serials import serial_hex
from ..vocabulary import AuditEvent, CertificateStatus, Custody, RegistrationMode
from . import enrollments
from .crl import SUPERSEDED, IssuedCrl, issue_crl
from .enrollments import Outcome, Pems
from .inventory import CertificateRecord, Inventory, issuer_key_id, utc_now
from .operation import (
    Handler,
    Lifecycle,
    Operation,
    item,
    move,
    precheck,
    resumes,
    update_detail,
)
from .paths import renewals_dir
from .service import Services, chunks, require_endpoints
from .targets import MAX_PROBLEMS, Targets, fingerprint, target_ids

RENEW, PROMOTE = "renew", "promote"
ISSUE, ENROLL, HUB, CRL, DONE, FAILED = "issue", "enroll", "hub", "crl", "done", "failed"
CHUNK = 64  # renewals per durable chunk (one filesystem sync, two log syncs)
VOID_REASON = "no durable bundle when the renewal stopped"


class KeySource(Protocol):
    """Where a renewed certificate's public key comes from. The station makes it for
    wrapped, retain and pkcs8 custody (batch.custody's key makers); in device custody it is
    the CSR in the renewal's plan (:func:`batch.custody.device_key`, no private file)."""

    def make(self, registration_id: str, may_exist: bool) -> DeviceKey: ...


@dataclass
class RenewResult:
    operation: str | None
    kind: str
    state: str
    devices: int = 0
    issued: int = 0
    voided: int = 0
    enrolled: int = 0
    directory: str | None = None
    crl: IssuedCrl | None = None
    failures: list[dict[str, str]] = field(default_factory=list)
    resumed: bool = False

    @property
    def exit_code(self) -> int:
        return RegistrationError.exit_code if self.failures else 0

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "crl"}
        out["crl"] = self.crl.to_json() if self.crl else None
        out["exit_code"] = self.exit_code
        return out


# -- applying events (live and on resume) ----------------------------------------------------
def _on_intent(inv: Inventory, op: Operation, rid: str, data: dict[str, Any]) -> None:
    current = item(inv, op, rid)
    if current is not None and current[0] == ISSUE:
        update_detail(inv, op, rid, {"serial": data["serial"]})


def _on_void(inv: Inventory, op: Operation, rid: str, data: dict[str, Any]) -> None:
    device = inv.device(rid)
    inv.add_certificate(
        CertificateRecord(
            serial=data["serial"],
            registration_id=rid,
            device_id=device.device_id if device else rid,
            batch_id=op.id,
            station=device.station if device else "",
            issuer=data["issuer"],
            sha1=None,
            sha256=None,
            not_after=None,
            custody=None,
            key_profile=None,
            bundle=None,
            status=CertificateStatus.VOID,
            reason=SUPERSEDED,
            revoked_at=data.get("at"),
        )
    )
    current = item(inv, op, rid)
    if current is not None and current[0] == ISSUE and current[1].get("serial") == data["serial"]:
        update_detail(inv, op, rid, {"serial": None})


def _on_renewed(inv: Inventory, op: Operation, rid: str, data: dict[str, Any]) -> None:
    device = inv.device(rid)
    inv.add_certificate(
        CertificateRecord(
            serial=data["serial"],
            registration_id=rid,
            device_id=device.device_id if device else rid,
            batch_id=op.id,
            station=device.station if device else "",
            issuer=data["issuer"],
            sha1=data["sha1_thumbprint"],
            sha256=data["sha256_thumbprint"],
            not_after=data["not_after"],
            custody=data["custody"],
            key_profile=data["key_profile"],
            bundle=data["bundle"],
            status=CertificateStatus.STAGED,
            public_key_sha256=data.get("public_key_sha256"),
        )
    )
    after = ENROLL if device is not None and device.mode is RegistrationMode.INDIVIDUAL else DONE
    move(
        inv,
        op,
        rid,
        when=(ISSUE,),
        to=after,
        detail={"new": data["serial"], "sha256": data["sha256_thumbprint"]},
    )


def _on_enrolled(inv: Inventory, op: Operation, rid: str, data: dict[str, Any]) -> None:
    move(inv, op, rid, when=(ENROLL,), to=DONE, detail={"enrolled": data["how"]})


def on_step_failed(inv: Inventory, op: Operation, rid: str, data: dict[str, Any]) -> None:
    move(
        inv,
        op,
        rid,
        when=(ISSUE, ENROLL, PROMOTE, HUB),
        to=FAILED if data["where"] in (ISSUE, PROMOTE) else DONE,
        detail={"error": f"{data['where']}: {data['reason']}"},
    )


def on_crl_done(inv: Inventory, op: Operation, rid: str, data: dict[str, Any]) -> None:
    inv.db.execute("UPDATE operations SET phase = ? WHERE id = ? AND phase = ?", (DONE, op.id, CRL))


RENEW_HANDLERS: dict[AuditEvent, Handler] = {
    AuditEvent.RENEWAL_INTENT: _on_intent,
    AuditEvent.RENEWAL_VOID: _on_void,
    AuditEvent.RENEWED: _on_renewed,
    AuditEvent.RENEWAL_ENROLLED: _on_enrolled,
    AuditEvent.LIFECYCLE_STEP_FAILED: on_step_failed,
    AuditEvent.CRL_ISSUED: on_crl_done,
}


# -- renew ------------------------------------------------------------------------------------
def renew(
    station: Station,
    targets: Targets,
    *,
    validity_days: int | None = None,
    resume: bool = False,
    operations_per_minute: int | None = None,
    operator: str | None = None,
    note: Callable[[str], None] = print,
    csr_dir: Path | None = None,
) -> RenewResult:
    """Renew the devices ``targets`` names (or resume the unfinished renewal).
    ``csr_dir`` holds the new CSRs of device-custody devices."""
    plan: list[tuple[str, str, dict[str, Any]]] = []
    args: dict[str, Any] = {}
    if not resume:
        rids = target_ids(station, targets)
        args = {"devices": len(rids), "targets_sha256": fingerprint(rids)}
        if validity_days:
            args["validity_days"] = validity_days
        if csr_dir is not None:
            args["csr_dir"] = str(csr_dir)
        resume = resumes(station, RENEW, args)
        if not resume:
            plan = _renewal_plan(station, rids, validity_days, csr_dir)
    precheck(station, RENEW, args, resume)
    if resume or any(d.get("mode") == RegistrationMode.INDIVIDUAL for _, _, d in plan):
        require_endpoints(station)
    lc = Lifecycle(station, RENEW_HANDLERS, operator)
    try:
        op = lc.start(RENEW, args, plan, ISSUE, resume=resume)
        result = RenewResult(op.id, RENEW, "open", resumed=op.resumed)
        directory = renewals_dir(station, op.id)
        result.directory = str(directory)
        if lc.items(op, ISSUE):
            _issue(lc, op, directory)
        if op.phase == ISSUE:
            lc.set_phase(op, ENROLL)
        if lc.items(op, ENROLL):
            asyncio.run(_enroll(lc, op, operations_per_minute))
        if op.phase in (ENROLL, CRL) and _voided(lc, op):
            lc.set_phase(op, CRL)  # serials a kill or a failure voided go onto the CRL
            result.crl = issue_crl(station, lc.inventory, lc.log, op.id)
            lc.set_phase(op, DONE)
        summarise(lc, op, result)
        result.state = lc.finish(
            op,
            {
                "devices": result.devices,
                "issued": result.issued,
                "voided": result.voided,
                "enrolled": result.enrolled,
                "failed": len(result.failures),
            },
        )
        return result
    finally:
        lc.close(note)


def _renewal_plan(
    station: Station, rids: list[str], validity_days: int | None, csr_dir: Path | None = None
) -> list[tuple[str, str, dict[str, Any]]]:
    """Every device, checked before anything changes: known, not revoked, one active
    certificate, no renewal staged, a custody the station can make keys for (in device
    custody: a CSR that passes every check, for a key the station has never certified)."""
    inventory = Inventory.of(station, create=False)
    plan: list[tuple[str, str, dict[str, Any]]] = []
    problems: list[str] = []
    new_keys: dict[str, str] = {}  # device custody: new key -> device, within this renewal
    try:
        for rid in rids:
            device = inventory.device(rid)
            live = inventory.certificates_of(
                rid, (CertificateStatus.ACTIVE, CertificateStatus.STAGED)
            )
            active = [c for c in live if c.status is CertificateStatus.ACTIVE]
            if device is None or device.revoked:
                problems.append(f"{rid}: revoked: a revoked device is not renewed")
            elif any(c.status is CertificateStatus.STAGED for c in live):
                problems.append(f"{rid}: a renewal is staged: promote it first (--promote)")
            elif not active:
                problems.append(f"{rid}: no active certificate to renew")
            elif (why := _custody_problem(station, active[-1], csr_dir)) is not None:
                problems.append(f"{rid}: {why}")
            else:
                old = active[-1]
                detail = {
                    "old": old.serial,
                    "custody": old.custody,
                    "profile": old.key_profile,
                    "validity_days": validity_days or _validity_days(old),
                    "batch": old.batch_id,
                    "mode": device.mode.value,
                }
                if old.custody == Custody.DEVICE:
                    assert csr_dir is not None
                    request = _renewal_request(inventory, csr_dir, rid, old, new_keys)
                    if isinstance(request, str):
                        problems.append(f"{rid}: {request}")
                        continue
                    detail.update(request)
                plan.append((rid, ISSUE, detail))
    finally:
        inventory.close()
    if problems:
        more = len(problems) - MAX_PROBLEMS
        raise ValidationFailed(
            problems[:MAX_PROBLEMS] + ([f"... and {more} more"] if more > 0 else [])
        )
    return plan


def _renewal_request(
    inventory: Inventory,
    csr_dir: Path,
    rid: str,
    old: CertificateRecord,
    new_keys: dict[str, str],
) -> dict[str, Any] | str:
    """The checked CSR of a device-custody renewal, as the plan keeps it, or the problem."""
    try:
        path = find_request(csr_dir, rid)
        data = read_input(path, limit=MAX_CSR_BYTES, what="CSR")
        checked = check_request(data, rid, KeyProfile(old.key_profile or ""))
    except (InputError, ValueError) as exc:
        return exc.line() if isinstance(exc, InputError) else str(exc)
    key = checked.public_key_sha256
    seen = inventory.keys_seen([key])
    if key in seen or key in new_keys:
        other, where = seen.get(key) or (new_keys[key], "this renewal")
        return (
            f"CSR {path}: its key was certified for {other} in {where} (a renewal is a key "
            "rollover: the device makes a new key)"
        )
    new_keys[key] = rid
    return {
        "csr": base64.b64encode(checked.der).decode(),
        "csr_sha256": checked.csr_sha256,
        "public_key_sha256": key,
    }


def _custody_problem(
    station: Station, cert: CertificateRecord, csr_dir: Path | None = None
) -> str | None:
    try:
        custody = Custody(cert.custody or "")
    except ValueError:
        return f"custody {cert.custody!r} is not one this provline knows"
    if custody is Custody.DEVICE and csr_dir is None:
        return (
            "custody device: the device makes its new key; give --csr-dir with its CSR "
            "(<registration-id>.csr | .pem | .der)"
        )
    if custody is Custody.WRAPPED and station.custody.transport_key is None:
        return "wrapped custody needs the station's custody.transport_key"
    if custody is Custody.PKCS8 and station.custody.pkcs8_passphrase is None:
        return "pkcs8 custody needs the station's custody.pkcs8_passphrase"
    return None


def _validity_days(cert: CertificateRecord) -> int:
    """The old certificate's validity, from its file (notAfter - notBefore, whole days)."""
    if cert.cert_path is None:
        return 365
    try:
        old = x509.load_pem_x509_certificate(Path(cert.cert_path).read_bytes())
    except (OSError, ValueError):
        return 365
    span = old.not_valid_after_utc - old.not_valid_before_utc
    return max(1, round(span.total_seconds() / 86400))


def _issue(lc: Lifecycle, op: Operation, directory: Path) -> None:
    station = lc.station
    keys = open_station_keys(station)
    issuer = keys.issuer
    issuer_id = issuer_key_id(issuer.cert)
    chain = list(keys.chain.certs)
    passphrase = None
    makers: dict[tuple[str, str], KeySource] = {}

    def source(custody: str, profile: str) -> KeySource:
        nonlocal passphrase
        if (custody, profile) not in makers:
            policy = Custody(custody)
            if policy is Custody.PKCS8 and passphrase is None:
                assert station.custody.pkcs8_passphrase is not None
                passphrase = station.custody.pkcs8_passphrase.read()
            config = CustodyConfig(
                policy=policy,
                transport_key=station.custody.transport_key,
                pkcs8_passphrase=station.custody.pkcs8_passphrase,
                pkcs12=station.custody.pkcs12,
            )
            makers[custody, profile] = key_maker(
                config, keys.token, KeyProfile(profile), passphrase
            )
        return makers[custody, profile]

    directory.mkdir(parents=True, exist_ok=True)
    at = utc_now()
    for part in chunks(lc.items(op, ISSUE), CHUNK):
        events: list[tuple[AuditEvent, str | None, dict[str, Any]]] = []
        serials: dict[str, str] = {}
        for rid, detail in part:
            if detail.get("serial"):  # an intent a kill left without a durable bundle
                shutil.rmtree(directory / rid, ignore_errors=True)  # what it may have written
                events.append(
                    (
                        AuditEvent.RENEWAL_VOID,
                        rid,
                        {
                            "serial": detail["serial"],
                            "issuer": issuer_id,
                            "at": at,
                            "reason": VOID_REASON,
                        },
                    )
                )
            serials[rid] = serial_hex(random_serial())
            events.append(
                (
                    AuditEvent.RENEWAL_INTENT,
                    rid,
                    {"serial": serials[rid], "renews": detail["old"], "issuer": issuer_id},
                )
            )
        lc.commit(op, events)
        done: list[tuple[AuditEvent, str | None, dict[str, Any]]] = []
        for rid, detail in part:
            done += _issue_one(
                lc, rid, detail, serials[rid], source, issuer, issuer_id, chain, directory, op.id
            )
        sync_filesystem(directory)
        lc.commit(op, done)


def _issue_one(
    lc: Lifecycle,
    rid: str,
    detail: dict[str, Any],
    serial: str,
    source: Callable[[str, str], KeySource],
    issuer: Issuer,
    issuer_id: str,
    chain: list[x509.Certificate],
    directory: Path,
    op_id: str,
) -> list[tuple[AuditEvent, str | None, dict[str, Any]]]:
    device = lc.inventory.device(rid)
    custody, profile = detail["custody"], detail["profile"]
    signed = False
    try:
        if custody == Custody.DEVICE:
            row = (rid, base64.b64decode(detail["csr"]), detail["csr_sha256"])
            key = device_key((*row, detail["public_key_sha256"]), KeyProfile(profile))
        else:
            label = f"{rid}@{op_id}" if custody == Custody.RETAIN else rid
            key = source(custody, profile).make(label, True)
        cert = build_leaf(
            key.public, rid, issuer, serial=int(serial, 16), validity_days=detail["validity_days"]
        )
        signed = True
        files = dict(key.files)
        if key.with_certificate is not None:
            files.update(key.with_certificate(cert, chain))
        bundle = write_bundle(
            directory,
            render_bundle(
                batch_id=op_id,
                registration_id=rid,
                device_id=device.device_id if device else rid,
                cert=cert,
                chain_pem=issuer.chain_pem,
                private_files=files,
                key=key.reference,
                extra={"renews_serial": detail["old"], "renews_batch": detail.get("batch")},
                key_generated=key.generated,
            ),
        )
    except HsmError:
        raise  # the token is unusable: stop; resume voids this chunk's intents
    except Exception as exc:  # this device failed; the others go on
        reason = f"{type(exc).__name__}: {exc}"
        shutil.rmtree(directory / rid, ignore_errors=True)  # an undelivered, partial bundle
        events: list[tuple[AuditEvent, str | None, dict[str, Any]]] = []
        if signed:
            events.append(
                (
                    AuditEvent.RENEWAL_VOID,
                    rid,
                    {"serial": serial, "issuer": issuer_id, "at": utc_now(), "reason": reason},
                )
            )
        events.append(
            (
                AuditEvent.LIFECYCLE_STEP_FAILED,
                rid,
                {"where": ISSUE, "serial": serial, "reason": reason},
            )
        )
        return events
    return [
        (
            AuditEvent.RENEWED,
            rid,
            {
                "serial": bundle.serial,
                "renews": detail["old"],
                "issuer": issuer_id,
                "sha1_thumbprint": bundle.thumbprints.sha1,
                "sha256_thumbprint": bundle.thumbprints.sha256,
                "public_key_sha256": bundle.public_key_sha256,
                "not_after": bundle.not_after,
                "custody": custody,
                "key_profile": profile,
                "key_generated": bundle.key_generated,
                "bundle": str(directory / rid),
                "files": bundle.files,
            },
        )
    ]


async def _enroll(lc: Lifecycle, op: Operation, operations_per_minute: int | None) -> None:
    """Individual enrollments: the renewal goes into the secondary slot, the primary stays."""
    pems = Pems(lc.inventory)
    items = dict(lc.items(op, ENROLL))

    def secondary(rid: str) -> enrollments.Change:
        new_sha = items[rid]["sha256"]

        def change(current: dict[str, Any] | None) -> dict[str, Any] | str | None:
            if current is None:
                return "the device has no individual enrollment (provline reconcile reports it)"
            slots = enrollments.slot_thumbprints(current)
            if new_sha in slots.values():
                return None
            primary = pems.get(slots.get("primary", ""))
            new = pems.get(new_sha)
            if primary is None or new is None:
                return "the enrollment's primary certificate is not one provline issued: left alone"
            status = str(current.get("provisioningStatus") or "enabled")
            return enrollments.body(rid, current, {"primary": primary, "secondary": new}, status)

        return change

    svc = Services(lc.station, operations_per_minute)
    try:

        def done(outcomes: list[Outcome]) -> None:
            lc.commit(
                op,
                [
                    (
                        AuditEvent.LIFECYCLE_STEP_FAILED,
                        o.registration_id,
                        {"where": ENROLL, "reason": o.reason},
                    )
                    if o.failed
                    else (
                        AuditEvent.RENEWAL_ENROLLED,
                        o.registration_id,
                        {
                            "serial": items[o.registration_id]["new"],
                            "slot": "secondary",
                            "how": o.how,
                        },
                    )
                    for o in outcomes
                ],
            )

        await enrollments.apply(svc, {rid: secondary(rid) for rid in items}, done)
    finally:
        await svc.aclose()


def summarise(lc: Lifecycle, op: Operation, result: RenewResult) -> None:
    rows = lc.inventory.db.execute(
        "SELECT registration_id, step, detail FROM op_items WHERE op = ?", (op.id,)
    ).fetchall()
    result.devices = len(rows)
    for rid, step, text in rows:
        detail = json.loads(text)
        if detail.get("new"):
            result.issued += 1
        if detail.get("enrolled") or (
            op.kind == PROMOTE and step == DONE and "error" not in detail
        ):
            result.enrolled += 1
        if detail.get("error"):
            result.failures.append({"registration_id": rid, "reason": detail["error"]})
    result.voided = _voided(lc, op)


def _voided(lc: Lifecycle, op: Operation) -> int:
    return int(
        lc.inventory.db.execute(
            "SELECT COUNT(*) FROM certificates WHERE batch_id = ? AND status = ?",
            (op.id, CertificateStatus.VOID.value),
        ).fetchone()[0]
    )
