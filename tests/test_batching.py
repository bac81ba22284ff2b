"""Group commit: concurrent writes share flushes, each caller waits for its own, errors reach every caller."""

from __future__ import annotations

import asyncio

import pytest

from relay.store.batching import GroupCommit


async def test_concurrent_writes_share_flushes() -> None:
    """100 concurrent submits are written in far fewer flushes, and every item is written once."""
    flushed: list[list[int]] = []

    async def flush(batch: list[int]) -> None:
        await asyncio.sleep(0)     # the commit takes a moment; more writes queue meanwhile
        flushed.append(batch)

    group: GroupCommit[int] = GroupCommit(flush)
    await asyncio.gather(*(group.submit(i) for i in range(100)))
    assert sorted(i for batch in flushed for i in batch) == list(range(100))
    assert len(flushed) <= 3


async def test_a_lone_write_is_flushed_at_once() -> None:
    """With nothing else pending a write commits alone, without waiting for company."""
    flushed: list[list[str]] = []

    async def flush(batch: list[str]) -> None:
        flushed.append(batch)

    group: GroupCommit[str] = GroupCommit(flush)
    await asyncio.wait_for(group.submit("a"), timeout=1)
    assert flushed == [["a"]]


async def test_a_failed_flush_fails_every_caller_in_it() -> None:
    """If the transaction fails, each caller in that batch sees the error (nothing is acknowledged)."""
    async def flush(batch: list[int]) -> None:
        raise RuntimeError("disk full")

    group: GroupCommit[int] = GroupCommit(flush)
    results = await asyncio.gather(*(group.submit(i) for i in range(5)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    with pytest.raises(RuntimeError):
        await group.submit(9)
