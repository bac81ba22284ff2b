"""PostgresStore when the server drops its connections (a restart, a failover, `pg_terminate_backend`).

Each test kills real backends from an admin connection and checks what the store promises
(relay/store/postgres.py, the module docstring):

- the LISTEN connection is opened again (capped backoff), the worker is woken when it is, and a job
  enqueued by another replica after that wakes this one at once; `ping()` fails while it is down;
- a claim, a read, or a transaction whose connection dies mid-statement (before its commit) is run once
  more on another connection and succeeds; nothing is written twice;
- pooled connections killed while idle are replaced: claims go on working.

Mid-statement is made certain, not hoped for: the admin connection holds an ACCESS EXCLUSIVE lock on the
table, the store's statement waits on it, the test kills the waiting backend, then lets the lock go.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from relay import ids
from relay.clock import ManualClock
from relay.models import Job
from relay.outage import Outage
from relay.store.postgres import PostgresStore
from tests.pg import admin_connection, fresh_database

TIMEOUT = 10.0       # seconds any awaited condition may take, at most


@pytest.fixture
async def dsn() -> AsyncIterator[str]:
    async with fresh_database() as found:
        yield found


@pytest.fixture
async def admin(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of the test's own to the test's database: it kills and locks, the stores under test don't."""
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def stores(dsn: str) -> AsyncIterator[Callable[[], Awaitable[PostgresStore]]]:
    opened: list[PostgresStore] = []

    async def open_one() -> PostgresStore:
        store = PostgresStore(dsn)
        await store.open()
        opened.append(store)
        return store
    try:
        yield open_one
    finally:
        for store in reversed(opened):
            await store.close()


def a_job(clock: ManualClock, kind: str = "poll") -> Job:
    return Job(id=ids.new_id("job", clock.now()), kind=kind, run_at=clock.now())


async def until(condition: Callable[[], bool]) -> None:
    """Wait (polling the loop, not sleeping a fixed time) until `condition()` holds, at most TIMEOUT."""
    async with asyncio.timeout(TIMEOUT):
        while not condition():
            await asyncio.sleep(0.005)


async def kill_waiting_backend(admin: asyncpg.Connection) -> int:
    """Terminate the one backend of this database waiting on a lock; its pid."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            pid = await admin.fetchval("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                                       "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()")
            if pid is not None:
                assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
                return int(pid)
            await asyncio.sleep(0.005)


async def killed_mid_statement(admin: asyncpg.Connection, table: str, call: Awaitable[Any]) -> Any:
    """Run `call` while `table` is locked; kill the backend `call` waits on; unlock; `call`'s result."""
    lock = admin.transaction()
    await lock.start()
    await admin.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
    running = asyncio.ensure_future(call)
    try:
        await kill_waiting_backend(admin)
    finally:
        await lock.rollback()
    async with asyncio.timeout(TIMEOUT):
        return await running


# ---- the LISTEN connection ---------------------------------------------------------------------------------
async def test_a_dropped_listen_connection_is_opened_again_and_wakes_the_worker(
        stores: Callable[[], Awaitable[PostgresStore]], admin: asyncpg.Connection, clock: ManualClock) -> None:
    """The server terminates replica A's LISTEN connection: A's ping() fails while it is down, A opens it
    again and wakes its worker (a notification may have been missed); then a job enqueued on replica B
    wakes A's worker at once again."""
    a, b = await stores(), await stores()
    woken = asyncio.Event()
    a.on_enqueue(woken.set)
    # Slow enough a first retry that the test sees the listener down (the default is 0.1 s).
    a.listen_outage = Outage("PostgreSQL LISTEN connection", logging.getLogger("test"), base=0.5, cap=0.5)
    assert a._listener is not None
    old = a._listener.get_server_pid()
    await a.ping()

    assert await admin.fetchval("SELECT pg_terminate_backend($1)", old)
    await until(lambda: a._listener is None)
    with pytest.raises(ConnectionError, match="LISTEN"):
        await a.ping()

    async with asyncio.timeout(TIMEOUT):
        await woken.wait()                       # woken by the reconnection itself
    assert a._listener is not None and a._listener.get_server_pid() != old
    await a.ping()

    woken.clear()
    await b.enqueue([a_job(clock)])
    async with asyncio.timeout(TIMEOUT):
        await woken.wait()                       # and by NOTIFY on the new connection


async def test_a_listen_connection_that_cannot_be_opened_is_tried_again_until_it_can(
        stores: Callable[[], Awaitable[PostgresStore]], admin: asyncpg.Connection, dsn: str,
        clock: ManualClock) -> None:
    """While the database refuses new connections the store keeps trying (backoff), then listens again."""
    a, b = await stores(), await stores()
    woken = asyncio.Event()
    a.on_enqueue(woken.set)
    a.listen_outage = Outage("PostgreSQL LISTEN connection", logging.getLogger("test"), base=0.05, cap=0.05)
    name = dsn.rsplit("/", 1)[1]
    root = await admin_connection()             # a database cannot refuse connections from inside itself
    try:
        await root.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        try:
            assert a._listener is not None
            await admin.fetchval("SELECT pg_terminate_backend($1)", a._listener.get_server_pid())
            await until(lambda: a.listen_outage.failures >= 3)      # refused, and refused again
            assert a._listener is None
        finally:
            await root.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    finally:
        await root.close()
    await until(lambda: a._listener is not None)
    await a.ping()
    woken.clear()
    await b.enqueue([a_job(clock)])
    async with asyncio.timeout(TIMEOUT):
        await woken.wait()


async def test_closing_the_store_does_not_open_the_listen_connection_again(
        stores: Callable[[], Awaitable[PostgresStore]]) -> None:
    """close() ends the LISTEN connection for good: no reconnection task is left behind."""
    a = await stores()
    await a.close()
    assert a._listener is None and a._listening is None


# ---- pooled connections -----------------------------------------------------------------------------------
async def test_a_claim_whose_connection_dies_mid_statement_is_run_again(
        stores: Callable[[], Awaitable[PostgresStore]], admin: asyncpg.Connection, clock: ManualClock) -> None:
    """The backend running a claim is terminated under it: the claim runs again on another connection and
    leases the jobs (once)."""
    store = await stores()
    await store.enqueue([a_job(clock) for _ in range(3)])
    claimed = await killed_mid_statement(admin, "jobs", store.claim(clock.now(), limit=10, lease_seconds=60))
    assert len(claimed) == 3
    assert await store.claim(clock.now(), limit=10, lease_seconds=60) == []


async def test_a_read_whose_connection_dies_mid_statement_is_run_again(
        stores: Callable[[], Awaitable[PostgresStore]], admin: asyncpg.Connection, clock: ManualClock) -> None:
    """A read (job counts) whose backend is terminated under it answers from another connection."""
    store = await stores()
    await store.enqueue([a_job(clock)])
    counts = await killed_mid_statement(admin, "jobs", store.job_counts())
    assert counts == {"poll:queued": 1}


async def test_a_lane_slot_whose_connection_dies_mid_statement_is_taken_on_another(
        stores: Callable[[], Awaitable[PostgresStore]], admin: asyncpg.Connection, clock: ManualClock) -> None:
    """Taking and giving back a delivery lane's slot are single autocommitted statements (Store._change), safe to
    run twice: killed under them, each runs again on another connection, and the cap still holds."""
    store = await stores()
    now = clock.now()
    assert await store.take_lane_slot("sub_L", 2, "warm", now, 30.0) == 0      # the lane's slots exist now
    await store.release_lane_slot("sub_L", 0, "warm")
    assert await killed_mid_statement(admin, "lane_slots", store.take_lane_slot("sub_L", 2, "dlv_1", now, 30.0)) == 0
    assert await store.take_lane_slot("sub_L", 2, "dlv_2", now, 30.0) == 1
    assert await store.take_lane_slot("sub_L", 2, "dlv_3", now, 30.0) is None, "dlv_1 holds slot 0 once"
    await killed_mid_statement(admin, "lane_slots", store.release_lane_slot("sub_L", 0, "dlv_1"))
    assert await store.take_lane_slot("sub_L", 2, "dlv_3", now, 30.0) == 0


async def test_a_transaction_whose_connection_dies_before_its_commit_is_run_again_once(
        stores: Callable[[], Awaitable[PostgresStore]], admin: asyncpg.Connection, clock: ManualClock) -> None:
    """An enqueue whose backend is terminated before COMMIT (nothing of it committed) is run again: the job
    is there, once."""
    store = await stores()
    added = await killed_mid_statement(admin, "jobs", store.enqueue([a_job(clock)]))
    assert added == 1
    assert await store.job_counts() == {"poll:queued": 1}


async def test_a_transaction_sent_as_one_statement_is_not_run_again_when_its_connection_dies(
        stores: Callable[[], Awaitable[PostgresStore]], admin: asyncpg.Connection, clock: ManualClock) -> None:
    """A new task with its first job is one statement without BEGIN (its writes held to the end): that statement
    is its commit, so a connection that dies under it leaves the outcome unknown and it is not sent again; the
    error reaches the caller (here nothing was written: the backend died waiting for the table's lock)."""
    from relay.models import Task
    from relay.store.postgres import _LOST
    store = await stores()
    now = clock.now()
    task = Task(id=ids.new_id("tsk", now), provider="gmicloud", request={"prompt": "p"}, created_at=now,
                updated_at=now)
    with pytest.raises(_LOST):
        await killed_mid_statement(admin, "tasks", store.create_task(task, [a_job(clock, "submit")]))
    assert await store.get_task(task.id) is None and await store.job_counts() == {}


async def test_claims_go_on_after_every_pooled_connection_is_terminated(
        stores: Callable[[], Awaitable[PostgresStore]], admin: asyncpg.Connection, clock: ManualClock) -> None:
    """All the pool's connections are killed while idle (a server restart): the next claims, enqueues and
    finishes work on new connections, and the LISTEN connection is left alone."""
    store = await stores()
    await asyncio.gather(*(store.enqueue([a_job(clock)]) for _ in range(8)))     # open several connections
    assert store._listener is not None
    listener = store._listener.get_server_pid()
    killed = await admin.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid NOT IN (pg_backend_pid(), $1) AND backend_type = 'client backend'", listener)
    assert killed >= 1
    for _ in range(2):        # every connection the pool had is dead now: each claim meets one or a new one
        jobs = await store.claim(clock.now(), limit=4, lease_seconds=60)
        assert len(jobs) == 4
        await asyncio.gather(*(store.finish_job(job) for job in jobs))
    assert await store.job_counts() == {}
    await store.enqueue([a_job(clock)])
    assert await store.job_counts() == {"poll:queued": 1}
    assert store._listener is not None and store._listener.get_server_pid() == listener


async def test_an_argument_asyncpg_cannot_encode_is_raised_not_taken_for_a_lost_connection(
        stores: Callable[[], Awaitable[PostgresStore]], monkeypatch: pytest.MonkeyPatch) -> None:
    """An argument of the wrong type (a bug) sends nothing and says nothing of the connection: asyncpg raises its
    DataError (a PostgresError, not an InterfaceError, which would count as a lost connection), raised at once,
    the pool left as it is, the call not run again (it would fail alike)."""
    store = await stores()
    lost: list[BaseException] = []
    real = store._connection_lost

    async def counting(exc: BaseException, then: str) -> None:
        lost.append(exc)
        await real(exc, then)

    monkeypatch.setattr(store, "_connection_lost", counting)
    with pytest.raises(asyncpg.exceptions.DataError):
        await store.get_task(12345)       # type: ignore[arg-type]   # a text parameter given an int: a bug
    with pytest.raises(asyncpg.exceptions.DataError):
        await store.transact(lambda tx: tx.run("UPDATE tasks SET status = ? WHERE id = ?", (1, "tsk_x")))
    assert lost == []


async def test_a_group_commit_aborted_for_a_deadlock_is_run_again(
        stores: Callable[[], Awaitable[PostgresStore]], admin: asyncpg.Connection, clock: ManualClock) -> None:
    """A group commit's batch (job ends, task writes: store._write) locks rows that another transaction locks in
    the other order: PostgreSQL aborts the batch for the deadlock. Nothing of it committed, so it is run again
    once the other transaction is done, and its callers are told it committed (without that every caller of the
    batch got the DeadlockDetectedError, and a finished job ran again once its lease ran out)."""
    from relay.models import Task
    from relay.store import queries as q
    # The batch's backend checks for the deadlock after 0.5 s of waiting, the admin's only after 60 s: the batch
    # is the one aborted (the admin starts waiting well within the batch's half second).
    await admin.execute("ALTER DATABASE " + await admin.fetchval("SELECT quote_ident(current_database())") +
                        " SET deadlock_timeout = '500ms'")
    await admin.execute("SET deadlock_timeout = '60s'")
    store = await stores()
    now = clock.now()
    tasks = [Task(id=ids.new_id("tsk", now), provider="gmicloud", request={"prompt": "p"}, created_at=now,
                  updated_at=now) for _ in range(2)]
    for task in tasks:
        await store.create_task(task, [])
        await store._change("UPDATE tasks SET submit_started_at = ? WHERE id = ?", (now, task.id))
    first, second = (task.id for task in tasks)
    lock = admin.transaction()
    await lock.start()
    try:
        await admin.execute("UPDATE tasks SET updated_at = updated_at WHERE id = $1", second)
        # The batch takes the first task's row, then waits for the second's.
        writing = asyncio.ensure_future(store._write_many(q.CLEAR_SUBMIT_STARTED, [(first, now), (second, now)]))
        async with asyncio.timeout(TIMEOUT):
            while not await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                           "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"):
                await asyncio.sleep(0.005)
        async with asyncio.timeout(TIMEOUT):
            await admin.execute("UPDATE tasks SET updated_at = updated_at WHERE id = $1", first)   # the cycle
    finally:
        await lock.commit()
    async with asyncio.timeout(TIMEOUT):
        await writing
    started = [await admin.fetchval("SELECT submit_started_at FROM tasks WHERE id = $1", task_id)
               for task_id in (first, second)]
    assert started == [None, None]


async def test_a_dead_job_retried_while_its_work_is_queued_again_returns_the_live_job(
        stores: Callable[[], Awaitable[PostgresStore]], admin: asyncpg.Connection, clock: ManualClock) -> None:
    """Retrying a dead job gives its dedupe key back; a live job with the same key queued meanwhile, by a
    transaction the retry's look could not see yet, took the key first. The retry is run again and returns the
    live job, the dead one dropped (it was a UniqueViolationError: a 500 from the console and the API)."""
    store = await stores()
    now = clock.now()
    job = Job(id=ids.new_id("job", now), kind="poll", payload={}, run_at=now, dedupe_key="poll:tsk_raced",
              max_attempts=3)
    await store.enqueue([job])
    [claimed] = await store.claim(now, limit=1, lease_seconds=60, kinds=["poll"])
    await store.bury_job(claimed, "gave up", now)
    live_id = ids.new_id("job", now + 1)
    queuing = admin.transaction()
    await queuing.start()
    try:
        await admin.execute("INSERT INTO jobs (id, kind, payload, run_at, state, dedupe_key, attempts, max_attempts, "
                            "created_at) VALUES ($1, 'poll', '{}', $2, 'queued', 'poll:tsk_raced', 0, 3, $2)",
                            live_id, now + 100)
        retrying = asyncio.ensure_future(store.retry_dead_job(job.id, now + 2))
        # The retry found no live job with the key and now waits on the uncommitted insert's key.
        async with asyncio.timeout(TIMEOUT):
            while not await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                           "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"):
                await asyncio.sleep(0.005)
    finally:
        await queuing.commit()
    async with asyncio.timeout(TIMEOUT):
        found = await retrying
    assert found is not None and found.id == live_id and found.state == "queued"
    assert await store.get_job(job.id) is None
