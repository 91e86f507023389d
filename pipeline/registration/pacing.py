"""Pacing and retries for calls to DPS and IoT Hub.

* :class:`TokenBucket`: ``per_minute`` calls a minute, at most a second's worth in a burst:
  smooth pacing that stays under a quota other stations may share (DPS: 1,000 operations a
  minute per service, Microsoft Learn "Quotas and limits").
* :func:`is_transient` and :func:`backoff`: 429, 5xx, connection errors and timeouts are
  retried with jittered exponential backoff, never sooner than the service's ``Retry-After``.
* :class:`Reachability`: how long the service has given no answer at all (connections
  refused, timed out, dropped). Past a deadline the stage gives up instead of retrying every
  device for its own deadline: the devices end ``register_failed`` with the reason.

The clock, the sleep and the random source are injectable, so the pacing logic is tested
without waiting.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable

import httpx

from .service import ServiceError

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


_EPSILON = 1e-9


class TokenBucket:
    def __init__(
        self, per_minute: int, *, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep
    ) -> None:
        if per_minute < 1:
            raise ValueError("a token bucket needs at least one call a minute")
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.capacity
        self._stamp = clock()
        self._lock = asyncio.Lock()

    async def take(self) -> None:
        """Wait until a call may be made, then spend one token."""
        async with self._lock:
            while True:
                now = self._clock()
                self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                if self._tokens >= 1 - _EPSILON:  # float rounding must not stall the bucket
                    self._tokens -= 1
                    return
                await self._sleep((1 - self._tokens) / self.rate)


def is_transient(exc: BaseException) -> bool:
    """Whether a failed call may succeed when tried again."""
    if isinstance(exc, ServiceError):
        return exc.transient
    return isinstance(exc, httpx.TransportError | ConnectionError | TimeoutError)


BACKOFF_START = 0.5
BACKOFF_CAP = 30.0


def backoff(
    attempt: int,
    retry_after: float | None,
    uniform: Callable[[float, float], float] = random.uniform,
) -> float:
    """Seconds to wait before attempt ``attempt + 1``: full-jitter exponential backoff from
    0.5 s doubling to 30 s, never shorter than ``retry_after`` (plus a little jitter, so
    stations throttled together do not come back together)."""
    wait = uniform(0, min(BACKOFF_CAP, BACKOFF_START * 2 ** (attempt - 1)))
    if retry_after:
        return max(wait, retry_after + uniform(0, 0.25))
    return wait


def is_unreachable(exc: BaseException) -> bool:
    """A failure without any HTTP answer: the service is down or cannot be reached."""
    return isinstance(exc, httpx.TransportError | ConnectionError | TimeoutError)


class Unreachable(Exception):
    """The service gave no answer for longer than the stage's deadline."""


class Reachability:
    """When the service last answered. ``failed`` starts (or continues) an outage;
    ``answered`` ends it; an outage longer than ``deadline`` seconds is given up on."""

    def __init__(self, deadline: float, *, clock: Clock = time.monotonic) -> None:
        self.deadline = deadline
        self._clock = clock
        self.down_since: float | None = None
        self.failures = 0
        self.last_error = ""

    def answered(self) -> None:
        self.down_since = None
        self.failures = 0

    def failed(self, error: str) -> None:
        if self.down_since is None:
            self.down_since = self._clock()
        self.failures += 1
        self.last_error = error

    @property
    def gave_up(self) -> bool:
        return self.down_since is not None and self._clock() - self.down_since >= self.deadline

    def reason(self) -> str:
        return (
            f"unreachable for {self.deadline:.0f} s, {self.failures} failed attempts "
            f"(last error: {self.last_error})"
        )
