"""Per-provider request stats (relay.stats): counted per process, added to the store, summed across replicas.

The store cases run on both backends (the `store` / `open_store` fixtures); the percentile maths is pure.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest

from relay.clock import ManualClock
from relay.stats import LATENCY_BUCKETS, ProviderStats, ProviderStatsRecorder, bucket_index, percentile_ms
from relay.store.base import Store

MINUTE = 1_700_000_040      # a minute's start (unix seconds, divisible by 60)


def buckets(**at: int) -> str:
    """A latency_buckets JSON list with `count` requests in the bucket of each latency in ms (`ms_120=3`)."""
    counts = [0] * (len(LATENCY_BUCKETS) + 1)
    for key, count in at.items():
        counts[bucket_index(float(key.removeprefix("ms_")) / 1000)] += count
    return json.dumps(counts)


def test_a_latency_falls_in_the_first_bucket_that_holds_it() -> None:
    """Bucket bounds are upper bounds, inclusive (as Prometheus' `le`); slower than the last: the overflow bucket."""
    assert bucket_index(0.0) == 0
    assert bucket_index(LATENCY_BUCKETS[0]) == 0
    assert bucket_index(LATENCY_BUCKETS[0] + 1e-9) == 1
    assert bucket_index(LATENCY_BUCKETS[-1] * 2) == len(LATENCY_BUCKETS)


def test_percentiles_interpolate_inside_the_bucket_like_histogram_quantile() -> None:
    """100 requests in the (0.1, 0.25] s bucket: p50 is halfway through it; none: no percentile."""
    counts = json.loads(buckets(ms_200=100))
    assert percentile_ms(counts, 0.5) == pytest.approx(175.0)
    assert percentile_ms(counts, 0.99) == pytest.approx(100 + 150 * 0.99)
    assert percentile_ms([0] * len(counts), 0.5) is None
    overflow = [0] * len(LATENCY_BUCKETS) + [5]
    assert percentile_ms(overflow, 0.99) == LATENCY_BUCKETS[-1] * 1000    # the histogram can say no more


async def test_provider_stats_add_up_per_provider_over_the_minutes_asked_for(store: Store) -> None:
    """Rows for one (provider, minute) add to each other; a read sums minutes >= since per provider."""
    await store.add_provider_stats([("evolink", MINUTE, 10, 2, 1, buckets(ms_20=10))])
    await store.add_provider_stats([("evolink", MINUTE, 5, 1, 0, buckets(ms_20=4, ms_3000=1)),
                                    ("evolink", MINUTE + 60, 3, 0, 0, buckets(ms_20=3)),
                                    ("apimart", MINUTE - 60, 7, 7, 7, buckets(ms_100=7))])
    got = await store.provider_stats(since=MINUTE)
    assert set(got) == {"evolink"}                                # apimart's minute is before `since`
    evolink = got["evolink"]
    assert (evolink.requests, evolink.errors, evolink.rate_limited) == (18, 3, 1)
    assert evolink.p50_ms is not None and 10 < evolink.p50_ms <= 25      # 17 of 18 in (10, 25] ms
    assert evolink.p99_ms is not None and 2500 < evolink.p99_ms <= 5000  # the one slow request
    everything = await store.provider_stats(since=0)
    assert everything["apimart"] == ProviderStats("apimart", 7, 7, 7, pytest.approx(75.0), pytest.approx(99.5))
    assert await store.provider_stats(since=MINUTE + 61) == {}    # a minute that started before `since` is out


async def test_two_stores_flushing_at_once_on_one_database_sum(open_store: Callable[[], Awaitable[Store]]) -> None:
    """Two replicas' recorders flushing the same minutes at the same moment: nothing is overwritten or lost."""
    first, second = await open_store(), await open_store()
    clock = ManualClock(start=MINUTE + 5)
    recorders = [ProviderStatsRecorder(first, clock), ProviderStatsRecorder(second, clock)]
    for _ in range(20):
        for recorder in recorders:
            recorder.record("evolink", 200, 0.02)
            recorder.record("evolink", 429, 0.2)
            recorder.record("gmicloud", None, 5.0)
    await asyncio.gather(*(recorder.flush() for recorder in recorders))
    for recorder in recorders:       # and again, each adding to the rows the other has written
        recorder.record("evolink", 500, 0.02)
    await asyncio.gather(*(recorder.flush() for recorder in recorders))
    got = await first.provider_stats(since=MINUTE)
    assert (got["evolink"].requests, got["evolink"].errors, got["evolink"].rate_limited) == (82, 42, 40)
    assert (got["gmicloud"].requests, got["gmicloud"].errors, got["gmicloud"].rate_limited) == (40, 40, 0)
    assert got == await second.provider_stats(since=MINUTE)


async def test_a_failed_flush_keeps_its_counts_for_the_next(store: Store) -> None:
    """The database away at a flush: the counts stay in memory, merged with newer ones, and land next time."""
    clock = ManualClock(start=MINUTE)
    recorder = ProviderStatsRecorder(store, clock)
    recorder.record("evolink", 200, 0.02)
    await store.close()
    with pytest.raises(Exception):  # noqa: B017 - whatever the closed backend raises
        await recorder.flush()
    recorder.record("evolink", 200, 0.02)
    await store.open()
    await recorder.flush()
    assert (await store.provider_stats(since=MINUTE))["evolink"].requests == 2


async def test_requests_are_counted_in_the_minute_they_end(store: Store) -> None:
    """Each request goes to the minute of the clock when it was recorded."""
    clock = ManualClock(start=MINUTE + 59)
    recorder = ProviderStatsRecorder(store, clock)
    recorder.record("evolink", 200, 0.01)
    clock.advance(2)
    recorder.record("evolink", 200, 0.01)
    recorder.record("evolink", 200, 0.01)
    await recorder.close()           # close flushes what is left
    assert (await store.provider_stats(since=MINUTE + 60))["evolink"].requests == 2
    assert (await store.provider_stats(since=MINUTE))["evolink"].requests == 3
