"""The registration stage (design.md "Registration"): pre-register every bundled device with
DPS (individual enrollments or one enrollment group) or IoT Hub — paced, retried, idempotent.

* Pacing: one token bucket at the station's operations/minute for the whole stage (DPS allows
  1,000/min per service, and stations may share one DPS); individual enrollments go in bulk
  calls of at most 10.
* Retry (tenacity): 429, 5xx, connection errors and timeouts, with jittered exponential
  backoff that honours Retry-After, within a per-device and a per-stage deadline. Other 4xx
  are final.
* Idempotency: an existing enrollment or identity that matches counts as registered (so a
  retried call whose first attempt did land is harmless); a different one is a conflict,
  reported and left alone unless ``replace``.
* Pre-flight: before the first call every bundle's chain is checked: leaf first, CN =
  registration ID, each link signed by the next, ending at the station root, and reaching what
  the target trusts in this mode.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, TypeVar

import httpx
from cryptography import x509
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_any
from tenacity.stop import stop_base

from . import ca
from .dps import DpsService, Endpoints, HubRegistry, ServiceError, attested_thumbprint
from .errors import RegistrationError
from .manifest import RegistrationMode
from .secret import SecretRef
from .station import HsmConfig

T = TypeVar("T")


@dataclass(frozen=True)
class RegisterOptions:
    replace: bool = False
    upload_ca: bool = False
    operations_per_minute: int = 1000
    concurrency: int = 8
    bulk_size: int = 10
    device_deadline: float = 600.0  # seconds a device's calls may keep retrying
    stage_deadline: float = 3600.0


@dataclass
class Target:
    registration_id: str
    device_id: str
    tags: dict[str, Any]
    desired: dict[str, Any]
    bundle: Path

    @property
    def leaf(self) -> x509.Certificate:
        """Read when needed, so a large batch's certificates are never all in memory."""
        return x509.load_pem_x509_certificate((self.bundle / "device.cert.pem").read_bytes())


Outcome = tuple[str, str, dict[str, Any]]  # (registration_id, state, detail)


class TokenBucket:
    """``per_minute`` tokens a minute, at most a second's worth at once: smooth pacing that
    stays under a quota other stations may be sharing."""

    def __init__(self, per_minute: int) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self._tokens = self.capacity
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                await asyncio.sleep((1 - self._tokens) / self.rate)


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, ServiceError):
        return exc.transient
    return isinstance(exc, httpx.TransportError | ConnectionError | TimeoutError)


def _wait(state: RetryCallState) -> float:
    """Jittered exponential backoff (0.5 s doubling, capped at 30 s), never shorter than the
    service's Retry-After."""
    backoff = random.uniform(0, min(30.0, 0.5 * 2 ** (state.attempt_number - 1)))
    exc = state.outcome.exception() if state.outcome else None
    retry_after = getattr(exc, "retry_after", None)
    if retry_after:
        return max(backoff, retry_after + random.uniform(0, 0.25))
    return backoff


class _StopAt(stop_base):
    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def __call__(self, state: RetryCallState) -> bool:
        return time.monotonic() >= self.deadline


class Stage:
    def __init__(self, mode: RegistrationMode, endpoints: Endpoints, options: RegisterOptions,
                 issuer: ca.Issuer, root: x509.Certificate) -> None:
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
            retry=retry_if_exception(_transient), wait=_wait,
            stop=stop_any(_StopAt(device_ends)), reraise=True, before_sleep=count_retry,
        ):
            with attempt:
                await self.bucket.take()
                self.calls += 1
                return await fn()
        raise AssertionError("unreachable")

    # -- individual enrollments -----------------------------------------------------------
    def _enrollment(self, t: Target) -> dict[str, Any]:
        body: dict[str, Any] = {
            "registrationId": t.registration_id, "deviceId": t.device_id,
            "provisioningStatus": "enabled",
            "attestation": {"type": "x509", "x509": {"clientCertificates": {
                "primary": {"certificate": (t.bundle / "device.cert.pem").read_text()}}}},
        }
        if t.tags or t.desired:
            body["initialTwin"] = {"tags": t.tags, "properties": {"desired": t.desired}}
        return body

    async def individual(self, svc: DpsService, chunk: list[Target]) -> list[Outcome]:
        result = await self.call(lambda: svc.bulk("enrollments", "create",
                                                  [self._enrollment(t) for t in chunk]))
        errors = {e.get("registrationId"): e for e in result.get("errors", [])}
        outcomes = []
        for t in chunk:
            err = errors.get(t.registration_id)
            if err is None:
                outcomes.append((t.registration_id, "registered",
                                 {"mode": "individual", "enrollment": t.registration_id}))
            elif err.get("errorCode") == 409201:
                outcomes.append(await self._existing(svc, t))
            else:
                outcomes.append((t.registration_id, "register_failed", {
                    "mode": "individual",
                    "reason": f"{err.get('errorCode')} {err.get('errorStatus', '')}".strip()}))
        return outcomes

    async def _existing(self, svc: DpsService, t: Target) -> Outcome:
        """An enrollment already exists: ours (same leaf) is success, another is a conflict."""
        current = await self.call(lambda: svc.get("enrollments", t.registration_id))
        found = attested_thumbprint(current, "clientCertificates")
        detail: dict[str, Any] = {"mode": "individual", "enrollment": t.registration_id}
        if current is not None and found == ca.thumbprints(t.leaf)["sha256"]:
            return t.registration_id, "registered", {**detail, "already": True}
        if current is not None and self.options.replace:
            await self.call(lambda: svc.put("enrollments", t.registration_id,
                                            self._enrollment(t), etag=current["etag"]))
            return t.registration_id, "registered", {**detail, "replaced": found}
        return t.registration_id, "conflict", {
            **detail, "reason": f"enrollment exists with another certificate (sha256 {found})"}

    # -- enrollment group ---------------------------------------------------------------------
    def group_id(self) -> str:
        return "provline-" + ca.thumbprints(self.issuer.cert)["sha256"][:24].lower()

    async def ensure_group(self, svc: DpsService) -> tuple[str, str]:
        """(state, reason): the group whose signing certificate is the issuer, enabled."""
        gid = self.group_id()
        pem = ca.pem(self.issuer.cert).decode()
        body = {"enrollmentGroupId": gid, "provisioningStatus": "enabled",
                "attestation": {"type": "x509", "x509": {"signingCertificates": {
                    "primary": {"certificate": pem}}}}}
        current = await self.call(lambda: svc.get("enrollmentGroups", gid))
        if current is None:
            try:
                await self.call(lambda: svc.put("enrollmentGroups", gid, body))
                return "registered", ""
            except ServiceError as exc:
                if exc.status != 409:
                    raise
                current = await self.call(lambda: svc.get("enrollmentGroups", gid))
        same = attested_thumbprint(current, "signingCertificates") == \
            ca.thumbprints(self.issuer.cert)["sha256"]
        if (not same and not self.options.replace) or current is None:
            return "conflict", f"enrollment group {gid} exists with another signing certificate"
        if not same or current.get("provisioningStatus") != "enabled":
            await self.call(lambda: svc.put("enrollmentGroups", gid, body,
                                            etag=current["etag"]))
        return "registered", ""

    # -- CA upload and proof of possession ----------------------------------------------------
    async def upload_ca(self, svc: DpsService) -> None:
        """Upload the issuing CA and prove possession with the HSM-held key. On Azure this is
        the management plane; where the endpoint has no certificate API it is reported."""
        name = "provline-" + ca.thumbprints(self.issuer.cert)["sha1"][:16].lower()
        record = await self.call(lambda: svc.upload_ca(name, ca.pem(self.issuer.cert).decode()))
        if record["properties"].get("isVerified"):
            return
        code, etag = await self.call(lambda: svc.verification_code(name, record["etag"]))
        proof = ca.build_pop(code, self.issuer.cert, self.issuer.key)
        await self.call(lambda: svc.verify_ca(name, etag, ca.pem(proof).decode()))

    async def verified_thumbprints(self, svc: DpsService) -> set[str] | None:
        try:
            records = await self.call(svc.certificates)
        except ServiceError as exc:
            if exc.status in (404, 405):
                return None  # Azure: CA verification lives in ARM, not here
            raise
        return {r["properties"]["thumbprint"].upper() for r in records
                if r["properties"].get("isVerified")}


def load_targets(batch_dir: Path, rows: list[tuple[str, str, str]]) -> list[Target]:
    targets = []
    for rid, did, extra in rows:
        info = json.loads(extra)
        targets.append(Target(rid, did, info.get("tags", {}), info.get("desired", {}),
                              batch_dir / rid))
    return targets


def preflight(targets: list[Target], root: x509.Certificate,
              must_contain: x509.Certificate | None,
              verified: set[str] | None) -> list[str]:
    """Problems that would make DPS refuse a device (401002 in the field), per bundle."""
    problems = []
    for t in targets:
        path = t.bundle / "full-chain.cert.pem"
        try:
            chain = x509.load_pem_x509_certificates(path.read_bytes())
            leaf = t.leaf
        except (OSError, ValueError):
            problems.append(f"{path}: unreadable chain or certificate")
            continue
        if chain[0] != leaf or ca.is_ca(chain[0]):
            problems.append(f"{path}: the leaf is not first")
        elif ca.common_name(chain[0]) != t.registration_id:
            problems.append(f"{path}: CN {ca.common_name(chain[0])!r} is not the registration ID")
        elif any(not ca.signed_by(c, p) for c, p in pairwise(chain)):
            problems.append(f"{path}: a link is not signed by the next certificate")
        elif chain[-1] != root:
            problems.append(f"{path}: the chain does not end at the station root")
        elif must_contain is not None and must_contain not in chain:
            problems.append(f"{path}: the group's signing certificate is not in the chain")
        elif verified is not None and not any(
                ca.thumbprints(c)["sha1"] in verified for c in chain[1:]):
            problems.append(f"{path}: no certificate of the chain is a CA verified by proof "
                            "of possession (use --upload-ca)")
        if len(problems) >= 20:
            break
    return problems


async def run_stage(stage: Stage, targets: list[Target],
                    record: Callable[[list[Outcome]], None]) -> dict[str, Any]:
    """Register ``targets``; ``record`` is called with each finished group of outcomes (the
    orchestrator journals and audits them). Returns stage statistics."""
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
            if mode is RegistrationMode.INDIVIDUAL and leaf.issuer != leaf.subject:
                verified = await stage.verified_thumbprints(svc)
            must = stage.issuer.cert if mode is RegistrationMode.GROUP else None
            problems = preflight(targets, stage.root, must, verified)
            if problems:
                raise RegistrationError(problems[0] + (f" (+{len(problems) - 1} more)"
                                                       if len(problems) > 1 else ""),
                                        rule="chain pre-flight: devices DPS would refuse")
            if mode is RegistrationMode.GROUP:
                state, reason = await stage.ensure_group(svc)
                detail = {"mode": "group", "group": stage.group_id()}
                if reason:
                    detail["reason"] = reason
                for i in range(0, len(targets), 1000):
                    record([(t.registration_id, state, detail) for t in targets[i:i + 1000]])
            else:
                await _individual(stage, svc, targets, record)
    finally:
        await svc.aclose()
    seconds = time.monotonic() - started
    return {"seconds": seconds, "devices": len(targets), "calls": stage.calls,
            "retries": stage.retries,
            "devices_per_s": len(targets) / seconds if seconds > 0 else 0.0}


async def _drain(items: list[T], concurrency: int,
                 handle: Callable[[T], Awaitable[list[Outcome]]],
                 record: Callable[[list[Outcome]], None]) -> None:
    """``concurrency`` tasks take items until none are left, recording each result."""
    queue: asyncio.Queue[T] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)

    async def worker() -> None:
        while not queue.empty():
            record(await handle(queue.get_nowait()))

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _individual(stage: Stage, svc: DpsService, targets: list[Target],
                      record: Callable[[list[Outcome]], None]) -> None:
    size = stage.options.bulk_size

    async def handle(chunk: list[Target]) -> list[Outcome]:
        try:
            return await stage.individual(svc, chunk)
        except (ServiceError, httpx.HTTPError, OSError) as exc:
            return [(t.registration_id, "register_failed",
                     {"mode": "individual", "reason": _reason(exc)}) for t in chunk]

    chunks = [targets[i:i + size] for i in range(0, len(targets), size)]
    await _drain(chunks, stage.options.concurrency, handle, record)


async def _hub(stage: Stage, targets: list[Target],
               record: Callable[[list[Outcome]], None]) -> None:
    registry = HubRegistry(stage.endpoints)

    async def handle(t: Target) -> list[Outcome]:
        detail: dict[str, Any] = {"mode": "hub", "device_id": t.device_id}
        try:
            state = await stage.call(lambda: asyncio.to_thread(
                registry.ensure_ca_identity, t.device_id))
        except (ServiceError, OSError, httpx.HTTPError) as exc:
            return [(t.registration_id, "register_failed", {**detail, "reason": _reason(exc)})]
        if state == "conflict":
            detail["reason"] = "identity exists with another authentication type"
        return [(t.registration_id, state, detail)]

    await _drain(targets, stage.options.concurrency, handle, record)


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 300 else text[:297] + "..."



def device_check(batch_dir: Path, endpoints: Endpoints, registration_ids: list[str],
                 passphrase: SecretRef | None, hsm: HsmConfig | None = None
                 ) -> list[dict[str, Any]]:
    """The device side of seed 004 for each device: register over mTLS with its bundle, poll
    until assigned, send one telemetry message to the assigned hub. pkcs8 keys are used from
    their files; retained keys sign inside the HSM (curl + the PKCS#11 engine). Wrapped keys
    are only usable once a device has unwrapped them, so they cannot be checked here."""
    from .dps import CurlDevice, DeviceClient

    results = []
    for rid in registration_ids:
        bundle = batch_dir / rid
        info = json.loads((bundle / "device.json").read_text())
        key = info["key"]
        client: DeviceClient | CurlDevice
        if key["custody"] == "pkcs8":
            client = DeviceClient(endpoints, bundle / "full-chain.cert.pem",
                                  bundle / "device.key.pem",
                                  passphrase.read() if passphrase else None)
        elif key["custody"] == "retain" and hsm is not None:
            client = CurlDevice(endpoints, bundle / "full-chain.cert.pem", key["uri"],
                                hsm.module, hsm.pin.read(), hsm.softhsm2_conf)
        else:
            raise RegistrationError(f"{rid}: {key['custody']} custody: the device's key is "
                                    "not usable from the station",
                                    rule="device check needs pkcs8 or retain custody")
        outcome: dict[str, Any] = {"registration_id": rid}
        try:
            result = client.register(rid)
            state = result.get("registrationState", {})
            outcome.update(status=result.get("status"), assigned_hub=state.get("assignedHub"),
                           device_id=state.get("deviceId"))
            if result.get("status") == "assigned":
                client.send_telemetry(state["assignedHub"], state["deviceId"],
                                      {"provline": "device check", "registrationId": rid})
                outcome["telemetry"] = "sent"
        except (ServiceError, httpx.HTTPError, OSError) as exc:
            outcome.update(status="error", reason=_reason(exc))
        finally:
            client.close()
        results.append(outcome)
    return results


def sample(ids: list[str], count: int) -> list[str]:
    """``count`` devices spread evenly over the batch (first and last included)."""
    if count >= len(ids):
        return ids
    if count <= 1:
        return ids[:count]
    step = (len(ids) - 1) / (count - 1)
    return [ids[round(i * step)] for i in range(count)]
