"""relay.store.writerlock: short work goes ahead of queued long work, never twice in a row while long work
waits; hand-over is direct; cancelled waiters neither hold nor lose the lock."""

from __future__ import annotations

import asyncio

import pytest

from relay.store.writerlock import WriterLock
from tests.harness import wait_for


async def _queue(lock: WriterLock, order: list[str], name: str, *, short: bool) -> asyncio.Task[None]:
    """A waiter that records its turn and releases at once; returned once it is queued."""
    async def take() -> None:
        await lock.acquire(short=short)
        order.append(name)
        lock.release()
    queued = lock.waiting()
    task = asyncio.create_task(take())
    await wait_for(lambda: lock.waiting() > queued, 5, f"{name} to queue")
    return task


async def test_short_work_goes_ahead_of_queued_long_work_but_not_twice_in_a_row() -> None:
    lock, order = WriterLock(), list[str]()
    await lock.acquire()                                   # a long transaction holds the writer
    waiters = [await _queue(lock, order, f"long{i}", short=False) for i in range(3)]
    waiters += [await _queue(lock, order, f"short{i}", short=True) for i in range(3)]
    lock.release()
    await asyncio.wait_for(asyncio.gather(*waiters), 5)
    # short0 jumps the three queued transactions; after it a transaction; then short, long, short, long.
    assert order == ["short0", "long0", "short1", "long1", "short2", "long2"]
    assert not lock.locked()


async def test_each_kind_is_first_come_first_served_and_short_alone_goes_in_order() -> None:
    lock, order = WriterLock(), list[str]()
    await lock.acquire(short=True)
    waiters = [await _queue(lock, order, f"short{i}", short=True) for i in range(4)]
    lock.release()
    await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert order == ["short0", "short1", "short2", "short3"]   # no long work waits: short after short is fine


async def test_a_stream_of_short_work_cannot_starve_a_transaction() -> None:
    """Short work queueing again as soon as it is done (a group commit's backlog, claim loops): queued
    transactions still get every other turn."""
    lock, order = WriterLock(), list[str]()
    stop = asyncio.Event()

    async def short_loop(name: str) -> None:
        while not stop.is_set():
            await lock.acquire(short=True)
            order.append(name)
            lock.release()

    await lock.acquire(short=True)
    loops = [asyncio.create_task(short_loop(f"s{i}")) for i in range(4)]
    await wait_for(lambda: lock.waiting() == 4, 5, "the short loops to queue")
    longs = [await _queue(lock, order, f"long{i}", short=False) for i in range(3)]
    lock.release()
    await asyncio.wait_for(asyncio.gather(*longs), 5)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*loops), 5)
    turns = [order.index(f"long{i}") for i in range(3)]
    assert turns == [0, 2, 4], order          # after the short holder: long, short, long, short, long


async def test_a_waiter_cancelled_as_it_is_handed_the_lock_keeps_the_alternation() -> None:
    """The lock handed to a waiter that is cancelled before it runs goes on as its previous holder would have
    passed it: after short work, to queued long work, not to more short work."""
    lock, order = WriterLock(), list[str]()
    await lock.acquire(short=True)
    ghost = asyncio.create_task(lock.acquire())
    await wait_for(lambda: lock.waiting() == 1, 5, "the doomed waiter to queue")
    waiters = [await _queue(lock, order, "long", short=False), await _queue(lock, order, "short", short=True)]
    lock.release()                        # to the ghost (long), which is cancelled before it runs
    ghost.cancel()
    with pytest.raises(asyncio.CancelledError):
        await ghost
    await asyncio.wait_for(asyncio.gather(*waiters), 5)
    # The last holder that ran was short: a long one goes next, as if the ghost had never queued.
    assert order == ["long", "short"]


def test_releasing_a_lock_not_held_is_an_error() -> None:
    with pytest.raises(RuntimeError):
        WriterLock().release()


async def test_the_lock_is_handed_over_directly() -> None:
    """Released with a waiter queued, the lock stays locked, now the waiter's: an acquire made before the
    waiter has run finds it locked and queues instead of slipping in."""
    lock, order = WriterLock(), list[str]()
    await lock.acquire()
    waiter = await _queue(lock, order, "queued", short=False)
    lock.release()
    assert lock.locked() and lock.waiting() == 0           # the waiter's now, though it has not run yet
    await asyncio.wait_for(waiter, 5)
    assert order == ["queued"] and not lock.locked()


async def test_cancelled_waiters_neither_hold_nor_lose_the_lock() -> None:
    lock, order = WriterLock(), list[str]()
    await lock.acquire()
    gone = asyncio.create_task(lock.acquire(short=True))
    await wait_for(lambda: lock.waiting() == 1, 5, "the waiter to queue")
    gone.cancel()                                          # cancelled while queued
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert lock.waiting() == 0

    handed = asyncio.create_task(lock.acquire())
    await wait_for(lambda: lock.waiting() == 1, 5, "the second waiter to queue")
    after = await _queue(lock, order, "after", short=False)
    lock.release()                                         # handed to `handed`...
    handed.cancel()                                        # ...which is cancelled before it runs: it passes it on
    with pytest.raises(asyncio.CancelledError):
        await handed
    await asyncio.wait_for(after, 5)
    assert order == ["after"] and not lock.locked()
