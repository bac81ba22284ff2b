"""Per-provider request statistics shared by every replica: what the dashboard's Providers page shows.

Each process counts its provider requests in memory, per provider per minute (requests, errors, 429s and a
latency histogram over LATENCY_BUCKETS), and a `ProviderStatsRecorder` adds them to the store's
`provider_stats` rows every FLUSH_SECONDS and at shutdown. The store sums what every replica added, so
`Store.provider_stats(since)` is the whole deployment's view, whichever replica answers.

The histogram bounds are the Prometheus histogram's too (relay.metrics), so both tell the same story.
Percentiles are read from the merged histogram here, in plain Python, the same on every backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from relay.clock import Clock

if TYPE_CHECKING:     # the store imports this module for ProviderStats
    from relay.store.base import Store

log = logging.getLogger("relay.stats")

# Upper bounds (seconds) of the latency buckets, the last bucket being everything slower. Provider calls
# range from a few ms (a poll) to a minute (a synchronous dialect rendering the image in its submit).
LATENCY_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FLUSH_SECONDS = 10.0

# (provider, minute, requests, errors, rate_limited, latency_buckets as JSON): one row of Store.add_provider_stats.
StatsRow = tuple[str, int, int, int, int, str]


@dataclass(frozen=True)
class ProviderStats:
    """One provider's requests over a time range; latency percentiles in milliseconds (None: no requests)."""

    provider: str
    requests: int
    errors: int
    rate_limited: int
    p50_ms: float | None
    p99_ms: float | None


def bucket_index(seconds: float) -> int:
    """The bucket a latency falls in: the first whose upper bound holds it (len(LATENCY_BUCKETS): slower)."""
    for index, bound in enumerate(LATENCY_BUCKETS):
        if seconds <= bound:
            return index
    return len(LATENCY_BUCKETS)


def merge_buckets(a: Sequence[int], b: Sequence[int]) -> list[int]:
    """Bucket counts added; a shorter list (a row written with fewer buckets) counts as zeros."""
    size = max(len(a), len(b), len(LATENCY_BUCKETS) + 1)
    return [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(size)]


def parse_buckets(text: str | None) -> list[int]:
    """A row's latency_buckets; junk reads as no latencies rather than failing the page."""
    try:
        value = json.loads(text or "[]")
    except ValueError:
        return []
    if not isinstance(value, list):
        return []
    return [int(v) if isinstance(v, int | float) and math.isfinite(v) else 0 for v in value]


def percentile_ms(buckets: Sequence[int], q: float) -> float | None:
    """The q-quantile (0..1) in ms, interpolated inside its bucket as Prometheus' histogram_quantile does.

    A quantile that falls in the last, unbounded bucket reads as the highest bound: the histogram cannot say more.
    """
    total = sum(buckets)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(buckets):
        if count and seen + count >= rank:
            if index >= len(LATENCY_BUCKETS):
                return LATENCY_BUCKETS[-1] * 1000
            low = LATENCY_BUCKETS[index - 1] if index else 0.0
            high = LATENCY_BUCKETS[index]
            return (low + (high - low) * (rank - seen) / count) * 1000
        seen += count
    return LATENCY_BUCKETS[-1] * 1000


def summarize(provider: str, requests: int, errors: int, rate_limited: int, buckets: Sequence[int]) -> ProviderStats:
    return ProviderStats(provider=provider, requests=requests, errors=errors, rate_limited=rate_limited,
                         p50_ms=percentile_ms(buckets, 0.50), p99_ms=percentile_ms(buckets, 0.99))


@dataclass
class _Minute:
    requests: int = 0
    errors: int = 0
    rate_limited: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))


class ProviderStatsRecorder:
    """This process's provider request counts, added to the store every `interval` seconds and at close.

    A flush that fails (the database is away) keeps its counts for the next one: they are lost only if
    the process dies before the database comes back.
    """

    def __init__(self, store: Store, clock: Clock, *, interval: float = FLUSH_SECONDS) -> None:
        self.store = store
        self.clock = clock
        self.interval = interval
        self._pending: dict[tuple[str, int], _Minute] = {}
        self._task: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()

    def record(self, provider: str, status_code: int | None, seconds: float) -> None:
        """One request's outcome: `status_code` None when no answer came (a transport failure)."""
        minute = int(self.clock.now() // 60) * 60
        counts = self._pending.get((provider, minute))
        if counts is None:
            counts = self._pending[(provider, minute)] = _Minute()
        counts.requests += 1
        if status_code is None or not 200 <= status_code < 300:
            counts.errors += 1
        if status_code == 429:
            counts.rate_limited += 1
        counts.buckets[bucket_index(seconds)] += 1

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="relay-provider-stats")

    async def close(self) -> None:
        """Stop the timer and flush what is left (a failure is logged: shutdown goes on)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self.flush()
        except Exception as exc:  # noqa: BLE001 - the counts are all that is lost
            log.warning("could not save the last provider request stats: %s", type(exc).__name__)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.flush()
            except Exception as exc:  # noqa: BLE001 - kept for the next flush
                log.warning("could not save provider request stats (kept for the next try): %s", type(exc).__name__)

    async def flush(self) -> None:
        """Add the counts so far to the store; on failure they are kept (merged with newer ones) and it raises."""
        async with self._flushing:
            taken, self._pending = self._pending, {}
            if not taken:
                return
            rows: list[StatsRow] = [(provider, minute, c.requests, c.errors, c.rate_limited, json.dumps(c.buckets))
                                    for (provider, minute), c in sorted(taken.items())]
            try:
                await self.store.add_provider_stats(rows)
            except BaseException:
                for key, old in taken.items():
                    new = self._pending.get(key)
                    if new is not None:
                        old.requests += new.requests
                        old.errors += new.errors
                        old.rate_limited += new.rate_limited
                        old.buckets = merge_buckets(old.buckets, new.buckets)
                    self._pending[key] = old
                raise
