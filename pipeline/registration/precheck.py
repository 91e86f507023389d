"""The pre-issue registration check: before a single certificate is signed, find every reason
DPS or IoT Hub would refuse the batch's devices, so that ``provline plan`` can tell and
``provline run`` can refuse (exit 51) instead of signing thousands of certificates that
could never register.

What is checked, read-only (paced and retried like the registration stage):

* **Enrollments** (individual mode): every device this run will register is looked up. One
  whose certificate is not issued yet must have no enrollment at all (provline cannot have
  made it for this batch); an issued one may only have the enrollment of its own leaf (a
  call that landed before a crash). Anything else is a conflict, which ``--replace``
  overwrites (and nothing else does).
* **Group mode**: the enrollment group ``provline-<issuer thumbprint>`` must be absent, or
  have the issuing CA as its signing certificate (``--replace`` takes it over); and no
  device may have an individual enrollment, which DPS would match before any group
  (Microsoft Learn, "X.509 certificate attestation", order of operations).
* **Verified CA** (both DPS modes): DPS accepts a device only when the chain it presents
  reaches a certificate verified by proof of possession (Microsoft Learn, "X.509
  certificate attestation"; "How to verify X.509 CA certificates with your Device
  Provisioning Service"). With ``--upload-ca`` the run uploads and proves the issuing CA
  itself, before issuing. On Azure the certificate API is part of Azure Resource Manager
  (Microsoft Entra ID), which provline does not call: there the check cannot be made, and
  ``--upload-ca`` is refused with the steps the operator takes instead.
* **IoT Hub** (hub mode): an identity that exists for a device not issued yet, or one of
  another authentication type, is a conflict.

Lookups read the paged query (1,000 items a call) until the pages read are as many as the
devices still missing, then GET the rest one by one: never more than about twice the calls
of the cheaper way, whatever the size of the service.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

import httpx
from cryptography import x509

from ..ca.builders import Issuer, build_pop
from ..ca.certs import common_name, pem, thumbprints
from ..errors import RegistrationRefused
from ..vocabulary import RegistrationMode
from .endpoints import Endpoints
from .pacing import Unreachable
from .service import ServiceError, attested_thumbprint
from .stage import RegisterOptions, Stage, describe

T = TypeVar("T")
PAGE_SIZE = 1000
SHOWN = 100  # conflicts listed by default (plan --all lists every one)
REFUSAL_LISTED = 20  # conflicts named in the refusal of a run
README_CA = 'README "Verifying the issuing CA with DPS"'
ARM = (
    "on Azure, CA certificates are Azure Resource Manager resources reached with Microsoft "
    "Entra ID, which provline does not call"
)
CHECK_ERRORS = (ServiceError, httpx.HTTPError, OSError, Unreachable)


class CaState(StrEnum):
    """Whether DPS trusts the station's chain (README "Verifying the issuing CA with DPS")."""

    VERIFIED = "verified"  # a certificate of the chain is verified by proof of possession
    UNVERIFIED = "unverified"  # none is: every device would be refused (401002)
    WILL_UPLOAD = "will_upload"  # none is; --upload-ca uploads and proves it before issuing
    UNKNOWN = "unknown"  # the endpoint has no certificate API (Azure: ARM)
    NOT_CHECKED = "not_checked"  # hub mode: IoT Hub's own CA list is not on its data plane


@dataclass(frozen=True)
class Candidate:
    """A device the run will register: ``sha256`` of its issued leaf, None when this run
    issues it."""

    registration_id: str
    device_id: str
    sha256: str | None


@dataclass(frozen=True)
class Conflict:
    registration_id: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"registration_id": self.registration_id, "reason": self.reason}


@dataclass
class Precheck:
    """What the check found; :attr:`refusals` empty means DPS / IoT Hub would accept."""

    mode: RegistrationMode
    service_endpoint: str
    device_endpoint: str | None
    id_scope: str | None
    hub: str | None
    devices: int = 0  # devices this run registers
    lookups: dict[str, int] = field(default_factory=dict)
    ca: CaState = CaState.NOT_CHECKED
    ca_detail: str = ""
    group: dict[str, str] | None = None
    conflicts: list[Conflict] = field(default_factory=list)  # the first ``limit``
    conflicts_total: int = 0
    replaced: int = 0  # conflicts --replace overwrites
    refusals: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    calls: int = 0
    retries: int = 0  # of those calls, retried after a fault, a throttle or a timeout

    @property
    def ok(self) -> bool:
        return not self.refusals

    def facts(self) -> dict[str, Any]:
        """What the audit log records of the registration target at the start of a run."""
        return {
            "mode": self.mode.value,
            "service_endpoint": self.service_endpoint,
            "device_endpoint": self.device_endpoint,
            "id_scope": self.id_scope,
            "hub": self.hub,
            "ca": self.ca.value,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            **self.facts(),
            "devices": self.devices,
            "lookups": self.lookups,
            "ca_detail": self.ca_detail,
            "group": self.group,
            "conflicts": {
                "total": self.conflicts_total,
                "listed": [c.to_json() for c in self.conflicts],
                "left_out": self.conflicts_total - len(self.conflicts),
                "replaced_by_run": self.replaced,
            },
            "refusals": self.refusals,
            "notes": self.notes,
            "calls": self.calls,
            "retries": self.retries,
        }

    def refusal(self) -> RegistrationRefused:
        """The error ``run`` raises, before issuing, naming each reason and the first
        conflicts."""
        lines = [*self.refusals]
        for c in self.conflicts[:REFUSAL_LISTED]:
            lines.append(f"{c.registration_id}: {c.reason}")
        more = self.conflicts_total - min(len(self.conflicts), REFUSAL_LISTED)
        if more > 0:
            lines.append(f"... and {more:,} more conflicts (`provline plan --all` lists them)")
        return RegistrationRefused(
            self.refusals[0], rule="pre-issue registration check", problems=lines
        )


@dataclass(frozen=True)
class CaProof:
    """The issuing CA uploaded to DPS's certificate API and proven by possession."""

    name: str
    subject: str
    sha1: str
    sha256: str
    proven: bool  # False: the endpoint marked it verified on upload
    calls: int = 0  # DPS calls the upload and proof made
    retries: int = 0  # of those, retried after a fault, a throttle or a timeout


def ca_name(issuer: x509.Certificate) -> str:
    """The name provline uploads its issuing CA under."""
    return "provline-" + thumbprints(issuer).sha1[:16].lower()


def check(
    mode: RegistrationMode,
    endpoints: Endpoints,
    options: RegisterOptions,
    issuer: Issuer,
    chain: list[x509.Certificate],
    candidates: Iterable[Candidate],
    *,
    limit: int | None = SHOWN,
) -> Precheck:
    """Look at DPS / IoT Hub for ``candidates`` (the devices the run will register) and the
    station ``chain`` (issuing CA first). Raises :class:`RegistrationRefused` when the
    service cannot be asked (unreachable, credentials refused). ``limit``: conflicts kept
    (None: all)."""
    return asyncio.run(_check(mode, endpoints, options, issuer, chain, list(candidates), limit))


async def _check(
    mode: RegistrationMode,
    endpoints: Endpoints,
    options: RegisterOptions,
    issuer: Issuer,
    chain: list[x509.Certificate],
    candidates: list[Candidate],
    limit: int | None,
) -> Precheck:
    stage = Stage(mode, endpoints, options, issuer, chain[-1])
    hub_host = endpoints.hub_cs.host if endpoints.hub_cs is not None else None
    result = Precheck(
        mode, endpoints.service, endpoints.device, endpoints.id_scope, hub_host, len(candidates)
    )
    try:
        if mode is RegistrationMode.HUB:
            await _hub(stage, result, candidates, limit)
        else:
            await _ca(stage, result, chain, options.upload_ca)
            enrolled = await _lookup(
                stage, "/enrollments/query", {c.registration_id for c in candidates}
            )
            if mode is RegistrationMode.GROUP:
                await _group(stage, result, issuer.cert, options.replace)
                _group_individuals(result, candidates, enrolled, limit)
            else:
                _individuals(result, candidates, enrolled, options.replace, limit)
    except CHECK_ERRORS as exc:
        raise RegistrationRefused(
            f"{endpoints.service} could not be checked before issuing: {describe(exc)}",
            rule="pre-issue registration check (nothing was signed; run again when it answers)",
        ) from exc
    finally:
        result.calls, result.retries = stage.calls, stage.retries
        await stage.aclose()
    return result


def _keep(result: Precheck, conflict: Conflict, limit: int | None) -> None:
    result.conflicts_total += 1
    if limit is None or len(result.conflicts) < limit:
        result.conflicts.append(conflict)


def _individuals(
    result: Precheck,
    candidates: list[Candidate],
    enrolled: dict[str, dict[str, Any]],
    replace: bool,
    limit: int | None,
) -> None:
    counts = {"missing": 0, "same_certificate": 0, "other_certificate": 0, "not_issued_yet": 0}
    for c in candidates:
        current = enrolled.get(c.registration_id)
        if current is None:
            counts["missing"] += 1
            continue
        found = attested_thumbprint(current, "clientCertificates") or "none"
        if c.sha256 is None:
            counts["not_issued_yet"] += 1
            reason = (
                f"already enrolled in DPS (sha256 {found}), but this batch has not issued its "
                "certificate yet: someone else made that enrollment"
            )
        elif found == c.sha256.upper():
            counts["same_certificate"] += 1
            continue
        else:
            counts["other_certificate"] += 1
            reason = f"enrolled in DPS with another certificate (sha256 {found})"
        _keep(result, Conflict(c.registration_id, reason), limit)
    result.lookups = counts
    if result.conflicts_total and replace:
        result.replaced = result.conflicts_total
        result.notes.append(
            f"--replace: {result.conflicts_total:,} enrollments made by someone else will be "
            "overwritten with this batch's certificates"
        )
    elif result.conflicts_total:
        result.refusals.append(
            f"{result.conflicts_total:,} of {len(candidates):,} registration IDs are already "
            f"enrolled in DPS ({result.service_endpoint}) with certificates this batch did not "
            "issue: DPS keeps them and the devices could never register (remove those "
            "enrollments, or run with --replace to overwrite them)"
        )


def _group_individuals(
    result: Precheck,
    candidates: list[Candidate],
    enrolled: dict[str, dict[str, Any]],
    limit: int | None,
) -> None:
    """A device of a group must have no individual enrollment: DPS matches that first."""
    shadowed = 0
    for c in candidates:
        current = enrolled.get(c.registration_id)
        if current is None:
            continue
        shadowed += 1
        status = current.get("provisioningStatus", "enabled")
        found = attested_thumbprint(current, "clientCertificates") or "none"
        _keep(
            result,
            Conflict(
                c.registration_id,
                f"an individual enrollment ({status}, sha256 {found}) exists for it: DPS "
                "matches that before any group, so the device could not use the group",
            ),
            limit,
        )
    result.lookups = {"individual_enrollments": shadowed, "none": len(candidates) - shadowed}
    if shadowed:
        result.refusals.append(
            f"{shadowed:,} of {len(candidates):,} registration IDs have individual enrollments "
            f"in DPS ({result.service_endpoint}), which DPS matches before the enrollment "
            "group: remove them (provline never deletes enrollments it did not make)"
        )


async def _group(stage: Stage, result: Precheck, issuer: x509.Certificate, replace: bool) -> None:
    gid = stage.group_id()
    current = await stage.call(lambda: stage.svc.get("enrollmentGroups", gid))
    mine = thumbprints(issuer).sha256
    if current is None:
        result.group = {"id": gid, "state": "absent"}
        result.notes.append(f"enrollment group {gid} will be created")
        return
    found = attested_thumbprint(current, "signingCertificates")
    if found == mine:
        enabled = current.get("provisioningStatus", "enabled") == "enabled"
        result.group = {"id": gid, "state": "same" if enabled else "disabled"}
        if not enabled:
            result.notes.append(f"enrollment group {gid} is disabled: the run enables it")
        return
    result.group = {"id": gid, "state": "other_signing_certificate", "sha256": found or "none"}
    if replace:
        result.notes.append(
            f"--replace: enrollment group {gid} (signing certificate sha256 {found or 'none'}) "
            "will be overwritten with the issuing CA"
        )
    else:
        result.refusals.append(
            f"enrollment group {gid} exists in DPS ({result.service_endpoint}) with another "
            f"signing certificate (sha256 {found or 'none'}): no device would match it (run "
            "with --replace to take it over)"
        )


async def _ca(stage: Stage, result: Precheck, chain: list[x509.Certificate], upload: bool) -> None:
    issuer = chain[0]
    verified = await stage.verified_thumbprints()
    named = ", ".join(f"{common_name(c)} (sha1 {thumbprints(c).sha1})" for c in chain)
    if verified is None:
        result.ca = CaState.UNKNOWN
        result.ca_detail = f"{result.service_endpoint} has no certificate API ({ARM})"
        if upload:
            result.refusals.append(
                f"--upload-ca: {result.service_endpoint} serves no CA certificate API ({ARM}). "
                f"Verify the issuing CA {common_name(issuer)} (sha1 "
                f"{thumbprints(issuer).sha1}) yourself, as Microsoft Learn 'How to verify X.509 "
                "CA certificates with your Device Provisioning Service' describes: upload it, "
                "generate a verification code, sign the code with `provline ca pop` (the key "
                f"stays in the HSM), upload the proof ({README_CA}); then run without --upload-ca"
            )
        else:
            result.notes.append(
                f"cannot check here whether DPS has verified the CA ({ARM}): make sure one of "
                f"{named} is verified by proof of possession ({README_CA}), or every device "
                "will be refused"
            )
        return
    proven = [c for c in chain if thumbprints(c).sha1 in verified]
    if proven:
        result.ca = CaState.VERIFIED
        result.ca_detail = f"{common_name(proven[0])} (sha1 {thumbprints(proven[0]).sha1})"
        return
    result.ca_detail = f"none of {named} is verified by proof of possession"
    if upload:
        result.ca = CaState.WILL_UPLOAD
        result.notes.append(
            f"--upload-ca: the issuing CA {common_name(issuer)} will be uploaded and proven "
            "by possession (HSM-held key) before any certificate is signed"
        )
        return
    result.ca = CaState.UNVERIFIED
    result.refusals.append(
        f"no certificate of the station chain ({named}) is verified by proof of possession on "
        f"DPS {result.service_endpoint}: DPS would refuse every device (401002); run with "
        f"--upload-ca, or verify the issuing CA ({README_CA}, `provline ca pop`)"
    )


async def _hub(
    stage: Stage, result: Precheck, candidates: list[Candidate], limit: int | None
) -> None:
    registry = stage.registry
    wanted = {c.device_id for c in candidates}

    async def page(continuation: str | None) -> tuple[dict[str, str], str | None]:
        return await stage.call(
            lambda: _in_thread(lambda: registry.identities_page(continuation, PAGE_SIZE))
        )

    async def one(device_id: str) -> str | None:
        return await stage.call(lambda: _in_thread(lambda: registry.auth_type(device_id)))

    found = await _scan(stage, page, one, wanted)
    counts = {"missing": 0, "certificate_authority": 0, "other": 0, "not_issued_yet": 0}
    for c in candidates:
        kind = found.get(c.device_id)
        if kind is None:
            counts["missing"] += 1
            continue
        if kind != "certificateAuthority":
            counts["other"] += 1
            reason = f"IoT Hub identity {c.device_id} exists with {kind or 'no'} authentication"
        elif c.sha256 is None:
            counts["not_issued_yet"] += 1
            reason = (
                f"IoT Hub identity {c.device_id} exists already, but this batch has not "
                "issued its certificate yet: someone else made it"
            )
        else:
            counts["certificate_authority"] += 1
            continue
        _keep(result, Conflict(c.registration_id, reason), limit)
    result.lookups = counts
    if result.conflicts_total:
        result.refusals.append(
            f"{result.conflicts_total:,} of {len(candidates):,} device IDs already have IoT Hub "
            f"identities ({result.hub}) this batch did not make: remove them (provline never "
            "deletes identities it did not make)"
        )


async def _in_thread(fn: Callable[[], T]) -> T:
    """A synchronous SDK call in a thread; its connection failures become ConnectionError,
    so they are retried and counted like the HTTP client's."""
    from msrest.exceptions import ClientRequestError

    try:
        return await asyncio.to_thread(fn)
    except ClientRequestError as exc:
        raise ConnectionError(str(exc)) from exc


async def _lookup(stage: Stage, query: str, wanted: set[str]) -> dict[str, dict[str, Any]]:
    """The current enrollment of each registration ID in ``wanted`` that has one."""

    async def page(continuation: str | None) -> tuple[dict[str, dict[str, Any]], str | None]:
        items, after = await stage.call(
            lambda: stage.svc.query_page(query, continuation, PAGE_SIZE, {"query": "SELECT *"})
        )
        return {str(i.get("registrationId", "")).lower(): i for i in items}, after

    async def one(rid: str) -> dict[str, Any] | None:
        return await stage.call(lambda: stage.svc.get("enrollments", rid))

    return await _scan(stage, page, one, wanted)


async def _scan(
    stage: Stage,
    page: Callable[[str | None], Awaitable[tuple[dict[str, T], str | None]]],
    one: Callable[[str], Awaitable[T | None]],
    wanted: set[str],
) -> dict[str, T]:
    """Read pages until the pages read are as many as the keys still missing (or the pages
    end), then look the rest up one by one, ``concurrency`` at a time."""
    found: dict[str, T] = {}
    missing = set(wanted)
    read = 0
    continuation: str | None = None
    while missing:
        items, continuation = await page(continuation)
        read += 1
        for key in missing & items.keys():
            found[key] = items[key]
        missing -= items.keys()
        if continuation is None or read >= len(missing):
            break
    if continuation is None:
        return found
    queue = sorted(missing)

    async def worker() -> None:
        while queue:
            key = queue.pop()
            value = await one(key)
            if value is not None:
                found[key] = value

    await asyncio.gather(*(worker() for _ in range(max(1, stage.options.concurrency))))
    return found


def upload_and_prove(endpoints: Endpoints, options: RegisterOptions, issuer: Issuer) -> CaProof:
    """Upload the issuing CA to DPS's certificate API and prove possession of its key (signed
    in the HSM), before the run issues anything. Raises :class:`RegistrationRefused` when it
    cannot (nothing was signed)."""

    async def go() -> CaProof:
        stage = Stage(RegistrationMode.INDIVIDUAL, endpoints, options, issuer, issuer.cert)
        name = ca_name(issuer.cert)
        prints = thumbprints(issuer.cert)
        try:
            record = await stage.call(lambda: stage.svc.upload_ca(name, pem(issuer.cert).decode()))
            proven = not record["properties"].get("isVerified")
            if proven:
                code, etag = await stage.call(
                    lambda: stage.svc.verification_code(name, record["etag"])
                )
                proof = build_pop(code, issuer.cert, issuer.key)
                await stage.call(lambda: stage.svc.verify_ca(name, etag, pem(proof).decode()))
        except CHECK_ERRORS as exc:
            raise RegistrationRefused(
                f"uploading and proving the issuing CA at {endpoints.service} failed: "
                f"{describe(exc)}",
                rule="--upload-ca before issuing (nothing was signed)",
            ) from exc
        finally:
            await stage.aclose()
        return CaProof(
            name,
            common_name(issuer.cert),
            prints.sha1,
            prints.sha256,
            proven,
            stage.calls,
            stage.retries,
        )

    return asyncio.run(go())
