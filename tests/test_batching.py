"""Group commit: concurrent writes share flushes, each caller waits for its own, errors reach every caller."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from relay.store.batching import GroupCommit


async def test_concurrent_writes_share_flushes() -> None:
    """100 concurrent submits are written in far fewer flushes, and every item is written once."""
    flushed: list[list[int]] = []

    async def flush(take: Callable[[], list[int]]) -> None:
        batch = take()
        await asyncio.sleep(0)     # the commit takes a moment; more writes queue meanwhile
        flushed.append(batch)

    group: GroupCommit[int] = GroupCommit(flush)
    await asyncio.gather(*(group.submit(i) for i in range(100)))
    assert sorted(i for batch in flushed for i in batch) == list(range(100))
    assert len(flushed) <= 3


async def test_a_lone_write_is_flushed_at_once() -> None:
    """With nothing else pending a write commits alone, without waiting for company."""
    flushed: list[list[str]] = []

    async def flush(take: Callable[[], list[str]]) -> None:
        flushed.append(take())

    group: GroupCommit[str] = GroupCommit(flush)
    await asyncio.wait_for(group.submit("a"), timeout=5)
    assert flushed == [["a"]]


async def test_a_failed_flush_fails_every_caller_in_it() -> None:
    """If the transaction fails, each caller in that batch sees the error (nothing is acknowledged)."""
    async def flush(take: Callable[[], list[int]]) -> None:
        raise RuntimeError("disk full")

    group: GroupCommit[int] = GroupCommit(flush)
    results = await asyncio.gather(*(group.submit(i) for i in range(5)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    with pytest.raises(RuntimeError):
        await group.submit(9)


async def test_a_group_commit_cancelled_with_the_loop_leaves_no_caller_waiting() -> None:
    """The runner cancelled mid-flush (the loop torn down at shutdown): the callers in its batch and those queued
    behind it are told the store is closing, not left waiting forever, and none is told its write was made."""
    started = asyncio.Event()

    async def flush(take: Callable[[], list[int]]) -> None:
        take()
        started.set()
        await asyncio.Event().wait()        # a commit that never ends

    group: GroupCommit[int] = GroupCommit(flush, max_batch=2)
    callers = [asyncio.ensure_future(group.submit(i)) for i in range(5)]
    await asyncio.wait_for(started.wait(), 5)
    assert group._runner is not None
    group._runner.cancel()
    results = await asyncio.wait_for(asyncio.gather(*callers, return_exceptions=True), 5)
    assert all(isinstance(r, RuntimeError) and "store closing" in str(r) for r in results), results


async def test_a_caller_that_goes_away_does_not_cancel_the_others_commit() -> None:
    """One caller cancelled while its batch is being committed: the batch still commits for the others."""
    started, release = asyncio.Event(), asyncio.Event()
    flushed: list[list[int]] = []

    async def flush(take: Callable[[], list[int]]) -> None:
        batch = take()
        started.set()
        await release.wait()
        flushed.append(batch)

    group: GroupCommit[int] = GroupCommit(flush)
    first = asyncio.create_task(group.submit(0))
    await asyncio.wait_for(started.wait(), timeout=5)             # batch [0] is being committed
    others = [asyncio.create_task(group.submit(i)) for i in (1, 2)]
    leaving = asyncio.create_task(group.submit(3))
    await asyncio.sleep(0)
    leaving.cancel()                                               # its client disconnected
    release.set()
    await asyncio.wait_for(asyncio.gather(first, *others), timeout=5)
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert flushed[0] == [0] and {1, 2} <= set(flushed[1])


async def test_writes_that_come_while_a_flush_waits_to_write_join_it() -> None:
    """The batch is taken when the flush is ready to write (its connection or the writer's lock held): writes
    submitted while it waited for that are committed with it, not a whole commit later."""
    ready, flushed = asyncio.Event(), []
    waiting = asyncio.Event()

    async def flush(take: Callable[[], list[int]]) -> None:
        waiting.set()
        await ready.wait()          # e.g. the writer's lock, held by another transaction
        flushed.append(take())

    group: GroupCommit[int] = GroupCommit(flush)
    first = asyncio.create_task(group.submit(0))
    await asyncio.wait_for(waiting.wait(), timeout=5)
    later = [asyncio.create_task(group.submit(i)) for i in (1, 2, 3)]
    await asyncio.sleep(0)
    ready.set()
    await asyncio.wait_for(asyncio.gather(first, *later), timeout=5)
    assert flushed == [[0, 1, 2, 3]]

async def test_a_flush_that_returns_without_taking_its_batch_fails_it() -> None:
    """Nothing is acknowledged that no flush took (and so wrote): its callers get an error instead."""
    async def flush(take: Callable[[], list[int]]) -> None:
        return None

    group: GroupCommit[int] = GroupCommit(flush)
    with pytest.raises(RuntimeError, match="without taking"):
        await asyncio.wait_for(group.submit(1), timeout=5)

# ---- shared transactions -------------------------------------------------------------------------------
from relay.store.batching import SharedTransactions  # noqa: E402
from relay.store.tx import Tx  # noqa: E402
from tests.harness import wait_for  # noqa: E402


class Recording:
    """A fake transact over a list "table": a transaction's writes land only if it commits (body returns)."""

    def __init__(self) -> None:
        self.table: list[str] = []
        self.transactions = 0

    async def transact(self, body: object) -> object:
        self.transactions += 1
        staged: list[str] = []

        class StagedTx:
            async def run(self, sql: str, args: object = ()) -> int:
                staged.append(sql)
                return 1
        await asyncio.sleep(0)               # the commit takes a moment: others queue meanwhile
        result = await body(StagedTx())       # type: ignore[operator]
        self.table.extend(staged)
        return result


async def test_shared_transactions_share_commits_and_give_each_caller_its_result() -> None:
    db = Recording()
    shared = SharedTransactions(db.transact)   # type: ignore[arg-type]

    def writer(i: int) -> object:
        async def body(tx: Tx) -> int:
            await tx.run(f"row {i}")
            return i * 10
        return body
    results = await asyncio.gather(*(shared.run(writer(i)) for i in range(40)))   # type: ignore[arg-type]
    assert results == [i * 10 for i in range(40)]
    assert sorted(db.table) == sorted(f"row {i}" for i in range(40))
    assert db.transactions <= 4


async def test_one_failing_body_fails_only_its_caller() -> None:
    """The batch is rolled back and every body runs again alone: the others commit, once each."""
    db = Recording()
    shared = SharedTransactions(db.transact)   # type: ignore[arg-type]

    def writer(i: int) -> object:
        async def body(tx: Tx) -> int:
            await tx.run(f"row {i}")
            if i == 3:
                raise ValueError("no")
            return i
        return body
    results = await asyncio.gather(*(shared.run(writer(i)) for i in range(8)),  # type: ignore[arg-type]
                                   return_exceptions=True)
    assert [r for r in results if isinstance(r, ValueError)] and results[:3] == [0, 1, 2] and results[4:] == [4, 5, 6, 7]
    assert sorted(db.table) == sorted(f"row {i}" for i in range(8) if i != 3)


async def test_a_failed_commit_is_not_run_again() -> None:
    """A failure after every body ran (the commit: its outcome may be unknown) reaches every caller of the
    batch, and no body runs a second time (it may have committed)."""
    runs: list[int] = []

    async def transact(body: object) -> object:
        await asyncio.sleep(0)
        await body(None)           # type: ignore[operator]
        raise ConnectionError("connection lost during COMMIT")

    shared = SharedTransactions(transact)   # type: ignore[arg-type]

    def writer(i: int) -> object:
        async def body(tx: object) -> int:
            runs.append(i)
            return i
        return body
    first = asyncio.ensure_future(shared.run(writer(0)))     # alone (nothing else queued yet)
    await asyncio.sleep(0)
    results = await asyncio.gather(*(shared.run(writer(i)) for i in range(1, 6)),  # type: ignore[arg-type]
                                   return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    with pytest.raises(ConnectionError):
        await first
    assert sorted(runs) == [0, 1, 2, 3, 4, 5]


def writer(i: int) -> object:
    """A body writing row i and returning i."""
    async def body(tx: Tx) -> int:
        await tx.run(f"row {i}")
        return i
    return body


async def test_a_caller_gone_before_its_turn_is_left_out() -> None:
    db = Recording()
    shared = SharedTransactions(db.transact)   # type: ignore[arg-type]

    calls = [asyncio.ensure_future(shared.run(writer(i))) for i in range(4)]  # type: ignore[arg-type]
    await asyncio.sleep(0)
    calls[2].cancel()
    done = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(done[2], asyncio.CancelledError)
    await shared.drain()
    assert "row 2" not in db.table and len(db.table) == 3


async def test_a_caller_gone_while_its_batch_waits_for_the_writer_is_left_out() -> None:
    """The batch is formed, then waits for the writer; a caller cancelled meanwhile has no write committed."""
    db, gate = Recording(), asyncio.Event()

    async def transact_after_gate(body: object) -> object:
        await gate.wait()                    # the writer is busy: the batch is formed and waits
        return await db.transact(body)
    shared = SharedTransactions(transact_after_gate)   # type: ignore[arg-type]

    calls = [asyncio.ensure_future(shared.run(writer(i))) for i in range(4)]  # type: ignore[arg-type]
    # All four queue in one turn, then the runner takes them as one batch and waits at the gate.
    await wait_for(lambda: shared._runner is not None and not shared._pending, 5, "the batch to form")
    calls[2].cancel()
    gate.set()
    done = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
    assert isinstance(done[2], asyncio.CancelledError) and done[:2] == [0, 1] and done[3] == 3
    await shared.drain()
    assert sorted(db.table) == ["row 0", "row 1", "row 3"]
