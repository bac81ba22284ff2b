"""PostgresStore's claim plan and batch writes: the shapes that keep them fast whatever the statistics say.

- The claim walks jobs_due in run_at order and stops at its limit, in the plan PostgreSQL picks for the
  values and in the generic plan of the prepared statement, even on a table never analyzed (where the
  planner otherwise sorted every queued job read through jobs_by_state_kind).
- `Tx.many` of an INSERT is one statement over arrays and still counts what ON CONFLICT skipped.
- Concurrent job outcomes share commits (group commit) and each keeps its lease check.
- Held writes (`Tx.write`) of different tables go as one statement, one round trip; a transition's writes too.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest

from relay import ids
from relay.models import Job
from relay.store import queries as q
from relay.store.postgres import CLAIM_SETTINGS, PostgresStore, claim_sql, to_postgres, unnest_insert
from tests.harness import listed_events
from tests.pg import fresh_database

KINDS = ["submit", "poll", "archive", "callback", "deliver"]


@pytest.fixture
async def store() -> AsyncIterator[PostgresStore]:
    async with fresh_database() as dsn:
        opened = PostgresStore(dsn)
        await opened.open()
        try:
            yield opened
        finally:
            await opened.close()


async def plan_of_claim(store: PostgresStore, *, generic: bool) -> str:
    """EXPLAIN of the claim as PostgresStore.claim runs it, in a transaction rolled back after."""
    now = time.time()
    args = (now + 60, "token", now, now, KINDS, 32)
    async with store.pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            await conn.execute(CLAIM_SETTINGS)
            if generic:
                await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
                await conn.execute("PREPARE claim AS " + to_postgres(claim_sql(True)))
                rows = await conn.fetch(f"EXPLAIN EXECUTE claim({now + 60}, 'token', {now}, {now}, "
                                        "ARRAY['submit','poll','archive','callback','deliver'], 32)")
            else:
                rows = await conn.fetch("EXPLAIN " + to_postgres(claim_sql(True)), *args)
        finally:
            await tx.rollback()
    return "\n".join(row[0] for row in rows)


async def test_the_claim_walks_the_due_index_on_a_table_never_analyzed(store: PostgresStore) -> None:
    """20,000 jobs just enqueued (no ANALYZE yet): the claim's plan walks jobs_due, sorts nothing, scans no
    whole table and finds the rows it locked by ctid, in the custom and the generic plan alike."""
    now = time.time()
    for start in range(0, 20_000, 1_000):
        await store.enqueue([Job(id=ids.new_id("job", now), kind=KINDS[n % 5], run_at=now - n % 7)
                             for n in range(start, start + 1_000)])
    analyzed = await store.pool.fetchval("SELECT last_analyze IS NOT NULL OR last_autoanalyze IS NOT NULL "
                                         "FROM pg_stat_user_tables WHERE relname = 'jobs'")
    assert not analyzed, "the case is a table whose statistics do not exist yet"
    for generic in (False, True):
        plan = await plan_of_claim(store, generic=generic)
        assert "Index Scan using jobs_due" in plan, plan
        # the UPDATE reaches the locked rows by their ctid, reading no page of jobs_pkey (see claim_sql)
        assert "Tid Scan on jobs" in plan and "jobs_pkey" not in plan, plan
        assert "Sort" not in plan and "Seq Scan" not in plan, plan
    jobs = await store.claim(time.time(), limit=32, lease_seconds=60, kinds=KINDS)
    assert len(jobs) == 32
    assert [j.run_at for j in jobs] != [] and max(j.attempts for j in jobs) == 1


async def test_a_claim_without_kinds_leases_every_kind(store: PostgresStore) -> None:
    """No kinds given: due jobs of any kind are leased, oldest first."""
    now = time.time()
    await store.enqueue([Job(id=ids.new_id("job", now), kind=kind, run_at=now - n)
                         for n, kind in enumerate(["poll", "deliver", "other"])])
    oldest = await store.claim(time.time(), limit=2, lease_seconds=60)
    assert {j.kind for j in oldest} == {"other", "deliver"}
    assert [j.kind for j in await store.claim(time.time(), limit=10, lease_seconds=60)] == ["poll"]


async def test_a_claim_is_a_hot_update_that_touches_no_index(store: PostgresStore) -> None:
    """A claim changes no indexed column (its lease is lease_until and the token, not run_at), so PostgreSQL
    writes every claimed row as a HOT update: no new entry in any of jobs' indexes, one heap page per job in the
    WAL (see claim_sql). Counted by PostgreSQL itself for the claim's own transaction."""
    now = time.time()
    await store.enqueue([Job(id=ids.new_id("job", now), kind=KINDS[n % 5], run_at=now - n) for n in range(20)])
    async with store.pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            await conn.execute(CLAIM_SETTINGS)
            claimed = await conn.fetch(to_postgres(claim_sql(True)), now + 60, "token", now, now, KINDS, 16)
            counted = await conn.fetchrow("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables "
                                          "WHERE relname = 'jobs'")
        finally:
            await tx.rollback()
    assert len(claimed) == 16
    assert (counted["n_tup_upd"], counted["n_tup_hot_upd"]) == (16, 16)
    assert {row["run_at"] for row in claimed} == {now - n for n in range(4, 20)}   # the oldest 16, run_at left alone


async def test_a_claim_of_an_earlier_version_is_refused(store: PostgresStore) -> None:
    """During a rolling upgrade a replica of an earlier version claims by moving run_at and setting a token:
    that claim fails (the trigger jobs_claimed_the_earlier_way), for a job nobody holds and above all for one a
    new replica holds, whose run_at, left in the past by the new claim, shows it as due. The new replica's
    claims, heartbeats and outcomes go through."""
    now = time.time()
    await store.enqueue([Job(id=ids.new_id("job", now), kind="poll", run_at=now - 1)])
    earlier = ("UPDATE jobs SET run_at = $1, lease_token = $2, attempts = attempts + 1 WHERE id = ANY(ARRAY("
               "SELECT id FROM jobs WHERE state = 'queued' AND run_at <= $3 ORDER BY run_at LIMIT $4 "
               "FOR UPDATE SKIP LOCKED)) RETURNING *")

    async def claim_the_earlier_way() -> None:
        async with store.pool.acquire() as conn:
            with pytest.raises(asyncpg.CheckViolationError, match="older than schema v21"):
                await conn.fetch(earlier, now + 60, "old-replica", now, 32)
    await claim_the_earlier_way()                          # a job nobody holds
    [held] = await store.claim(now, limit=32, lease_seconds=60)
    await claim_the_earlier_way()                          # the job the new replica holds
    assert await store.extend_lease(held, now + 90)
    await store.retry_job(held, now, None)
    [again] = await store.claim(now, limit=32, lease_seconds=60)
    assert again.id == held.id and again.lease_token != held.lease_token


def test_an_insert_becomes_one_statement_over_arrays() -> None:
    """INSERT … VALUES (?, 'x', ?) … → INSERT … SELECT u.a, 'x', u.c FROM unnest(?::T[], ?::T[]) … (constants kept,
    the rest of the statement kept); any other shape is left alone."""
    types = {("jobs", c): t for c, t in [("id", "text"), ("kind", "text"), ("task_id", "text"), ("payload", "text"),
                                         ("run_at", "double precision"), ("dedupe_key", "text"),
                                         ("attempts", "integer"), ("max_attempts", "integer"),
                                         ("created_at", "double precision")]}
    bulk = unnest_insert(q.INSERT_JOB, types)
    assert bulk is not None
    assert bulk.startswith("INSERT INTO jobs (id, kind, task_id, payload, run_at, state, dedupe_key, attempts, "
                           "max_attempts, created_at) SELECT u.id, u.kind, u.task_id, u.payload, u.run_at, 'queued', ")
    assert "unnest(?::text[], ?::text[], ?::text[], ?::text[], ?::double precision[], ?::text[], ?::integer[]" in bulk
    assert bulk.endswith("ON CONFLICT (dedupe_key) DO NOTHING")
    assert unnest_insert(q.FINISH_JOB, types) is None
    assert unnest_insert("INSERT INTO jobs (id, nope) VALUES (?, ?)", types) is None      # a column of no known type


async def test_a_batch_insert_counts_only_the_rows_it_added(store: PostgresStore) -> None:
    """Jobs whose dedupe key is live already (or repeated inside the batch) are skipped and not counted."""
    now = time.time()
    assert await store.enqueue([Job(id=ids.new_id("job", now), kind="poll", run_at=now, dedupe_key="poll:a")]) == 1
    batch = [Job(id=ids.new_id("job", now), kind="poll", run_at=now, dedupe_key=key, payload={"k": key})
             for key in ["poll:a", "poll:b", "poll:b", "poll:c", None, None]]
    assert await store.enqueue(batch) == 4
    assert await store.job_counts() == {"poll:queued": 5}


class CountingStore(PostgresStore):
    """Records the size of each group-committed batch of small writes (one transaction each)."""

    batches: list[int]

    async def _write_statements(self, take: Callable[[], list[tuple[str, tuple[Any, ...]]]]) -> None:
        def counted() -> list[tuple[str, tuple[Any, ...]]]:
            batch = take()
            self.batches.append(len(batch))
            return batch
        await super()._write_statements(counted)


async def test_concurrent_finishes_share_commits_and_keep_their_lease_check() -> None:
    """64 finishes at once are written in a few transactions, not 64; a finish whose lease was lost (the job
    claimed again since) leaves the job alone."""
    async with fresh_database() as dsn:
        store = CountingStore(dsn)
        store.batches = []
        await store.open()
        try:
            now = time.time()
            await store.enqueue([Job(id=ids.new_id("job", now), kind="poll", run_at=now) for _ in range(65)])
            first = {j.id: j for j in await store.claim(now, limit=65, lease_seconds=60)}
            jobs = await store.claim(now + 120, limit=65, lease_seconds=60)   # leases ran out: claimed again
            assert {j.id for j in jobs} == set(first)
            stale = first[jobs.pop().id]                                        # finished under its old lease
            await asyncio.gather(*(store.finish_job(job) for job in jobs), store.finish_job(stale))
            assert sum(store.batches) == 65 and len(store.batches) <= 3, store.batches
            assert await store.job_counts() == {"poll:queued": 1}             # only the re-leased job is left
        finally:
            await store.close()


class _CountingConnection:
    """A pooled connection that counts the statements sent on it (each one round trip)."""

    def __init__(self, conn: Any) -> None:
        self.conn, self.sent = conn, []

    async def execute(self, sql: str, *args: Any) -> Any:
        self.sent.append(sql)
        return await self.conn.execute(sql, *args)

    async def fetch(self, sql: str, *args: Any) -> Any:
        self.sent.append(sql)
        return await self.conn.fetch(sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        self.sent.append(sql)
        return await self.conn.fetchrow(sql, *args)

    def transaction(self) -> Any:
        return self.conn.transaction()


class _CountingPool:
    """Stands in for a PostgresStore's pool: the connections it hands out count their statements."""

    def __init__(self, pool: Any) -> None:
        self.pool, self.sent = pool, []

    async def fetch(self, sql: str, *args: Any) -> Any:
        self.sent.append(sql)
        return await self.pool.fetch(sql, *args)

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[_CountingConnection]:
        async with self.pool.acquire() as conn:
            counting = _CountingConnection(conn)
            counting.sent = self.sent
            yield counting


async def test_held_writes_of_different_tables_are_one_round_trip(store: PostgresStore) -> None:
    """Three held writes of three tables are sent as one statement when the transaction reads or ends; a write
    to a table already held sends the held ones first. BEGIN goes with the first round trip."""
    from relay.store.postgres import PostgresTx
    now = time.time()
    async with store.pool.acquire() as raw:
        conn = _CountingConnection(raw)
        tx = PostgresTx(conn, store._sql)    # noqa: SLF001 - the store's translations of the shared SQL
        await tx.write("INSERT INTO image_deletions (sha256, key, started_at) VALUES (?, ?, ?)", ("ab", "k", now))
        await tx.write_many(q.INSERT_JOB, [
            (f"job_held_{n}", "poll", None, "{}", now, f"held:{n}", 0, 5, now) for n in range(3)])
        await tx.write("INSERT INTO rate_buckets (key, tokens, updated_at) VALUES (?, 1, ?)", ("held", now))
        assert conn.sent == []
        rows = await tx.all("SELECT COUNT(*) AS n FROM jobs")
        assert conn.sent[0] == "BEGIN" and conn.sent[1].startswith("WITH w0 AS (INSERT INTO image_deletions")
        assert len(conn.sent) == 3 and rows[0]["n"] == 3
        await tx.write("UPDATE jobs SET run_at = 0 WHERE dedupe_key = ?", ("held:0",))
        await tx.write("DELETE FROM jobs WHERE dedupe_key = ?", ("held:1",))     # the same table: sent apart
        await tx.flush()
        assert len(conn.sent) == 5
        left = await tx.all("SELECT dedupe_key, run_at FROM jobs ORDER BY dedupe_key")
        assert [(r["dedupe_key"], r["run_at"]) for r in left] == [("held:0", 0), ("held:2", now)]
        await tx.rollback()
        assert not raw.is_in_transaction()


async def test_a_write_takes_the_held_writes_of_other_tables_along(store: PostgresStore) -> None:
    """A write the body sends itself carries the held writes of other tables as its WITH clauses: one round trip,
    its own row count and RETURNING rows; a write of a held table, or one that reads a table, goes after them."""
    from relay.store.postgres import PostgresTx
    now = time.time()
    async with store.pool.acquire() as raw:
        conn = _CountingConnection(raw)
        tx = PostgresTx(conn, store._sql)    # noqa: SLF001
        await tx.write_many(q.INSERT_JOB, [
            (f"job_ride_{n}", "poll", None, "{}", now, f"ride:{n}", 0, 5, now) for n in range(2)])
        await tx.write("INSERT INTO rate_buckets (key, tokens, updated_at) VALUES (?, 1, ?)", ("ride", now))
        changed = await tx.run("INSERT INTO image_deletions (sha256, key, started_at) VALUES (?, ?, ?)",
                               ("cd", "k", now))
        assert changed == 1 and len(conn.sent) == 2 and conn.sent[1].startswith("WITH w0 AS (INSERT INTO jobs")
        await tx.write("UPDATE rate_buckets SET tokens = 5 WHERE key = ?", ("ride",))
        row = await tx.one("UPDATE jobs SET attempts = 7 WHERE dedupe_key = ? RETURNING id", ("ride:1",))
        assert row is not None and row["id"] == "job_ride_1" and len(conn.sent) == 3
        await tx.write("UPDATE rate_buckets SET tokens = 6 WHERE key = ?", ("ride",))
        assert await tx.run("UPDATE rate_buckets SET updated_at = 1 WHERE key = ?", ("ride",)) == 1   # its table
        assert len(conn.sent) == 5
        await tx.write("UPDATE jobs SET attempts = 8 WHERE dedupe_key = ?", ("ride:0",))
        # Reading a table a held write writes: it would not see their changes, so they go first.
        assert await tx.run("DELETE FROM image_deletions WHERE sha256 IN (SELECT ? FROM jobs WHERE attempts = 8)",
                            ("cd",)) == 1
        assert len(conn.sent) == 7
        # Reading only tables no held write writes: along with them. A held write reading a table a later one
        # writes reads it as it was before, as it would have alone.
        await tx.write("UPDATE jobs SET attempts = 9 WHERE dedupe_key = ? AND EXISTS (SELECT 1 FROM rate_buckets "
                       "WHERE key = ? AND tokens = 6)", ("ride:0", "ride"))
        assert await tx.run("UPDATE rate_buckets SET tokens = 7 WHERE key = ? AND NOT EXISTS "
                            "(SELECT 1 FROM images WHERE id = 'none')", ("ride",)) == 1
        assert len(conn.sent) == 8 and conn.sent[-1].startswith("WITH w0 AS (UPDATE jobs SET attempts = 9")
        # A list of tables after FROM is not read apart: never held.
        await tx.write("UPDATE jobs SET attempts = 8 WHERE dedupe_key = ?", ("ride:0",))
        await tx.write("UPDATE rate_buckets SET tokens = 6 WHERE key = ? AND EXISTS (SELECT 1 FROM images i, jobs j "
                       "WHERE j.attempts = 9)", ("ride",))
        assert len(conn.sent) == 10
        assert (await tx.one("SELECT tokens FROM rate_buckets WHERE key = ?", ("ride",)))["tokens"] == 7
        found = await tx.all("SELECT j.attempts, b.tokens FROM jobs j, rate_buckets b WHERE b.key = ? "
                             "AND j.dedupe_key LIKE 'ride:%' ORDER BY j.dedupe_key", ("ride",))
        assert [(r["attempts"], r["tokens"]) for r in found] == [(8, 7), (7, 7)]
        await tx.rollback()


async def test_a_body_of_held_writes_is_one_statement_without_begin(store: PostgresStore) -> None:
    """A transaction whose body only holds writes sends them as one statement, no BEGIN or COMMIT; it is atomic
    all the same: a failing part leaves nothing of the others."""
    now = time.time()

    def body(bucket: str, job: str) -> Any:
        async def write(tx: Any) -> None:
            await tx.write("INSERT INTO rate_buckets (key, tokens, updated_at) VALUES (?, 1, ?)", (bucket, now))
            await tx.write_many(q.INSERT_JOB, [(f"job_{job}", "poll", None, "{}", now, job, 0, 5, now)])
        return write

    counting = _CountingPool(store._pool)   # noqa: SLF001 - counts what the store sends
    store._pool = counting                  # noqa: SLF001
    try:
        await store.transact(body("alone", "first"))
        assert len(counting.sent) == 1 and counting.sent[0].startswith("WITH w0 AS (INSERT INTO rate_buckets")
        with pytest.raises(asyncpg.UniqueViolationError):
            await store.transact(body("alone", "second"))       # the bucket's key is taken
        assert len(counting.sent) == 2
    finally:
        store._pool = counting.pool         # noqa: SLF001
    keys = await store.pool.fetch("SELECT dedupe_key FROM jobs WHERE dedupe_key IN ('first', 'second')")
    assert [r["dedupe_key"] for r in keys] == ["first"]


async def test_a_transition_sends_its_writes_in_one_round_trip(store: PostgresStore) -> None:
    """Through the store: a task moving on locks its row (in one message with BEGIN), reads it with its images
    and the subscriptions, then sends its row's change and its event as one statement, then COMMIT."""
    from relay.models import ProviderStatus, Task, TaskUpdate
    from relay.states import on_update
    now = time.time()
    task = Task(id=ids.new_id("tsk", now), provider="gmicloud", request={"prompt": "p", "n": 1}, created_at=now,
                updated_at=now)
    await store.create_task(task, [])
    counting = _CountingPool(store._pool)   # noqa: SLF001 - counts what the store sends
    store._pool = counting                  # noqa: SLF001
    try:
        applied = await store.apply(task.id, lambda t: on_update(t, TaskUpdate(status=ProviderStatus.RUNNING)), now)
    finally:
        store._pool = counting.pool         # noqa: SLF001
    assert applied is not None
    assert len(counting.sent) == 5, counting.sent
    assert counting.sent[0] == f"BEGIN; SELECT 1 FROM tasks WHERE id = '{task.id}' FOR UPDATE"
    assert counting.sent[1] == to_postgres(q.LOAD_TASK_WITH_IMAGES) and counting.sent[-1] == "COMMIT"
    assert counting.sent[-2].startswith("WITH w0 AS (UPDATE tasks SET status")
    assert counting.sent[2] == to_postgres(q.ENABLED_SUBSCRIPTIONS)
    events = await listed_events(store, 1, task_id=task.id)
    assert [e.id for e in events] == [applied.event.id]
    loaded = await store.get_task(task.id)
    assert loaded is not None and loaded.status == applied.task.status and loaded.sequence == applied.task.sequence
    # The next one finds the subscriptions unchanged (their stamp, read with the task): it does not read them.
    counting.sent.clear()
    store._pool = counting                  # noqa: SLF001
    try:
        again = await store.apply(task.id, lambda t: on_update(t, TaskUpdate(status=ProviderStatus.RUNNING,
                                                                              progress=50)), now)
    finally:
        store._pool = counting.pool         # noqa: SLF001
    assert again is not None and again.transition.progress == 50, again
    assert len(counting.sent) == 4 and to_postgres(q.ENABLED_SUBSCRIPTIONS) not in counting.sent, counting.sent


async def test_a_task_is_read_with_its_images_in_one_statement(store: PostgresStore) -> None:
    """get_task reads the task's row and its images (in their order) in one statement; none, or no task."""
    from relay.models import Task
    now = time.time()
    task = Task(id=ids.new_id("tsk", now), provider="gmicloud", request={"prompt": "p", "n": 2}, created_at=now,
                updated_at=now)
    await store.create_task(task, [])
    for index in (1, 0):
        await store.pool.execute(to_postgres(q.INSERT_IMAGE), f"img_{task.id}_{index}", task.id, index,
                                 f"https://example.com/{index}.png", None, now + 60)
    counting = _CountingPool(store._pool)   # noqa: SLF001 - counts what the store sends
    store._pool = counting                  # noqa: SLF001
    try:
        loaded = await store.get_task(task.id)
    finally:
        store._pool = counting.pool         # noqa: SLF001
    assert loaded is not None and [image.id for image in loaded.images] == [f"img_{task.id}_0", f"img_{task.id}_1"]
    assert len(counting.sent) == 1
    bare = Task(id=ids.new_id("tsk", now), provider="gmicloud", request={"prompt": "p"}, created_at=now,
                updated_at=now)
    await store.create_task(bare, [])
    loaded = await store.get_task(bare.id)
    assert loaded is not None and loaded.images == [] and await store.get_task("tsk_unknown") is None


async def test_a_transition_that_waited_for_the_task_lock_sees_the_images_as_then_committed(
        store: PostgresStore) -> None:
    """A transition waits for the task's row lock, then reads the images: it sees what the transaction holding
    the lock changed in them (an image archived meanwhile). Read in the same statement as the locked row,
    PostgreSQL would re-read only the task's row after the wait and keep the images as they were before it."""
    from relay.models import Task
    from tests.harness import wait_for
    now = time.time()
    task = Task(id=ids.new_id("tsk", now), provider="gmicloud", request={"prompt": "p"}, created_at=now,
                updated_at=now)
    await store.create_task(task, [])
    await store.pool.execute(to_postgres(q.INSERT_IMAGE), f"img_{task.id}", task.id, 0, "https://example.com/0.png",
                             None, now + 60)
    seen: list[list[str]] = []

    def decide(current: Any) -> None:
        seen.append([image.status for image in current.images])
        return None

    async def waiting_for_the_lock() -> bool:
        return bool(await store.pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"))

    async with store.pool.acquire() as holder:
        async with holder.transaction():
            await holder.execute("SELECT id FROM tasks WHERE id = $1 FOR UPDATE", task.id)
            waiting = asyncio.create_task(store.apply(task.id, decide, now))
            await wait_for(waiting_for_the_lock, 10, "the transition to wait for the task's lock")
            await holder.execute("UPDATE images SET status = 'archived' WHERE task_id = $1", task.id)
        assert await asyncio.wait_for(waiting, 10) is None
    assert seen == [["archived"]]


async def test_statements_run_once_per_row_are_inside_the_transaction(store: PostgresStore) -> None:
    """A batch with no one-statement form (a DELETE per row) runs in the body's transaction: when the body then
    fails, none of its rows is deleted."""
    now = time.time()
    for key in ("del:1", "del:2"):
        await store.pool.execute("INSERT INTO image_deletions (sha256, key, started_at) VALUES ($1, 'k', $2)", key,
                                 now)

    async def body(tx: Any) -> None:
        assert await tx.many(q.END_IMAGE_DELETION, [("del:1",), ("del:2",)]) == 2
        raise RuntimeError("the body fails after its batch")

    with pytest.raises(RuntimeError):
        await store.transact(body)
    left = await store.pool.fetch("SELECT sha256 FROM image_deletions WHERE sha256 LIKE 'del:%' ORDER BY sha256")
    assert [r["sha256"] for r in left] == ["del:1", "del:2"]


@pytest.mark.parametrize("key", ["relay.provider:gmi-cloud_2", "relay.provider:o'brien; DROP TABLE jobs"])
async def test_an_advisory_lock_first_goes_with_begin_and_holds(store: PostgresStore, key: str) -> None:
    """The transaction's first statement, an advisory lock on a key of plain characters, goes in one message with
    BEGIN; any other key as a statement of its own, with its text as an argument. Either way the lock is held
    until the transaction ends."""
    from relay.store.postgres import PostgresTx
    async with store.pool.acquire() as raw, store.pool.acquire() as other:
        conn = _CountingConnection(raw)
        tx = PostgresTx(conn, store._sql)    # noqa: SLF001
        await tx.advisory_lock(key)
        plain = "'" not in key
        assert conn.sent == ([f"BEGIN; SELECT pg_advisory_xact_lock(hashtext('{key}')) AS locked"] if plain
                             else ["BEGIN", "SELECT pg_advisory_xact_lock(hashtext($1)) AS locked"])
        assert await other.fetchval("SELECT pg_try_advisory_xact_lock(hashtext($1))", key) is False
        await tx.commit()
        assert await other.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key) is True
        await other.execute("SELECT pg_advisory_unlock(hashtext($1))", key)
    assert await store.pool.fetchval("SELECT count(*) FROM jobs") is not None      # the table is still there


@pytest.mark.parametrize("plain", [True, False])
async def test_a_row_lock_first_goes_with_begin_and_holds(store: PostgresStore, plain: bool) -> None:
    """Tx.lock as the transaction's first statement: for a key of plain characters one message with BEGIN, its
    status telling whether the row is there; any other key (a quote in it) as a statement of its own with the key
    as an argument. Either way the row stays locked until the transaction ends, and an unknown key locks nothing."""
    from relay.models import Task
    from relay.store.postgres import PostgresTx
    now = time.time()
    task = Task(id=ids.new_id("tsk", now) + ("" if plain else "o'brien; DROP TABLE jobs; --"), provider="gmicloud",
                request={"prompt": "p"}, created_at=now, updated_at=now)
    await store.create_task(task, [])
    async with store.pool.acquire() as raw, store.pool.acquire() as other:
        conn = _CountingConnection(raw)
        tx = PostgresTx(conn, store._sql)    # noqa: SLF001
        assert await tx.lock(q.LOCK_TASK_ROW, task.id) is True
        assert conn.sent == ([f"BEGIN; SELECT 1 FROM tasks WHERE id = '{task.id}' FOR UPDATE"] if plain
                             else ["BEGIN", "SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE"])
        with pytest.raises(asyncpg.LockNotAvailableError):
            await other.execute("SELECT id FROM tasks WHERE id = $1 FOR UPDATE NOWAIT", task.id)
        await tx.commit()
        assert await other.fetchval("SELECT id FROM tasks WHERE id = $1 FOR UPDATE NOWAIT", task.id) == task.id
        unknown = PostgresTx(_CountingConnection(raw), store._sql)    # noqa: SLF001
        assert await unknown.lock(q.LOCK_TASK_ROW, "tsk_" + ("unknown" if plain else "o'unknown")) is False
        await unknown.commit()
    assert await store.pool.fetchval("SELECT count(*) FROM jobs") is not None      # the table is still there


async def test_subscriptions_truncated_are_not_fanned_out_to(store: PostgresStore) -> None:
    """TRUNCATE fires no DELETE trigger: its own trigger gives the subscriptions a new stamp, so a replica that
    kept them reads them again at its next transition."""
    from relay.deliveries.models import Subscription
    from relay.models import ProviderStatus, Task, TaskUpdate
    from relay.states import on_update
    now = time.time()
    await store.create_subscription(Subscription(id=ids.new_id("sub", now), url="https://subscriber.test/hook",
                                                 events=["*"], keyring="sealed", created_at=now, updated_at=now))

    async def deliveries_of_a_transition() -> int:
        task = Task(id=ids.new_id("tsk", now), provider="gmicloud", request={"prompt": "p"}, created_at=now,
                    updated_at=now)
        await store.create_task(task, [])
        applied = await store.apply(task.id, lambda t: on_update(t, TaskUpdate(status=ProviderStatus.QUEUED)), now)
        assert applied is not None
        return int(await store.pool.fetchval("SELECT count(*) FROM deliveries WHERE event_id = $1", applied.event.id))

    assert await deliveries_of_a_transition() == 1
    await store.pool.execute("TRUNCATE subscriptions CASCADE")
    assert await deliveries_of_a_transition() == 0


async def test_a_lock_after_a_held_write_goes_after_it(store: PostgresStore) -> None:
    """Held writes are sent before the transaction's next statement of another kind: a lock that follows one is
    not sent with BEGIN ahead of it, but after it, with its key as an argument (advisory lock and row lock)."""
    from relay.store.postgres import PostgresTx
    async with store.pool.acquire() as raw:
        for name, take in (("advisory", lambda tx: tx.advisory_lock("relay.provider:x")),
                           ("row", lambda tx: tx.lock(q.LOCK_TASK_ROW, "tsk_unknown"))):
            conn = _CountingConnection(raw)
            tx = PostgresTx(conn, store._sql)    # noqa: SLF001
            await tx.write(q.START_IMAGE_DELETION, (f"held:{name}", "", time.time(), "", 0.0))
            await take(tx)
            assert conn.sent[:2] == ["BEGIN", to_postgres(q.START_IMAGE_DELETION)], (name, conn.sent)
            assert len(conn.sent) == 3 and "$1" in conn.sent[2], (name, conn.sent)
            await tx.rollback()
