"""SQLite's small writes (job outcomes, received callbacks) and claims are committed on the event loop's own
thread (relay.store.sqlite.SQLiteStore._tx_on_loop). What that must never cost: the loop waiting on another
process's lock or on the writer's thread, a write lost or half-done, or the one writer connection left inside
a transaction."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from relay import ids
from relay.clock import ManualClock
from relay.jobs.callback import CALLBACK_JOB, callback_job
from relay.models import Task
from relay.store.sqlite import LOOP_WRITE_BYTES, SQLiteStore, _utf8_bound
from tests.harness import wait_for

STALL_LIMIT = 2.0      # seconds the loop may go without a turn; a busy handler on it would sleep 10 s


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "relay.db")
    await store.open()
    yield store
    await store.close()


async def _task(store: SQLiteStore, clock: ManualClock) -> Task:
    now = clock.now()
    task = Task(id=ids.new_id("tsk", now), provider="evolink", request={"prompt": "p", "n": 1}, created_at=now,
                updated_at=now)
    await store.create_task(task, [])
    return task


def _callback_jobs(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as other:
        return int(other.execute("SELECT count(*) FROM jobs WHERE kind = ?", (CALLBACK_JOB,)).fetchone()[0])


async def _receive(store: SQLiteStore, task: Task, clock: ManualClock) -> None:
    await store.receive_callback(callback_job("evolink", task.id, '{"status": "pending"}', clock.now()))


async def _claim(store: SQLiteStore, task: Task, clock: ManualClock) -> None:
    claimed = await store.claim(clock.now(), limit=32, lease_seconds=60)
    assert [job.kind for job in claimed] == [CALLBACK_JOB]


Work = Callable[[SQLiteStore, Task, ManualClock], Awaitable[None]]


class LoopWatch:
    """Counts the loop's turns and keeps the longest gap between two: a loop blocked shows as a long gap."""

    def __init__(self) -> None:
        self.ticks = 0
        self.longest_gap = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            self.ticks, self.longest_gap, last = self.ticks + 1, max(self.longest_gap, now - last), now

    async def __aenter__(self) -> LoopWatch:
        self._task = asyncio.create_task(self._tick())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def turns(self, n: int, what: str) -> None:
        start = self.ticks
        await wait_for(lambda: self.ticks >= start + n, timeout=10, what=what)


@contextlib.contextmanager
def _write_lock_held(path: Path) -> Iterator[sqlite3.Connection]:
    """Another process's write transaction on the database, open until the caller COMMITs it."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        yield other


@contextlib.asynccontextmanager
async def _writers_thread_held(store: SQLiteStore) -> AsyncIterator[None]:
    """The writer's thread busy (on purpose, outside the store's lock) until the block ends."""
    assert store._writer is not None
    release = threading.Event()
    held = asyncio.ensure_future(store._writer._execute(release.wait, 10))  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        release.set()
        await held


async def _done_once_released(other: sqlite3.Connection, loop: LoopWatch, work: Awaitable[None]) -> None:
    """`work` waits while `other` holds the write lock (the loop running meanwhile), and ends once it is released."""
    done = asyncio.ensure_future(work)
    await loop.turns(20, "the loop to run while the work waits for the lock")
    assert not done.done(), "nothing can commit while another connection holds the write lock"
    other.execute("COMMIT")
    await asyncio.wait_for(done, timeout=15)


@pytest.mark.parametrize("work", [_receive, _claim], ids=["small write", "claim"])
async def test_work_on_the_loop_does_not_go_through_the_writers_thread(
        sqlite_store: SQLiteStore, clock: ManualClock, work: Work) -> None:
    """With the writer's thread busy (here: held on purpose, outside the store's lock), a callback is still
    recorded and jobs still claimed: that work runs on the loop's own thread, not queued behind the thread."""
    task = await _task(sqlite_store, clock)
    if work is _claim:
        await _receive(sqlite_store, task, clock)
    async with _writers_thread_held(sqlite_store):
        await asyncio.wait_for(work(sqlite_store, task, clock), timeout=5)


@pytest.mark.parametrize("work", [_receive, _claim], ids=["small write", "claim"])
async def test_work_on_the_loop_waits_off_it_while_another_process_holds_the_write_lock(
        sqlite_store: SQLiteStore, clock: ManualClock, tmp_path: Path, work: Work) -> None:
    """`relay retention` beside the server holds the write lock: a callback is recorded (or jobs claimed) once
    the lock is free, and the event loop keeps running meanwhile (on the loop's thread, SQLite's busy handler
    would have slept the whole loop until the lock came free or busy_timeout ran out)."""
    task = await _task(sqlite_store, clock)
    if work is _claim:
        await _receive(sqlite_store, task, clock)
    with _write_lock_held(tmp_path / "relay.db") as other:
        async with LoopWatch() as loop:
            await _done_once_released(other, loop, work(sqlite_store, task, clock))
        assert loop.longest_gap < STALL_LIMIT
    assert _callback_jobs(tmp_path / "relay.db") == 1


async def test_a_cancelled_transaction_keeps_the_writer_until_its_thread_is_done(
        sqlite_store: SQLiteStore, clock: ManualClock, tmp_path: Path) -> None:
    """A transaction waiting on the writer's thread for another process's lock is cancelled (a job's timeout,
    shutdown): its thread still holds the connection, so a small write after it must wait for the thread
    without blocking the loop, and then succeed (it must not run on the connection meanwhile: the loop would
    sleep in the thread's busy wait, or BEGIN inside the thread's transaction)."""
    task = await _task(sqlite_store, clock)
    with _write_lock_held(tmp_path / "relay.db") as other:
        async with LoopWatch() as loop:
            waiting = asyncio.create_task(_task(sqlite_store, clock))      # on the writer's thread, waiting
            await wait_for(sqlite_store._lock.locked, timeout=10, what="the transaction to take the writer")
            await loop.turns(5, "the transaction to reach the writer's thread")
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            await _done_once_released(other, loop, _receive(sqlite_store, task, clock))
        assert loop.longest_gap < STALL_LIMIT
    assert _callback_jobs(tmp_path / "relay.db") == 1


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


async def test_a_commit_that_fails_is_rolled_back(sqlite_store: SQLiteStore, clock: ManualClock,
                                                  tmp_path: Path) -> None:
    """A COMMIT can fail and leave SQLite's transaction open (here: a deferred foreign key checked at COMMIT).
    The batch is rolled back, so the one writer connection is not left inside a transaction, where every
    later BEGIN would fail."""
    with contextlib.closing(sqlite3.connect(tmp_path / "relay.db", isolation_level=None)) as other:
        other.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
        other.execute("CREATE TABLE child (parent_id INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)")
    with pytest.raises(sqlite3.IntegrityError):
        await sqlite_store._write("INSERT INTO child VALUES (?)", (42,))
    task = await _task(sqlite_store, clock)
    await _receive(sqlite_store, task, clock)
    assert _callback_jobs(tmp_path / "relay.db") == 1
    with contextlib.closing(sqlite3.connect(tmp_path / "relay.db")) as other:
        assert other.execute("SELECT count(*) FROM child").fetchone()[0] == 0


async def test_a_batch_of_large_values_goes_to_the_writers_thread(
        sqlite_store: SQLiteStore, clock: ManualClock, tmp_path: Path) -> None:
    """Callback bodies of a megabyte are not copied on the loop's thread: with the writer's thread held, such a
    write waits for it (a small one does not: the first test), and is committed once the thread is free."""
    task = await _task(sqlite_store, clock)
    async with _writers_thread_held(sqlite_store):
        large = asyncio.create_task(sqlite_store.receive_callback(
            callback_job("evolink", task.id, '{"status": "' + "x" * 1_000_000 + '"}', clock.now())))
        async with LoopWatch() as loop:
            await loop.turns(20, "the loop to run while the large write waits for the writer's thread")
        assert not large.done()
    await asyncio.wait_for(large, timeout=10)
    assert _callback_jobs(tmp_path / "relay.db") == 1


async def test_small_writes_and_claims_go_ahead_of_queued_thread_transactions(
        sqlite_store: SQLiteStore, clock: ManualClock) -> None:
    """A claim and a callback's write do not wait behind every transaction queued for the writer's thread
    (relay.store.writerlock): with one transaction running there and three queued, the claim goes first, then
    one queued transaction, then the write, then the other two."""
    task = await _task(sqlite_store, clock)
    await _receive(sqlite_store, task, clock)          # a job for the claim to find
    order: list[str] = []
    running, release = threading.Event(), threading.Event()

    def transaction(name: str, block: bool = False) -> Callable[..., Awaitable[None]]:
        async def body(tx: object) -> None:
            order.append(name)
            if block:
                running.set()
                release.wait(10)
        return body

    async def claim() -> None:
        await _claim(sqlite_store, task, clock)
        order.append("claim")

    async def small_write() -> None:
        await _receive(sqlite_store, task, clock)
        order.append("small write")

    lock = sqlite_store._lock
    try:
        first = asyncio.ensure_future(sqlite_store.transact(transaction("running", block=True)))
        await wait_for(running.is_set, 10, "the first transaction to run on the writer's thread")
        queued = [asyncio.ensure_future(sqlite_store.transact(transaction(f"queued{i}"))) for i in range(3)]
        await wait_for(lambda: lock.waiting() == 3, 10, "three transactions to queue")
        ahead = [asyncio.ensure_future(claim())]
        await wait_for(lambda: lock.waiting() == 4, 10, "the claim to queue")
        ahead.append(asyncio.ensure_future(small_write()))
        await wait_for(lambda: lock.waiting() == 5, 10, "the small write to queue")
    finally:
        release.set()
    await asyncio.wait_for(asyncio.gather(first, *queued, *ahead), 15)
    assert order == ["running", "claim", "queued0", "small write", "queued1", "queued2"]


@contextlib.asynccontextmanager
async def reader_thread_stuck(store: SQLiteStore) -> AsyncIterator[threading.Event]:
    """Hold the read connection's thread busy until the event is set (or the block ends)."""
    assert store._reader is not None
    release, holding = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        release.wait(30)
    stuck = asyncio.ensure_future(store._reader._execute(hold))
    try:
        await wait_for(holding.is_set, 5, "the reader's thread to be held")
        yield release
    finally:
        release.set()
        await asyncio.wait_for(stuck, 5)


async def test_key_reads_are_served_on_the_loop_without_the_readers_thread(sqlite_store: SQLiteStore,
                                                                           clock: ManualClock) -> None:
    """The reads every job starts with (a task without images, a delivery's send target) need no hop to the
    reader's thread: they are answered while that thread is busy, and see what was committed just before."""
    task = await _task(sqlite_store, clock)
    async with reader_thread_stuck(sqlite_store):
        found = await asyncio.wait_for(sqlite_store.get_task(task.id, images=False), 5)
        assert found is not None and found.id == task.id
        assert await asyncio.wait_for(sqlite_store.load_send_target("dlv_unknown"), 5) is None
        other = await _task(sqlite_store, clock)        # written on the writer's thread, read at once here
        assert (await asyncio.wait_for(sqlite_store.get_task(other.id, images=False), 5)) is not None


class _Busy:
    """A connection whose every statement meets another connection's lock (SQLITE_BUSY)."""

    def execute(self, *_: object) -> None:
        exc = sqlite3.OperationalError("database is locked")
        exc.sqlite_errorcode = sqlite3.SQLITE_BUSY
        raise exc


async def test_a_key_read_meeting_a_lock_goes_through_the_readers_thread(sqlite_store: SQLiteStore,
                                                                         clock: ManualClock) -> None:
    """A lock on the loop's key reader (a WAL being recovered) is never waited out on the loop: the read goes
    through the reader's thread instead and returns the row; any other error is raised."""
    task = await _task(sqlite_store, clock)
    assert sqlite_store._key_reader is not None
    real = sqlite_store._key_reader._connection
    sqlite_store._key_reader._connection = _Busy()  # type: ignore[assignment]
    try:
        found = await sqlite_store.get_task(task.id, images=False)
        assert found is not None and found.id == task.id
        async with reader_thread_stuck(sqlite_store) as release:    # so it really waits for that thread
            waiting = asyncio.ensure_future(sqlite_store.get_task(task.id, images=False))
            for _ in range(5):      # a read answered on the loop would be done after one turn
                await asyncio.sleep(0)
            assert not waiting.done()
            release.set()
            assert (await asyncio.wait_for(waiting, 5)) is not None
    finally:
        sqlite_store._key_reader._connection = real


class _Broken:
    def execute(self, *_: object) -> None:
        exc = sqlite3.OperationalError("disk I/O error")
        exc.sqlite_errorcode = sqlite3.SQLITE_IOERR
        raise exc


async def test_a_key_read_meeting_another_error_raises_it(sqlite_store: SQLiteStore, clock: ManualClock) -> None:
    task = await _task(sqlite_store, clock)
    assert sqlite_store._key_reader is not None
    real = sqlite_store._key_reader._connection
    sqlite_store._key_reader._connection = _Broken()  # type: ignore[assignment]
    try:
        with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
            await sqlite_store.get_task(task.id, images=False)
    finally:
        sqlite_store._key_reader._connection = real


async def test_a_large_write_of_non_ascii_text_goes_to_the_writers_thread(
        sqlite_store: SQLiteStore, clock: ManualClock) -> None:
    """A callback body of 100,000 CJK characters is 300 KB of UTF-8 (stored as such, relay.jsontext): over
    LOOP_WRITE_BYTES, so it is copied on the writer's thread, not on the loop, though its len() is under it."""
    assert _utf8_bound(("é" * 10, "e" * 10, b"\xff" * 10, 12345, 1.5, None)) == 40 + 10 + 10
    task = await _task(sqlite_store, clock)
    body = '{"status": "pending", "note": "%s"}' % ("雨" * 100_000)
    assert len(body) < LOOP_WRITE_BYTES < len(body.encode())
    async with LoopWatch() as loop:
        async with _writers_thread_held(sqlite_store):
            receiving = asyncio.ensure_future(
                sqlite_store.receive_callback(callback_job("evolink", task.id, body, clock.now())))
            await loop.turns(20, "the loop to run while the write waits for the writer's thread")
            assert not receiving.done(), "a write this large must wait for the writer's thread, not run on the loop"
        await asyncio.wait_for(receiving, timeout=15)
    assert _callback_jobs(Path(sqlite_store.path)) == 1
