"""Group commit: many concurrent small writes share one transaction.

While one batch is being committed, new writes queue up; the next commit takes
them all. Under light load a write commits alone at once (no added delay);
under heavy load the cost of a commit is shared by everyone who arrived during
the previous one. Each caller returns only after its own write is durable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class GroupCommit(Generic[T]):
    def __init__(self, flush: Callable[[list[T]], Awaitable[None]], max_batch: int = 512) -> None:
        self._flush = flush
        self._max_batch = max_batch
        self._pending: list[tuple[T, asyncio.Future[None]]] = []
        self._runner: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> None:
        """Queue `item` and wait until the batch holding it is committed (or raise its error)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        # Each caller awaits its own future: a caller that goes away (client disconnect) cancels only
        # that future; the batch it joined still commits for everyone else (see _run's done() checks).
        await future

    async def _run(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:self._max_batch], self._pending[self._max_batch:]
            try:
                await self._flush([item for item, _ in batch])
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)

    async def drain(self) -> None:
        """Wait for every queued write (before closing the connection)."""
        while self._runner is not None and not self._runner.done():
            await self._runner
