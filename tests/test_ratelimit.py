"""Provider request rates: the in-process bucket, and the bucket shared through the store by every replica."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from relay.clock import ManualClock, SystemClock
from relay.ratelimit import SharedTokenBucket
from relay.store.base import BUCKETS_REMEMBERED, Store
from tests.harness import wait_for


async def test_two_stores_on_one_database_draw_from_one_bucket(open_store: Callable[[], Awaitable[Store]],
                                                               clock: ManualClock) -> None:
    """Two replicas taking tokens at the same instant get `burst` of them between them, not each."""
    first, second = await open_store(), await open_store()
    now = clock.now()
    waits = await asyncio.gather(*(store.take_token("provider:evolink", 2.0, 5.0, now)
                                   for store in (first, second) * 10))
    assert sum(1 for w in waits if w == 0.0) == 5, waits
    assert all(w > 0 for w in waits if w != 0.0), "the others are told how long to wait"


async def test_a_replica_never_takes_from_a_stale_view_of_the_bucket(
        open_store: Callable[[], Awaitable[Store]], clock: ManualClock) -> None:
    """Each store takes from the state it last left the bucket in (one compare-and-set): when another replica
    took meanwhile, the swap misses and the take is worked out again from the row, not from the stale state."""
    first, second = await open_store(), await open_store()
    now = clock.now()
    assert await first.take_tokens("provider:pixazo", 0.001, 5.0, now, 2) == (2, 0.0)     # first saw 3 left
    assert await second.take_tokens("provider:pixazo", 0.001, 5.0, now, 2) == (2, 0.0)    # 1 left
    assert (await first.take_tokens("provider:pixazo", 0.001, 5.0, now, 5))[0] == 1
    assert (await second.take_tokens("provider:pixazo", 0.001, 5.0, now, 5))[0] == 0


async def test_a_store_remembers_a_bounded_number_of_buckets(store: Store, clock: ManualClock) -> None:
    """The console's login limit makes a bucket per client address: the states a store keeps to take with one
    statement stay bounded, and a forgotten bucket is read again, never taken from twice."""
    now = clock.now()
    for n in range(BUCKETS_REMEMBERED + 50):
        assert await store.take_token(f"login:10.0.{n // 256}.{n % 256}", 0.001, 1.0, now) == 0.0
    assert len(store._bucket_states()) == BUCKETS_REMEMBERED     # noqa: SLF001 - the bound is the point
    assert await store.take_token("login:10.0.0.0", 0.001, 1.0, now) > 0       # forgotten, read again: empty


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


async def test_callers_waiting_together_share_one_take(store: Store) -> None:
    """Twenty requests at once cost the store a couple of takes, not twenty, and get only the bucket's tokens."""
    bucket = SharedTokenBucket(store, "provider:gmicloud", rate=0.001, clock=SystemClock(), burst=20.0)
    takes: list[int] = []
    real = store.take_tokens

    async def counted(key: str, rate: float, burst: float, now: float, wanted: int) -> tuple[int, float]:
        takes.append(wanted)
        return await real(key, rate, burst, now, wanted)
    store.take_tokens = counted  # type: ignore[method-assign]
    await asyncio.wait_for(asyncio.gather(*(bucket.acquire() for _ in range(20))), 10)
    assert len(takes) <= 3, takes
    assert sum(takes) >= 20
    # The bucket is empty now: one more request would wait about 1/rate (1,000 s), so it is told to.
    assert await real("provider:gmicloud", 0.001, 20.0, SystemClock().now(), 1) == (0, pytest.approx(1000, rel=0.01))


async def test_tokens_taken_for_a_caller_who_gave_up_are_not_kept(store: Store) -> None:
    """A caller cancelled after tokens were taken for it leaves one behind; once nobody waits it is dropped, so a
    later request goes to the store again rather than bursting past the account's rate on a saved-up token."""
    bucket = SharedTokenBucket(store, "provider:pixazo", rate=0.001, clock=SystemClock(), burst=4.0)
    real = store.take_tokens
    gates = [asyncio.Event(), asyncio.Event(), asyncio.Event()]
    asked: list[int] = []

    async def gated(key: str, rate: float, burst: float, now: float, wanted: int) -> tuple[int, float]:
        asked.append(wanted)
        await gates[len(asked) - 1].wait()
        return await real(key, rate, burst, now, wanted)
    store.take_tokens = gated  # type: ignore[method-assign]
    head = asyncio.create_task(bucket.acquire())
    await wait_for(lambda: len(asked) == 1, 5, "the head to ask alone")    # and hold the queue
    second, third = asyncio.create_task(bucket.acquire()), asyncio.create_task(bucket.acquire())
    await wait_for(lambda: bucket._waiting == 3, 5, "two more callers to queue")
    gates[0].set()
    await asyncio.wait_for(head, 10)
    await wait_for(lambda: len(asked) == 2, 5, "the second to ask")    # for itself and the third
    assert asked == [1, 2]
    third.cancel()
    await asyncio.gather(third, return_exceptions=True)
    gates[1].set()
    await asyncio.wait_for(second, 10)              # took 2, used 1
    gates[2].set()
    await asyncio.wait_for(bucket.acquire(), 10)    # the bucket still holds a fourth token: taken from the store
    assert asked == [1, 2, 1], "the token left by the cancelled caller was kept for a later one"
