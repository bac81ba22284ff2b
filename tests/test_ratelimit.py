"""Provider request rates: the in-process bucket, and the bucket shared through the store by every replica."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from relay.clock import ManualClock, SystemClock
from relay.ratelimit import SharedTokenBucket
from relay.store.base import Store


async def test_two_stores_on_one_database_draw_from_one_bucket(open_store: Callable[[], Awaitable[Store]],
                                                               clock: ManualClock) -> None:
    """Two replicas taking tokens at the same instant get `burst` of them between them, not each."""
    first, second = await open_store(), await open_store()
    now = clock.now()
    waits = await asyncio.gather(*(store.take_token("provider:evolink", 2.0, 5.0, now)
                                   for store in (first, second) * 10))
    assert sum(1 for w in waits if w == 0.0) == 5, waits
    assert all(w > 0 for w in waits if w != 0.0), "the others are told how long to wait"


async def test_the_shared_bucket_refills_at_its_rate(store: Store, clock: ManualClock) -> None:
    """An empty bucket gives one token per 1/rate seconds, says how long until the next, and caps at burst."""
    now = clock.now()
    assert await store.take_token("k", 4.0, 1.0, now) == 0.0
    assert 0.24 < await store.take_token("k", 4.0, 1.0, now) <= 0.25
    assert await store.take_token("k", 4.0, 1.0, now + 0.25) == 0.0
    assert await store.take_token("k", 4.0, 1.0, now + 3600) == 0.0      # a long idle refills only to burst
    assert await store.take_token("k", 4.0, 1.0, now + 3600) > 0
    assert await store.take_token("other", 4.0, 1.0, now) == 0.0         # buckets are per key


async def test_shared_token_bucket_paces_its_callers(store: Store) -> None:
    """Past its burst, acquire() waits for the refill: 3 requests at 200/s with a burst of 1 take >= 10 ms."""
    bucket = SharedTokenBucket(store, "provider:apimart", rate=200.0, clock=SystemClock(), burst=1.0)
    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(bucket.acquire() for _ in range(3))), 10)
    assert time.monotonic() - started >= 2 / 200 * 0.99      # a lower bound: it cannot be beaten, only slowed
