"""The registration stage (README "Registration"): pre-register every bundled device with DPS
(individual enrollments or one enrollment group) or IoT Hub — paced, retried, idempotent.

* Pacing: one token bucket at the station's operations/minute for the whole stage; individual
  enrollments go in bulk calls of at most 10 (:mod:`.pacing`).
* Retry (tenacity): 429, 5xx, connection errors and timeouts, with jittered exponential
  backoff that honours Retry-After, within a per-device and a per-stage deadline. Other 4xx
  are final. Every retry is reported (count and last error) to the progress output.
* Unreachable service: when no call gets any answer for ``unreachable_deadline`` seconds the
  stage gives up and every device left ends ``register_failed`` with the reason. With
  ``dps.emulator_dir`` the emulator's ``emulator.json`` is read again on a connection
  failure, so an emulator restarted on other ports is used at once.
* Idempotency: an existing enrollment or identity that matches counts as registered (so a
  retried call whose first attempt did land is harmless); a different one is a conflict,
  reported and left alone unless ``replace``.
* Pre-flight (:mod:`.preflight`): before the first call every bundle's chain is checked the
  way DPS will check it.
"""

from __future__ import annotations

import asyncio
import os
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
from ..errors import InputError, RegistrationError
from ..stats import StageStats
from ..vocabulary import DeviceState, RegistrationMode
from .endpoints import Endpoints
from .hub import HubRegistry
from .pacing import Reachability, TokenBucket, Unreachable, backoff, is_transient, is_unreachable
from .preflight import preflight
from .service import DpsService, ServiceError, attested_thumbprint, short_reason
from .target import RegistrationOutcome, Target

T = TypeVar("T")
Record = Callable[[list[RegistrationOutcome]], None]
OnRetry = Callable[[int, str], None]  # (retries so far, last error)

# What a failed call can raise once retries are over: it becomes the device's reason.
CALL_ERRORS = (ServiceError, httpx.HTTPError, OSError, Unreachable)
REFRESH_EVERY = 1.0  # seconds between re-reads of emulator.json during an outage

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
    unreachable_deadline: float = 60.0  # seconds without any answer before giving up


def _wait(state: RetryCallState) -> float:
    exc = state.outcome.exception() if state.outcome else None
    return backoff(state.attempt_number, getattr(exc, "retry_after", None))


class _StopAt(stop_base):
    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def __call__(self, state: RetryCallState) -> bool:
        return time.monotonic() >= self.deadline


def describe(exc: BaseException) -> str:
    """A failed call in one line, with the kind of failure when the message lacks it."""
    if isinstance(exc, ServiceError):
        return short_reason(exc)
    text = f"{type(exc).__name__}: {short_reason(exc)}"
    cause: BaseException | None = exc
    while cause is not None:  # the system error underneath, e.g. "Connection refused"
        if isinstance(cause, OSError) and cause.errno:
            reason = os.strerror(cause.errno)
            return text if reason in text else f"{text} ({reason})"
        cause = cause.__cause__ or cause.__context__
    return text


class StageStopped(Exception):
    """The run was asked to stop: calls end, nothing more is recorded."""


class Stage:
    def __init__(
        self,
        mode: RegistrationMode,
        endpoints: Endpoints,
        options: RegisterOptions,
        issuer: Issuer,
        root: x509.Certificate,
        *,
        refresh: Callable[[], Endpoints] | None = None,
        on_retry: OnRetry | None = None,
        should_stop: Callable[[], bool] | None = None,
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
        self.reach = Reachability(options.unreachable_deadline)
        self.gave_up = ""  # why the stage stopped calling an unreachable service
        self._refresh = refresh
        self._refreshed = 0.0
        self._on_retry = on_retry
        self._should_stop = should_stop or (lambda: False)
        self._svc: DpsService | None = None
        self._registry: HubRegistry | None = None
        self._retired: list[DpsService] = []

    # -- the clients, rebuilt when the endpoints move ----------------------------------------
    @property
    def svc(self) -> DpsService:
        if self._svc is None:
            self._svc = DpsService(self.endpoints, max_connections=max(4, self.options.concurrency))
        return self._svc

    @property
    def registry(self) -> HubRegistry:
        if self._registry is None:
            self._registry = HubRegistry(self.endpoints)
        return self._registry

    async def aclose(self) -> None:
        for svc in [*self._retired, *([self._svc] if self._svc else [])]:
            await svc.aclose()

    def _maybe_moved(self) -> None:
        """On a connection failure, read the endpoints again (an emulator restarted on new
        ports); at most once a second."""
        now = time.monotonic()
        if self._refresh is None or now - self._refreshed < REFRESH_EVERY:
            return
        self._refreshed = now
        try:
            fresh = self._refresh()
        except InputError:
            return  # emulator.json is being rewritten: keep trying the old endpoints
        if fresh != self.endpoints:
            self.endpoints = fresh
            if self._svc is not None:
                self._retired.append(self._svc)  # calls in flight finish on the old client
            self._svc = None
            self._registry = None

    # -- calls ---------------------------------------------------------------------------------
    def stopping(self) -> bool:
        return self._should_stop()

    def _check(self) -> None:
        if self._should_stop():
            raise StageStopped
        if self.reach.gave_up:
            self.gave_up = self.gave_up or f"gave up: the service is {self.reach.reason()}"
            raise Unreachable(self.gave_up)

    def _retryable(self, exc: BaseException) -> bool:
        return is_transient(exc) and not isinstance(exc, Unreachable | StageStopped)

    def _count_retry(self, state: RetryCallState) -> None:
        self.retries += 1
        exc = state.outcome.exception() if state.outcome else None
        if self._on_retry is not None and exc is not None:
            self._on_retry(self.retries, describe(exc))

    async def _sleep(self, seconds: float) -> None:
        """Back off, but wake up to stop or to give up."""
        ends = time.monotonic() + seconds
        while (left := ends - time.monotonic()) > 0:
            await asyncio.sleep(min(left, 0.25))
            self._check()

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """One paced, retried API call. ``fn`` is called again on each attempt, so it uses
        the current client (the endpoints may move between attempts)."""
        device_ends = min(self.stage_ends, time.monotonic() + self.options.device_deadline)
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(self._retryable),
            wait=_wait,
            stop=stop_any(_StopAt(device_ends)),
            reraise=True,
            before_sleep=self._count_retry,
            sleep=self._sleep,
        ):
            with attempt:
                self._check()
                await self.bucket.take()
                self._check()  # the wait for a token may have been long
                self.calls += 1
                try:
                    result = await fn()
                except Exception as exc:
                    if is_unreachable(exc):
                        self.reach.failed(describe(exc))
                        self._maybe_moved()
                    else:
                        self.reach.answered()  # an HTTP error is an answer
                    raise
                self.reach.answered()
                return result
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

    async def individual(self, chunk: list[Target]) -> list[RegistrationOutcome]:
        result = await self.call(
            lambda: self.svc.bulk("enrollments", "create", [self._enrollment(t) for t in chunk])
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
                outcomes.append(await self._existing(t))
            else:
                reason = f"{err.get('errorCode')} {err.get('errorStatus', '')}".strip()
                outcomes.append(self._individual(t, DeviceState.REGISTER_FAILED, reason=reason))
        return outcomes

    async def _existing(self, t: Target) -> RegistrationOutcome:
        """An enrollment already exists: ours (same leaf) is success, another is a conflict."""
        current = await self.call(lambda: self.svc.get("enrollments", t.registration_id))
        found = attested_thumbprint(current, "clientCertificates")
        rid = t.registration_id
        if current is not None and found == thumbprints(t.leaf).sha256:
            return self._individual(t, DeviceState.REGISTERED, enrollment=rid, already=True)
        if current is not None and self.options.replace:
            await self.call(
                lambda: self.svc.put("enrollments", rid, self._enrollment(t), etag=current["etag"])
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

    async def ensure_group(self) -> tuple[DeviceState, str]:
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
        current = await self.call(lambda: self.svc.get("enrollmentGroups", gid))
        if current is None:
            try:
                await self.call(lambda: self.svc.put("enrollmentGroups", gid, body))
                return DeviceState.REGISTERED, ""
            except ServiceError as exc:
                if exc.status != 409:
                    raise
                current = await self.call(lambda: self.svc.get("enrollmentGroups", gid))
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
            await self.call(
                lambda: self.svc.put("enrollmentGroups", gid, body, etag=current["etag"])
            )
        return DeviceState.REGISTERED, ""

    # -- CA upload and proof of possession ----------------------------------------------------
    async def upload_ca(self) -> None:
        """Upload the issuing CA and prove possession with the HSM-held key. On Azure this is
        the management plane; where the endpoint has no certificate API it is reported."""
        name = "provline-" + thumbprints(self.issuer.cert).sha1[:16].lower()
        record = await self.call(lambda: self.svc.upload_ca(name, pem(self.issuer.cert).decode()))
        if record["properties"].get("isVerified"):
            return
        code, etag = await self.call(lambda: self.svc.verification_code(name, record["etag"]))
        proof = build_pop(code, self.issuer.cert, self.issuer.key)
        await self.call(lambda: self.svc.verify_ca(name, etag, pem(proof).decode()))

    async def verified_thumbprints(self) -> set[str] | None:
        try:
            records = await self.call(lambda: self.svc.certificates())
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
    orchestrator journals and audits them). A service that cannot be reached, or a set-up
    call that fails (CA upload, enrollment group), ends every device left
    ``register_failed`` with the reason; a stop request ends the stage early, recording
    nothing more."""
    started = time.monotonic()
    mode = stage.mode
    left = {t.registration_id: t for t in targets}

    def recorded(outcomes: list[RegistrationOutcome]) -> None:
        record(outcomes)
        for outcome in outcomes:
            left.pop(outcome.registration_id, None)

    try:
        if mode is RegistrationMode.HUB:
            await _hub(stage, targets, recorded)
        else:
            if stage.options.upload_ca:
                await _setup(stage, "CA upload and proof of possession", stage.upload_ca)
            verified = None
            leaf = targets[0].leaf
            if leaf.issuer != leaf.subject:  # groups too: DPS wants a verified CA in the chain
                verified = await _setup(
                    stage, "reading verified CA certificates", stage.verified_thumbprints
                )
            must = stage.issuer.cert if mode is RegistrationMode.GROUP else None
            problems = preflight(targets, stage.root, must, verified)
            if problems:
                raise RegistrationError(
                    problems[0] + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""),
                    rule="chain pre-flight: devices DPS would refuse",
                )
            if mode is RegistrationMode.GROUP:
                await _group(stage, targets, recorded)
            else:
                await _individuals(stage, targets, recorded)
    except _SetupFailed as failed:
        recorded([_failed(t, mode, failed.reason) for t in left.values()])
    except StageStopped:
        pass
    finally:
        await stage.aclose()
    if stage.gave_up and left and not stage.stopping():
        recorded([_failed(t, mode, stage.gave_up) for t in left.values()])
    seconds = time.monotonic() - started
    return StageStats(
        seconds=seconds,
        devices=len(targets),
        calls=stage.calls,
        retries=stage.retries,
        devices_per_s=len(targets) / seconds if seconds > 0 else 0.0,
    )


class _SetupFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def _setup(stage: Stage, what: str, step: Callable[[], Awaitable[T]]) -> T:
    try:
        return await step()
    except CALL_ERRORS as exc:
        raise _SetupFailed(f"{what} failed: {short_reason(exc)}") from exc


def _failed(t: Target, mode: RegistrationMode, reason: str) -> RegistrationOutcome:
    return RegistrationOutcome(t.registration_id, DeviceState.REGISTER_FAILED, mode, reason=reason)


async def _drain(
    stage: Stage,
    items: list[T],
    concurrency: int,
    handle: Callable[[T], Awaitable[list[RegistrationOutcome]]],
    record: Record,
) -> None:
    """``concurrency`` tasks take items until none are left (or the stage gives up or is
    stopped), recording each result."""
    queue: asyncio.Queue[T] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)

    async def worker() -> None:
        while not queue.empty() and not stage.gave_up:
            if stage.stopping():
                raise StageStopped
            record(await handle(queue.get_nowait()))

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        await asyncio.gather(*tasks)
    finally:  # one stopped or failed: the others stop too, recording nothing half-done
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _group(stage: Stage, targets: list[Target], record: Record) -> None:
    state, reason = await _setup(stage, "enrollment group", stage.ensure_group)
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


async def _individuals(stage: Stage, targets: list[Target], record: Record) -> None:
    size = stage.options.bulk_size

    async def handle(chunk: list[Target]) -> list[RegistrationOutcome]:
        try:
            return await stage.individual(chunk)
        except CALL_ERRORS as exc:
            return [_failed(t, RegistrationMode.INDIVIDUAL, short_reason(exc)) for t in chunk]

    chunks = [targets[i : i + size] for i in range(0, len(targets), size)]
    await _drain(stage, chunks, stage.options.concurrency, handle, record)


def _ensure_ca_identity(stage: Stage, device_id: str) -> DeviceState:
    """The IoT Hub call, in a thread; the SDK's connection failures become ConnectionError
    so they are retried and counted like any other."""
    from msrest.exceptions import ClientRequestError

    try:
        return stage.registry.ensure_ca_identity(device_id)
    except ClientRequestError as exc:
        raise ConnectionError(short_reason(exc)) from exc


async def _hub(stage: Stage, targets: list[Target], record: Record) -> None:
    stage.registry  # noqa: B018  (made now: a missing hub connection string fails here, once)

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
                lambda: asyncio.to_thread(_ensure_ca_identity, stage, t.device_id)
            )
        except CALL_ERRORS as exc:
            return outcome(DeviceState.REGISTER_FAILED, short_reason(exc))
        if state is DeviceState.CONFLICT:
            return outcome(state, "identity exists with another authentication type")
        return outcome(state)

    await _drain(stage, targets, stage.options.concurrency, handle, record)
