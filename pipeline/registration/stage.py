"""The registration stage (README "Registration"): pre-register every bundled device with DPS
(individual enrollments or one enrollment group) or IoT Hub — paced, retried, idempotent.

* Pacing: one token bucket at the station's operations/minute for the whole stage; individual
  enrollments go in bulk calls of at most 10 (:mod:`.pacing`).
* Retry (tenacity): 429, 5xx, connection errors and timeouts, with jittered exponential
  backoff that honours Retry-After, within a per-device and a per-stage deadline. Other 4xx
  are final.
* Idempotency: an existing enrollment or identity that matches counts as registered (so a
  retried call whose first attempt did land is harmless); a different one is a conflict,
  reported and left alone unless ``replace``.
* Pre-flight (:mod:`.preflight`): before the first call every bundle's chain is checked the
  way DPS will check it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from cryptography import x509
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_any
from tenacity.stop import stop_base

from ..ca.builders import Issuer, build_pop
from ..ca.certs import pem, thumbprints
from ..config.station import DEFAULT_CONCURRENCY, DEFAULT_OPERATIONS_PER_MINUTE, MAX_BULK_SIZE
from ..errors import RegistrationError
from ..stats import StageStats
from ..vocabulary import DeviceState, RegistrationMode
from .endpoints import Endpoints
from .hub import HubRegistry
from .pacing import TokenBucket, backoff, is_transient
from .preflight import preflight
from .service import DpsService, ServiceError, attested_thumbprint, short_reason
from .target import RegistrationOutcome, Target

T = TypeVar("T")
Record = Callable[[list[RegistrationOutcome]], None]

DPS_ENROLLMENT_EXISTS = 409201  # the bulk API's per-item code for an existing enrollment
GROUP_RECORD_CHUNK = 1000  # group outcomes are journaled in chunks of this many devices


@dataclass(frozen=True)
class RegisterOptions:
    replace: bool = False
    upload_ca: bool = False
    operations_per_minute: int = DEFAULT_OPERATIONS_PER_MINUTE
    concurrency: int = DEFAULT_CONCURRENCY
    bulk_size: int = MAX_BULK_SIZE
    device_deadline: float = 600.0  # seconds a device's calls may keep retrying
    stage_deadline: float = 3600.0


def _wait(state: RetryCallState) -> float:
    exc = state.outcome.exception() if state.outcome else None
    return backoff(state.attempt_number, getattr(exc, "retry_after", None))


class _StopAt(stop_base):
    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def __call__(self, state: RetryCallState) -> bool:
        return time.monotonic() >= self.deadline


class Stage:
    def __init__(
        self,
        mode: RegistrationMode,
        endpoints: Endpoints,
        options: RegisterOptions,
        issuer: Issuer,
        root: x509.Certificate,
    ) -> None:
        self.mode = mode
        self.endpoints = endpoints
        self.options = options
        self.issuer = issuer
        self.root = root
        self.bucket = TokenBucket(options.operations_per_minute)
        self.stage_ends = time.monotonic() + options.stage_deadline
        self.calls = 0
        self.retries = 0

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """One paced, retried API call."""
        device_ends = min(self.stage_ends, time.monotonic() + self.options.device_deadline)

        def count_retry(state: RetryCallState) -> None:
            self.retries += 1

        async for attempt in AsyncRetrying(
            retry=retry_if_exception(is_transient),
            wait=_wait,
            stop=stop_any(_StopAt(device_ends)),
            reraise=True,
            before_sleep=count_retry,
        ):
            with attempt:
                await self.bucket.take()
                self.calls += 1
                return await fn()
        raise AssertionError("unreachable")

    # -- individual enrollments -----------------------------------------------------------
    @staticmethod
    def _enrollment(t: Target) -> dict[str, Any]:
        body: dict[str, Any] = {
            "registrationId": t.registration_id,
            "deviceId": t.device_id,
            "provisioningStatus": "enabled",
            "attestation": {
                "type": "x509",
                "x509": {"clientCertificates": {"primary": {"certificate": t.leaf_pem}}},
            },
        }
        if t.tags or t.desired:
            body["initialTwin"] = {"tags": t.tags, "properties": {"desired": t.desired}}
        return body

    def _individual(self, t: Target, state: DeviceState, **detail: Any) -> RegistrationOutcome:
        return RegistrationOutcome(t.registration_id, state, RegistrationMode.INDIVIDUAL, **detail)

    async def individual(self, svc: DpsService, chunk: list[Target]) -> list[RegistrationOutcome]:
        result = await self.call(
            lambda: svc.bulk("enrollments", "create", [self._enrollment(t) for t in chunk])
        )
        errors = {e.get("registrationId"): e for e in result.get("errors", [])}
        outcomes = []
        for t in chunk:
            err = errors.get(t.registration_id)
            if err is None:
                outcomes.append(
                    self._individual(t, DeviceState.REGISTERED, enrollment=t.registration_id)
                )
            elif err.get("errorCode") == DPS_ENROLLMENT_EXISTS:
                outcomes.append(await self._existing(svc, t))
            else:
                reason = f"{err.get('errorCode')} {err.get('errorStatus', '')}".strip()
                outcomes.append(self._individual(t, DeviceState.REGISTER_FAILED, reason=reason))
        return outcomes

    async def _existing(self, svc: DpsService, t: Target) -> RegistrationOutcome:
        """An enrollment already exists: ours (same leaf) is success, another is a conflict."""
        current = await self.call(lambda: svc.get("enrollments", t.registration_id))
        found = attested_thumbprint(current, "clientCertificates")
        rid = t.registration_id
        if current is not None and found == thumbprints(t.leaf).sha256:
            return self._individual(t, DeviceState.REGISTERED, enrollment=rid, already=True)
        if current is not None and self.options.replace:
            await self.call(
                lambda: svc.put("enrollments", rid, self._enrollment(t), etag=current["etag"])
            )
            return self._individual(t, DeviceState.REGISTERED, enrollment=rid, replaced=found)
        return self._individual(
            t,
            DeviceState.CONFLICT,
            enrollment=rid,
            reason=f"enrollment exists with another certificate (sha256 {found})",
        )

    # -- enrollment group ---------------------------------------------------------------------
    def group_id(self) -> str:
        return "provline-" + thumbprints(self.issuer.cert).sha256[:24].lower()

    async def ensure_group(self, svc: DpsService) -> tuple[DeviceState, str]:
        """(state, reason): the group whose signing certificate is the issuer, enabled."""
        gid = self.group_id()
        body = {
            "enrollmentGroupId": gid,
            "provisioningStatus": "enabled",
            "attestation": {
                "type": "x509",
                "x509": {
                    "signingCertificates": {
                        "primary": {"certificate": pem(self.issuer.cert).decode()}
                    }
                },
            },
        }
        current = await self.call(lambda: svc.get("enrollmentGroups", gid))
        if current is None:
            try:
                await self.call(lambda: svc.put("enrollmentGroups", gid, body))
                return DeviceState.REGISTERED, ""
            except ServiceError as exc:
                if exc.status != 409:
                    raise
                current = await self.call(lambda: svc.get("enrollmentGroups", gid))
        same = (
            attested_thumbprint(current, "signingCertificates")
            == thumbprints(self.issuer.cert).sha256
        )
        if (not same and not self.options.replace) or current is None:
            return (
                DeviceState.CONFLICT,
                f"enrollment group {gid} exists with another signing certificate",
            )
        if not same or current.get("provisioningStatus") != "enabled":
            await self.call(lambda: svc.put("enrollmentGroups", gid, body, etag=current["etag"]))
        return DeviceState.REGISTERED, ""

    # -- CA upload and proof of possession ----------------------------------------------------
    async def upload_ca(self, svc: DpsService) -> None:
        """Upload the issuing CA and prove possession with the HSM-held key. On Azure this is
        the management plane; where the endpoint has no certificate API it is reported."""
        name = "provline-" + thumbprints(self.issuer.cert).sha1[:16].lower()
        record = await self.call(lambda: svc.upload_ca(name, pem(self.issuer.cert).decode()))
        if record["properties"].get("isVerified"):
            return
        code, etag = await self.call(lambda: svc.verification_code(name, record["etag"]))
        proof = build_pop(code, self.issuer.cert, self.issuer.key)
        await self.call(lambda: svc.verify_ca(name, etag, pem(proof).decode()))

    async def verified_thumbprints(self, svc: DpsService) -> set[str] | None:
        try:
            records = await self.call(svc.certificates)
        except ServiceError as exc:
            if exc.status in (404, 405):
                return None  # Azure: CA verification lives in ARM, not here
            raise
        return {
            r["properties"]["thumbprint"].upper()
            for r in records
            if r["properties"].get("isVerified")
        }


async def run_stage(stage: Stage, targets: list[Target], record: Record) -> StageStats:
    """Register ``targets``; ``record`` is called with each finished group of outcomes (the
    orchestrator journals and audits them)."""
    started = time.monotonic()
    mode = stage.mode
    svc = DpsService(stage.endpoints, max_connections=max(4, stage.options.concurrency))
    try:
        if mode is RegistrationMode.HUB:
            await _hub(stage, targets, record)
        else:
            if stage.options.upload_ca:
                await stage.upload_ca(svc)
            verified = None
            leaf = targets[0].leaf
            if leaf.issuer != leaf.subject:  # groups too: DPS wants a verified CA in the chain
                verified = await stage.verified_thumbprints(svc)
            must = stage.issuer.cert if mode is RegistrationMode.GROUP else None
            problems = preflight(targets, stage.root, must, verified)
            if problems:
                raise RegistrationError(
                    problems[0] + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""),
                    rule="chain pre-flight: devices DPS would refuse",
                )
            if mode is RegistrationMode.GROUP:
                await _group(stage, svc, targets, record)
            else:
                await _individuals(stage, svc, targets, record)
    finally:
        await svc.aclose()
    seconds = time.monotonic() - started
    return StageStats(
        seconds=seconds,
        devices=len(targets),
        calls=stage.calls,
        retries=stage.retries,
        devices_per_s=len(targets) / seconds if seconds > 0 else 0.0,
    )


async def _drain(
    items: list[T],
    concurrency: int,
    handle: Callable[[T], Awaitable[list[RegistrationOutcome]]],
    record: Record,
) -> None:
    """``concurrency`` tasks take items until none are left, recording each result."""
    queue: asyncio.Queue[T] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)

    async def worker() -> None:
        while not queue.empty():
            record(await handle(queue.get_nowait()))

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _group(stage: Stage, svc: DpsService, targets: list[Target], record: Record) -> None:
    state, reason = await stage.ensure_group(svc)
    gid = stage.group_id()
    for i in range(0, len(targets), GROUP_RECORD_CHUNK):
        record(
            [
                RegistrationOutcome(
                    t.registration_id, state, RegistrationMode.GROUP, reason=reason, group=gid
                )
                for t in targets[i : i + GROUP_RECORD_CHUNK]
            ]
        )


async def _individuals(
    stage: Stage, svc: DpsService, targets: list[Target], record: Record
) -> None:
    size = stage.options.bulk_size

    async def handle(chunk: list[Target]) -> list[RegistrationOutcome]:
        try:
            return await stage.individual(svc, chunk)
        except (ServiceError, httpx.HTTPError, OSError) as exc:
            return [
                RegistrationOutcome(
                    t.registration_id,
                    DeviceState.REGISTER_FAILED,
                    RegistrationMode.INDIVIDUAL,
                    reason=short_reason(exc),
                )
                for t in chunk
            ]

    chunks = [targets[i : i + size] for i in range(0, len(targets), size)]
    await _drain(chunks, stage.options.concurrency, handle, record)


async def _hub(stage: Stage, targets: list[Target], record: Record) -> None:
    registry = HubRegistry(stage.endpoints)

    async def handle(t: Target) -> list[RegistrationOutcome]:
        def outcome(state: DeviceState, reason: str = "") -> list[RegistrationOutcome]:
            return [
                RegistrationOutcome(
                    t.registration_id,
                    state,
                    RegistrationMode.HUB,
                    reason=reason,
                    device_id=t.device_id,
                )
            ]

        try:
            state = await stage.call(
                lambda: asyncio.to_thread(registry.ensure_ca_identity, t.device_id)
            )
        except (ServiceError, OSError, httpx.HTTPError) as exc:
            return outcome(DeviceState.REGISTER_FAILED, short_reason(exc))
        if state is DeviceState.CONFLICT:
            return outcome(state, "identity exists with another authentication type")
        return outcome(state)

    await _drain(targets, stage.options.concurrency, handle, record)
