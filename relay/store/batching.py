"""Group commit: many concurrent small writes share one transaction.

While one batch is being committed, new writes queue up; the next commit takes
them all. Under light load a write commits alone at once (no added delay);
under heavy load the cost of a commit is shared by everyone who arrived during
the previous one. Each caller returns only after its own write is durable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from relay.store.tx import Tx

T = TypeVar("T")


class GroupCommit(Generic[T]):
    def __init__(self, flush: Callable[[Callable[[], list[T]]], Awaitable[None]], max_batch: int = 512) -> None:
        """`flush(take)` commits the batch `take()` returns. It calls take once, when it is ready to write (its
        connection or the writer's lock held), so writes that arrived while it waited for that join this commit
        rather than wait for a whole commit more."""
        self._flush = flush
        self._max_batch = max_batch
        self._pending: list[tuple[T, asyncio.Future[None]]] = []
        self._runner: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> None:
        """Queue `item` and wait until the batch holding it is committed (or raise its error)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        self._run_soon()
        # Each caller awaits its own future: a caller that goes away (client disconnect) cancels only
        # that future; the batch it joined still commits for everyone else (see _run's done() checks).
        await future

    async def submit_many(self, items: list[T]) -> None:
        """`submit` for several items at once (one caller's writes): returns when every one is committed."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        self._pending.extend(zip(items, futures, strict=True))
        self._run_soon()
        await asyncio.gather(*futures)

    def _run_soon(self) -> None:
        """Start committing what is pending, unless a run is under way (it takes what is queued meanwhile)."""
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())

    async def _run(self) -> None:
        batch: list[tuple[T, asyncio.Future[None]]] = []
        try:
            while self._pending:
                take, batch = self._round()
                try:
                    await self._flush(take)
                    if not batch:   # a flush must write what it takes: acknowledging what it never took would lose it
                        take()
                        raise RuntimeError("a group commit's flush returned without taking its batch")
                except Exception as exc:
                    take()          # failed before taking: what it would have written fails with it
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                else:
                    for _, future in batch:
                        if not future.done():
                            future.set_result(None)
                if self._pending:
                    # A flush may not suspend at all (SQLite's runs on the loop's thread): let the loop serve
                    # others between the batches of a backlog.
                    await asyncio.sleep(0)
        except BaseException:       # cancelled with the loop: nobody may wait forever (nor be told "written")
            for _, future in [*batch, *self._pending]:
                if not future.done():
                    future.set_exception(RuntimeError("store closing"))
            self._pending = []
            raise

    def _round(self) -> tuple[Callable[[], list[T]], list[tuple[T, asyncio.Future[None]]]]:
        """One round's take() and the batch it fills (its own list: a take kept past its round takes nothing)."""
        batch: list[tuple[T, asyncio.Future[None]]] = []
        taken = False

        def take() -> list[T]:
            nonlocal taken
            if not taken:
                taken = True
                batch.extend(self._pending[:self._max_batch])
                del self._pending[:len(batch)]
            return [item for item, _ in batch]
        return take, batch

    async def drain(self) -> None:
        """Wait for every queued write (before closing the connection)."""
        while self._runner is not None and not self._runner.done():
            await self._runner


Body = Callable[[Tx], Awaitable[Any]]


class SharedTransactions:
    """Group commit for whole transaction bodies: bodies that arrive while a transaction is being committed
    run together in the next one, each in its turn, and share its commit.

    One body failing (its own error, a lost race) must not fail the others: the batch is then rolled back as
    a whole and every body runs again alone, in a transaction of its own, so each caller gets what a
    transaction of its own would have given it. Bodies may therefore run more than once (as PostgreSQL's
    retried transactions already may): they must only write through their Tx. A failure after every body
    ran (the commit itself: its outcome may be unknown, a lost connection) is not rerun: every caller of
    the batch gets it, as a lone transaction's caller would. A caller gone before its turn (cancelled) is
    left out. Under light load a body runs alone at once (no added delay).
    """

    def __init__(self, transact: Callable[[Body], Awaitable[Any]], max_batch: int = 32) -> None:
        self._transact = transact
        self._max_batch = max_batch
        self._pending: list[tuple[Body, asyncio.Future[Any]]] = []
        self._runner: asyncio.Task[None] | None = None

    async def run(self, body: Callable[[Tx], Awaitable[T]]) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((body, future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        batch: list[tuple[Body, asyncio.Future[Any]]] = []
        try:
            while self._pending:
                batch = [(body, future) for body, future in self._pending[:self._max_batch] if not future.done()]
                self._pending = self._pending[self._max_batch:]
                if len(batch) > 1 and await self._together(batch):
                    continue
                for body, future in batch:
                    await self._alone(body, future)
        except BaseException as exc:       # cancelled with the loop: nobody may wait forever
            for _, future in [*batch, *self._pending]:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("store closing"))
            self._pending = []
            raise

    async def _together(self, batch: list[tuple[Body, asyncio.Future[Any]]]) -> bool:
        """The batch in one transaction; False if a body failed (each is then run alone)."""
        ran_all = False

        async def all_of(tx: Tx) -> list[Any]:
            nonlocal ran_all
            ran_all = False
            # A caller gone while the batch waited for the writer (a job timed out or stopped at shutdown) is
            # left out here too: its body would commit what it never learns of (a submit marked as started).
            results = [None if future.done() else await body(tx) for body, future in batch]
            ran_all = True
            return results
        try:
            results = await self._transact(all_of)
        except Exception as exc:
            if not ran_all:
                return False
            for _, future in batch:      # the commit failed: as for a transaction of one's own
                if not future.done():
                    future.set_exception(exc)
            return True
        for (_, future), result in zip(batch, results):
            if not future.done():
                future.set_result(result)
        return True

    async def _alone(self, body: Body, future: asyncio.Future[Any]) -> None:
        if future.done():
            return
        try:
            result = await self._transact(body)
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
        else:
            if not future.done():
                future.set_result(result)

    async def drain(self) -> None:
        while self._runner is not None and not self._runner.done():
            await self._runner
