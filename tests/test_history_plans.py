"""Statements on per-submit, per-request and per-scrape paths read what they return (or the live tasks), never the
stored history: with 3,000 finished tasks (and their events) beside a dozen live ones, each one's plan goes
through the index that bounds it, with and without the statistics of ANALYZE, on both backends.

Each case was measured before its index (sql/022) at 200,000 stored tasks on SQLite: the in-flight count of every
submit 32 ms (under the writer's lock), GET /v1/tasks by provider and status 33 ms, the adoption of a provider
task 19-34 ms (in a write transaction), GET /v1/events?type= for a type absent from the log 65 ms (PostgreSQL
57-96 ms, a sequential scan). See tests/test_store.py for the in-flight count itself.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Any

import pytest

from relay.store import queries as q
from relay.store.base import Store
from relay.store.sqlite import SQLiteStore, sqlite_spelling

FINISHED = 3000


async def _stored_history(store: Store) -> None:
    tasks = [(f"tsk_{n:06d}", ("alpha", "beta")[n % 2], "succeeded" if n >= 12 else "running", f"pt_{n}", "{}",
              n, 1.0, 1.0) for n in range(FINISHED)]
    events = [(f"evt_{n:06d}", ("task.queued", "task.running", "task.succeeded")[n % 3], f"tsk_{n // 3:06d}", n,
               "{}", 1.0) for n in range(3 * FINISHED)]

    async def body(tx: Any) -> None:
        await tx.many("INSERT INTO tasks (id, provider, status, provider_task_id, request, sequence, created_at, "
                      "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", tasks)
        await tx.many("INSERT INTO events (id, type, task_id, sequence, data, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                      events)
    await store.transact(body)


async def _analyze(store: Store) -> None:
    if isinstance(store, SQLiteStore):
        await store._writer.execute("ANALYZE")                                              # type: ignore[union-attr]
    else:
        from relay.store.postgres import PostgresStore
        assert isinstance(store, PostgresStore)
        async with store.pool.acquire() as conn:
            await conn.execute("ANALYZE")


async def _sqlite_statements(store: SQLiteStore, call: Callable[[], Any]) -> list[str]:
    """The statements `call` has the store run on its reader (with their values, as SQLite saw them)."""
    seen: list[str] = []
    conn: sqlite3.Connection = store._reader._conn                                          # type: ignore[union-attr]
    conn.set_trace_callback(seen.append)
    try:
        await call()
    finally:
        conn.set_trace_callback(None)
    return seen


async def _plans(store: Store, sql: str, args: tuple[Any, ...]) -> list[str]:
    """The plans of `sql` as the store runs it: SQLite's; PostgreSQL's for the values and its generic plan."""
    if isinstance(store, SQLiteStore):
        rows = await store._writer.execute_fetchall(                                       # type: ignore[union-attr]
            "EXPLAIN QUERY PLAN " + sqlite_spelling(sql), args)
        return [" / ".join(row[3] for row in rows)]
    from relay.store.postgres import PostgresStore, to_postgres
    assert isinstance(store, PostgresStore)
    spelled = to_postgres(sql)
    async with store.pool.acquire() as conn:
        plans = ["\n".join(row[0] for row in await conn.fetch("EXPLAIN " + spelled, *args))]
        async with conn.transaction():
            await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            await conn.execute("PREPARE look AS " + spelled)
            values = ", ".join("'" + str(value) + "'" if isinstance(value, str) else str(value) for value in args)
            plans.append("\n".join(row[0] for row in await conn.fetch(f"EXPLAIN EXECUTE look({values})")))
            await conn.execute("DEALLOCATE look")
    return plans


@pytest.mark.parametrize("analyzed", [False, True])
async def test_an_adoption_finds_the_provider_task_by_its_id_alone(store: Store, analyzed: bool) -> None:
    """archives.adopt_task looks for the task a provider task id already belongs to, inside a write transaction."""
    await _stored_history(store)
    if analyzed:
        await _analyze(store)
    found = await store.transact(lambda tx: tx.one(q.TASK_BY_PROVIDER_TASK, ("pt_2000", "alpha")))
    assert found is not None and found["id"] == "tsk_002000"
    for plan in await _plans(store, q.TASK_BY_PROVIDER_TASK, ("pt_2000", "alpha")):
        assert "tasks_of_provider_task" in plan, plan
        assert "Seq Scan on tasks" not in plan and "tasks_by_provider " not in plan and "B-TREE" not in plan, plan


@pytest.mark.parametrize("analyzed", [False, True])
async def test_a_rare_event_type_is_found_without_reading_the_log(store: Store, analyzed: bool) -> None:
    """GET /v1/events?type= for a type the log holds once (or not at all) reads that type's events only."""
    await _stored_history(store)
    await store.transact(lambda tx: tx.run("INSERT INTO events (id, type, task_id, sequence, data, created_at) "
                                           "VALUES ('evt_rare', 'task.failed', 'tsk_000001', 9, '{}', 1.0)"))
    if analyzed:
        await _analyze(store)
    [rare] = await store.list_events(after=None, type="task.failed", task_id=None, limit=100)
    assert rare.id == "evt_rare"
    assert await store.list_events(after=None, type="task.cancelled", task_id=None, limit=100) == []
    if isinstance(store, SQLiteStore):
        sent = await _sqlite_statements(store, lambda: store.list_events(after="evt_000100", type="task.failed",
                                                                         task_id=None, limit=100))
        plans = [(await _plans(store, sql, ()))[0] for sql in sent]
    else:
        plans = await _plans(store, q.filtered("events", ["type = 'task.failed'", store._visible_events],
                                               order="seq"), (100,))
    for plan in plans:
        assert "events_by_type" in plan, plan
        assert "Seq Scan on events" not in plan and "SCAN events" not in plan, plan


@pytest.mark.parametrize("analyzed", [False, True])
async def test_tasks_listed_by_provider_and_status_read_those_tasks_only(store: Store, analyzed: bool) -> None:
    """GET /v1/tasks?provider=&status= (and the console's task list) for a live status of one provider."""
    await _stored_history(store)
    if analyzed:
        await _analyze(store)
    listed, _ = await store.list_tasks(status="running", provider="alpha", limit=50, cursor=None)
    assert sorted(task.id for task in listed) == [f"tsk_{n:06d}" for n in range(0, 12, 2)]
    if not isinstance(store, SQLiteStore):
        return      # PostgreSQL's planner reads (status, id) or (provider, status, id): both bounded
    sent = await _sqlite_statements(store, lambda: store.list_tasks(status="running", provider="alpha", limit=50,
                                                                    cursor="tsk_000011"))
    looks = [sql for sql in sent if "FROM tasks" in sql]
    assert looks, sent
    for sql in looks:
        plan = (await _plans(store, sql, ()))[0]
        assert "tasks_by_provider_status" in plan or "tasks_by_status" in plan, plan
        assert "SCAN tasks" not in plan and "tasks_by_provider (" not in plan, plan


@pytest.mark.parametrize("analyzed", [False, True])
async def test_the_sweeps_look_for_pending_deliveries_among_each_rows_own(store: Store, analyzed: bool) -> None:
    """Retention picks old events, tasks and archives that no pending delivery still needs, a batch at a time in a
    write transaction. With many deliveries pending (a subscriber down), each old row's look went through
    deliveries_by_status and read every pending delivery: SQLite held the writer 537 ms per batch of 500 events
    with 10,200 pending. It goes through the row's own deliveries (by event, by task)."""
    await _stored_history(store)
    # A delivery for every event, one in ten still pending.
    deliveries = [(f"dlv_{n:06d}", f"evt_{n:06d}", "task.queued", f"tsk_{n // 3:06d}", "sub_1", "http://x/",
                   "pending" if n % 10 == 0 else "succeeded", 1.0, 1.0) for n in range(3 * FINISHED)]
    await store.transact(lambda tx: tx.many(
        "INSERT INTO deliveries (id, event_id, event_type, task_id, target, url, status, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", deliveries))
    if analyzed:
        await _analyze(store)
    picked = await store.transact(lambda tx: tx.all(q.OLD_EVENTS, (2.0, 50)))
    assert len(picked) == 50 and "evt_000000" not in {row["id"] for row in picked}     # its delivery is pending
    counted = ((q.COUNT_OLD_EVENTS, (2.0,)),) if isinstance(store, SQLiteStore) else ()   # PostgreSQL: a hash, once
    for sql, args in ((q.OLD_EVENTS, (2.0, 500)), (q.OLD_FINISHED_TASKS, (2.0, 500)),
                      (q.OLD_FINISHED_ARCHIVES, (2.0, 500)), *counted):
        for plan in await _plans(store, sql, args):
            assert "SCAN d" not in plan and "Seq Scan on deliveries" not in plan, plan
            if isinstance(store, SQLiteStore):     # PostgreSQL may read the pending ones once, into a hash
                assert "deliveries_by_status" not in plan, plan


@pytest.mark.parametrize("analyzed", [False, True])
async def test_a_subscriptions_delivery_health_reads_its_attempts_of_the_window(store: Store, analyzed: bool) -> None:
    """The console's Subscriptions page: per subscription, its attempts of the last hour and day (counts, latency
    at two ranks, the last error). Through the subscription's deliveries, every one it ever had, each statement took
    119-133 ms at 408,000 deliveries on SQLite (five per subscription per view, on the reader the API shares)."""
    now = 10_000.0
    deliveries = [(f"dlv_{n:06d}", f"evt_{n:06d}", "task.queued", f"tsk_{n:06d}", "sub_1", "sub_1", "http://x/",
                   "succeeded", 1.0, 1.0) for n in range(3000)]
    attempts = [(f"dlv_{n:06d}", 1, now - 30 * 86400 + n, "http://x/", "auto", 200, 5.0, None, None, "sub_1")
                for n in range(3000)]
    attempts += [("dlv_000001", 2, now - 60, "http://x/", "auto", 503, 9.0, None, "HTTP 503", "sub_1")]

    async def body(tx: Any) -> None:
        await tx.many("INSERT INTO deliveries (id, event_id, event_type, task_id, subscription_id, target, url, "
                      "status, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", deliveries)
        await tx.many(q.INSERT_ATTEMPT, attempts)
    await store.transact(body)
    if analyzed:
        await _analyze(store)
    health = await store.delivery_health(now - 3600)
    assert set(health) == {"sub_1"} and health["sub_1"].attempts == 1 and health["sub_1"].p50_ms == 9.0
    assert await store.last_delivery_error("sub_1", now - 3600) == (now - 60, "HTTP 503")
    if not analyzed and not isinstance(store, SQLiteStore):
        return      # a table PostgreSQL has never analyzed (autovacuum does, as it grows) is guessed small: a scan
    for sql, args in ((q.SUBSCRIPTION_ATTEMPT_COUNTS, (now - 3600,)),
                      (q.SUBSCRIPTION_LATENCY_AT, ("sub_1", now - 3600, 0)),
                      (q.SUBSCRIPTION_LAST_ERROR, ("sub_1", now - 3600))):
        for plan in await _plans(store, sql, args):
            # The counts walk the window by time (walking delivery_attempts_by_subscription for their GROUP BY order
            # read every attempt ever made); the others the subscription's attempts of the window, or the window's.
            if sql == q.SUBSCRIPTION_ATTEMPT_COUNTS and isinstance(store, SQLiteStore):
                assert "delivery_attempts_by_time" in plan, plan
            else:
                assert "delivery_attempts_by_subscription" in plan or "delivery_attempts_by_time" in plan, plan
            assert "deliveries" not in plan.replace("delivery_attempts", ""), plan
            assert "SCAN a" not in plan and "Seq Scan" not in plan, plan


async def _queue_of(store: Store, jobs: int) -> list[tuple[Any, ...]]:
    """`jobs` jobs, six in seven queued, one in seven dead, five kinds in turn; their rows (id, kind, state)."""
    kinds = ("poll", "deliver", "archive", "submit", "callback_body")
    rows = [(f"job_{n:06d}", kinds[n % 5], "dead" if n % 7 == 3 else "queued") for n in range(jobs)]
    await store.transact(lambda tx: tx.many(
        "INSERT INTO jobs (id, kind, payload, run_at, state, max_attempts, created_at) VALUES (?, ?, '{}', ?, ?, 12, "
        "1.0)", [(job_id, kind, 1e10 + n, state) for n, (job_id, kind, state) in enumerate(rows)]))
    return rows


@pytest.mark.parametrize("analyzed", [False, True])
async def test_a_page_of_jobs_walks_an_index_in_id_order(store: Store, analyzed: bool) -> None:
    """GET /v1/jobs and the console's jobs pages, newest first, by state and maybe kind. With the state a parameter
    and (state, kind) the only index, SQLite read every job of the state and sorted them: 288 ms a page at 400,000
    queued jobs, 40 ms with 20,000 dead. Each page walks an index in id order now (queries.jobs_listing)."""
    rows = await _queue_of(store, 3000)
    if analyzed:
        await _analyze(store)
    for state, kind in (("queued", None), ("queued", "submit"), ("dead", None), ("dead", "deliver")):
        expected = [job_id for job_id, k, s in reversed(rows) if s == state and kind in (None, k)]
        first, cursor = await store.list_jobs(state=state, kind=kind, limit=20, cursor=None)
        second, _ = await store.list_jobs(state=state, kind=kind, limit=20, cursor=cursor)
        assert len(expected) > 40 and [job.id for job in first + second] == expected[:40], (state, kind)
        if isinstance(store, SQLiteStore):      # the statements list_jobs sends, as SQLite saw them
            sent = await _sqlite_statements(store, lambda: store.list_jobs(state=state, kind=kind, limit=20,
                                                                           cursor=cursor))
            plans = [(await _plans(store, sql, ()))[0] for sql in sent]
        elif analyzed:      # a table PostgreSQL has never analyzed (autovacuum does, as it grows) is guessed tiny
            table, filters = q.jobs_listing(state, kind is not None)
            plans = await _plans(store, q.filtered(table, [*filters, "id < ?"], order="id DESC"),
                                 (*([kind] if kind else []), "job_002000", 21))
        else:
            plans = []
        for plan in plans:
            assert "B-TREE" not in plan and "Sort" not in plan and "Seq Scan" not in plan, (state, kind, plan)


@pytest.mark.parametrize("analyzed", [False, True])
async def test_dead_jobs_swept_and_a_tasks_waiting_callbacks_are_read_by_what_is_taken(store: Store,
                                                                                      analyzed: bool) -> None:
    """Retention deletes dead jobs of no task by the time they died, under the writer's lock: through jobs_dead each
    batch read every dead job (74 ms at 50,000 on SQLite, also when none was old). A worker gathering a task's
    waiting callbacks read every queued callback job of every task (124 ms a page with 250,000 queued). Each goes
    through the index that holds only what it takes: jobs_dead_of_no_task, the task's own jobs."""
    rows = await _queue_of(store, 3000)
    mine = [(f"job_9{n:05d}", "tsk_mine", "callback_body", json.dumps({"provider": "evolink", "body": "{}"}))
            for n in range(3)]
    await store.transact(lambda tx: tx.many(
        "INSERT INTO jobs (id, task_id, kind, payload, run_at, state, max_attempts, created_at) VALUES (?, ?, ?, ?, "
        "1.0, 'queued', 12, 1.0)", mine))
    if analyzed:
        await _analyze(store)
    assert [job_id for job_id, _, _ in await store.waiting_callbacks("tsk_mine", "callback_body", 2.0, "", 10)] == [
        job_id for job_id, _, _, _ in mine]
    dead = [job_id for n, (job_id, _, state) in enumerate(rows) if state == "dead"]
    swept = await store.delete_old_dead_jobs(1e10 + 20, 10)      # the dead ones "died" at 1e10 + n (_queue_of)
    assert (swept.picked, swept.deleted) == (3, 3) and await store.get_job(dead[0]) is None
    assert await store.get_job(dead[3]) is not None
    looks = [(q.DELETE_OLD_DEAD_JOBS, (2e10, 500)), (q.COUNT_OLD_DEAD_JOBS, (1e10,)),
             (q.WAITING_CALLBACK_JOBS, ("tsk_mine", "callback_body", 2.0, "", 10))]
    for sql, args in looks:
        plans = await _plans(store, sql, args)
        if not isinstance(store, SQLiteStore):
            plans = plans if analyzed else []    # a table PostgreSQL never analyzed is guessed tiny
        for plan in plans:
            assert "jobs_dead_of_no_task" in plan or "jobs_by_task" in plan, (sql, plan)
            assert "Seq Scan" not in plan and "SCAN jobs" not in plan and "jobs_by_state_kind" not in plan, (sql, plan)


@pytest.mark.parametrize("analyzed", [False, True])
async def test_a_page_filtered_by_its_owner_walks_that_owners_rows(store: Store, analyzed: bool) -> None:
    """GET /v1/events?type=&task_id= and GET /v1/deliveries?status= with an event or a task: SQLite walked every
    event of the type (0.14-0.19 s at 800,000 events) or every delivery of the status (0.2-0.65 s at 500,000) to find
    one owner's. The narrowest filter walks its own index (events_by_task, the deliveries' of the event or task, a
    subscription's, or with a status those of the subscription of that status: queries.deliveries_listing)."""
    await _stored_history(store)
    deliveries = [(f"dlv_{n:06d}", f"evt_{n:06d}", "task.queued", f"tsk_{n // 3:06d}", "sub_1" if n else "sub_2",
                   "sub_1" if n else "sub_2", "http://x/", "succeeded", 1.0, 1.0) for n in range(3 * FINISHED)]
    await store.transact(lambda tx: tx.many(
        "INSERT INTO deliveries (id, event_id, event_type, task_id, subscription_id, target, url, status, created_at, "
        "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", deliveries))
    if analyzed:
        await _analyze(store)
    [own] = await store.list_events(after=None, type="task.running", task_id="tsk_000000", limit=10)
    assert own.id == "evt_000001"
    pages = [(await store.list_deliveries(subscription_id=None, status="succeeded", task_id=None,
                                          event_id="evt_000005", limit=10, cursor=None))[0],
             (await store.list_deliveries(subscription_id=None, status="succeeded", task_id="tsk_000002",
                                          event_id=None, limit=10, cursor=None))[0],
             (await store.list_deliveries(subscription_id="sub_2", status=None, task_id=None, event_id=None,
                                          limit=10, cursor=None))[0],
             (await store.list_deliveries(subscription_id="sub_2", status="succeeded", task_id=None, event_id=None,
                                          limit=10, cursor=None))[0]]
    assert [[d.id for d in page] for page in pages] == [["dlv_000005"], ["dlv_000008", "dlv_000007", "dlv_000006"],
                                                        ["dlv_000000"], ["dlv_000000"]]
    if not isinstance(store, SQLiteStore):
        # PostgreSQL plans these from its statistics (the hints are comments there), but a subscription's page of one
        # status without its values (queries.GENERIC_PLAN): for a pair rare where each value alone is common, its
        # plan for the values walked the primary key backwards (28-32 ms at 300,000 deliveries). A read so marked
        # runs in a transaction of its own that says so; others do not.
        assert q.GENERIC_PLAN in q.deliveries_listing(subscription=True, status=True, task=False, event=False)
        assert q.GENERIC_PLAN not in q.deliveries_listing(subscription=True, status=False, task=False, event=False)
        mode = "SELECT current_setting('plan_cache_mode') AS mode"
        assert [row["mode"] for row in await store._read_all(q.GENERIC_PLAN + mode)] == ["force_generic_plan"]
        assert (await store._read(q.GENERIC_PLAN + mode) or {})["mode"] == "force_generic_plan"
        assert [row["mode"] for row in await store._read_all(mode)] == ["auto"]
        return
    sent = await _sqlite_statements(store, lambda: store.list_events(after=None, type="task.running",
                                                                     task_id="tsk_000000", limit=10))
    for owner in ({"event_id": "evt_000005", "status": "succeeded"}, {"task_id": "tsk_000002", "status": "succeeded"},
                  {"subscription_id": "sub_2", "status": None}, {"subscription_id": "sub_2", "status": "succeeded"}):
        given: dict[str, Any] = {"subscription_id": None, "task_id": None, "event_id": None, **owner}
        sent += await _sqlite_statements(store, lambda: store.list_deliveries(limit=10, cursor=None, **given))
    looks = [sql for sql in sent if "FROM events" in sql or "FROM deliveries" in sql]
    assert len(looks) == 5, sent
    walked = []
    for sql in looks:
        plan = (await _plans(store, sql, ()))[0]
        assert "events_by_type" not in plan and "deliveries_by_status" not in plan and "SCAN" not in plan, plan
        walked.append(plan.split(" USING ")[1].split(" (")[0])
    # A subscription's deliveries of one status: those alone (sql/028), not all of the subscription's or the status's.
    assert walked[3:] == ["INDEX deliveries_by_subscription", "INDEX deliveries_by_subscription_status"], walked


async def _deliveries_of_three_subscriptions(store: Store, status_of: Callable[[int], str]) -> list[tuple[Any, ...]]:
    """A delivery of each stored event, to sub_0, sub_1 and sub_2 in turn, the nth with status_of(n); their rows."""
    deliveries = [(f"dlv_{n:06d}", f"evt_{n:06d}", "task.queued", f"tsk_{n // 3:06d}", f"sub_{n % 3}",
                   f"sub_{n % 3}", "http://x/", status_of(n), 1.0, 1.0) for n in range(3 * FINISHED)]
    await store.transact(lambda tx: tx.many(
        "INSERT INTO deliveries (id, event_id, event_type, task_id, subscription_id, target, url, status, created_at, "
        "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", deliveries))
    return deliveries


@pytest.mark.parametrize("analyzed", [False, True])
async def test_cancelling_a_subscriptions_deliveries_reads_its_pending_ones(store: Store, analyzed: bool) -> None:
    """Disabling, deleting or auto-disabling a subscription cancels its pending deliveries under the writer's lock
    (auto-disable inside a shared transaction of attempts and transitions). Through deliveries_by_status it read
    every pending delivery of every subscription (36-38 ms at 20,000, as when another subscriber is down)."""
    await _stored_history(store)
    deliveries = await _deliveries_of_three_subscriptions(store, lambda n: "pending" if n % 2 else "succeeded")
    if analyzed:
        await _analyze(store)
    cancelled = await store.transact(lambda tx: tx.run(q.CANCEL_PENDING_DELIVERIES, ("gone", 2.0, 2.0, "sub_1")))
    assert cancelled == len([d for d in deliveries if d[4] == "sub_1" and d[7] == "pending"])
    rows = await store._read_all("SELECT subscription_id, COUNT(*) AS n FROM deliveries WHERE status = 'pending' "
                                 "GROUP BY subscription_id ORDER BY subscription_id")
    assert [(row["subscription_id"], row["n"]) for row in rows] == [("sub_0", 1500), ("sub_2", 1500)]
    if not isinstance(store, SQLiteStore) and not analyzed:
        return      # a table PostgreSQL has never analyzed is guessed tiny
    for plan in await _plans(store, q.CANCEL_PENDING_DELIVERIES, ("gone", 2.0, 2.0, "sub_0")):
        assert "deliveries_by_subscription_status" in plan, plan
        assert "deliveries_by_status" not in plan and "Seq Scan" not in plan, plan


@pytest.mark.parametrize("analyzed", [False, True])
async def test_a_file_in_use_is_told_by_the_images_that_still_use_it(store: Store, analyzed: bool) -> None:
    """Retention asks whether a file is in use under the writer's lock, once per batch of images it expires. Through
    images_by_sha256 it walked every expired image sharing the bytes before the one that still uses them (5.3 ms
    with 50,000 on SQLite; PostgreSQL read the whole table). images_in_use holds only the images not expired."""
    shared = "a" * 64
    images = [(f"img_{n:06d}", f"tsk_{n:06d}", 0, "expired", shared, "ab/cd/a.png") for n in range(FINISHED)]
    images += [(f"img_other_{n:06d}", f"tsk_other_{n:06d}", 0, "archived", f"{n:064d}", "x") for n in range(FINISHED)]
    images.append(("img_live", "tsk_live", 0, "archived", shared, "ab/cd/a.png"))
    await store.transact(lambda tx: tx.many(
        "INSERT INTO images (id, task_id, idx, status, sha256, path) VALUES (?, ?, ?, ?, ?, ?)", images))
    assert await store.transact(lambda tx: tx.one(q.IMAGE_IN_USE, (shared, shared))) is not None
    await store.transact(lambda tx: tx.run("UPDATE images SET status = 'expired' WHERE id = 'img_live'"))
    if analyzed:
        await _analyze(store)
        if not isinstance(store, SQLiteStore):
            from relay.store.postgres import PostgresStore
            assert isinstance(store, PostgresStore)
            async with store.pool.acquire() as conn:    # as autovacuum leaves it: index-only scans need no heap
                await conn.execute("VACUUM images")
    assert await store.transact(lambda tx: tx.one(q.IMAGE_IN_USE, (shared, shared))) is None
    if not isinstance(store, SQLiteStore) and not analyzed:
        return      # a table PostgreSQL has never analyzed is guessed tiny
    for plan in await _plans(store, q.IMAGE_IN_USE, (shared, shared)):
        assert "images_in_use" in plan and "Seq Scan on images" not in plan, plan


@pytest.mark.parametrize("analyzed", [False, True])
async def test_a_replays_candidates_are_read_status_by_status_in_the_window(store: Store, analyzed: bool) -> None:
    """A replay picks a subscription's deliveries of some statuses in a window of ids, a batch at a time, in a write
    transaction. Each status is a bounded walk of deliveries_by_subscription_status, merged in id order: with the
    statuses as one IN, PostgreSQL's generic plan (a prepared statement's after five runs) walked the primary key
    over the whole window (117-138 ms a batch at 526,000 deliveries), and so did its plans for the values of a
    subscription with few deliveries of a status common overall."""
    await _stored_history(store)
    statuses = ("succeeded", "failed", "pending")
    deliveries = await _deliveries_of_three_subscriptions(
        store, lambda n: statuses[n % 4 % 3] if n % 4 else "canceled")
    if analyzed:
        await _analyze(store)
    sql = q.replay_candidates(2)
    args = (*("sub_1", "failed", 0.0, 9.0, "dlv_000100", "dlv_999999", 6), *("sub_1", "succeeded", 0.0, 9.0, "dlv_000100",
                                                                         "dlv_999999", 6), 6)
    rows = await store.transact(lambda tx: tx.all(sql, args))
    expected = [d[0] for d in deliveries if d[4] == "sub_1" and d[7] in ("failed", "succeeded") and d[0] > "dlv_000100"]
    assert [row["id"] for row in rows] == expected[:6]
    if isinstance(store, SQLiteStore):
        [plan] = await _plans(store, sql, args)
        assert plan.count("deliveries_by_subscription_status") == 2, plan
        assert "SCAN deliveries" not in plan, plan
        return
    # PostgreSQL plans it without its values (queries.GENERIC_PLAN), for the rest of its transaction only, whether it
    # is the transaction's first statement (the setting goes with BEGIN) or not. Its plans for the values walked the
    # primary key from the window's start for a pair rare where each value alone is common (55 ms a batch at 300,000
    # deliveries); which plan is cheapest at this test's size says nothing of that, so the setting is what is held.

    async def mode(tx: Any) -> str:
        return str((await tx.one("SHOW plan_cache_mode"))["plan_cache_mode"])

    async def marked_first(tx: Any) -> str:
        rows = await tx.all(sql, args)
        assert [row["id"] for row in rows] == expected[:6]
        return await mode(tx)

    async def marked_later(tx: Any) -> list[str]:
        before = await mode(tx)
        await tx.all(sql, args)
        return [before, await mode(tx)]
    assert await store.transact(marked_first) == "force_generic_plan"
    alone = q.GENERIC_PLAN + "SELECT current_setting('plan_cache_mode') AS mode"     # the whole transaction
    assert [row["mode"] for row in await store.transact(lambda tx: tx.last(alone, ()))] == ["force_generic_plan"]
    assert await store.transact(marked_later) == ["auto", "force_generic_plan"]
    assert await store.transact(mode) == "auto"
