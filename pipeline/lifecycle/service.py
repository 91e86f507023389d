"""DPS and IoT Hub as lifecycle operations use them: every call paced and retried like the
registration stage (one token bucket at the station's ``dps.operations_per_minute``,
tenacity retries of 429, 5xx and connection errors honouring ``Retry-After``), plus the
read strategies that keep a large operation near the quota-limited minimum:

* current enrollments (with their etags, for ``updateIfMatchETag`` bulk writes) come from
  the paged enrollment query (1,000 a call) until the pages read are as many as the devices
  still missing, and then from one GET each: never more than twice the calls of the cheaper
  way, whatever the size of the DPS (10,000 devices of a 10,000-enrollment DPS: 10 calls);
* registration records likewise, from the enrollment group's paged registration query.

IoT Hub calls have their own bucket at the same rate (the hub's registry quota is its own).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from functools import partial
from typing import Any, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_delay

from ..config.station import Station
from ..registration.endpoints import Endpoints, resolve
from ..registration.pacing import TokenBucket, backoff, is_transient
from ..registration.service import DpsService
from .hub import HubIdentities

T = TypeVar("T")
PAGE_SIZE = 1000
CALL_DEADLINE = 300.0  # seconds one call may keep being retried
BULK_LIMIT = 10  # DPS: at most 10 enrollments per bulk operation


def _wait(state: RetryCallState) -> float:
    exc = state.outcome.exception() if state.outcome else None
    return backoff(state.attempt_number, getattr(exc, "retry_after", None))


class Services:
    """One per lifecycle command; use :meth:`aclose` when done."""

    def __init__(self, station: Station, operations_per_minute: int | None = None) -> None:
        self.endpoints: Endpoints = resolve(station.dps)
        rate = operations_per_minute or station.dps.operations_per_minute
        self.concurrency = station.dps.concurrency
        self.dps = DpsService(self.endpoints, max_connections=max(4, self.concurrency))
        self.bucket = TokenBucket(rate)
        self.hub_bucket = TokenBucket(rate)
        self._hub: HubIdentities | None = None
        self.calls = 0
        self.hub_calls = 0
        self.retries = 0

    async def aclose(self) -> None:
        await self.dps.aclose()

    @property
    def has_hub(self) -> bool:
        return self.endpoints.hub_cs is not None

    @property
    def hub(self) -> HubIdentities:
        if self._hub is None:
            self._hub = HubIdentities(self.endpoints)
        return self._hub

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """One paced, retried DPS call."""
        return await self._paced(fn, self.bucket, hub=False)

    async def hub_call(self, fn: Callable[[], T], requests: int = 1) -> T:
        """A paced, retried IoT Hub step of ``requests`` registry calls (the SDK is
        synchronous: run in a thread)."""
        return await self._paced(
            lambda: asyncio.to_thread(fn), self.hub_bucket, hub=True, requests=requests
        )

    async def _paced(
        self,
        fn: Callable[[], Awaitable[T]],
        bucket: TokenBucket,
        *,
        hub: bool,
        requests: int = 1,
    ) -> T:
        def count_retry(state: RetryCallState) -> None:
            self.retries += 1

        async for attempt in AsyncRetrying(
            retry=retry_if_exception(is_transient),
            wait=_wait,
            stop=stop_after_delay(CALL_DEADLINE),
            reraise=True,
            before_sleep=count_retry,
        ):
            with attempt:
                for _ in range(requests):
                    await bucket.take()
                if hub:
                    self.hub_calls += requests
                else:
                    self.calls += 1
                return await fn()
        raise AssertionError("unreachable")

    # -- reading -------------------------------------------------------------------------
    async def pages(self, path: str, page_size: int = PAGE_SIZE) -> AsyncGenerator[list[Any], None]:
        """Every page of a DPS query, one paced call each."""
        body = None if path.startswith("/registrations/") else _SELECT
        continuation: str | None = None
        while True:
            items, continuation = await self.call(
                partial(self.dps.query_page, path, continuation, page_size, body)
            )
            yield items
            if not continuation:
                return

    async def enrollments(self, rids: Iterable[str]) -> dict[str, dict[str, Any] | None]:
        """The current individual enrollment (with its etag) of each registration ID, None
        where there is none."""
        wanted = set(rids)
        found: dict[str, dict[str, Any] | None] = dict.fromkeys(wanted)
        missing = await self._scan("/enrollments/query", wanted, found)
        await self.each(
            sorted(missing),
            lambda rid: self._store(
                found, rid, self.call(lambda: self.dps.get("enrollments", rid))
            ),
        )
        return found

    async def registrations(
        self, groups: dict[str | None, set[str]]
    ) -> dict[str, dict[str, Any] | None]:
        """The registration record of each device (grouped by enrollment group id, None for
        individual enrollments); None where the device never registered."""
        found: dict[str, dict[str, Any] | None] = {}
        missing: set[str] = set()
        for group, rids in groups.items():
            found.update(dict.fromkeys(rids))
            if group is None:
                missing |= rids
            else:
                missing |= await self._scan(f"/registrations/{group}/query", set(rids), found)
        await self.each(
            sorted(missing),
            lambda rid: self._store(found, rid, self.call(lambda: self.dps.registration(rid))),
        )
        return found

    async def _scan(
        self, path: str, wanted: set[str], found: dict[str, dict[str, Any] | None]
    ) -> set[str]:
        """Page through a query collecting ``wanted``; stop as soon as the pages read are as
        many as the ones still missing (whose one GET each is then no dearer), so reading
        costs at most twice the cheaper of the two ways. Returns what is still missing."""
        missing = set(wanted)
        if not missing:
            return missing
        read = 0
        pages = self.pages(path)
        try:
            async for page in pages:
                read += 1
                for item in page:
                    rid = str(item.get("registrationId", "")).lower()
                    if rid in missing:
                        found[rid] = item
                        missing.discard(rid)
                if read >= len(missing):
                    break
        finally:
            await pages.aclose()
        return missing

    @staticmethod
    async def _store(
        into: dict[str, dict[str, Any] | None],
        key: str,
        value: Awaitable[dict[str, Any] | None],
    ) -> None:
        into[key] = await value

    async def each(self, items: list[T], handle: Callable[[T], Awaitable[None]]) -> None:
        """``handle`` every item, ``concurrency`` at a time."""
        queue: asyncio.Queue[T] = asyncio.Queue()
        for item in items:
            queue.put_nowait(item)

        async def worker() -> None:
            while not queue.empty():
                await handle(queue.get_nowait())

        await asyncio.gather(*(worker() for _ in range(max(1, self.concurrency))))


_SELECT = {"query": "SELECT *"}


def require_endpoints(station: Station) -> None:
    """Raise, before any side effect, when DPS / IoT Hub cannot be reached from the station's
    settings (no endpoint, no connection string, emulator not started)."""
    resolve(station.dps)


def chunks(items: list[T], size: int = BULK_LIMIT) -> list[list[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
