"""Pacing with an injected clock: the token bucket and the retry backoff, no waiting."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from pipeline.registration.pacing import (
    BACKOFF_CAP,
    Reachability,
    TokenBucket,
    backoff,
    is_transient,
    is_unreachable,
)
from pipeline.registration.service import ServiceError


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def _calls_until(bucket: TokenBucket, clock: FakeClock, seconds: float) -> int:
    async def run() -> int:
        calls = 0
        while True:
            await bucket.take()
            if clock.now > 1000.0 + seconds:
                return calls
            calls += 1

    return asyncio.run(run())


@pytest.mark.parametrize("per_minute", [60, 600, 1000, 6000])
def test_bucket_holds_the_rate_over_a_minute(per_minute: int) -> None:
    clock = FakeClock()
    bucket = TokenBucket(per_minute, clock=clock, sleep=clock.sleep)
    calls = _calls_until(bucket, clock, 60.0)
    burst = max(1, per_minute // 60)  # at most a second's worth at once
    assert per_minute <= calls <= per_minute + burst


def test_bucket_bursts_at_most_a_seconds_worth() -> None:
    clock = FakeClock()
    bucket = TokenBucket(600, clock=clock, sleep=clock.sleep)

    async def burst() -> None:
        for _ in range(10):
            await bucket.take()

    asyncio.run(burst())
    assert clock.slept == []  # ten calls (one second at 600/min) go at once
    asyncio.run(burst())
    assert sum(clock.slept) == pytest.approx(1.0)


def test_backoff_grows_is_capped_and_honours_retry_after() -> None:
    high = lambda low, high: high  # noqa: E731  (the largest jitter)
    assert [backoff(n, None, high) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert backoff(30, None, high) == BACKOFF_CAP
    assert backoff(1, 7.0, lambda low, high: low) == 7.0
    assert 7.0 <= backoff(1, 7.0) <= 7.25


def test_what_is_worth_retrying() -> None:
    assert is_transient(ServiceError(429, 429001, "throttled"))
    assert is_transient(ServiceError(503, None, "unavailable"))
    assert not is_transient(ServiceError(401, 401002, "bad certificate"))
    assert not is_transient(ServiceError(409, 409201, "exists"))
    assert is_transient(httpx.ConnectError("refused"))
    assert not is_transient(ValueError("bug"))


def test_an_outage_is_given_up_on_after_its_deadline_and_any_answer_ends_it() -> None:
    clock = FakeClock()
    reach = Reachability(60, clock=clock)
    assert not reach.gave_up
    reach.failed("ConnectError: refused")
    clock.now += 59
    reach.failed("ConnectError: refused again")
    assert not reach.gave_up and reach.failures == 2
    reach.answered()  # an HTTP error status is an answer too
    clock.now += 120
    assert not reach.gave_up
    reach.failed("ConnectTimeout: timed out")
    clock.now += 60
    assert reach.gave_up
    assert reach.reason() == (
        "unreachable for 60 s, 1 failed attempts (last error: ConnectTimeout: timed out)"
    )


def test_only_failures_without_an_answer_count_as_unreachable() -> None:
    request = httpx.Request("GET", "https://dps.example")
    assert is_unreachable(httpx.ConnectError("refused", request=request))
    assert is_unreachable(ConnectionRefusedError(111, "refused"))
    assert not is_unreachable(ServiceError(503, None, "busy"))
