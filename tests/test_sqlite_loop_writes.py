"""SQLite's small writes (job outcomes, received callbacks) and claims are committed on the event loop's own
thread (relay.store.sqlite.SQLiteStore._tx_on_loop). What that must never cost: the loop waiting on another
process's lock, a write lost or half-done, or the one writer connection left inside a transaction."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from relay import ids
from relay.clock import ManualClock
from relay.jobs.callback import CALLBACK_JOB, callback_job
from relay.models import Task
from relay.store.sqlite import SQLiteStore
from tests.harness import wait_for


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> SQLiteStore:
    store = SQLiteStore(tmp_path / "relay.db")
    await store.open()
    yield store  # type: ignore[misc]
    await store.close()


async def _task(store: SQLiteStore, clock: ManualClock) -> Task:
    now = clock.now()
    task = Task(id=ids.new_id("tsk", now), provider="evolink", request={"prompt": "p", "n": 1}, created_at=now,
                updated_at=now)
    await store.create_task(task, [])
    return task


def _callback_jobs(path: Path) -> int:
    with sqlite3.connect(path) as other:
        return int(other.execute("SELECT count(*) FROM jobs WHERE kind = ?", (CALLBACK_JOB,)).fetchone()[0])


async def _receive(store: SQLiteStore, task: Task, clock: ManualClock) -> None:
    await store.receive_callback(callback_job("evolink", task.id, '{"status": "pending"}', clock.now()))


async def _claim(store: SQLiteStore, task: Task, clock: ManualClock) -> None:
    claimed = await store.claim(clock.now(), limit=32, lease_seconds=60)
    assert [job.kind for job in claimed] == [CALLBACK_JOB]


@pytest.mark.parametrize("work", [_receive, _claim], ids=["small write", "claim"])
async def test_work_on_the_loop_waits_off_it_while_another_process_holds_the_write_lock(
        sqlite_store: SQLiteStore, clock: ManualClock, tmp_path: Path,
        work: Callable[[SQLiteStore, Task, ManualClock], Awaitable[None]]) -> None:
    """`relay retention` beside the server holds the write lock: a callback is recorded (or jobs claimed) once
    the lock is free, and the event loop keeps running meanwhile (on the loop's thread, SQLite's busy handler
    would have slept the whole loop until the lock came free or busy_timeout ran out)."""
    task = await _task(sqlite_store, clock)
    if work is _claim:
        await _receive(sqlite_store, task, clock)
    before = _callback_jobs(tmp_path / "relay.db")
    other = sqlite3.connect(tmp_path / "relay.db", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")          # another process's write transaction, open
        write = asyncio.create_task(work(sqlite_store, task, clock))
        ticks = 0

        async def ticking() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)
        ticker = asyncio.create_task(ticking())
        await wait_for(lambda: ticks >= 20, timeout=10, what="the loop to run while the write waits for the lock")
        ticker.cancel()
        assert not write.done(), "the write cannot have committed while another connection holds the write lock"
        other.execute("COMMIT")
        await asyncio.wait_for(write, timeout=10)
    finally:
        other.close()
    assert _callback_jobs(tmp_path / "relay.db") == (before if work is _claim else 1)


async def test_a_failed_batch_of_small_writes_leaves_the_writer_usable(
        sqlite_store: SQLiteStore, clock: ManualClock, tmp_path: Path) -> None:
    """A write that fails (the same callback job recorded twice: its id is taken) fails its caller, commits
    nothing of its batch, and the next writes and transactions go through."""
    task = await _task(sqlite_store, clock)
    job = callback_job("evolink", task.id, '{"status": "pending"}', clock.now())
    await sqlite_store.receive_callback(job)
    with pytest.raises(sqlite3.IntegrityError):
        await sqlite_store.receive_callback(job)
    await sqlite_store.receive_callback(callback_job("evolink", task.id, '{"status": "done"}', clock.now()))
    await _task(sqlite_store, clock)                          # a whole transaction on the writer's thread
    assert _callback_jobs(tmp_path / "relay.db") == 2
