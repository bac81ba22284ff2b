"""Per-provider request-rate limits: a token bucket per provider account.

`TokenBucket` lives in this process's memory: right for the embedded default (one process on SQLite).
`SharedTokenBucket` keeps the bucket in the store, one row per provider, changed only from the state a take
was worked out from (Store.take_tokens): with several replicas on PostgreSQL the provider's `rate_limit` is
the account's, however many processes send to it. A provider 429 is still honoured through Retry-After
either way.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from relay.clock import Clock
from relay.store.base import Store


class RateLimiter(Protocol):
    async def acquire(self) -> None:
        """Wait until a request may be sent."""


class TokenBucket:
    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.capacity = burst if burst is not None else max(1.0, rate)
        self._tokens = self.capacity
        self._updated = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        """Wait until a request may be sent."""
        async with self._lock:
            while True:
                now = time.monotonic()
                self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
                self._updated = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                await asyncio.sleep((1 - self._tokens) / self.rate)


class SharedTokenBucket:
    """A token bucket kept in the store (see Store.take_tokens), shared by every process on the database.

    This process's callers queue here, not in the database, and whoever is at the head of the queue takes
    tokens for everyone waiting at that moment in one take: a burst of requests costs a round trip or a
    few, not one each. Tokens taken for callers who gave up waiting are dropped once nobody waits, never
    kept for later (so the account's rate is never exceeded by saved-up tokens).
    """

    def __init__(self, store: Store, key: str, rate: float, clock: Clock, burst: float | None = None) -> None:
        self.store = store
        self.key = key
        self.rate = rate
        self.capacity = burst if burst is not None else max(1.0, rate)
        self.clock = clock
        self._lock = asyncio.Lock()
        self._waiting = 0           # callers in acquire(), the one taking tokens included
        self._granted = 0           # tokens taken and not yet handed to a caller

    async def acquire(self) -> None:
        """Wait until a request may be sent."""
        self._waiting += 1
        try:
            async with self._lock:
                while self._granted == 0:
                    taken, wait = await self.store.take_tokens(self.key, self.rate, self.capacity, self.clock.now(),
                                                               self._waiting)
                    self._granted += taken
                    if not taken:
                        await asyncio.sleep(wait)
                self._granted -= 1
        finally:
            self._waiting -= 1
            if self._waiting == 0:
                self._granted = 0
