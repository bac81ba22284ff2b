"""Per-provider request-rate limits: a token bucket per provider account.

`TokenBucket` lives in this process's memory: right for the embedded default (one process on SQLite).
`SharedTokenBucket` keeps the bucket in the store, one row per provider, taken under a row lock: with
several replicas on PostgreSQL the provider's `rate_limit` is the account's, however many processes
send to it. A provider 429 is still honoured through Retry-After either way.
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
    """A token bucket kept in the store (see Store.take_token), shared by every process on the database."""

    def __init__(self, store: Store, key: str, rate: float, clock: Clock, burst: float | None = None) -> None:
        self.store = store
        self.key = key
        self.rate = rate
        self.capacity = burst if burst is not None else max(1.0, rate)
        self.clock = clock
        self._lock = asyncio.Lock()     # this process's callers queue here, not in the database

    async def acquire(self) -> None:
        """Wait until a request may be sent."""
        async with self._lock:
            while True:
                wait = await self.store.take_token(self.key, self.rate, self.capacity, self.clock.now())
                if wait <= 0:
                    return
                await asyncio.sleep(wait)
