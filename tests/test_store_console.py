"""The console's reads and the dead-job retry (relay.store.console), on SQLite and PostgreSQL alike."""

from __future__ import annotations

import time
from typing import Any

import pytest

from relay import ids
from relay.deliveries.models import Attempt
from relay.errors import Conflict
from relay.models import Job, Task
from relay.store import queries as q
from relay.store.base import Store
from relay.store.rows import attempt_row
from relay.store.tx import Tx


async def _task(store: Store, now: float, **fields: object) -> Task:
    task = Task(id=ids.new_id("tsk", now), provider="gmicloud", request={"prompt": "x"}, created_at=now,
                updated_at=now, **fields)  # type: ignore[arg-type]
    await store.create_task(task, [])
    return task


async def _dead_job(store: Store, now: float, key: str, error: str = "gave up") -> Job:
    job = Job(id=ids.new_id("job", now), kind="poll", payload={}, run_at=now, dedupe_key=key, max_attempts=3)
    await store.enqueue([job])
    [claimed] = await store.claim(now, limit=1, lease_seconds=60, kinds=["poll"])
    await store.bury_job(claimed, error, now)
    return claimed


async def test_search_finds_a_task_by_id_provider_task_id_or_metadata_value(store: Store) -> None:
    """Search matches the task id, the provider's task id, or text in the metadata; LIKE wildcards are literal."""
    now = time.time()
    a = await _task(store, now, metadata={"order": "A-1042"}, provider_task_id="prov-77")
    b = await _task(store, now + 1, metadata={"order": "B_9"})
    # Metadata text matches whatever its case, on both backends (PostgreSQL's LIKE alone is case-sensitive).
    for text, expected in ((a.id, [a.id]), ("prov-77", [a.id]), ("A-1042", [a.id]), ("B_9", [b.id]),
                           ("order", [b.id, a.id]), ("%", []), ("_", [b.id]), ("a-1042", [a.id]),
                           ("ORDER", [b.id, a.id])):
        found, _ = await store.search_tasks(status=None, provider=None, search=text, limit=10, cursor=None)
        assert [t.id for t in found] == expected, text
    page, cursor = await store.search_tasks(status=None, provider="gmicloud", search=None, limit=1, cursor=None)
    assert [t.id for t in page] == [b.id] and cursor == b.id
    rest, end = await store.search_tasks(status=None, provider=None, search=None, limit=1, cursor=cursor)
    assert [t.id for t in rest] == [a.id] and end is None


async def test_a_retried_dead_job_is_queued_due_now_with_its_key(store: Store) -> None:
    """A dead job comes back queued, due now, attempts reset, holding its dedupe key again."""
    now = time.time()
    dead = await _dead_job(store, now, "poll:tsk_a")
    assert [j.id for j in (await store.list_jobs(state="dead", kind=None, limit=10, cursor=None))[0]] == [dead.id]
    job = await store.retry_dead_job(dead.id, now + 5)
    assert job is not None and job.state == "queued" and job.attempts == 0 and job.run_at == now + 5
    assert await store.enqueue([Job(id=ids.new_id("job"), kind="poll", run_at=now, dedupe_key="poll:tsk_a")]) == 0
    with pytest.raises(Conflict):
        await store.retry_dead_job(dead.id, now + 6)
    assert await store.retry_dead_job("job_unknown", now) is None


async def test_a_dead_job_whose_work_is_queued_again_is_dropped_on_retry(store: Store) -> None:
    """When a live job holds the dead one's key, retry deletes the dead one and returns the live one."""
    now = time.time()
    dead = await _dead_job(store, now, "poll:tsk_b")
    live = Job(id=ids.new_id("job", now + 1), kind="poll", run_at=now + 100, dedupe_key="poll:tsk_b")
    assert await store.enqueue([live]) == 1
    job = await store.retry_dead_job(dead.id, now + 2)
    assert job is not None and job.id == live.id
    assert await store.get_job(dead.id) is None


async def test_queue_by_kind_counts_depth_due_running_dead_and_the_oldest_due(store: Store) -> None:
    """Per kind: queued, due now, leased, dead, and when the oldest due job was due."""
    now = time.time()
    await store.enqueue([Job(id=ids.new_id("job"), kind="archive", run_at=run_at, dedupe_key=f"archive:{i}")
                         for i, run_at in enumerate((now - 30, now - 10, now + 60))])
    await _dead_job(store, now, "poll:tsk_c")
    stats = {k.kind: k for k in await store.queue_by_kind(now)}
    assert stats["archive"].queued == 3 and stats["archive"].due == 2 and stats["archive"].running == 0
    assert stats["archive"].oldest_due_at == pytest.approx(now - 30)
    assert stats["poll"].dead == 1 and stats["poll"].queued == 0
    [held] = await store.claim(now, limit=1, lease_seconds=60, kinds=["archive"])       # the oldest, now held
    stats = {k.kind: k for k in await store.queue_by_kind(now)}
    assert stats["archive"].queued == 3 and stats["archive"].due == 1 and stats["archive"].running == 1
    assert stats["archive"].oldest_due_at == pytest.approx(now - 10)


async def test_a_job_held_by_a_replica_whose_clock_runs_ahead_counts_as_running(store: Store) -> None:
    """The Queue page walks only the jobs due by a little after now; one claimed by a replica whose clock is 30 s
    ahead (its run_at still ahead of this reader's now) is running, neither due nor missed."""
    now = time.time()
    await store.enqueue([Job(id=ids.new_id("job"), kind="poll", run_at=now + 20, dedupe_key="poll:ahead"),
                         Job(id=ids.new_id("job"), kind="poll", run_at=now + 9000, dedupe_key="poll:later")])
    [held] = await store.claim(now + 30, limit=5, lease_seconds=60, kinds=["poll"])
    stats = {k.kind: k for k in await store.queue_by_kind(now)}
    assert (stats["poll"].queued, stats["poll"].due, stats["poll"].running) == (2, 0, 1)
    assert stats["poll"].oldest_due_at is None


async def test_delivery_health_gives_success_rate_and_nearest_rank_percentiles(store: Store) -> None:
    """100 attempts in the window with latencies 1..100 ms, 90 of them 2xx: p50 50 ms, p99 99 ms, 90 %; older
    attempts and the task's own webhook are not counted."""
    now = time.time()

    async def write(tx: Tx) -> None:
        await tx.run(q.INSERT_DELIVERY, ("dlv_1", "evt_1", "task.succeeded", "tsk_1", "sub_1", "sub_1", "http://h/",
                                         None, now, now))
        await tx.run(q.INSERT_DELIVERY, ("dlv_2", "evt_1", "task.succeeded", "tsk_1", None, "task", "http://h/",
                                         None, now, now))
        for i in range(1, 101):
            ok = i > 10
            await tx.run(q.INSERT_ATTEMPT, attempt_row(Attempt(
                delivery_id="dlv_1", number=i, at=now - 60, url="http://h/", status_code=200 if ok else 503,
                latency_ms=float(i), error=None if ok else "HTTP 503", subscription_id="sub_1")))
        await tx.run(q.INSERT_ATTEMPT, attempt_row(Attempt(delivery_id="dlv_1", number=101, at=now - 7200,
                                                           url="http://h/", status_code=500, latency_ms=9999.0,
                                                           error="old", subscription_id="sub_1")))
        await tx.run(q.INSERT_ATTEMPT, attempt_row(Attempt(delivery_id="dlv_2", number=1, at=now, url="http://h/",
                                                           status_code=200, latency_ms=1.0)))
    await store.transact(write)
    health = await store.delivery_health(now - 3600)
    assert set(health) == {"sub_1"}
    hour = health["sub_1"]
    assert (hour.attempts, hour.succeeded, hour.p50_ms, hour.p99_ms) == (100, 90, 50.0, 99.0)
    assert hour.success_rate == pytest.approx(0.9)
    assert await store.last_delivery_error("sub_1", now - 3600) == (pytest.approx(now - 60), "HTTP 503")
    # The Subscriptions page asks for the subscriptions it shows: the others' percentiles are not read.
    ranked: list[Any] = []
    rank = store._latency_rank

    async def counted(*args: Any) -> Any:
        ranked.append(args[0])
        return await rank(*args)
    store._latency_rank = counted  # type: ignore[method-assign]
    assert await store.delivery_health(now - 3600, ["sub_other"]) == {} and ranked == []
    assert set(await store.delivery_health(now - 3600, ["sub_1", "sub_other"])) == {"sub_1"}
    assert ranked == ["sub_1", "sub_1"]


async def test_a_tasks_timeline_reads_the_attempts_of_the_deliveries_it_shows(store: Store,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The timeline shows a task's newest deliveries (TIMELINE_LIMIT: those of its last events, which tell whether
    its outcome reached everyone) with their attempts, oldest first, and says older ones were left out; the attempts
    of the deliveries left out are not read (every attempt of every delivery was: 60 ms for a task of 14,000
    deliveries on PostgreSQL)."""
    from relay.store import console

    monkeypatch.setattr(console, "TIMELINE_LIMIT", 2)
    now = time.time()

    async def write(tx: Tx) -> None:
        for n in (1, 2, 3):
            await tx.run(q.INSERT_DELIVERY, (f"dlv_{n}", "evt_1", "task.succeeded", "tsk_1", f"sub_{n}", f"sub_{n}",
                                             "http://h/", None, now, now))
        for number, delivery in enumerate(["dlv_3", "dlv_1", "dlv_2", "dlv_1", "dlv_3"], start=1):
            await tx.run(q.INSERT_ATTEMPT, attempt_row(Attempt(
                delivery_id=delivery, number=number, at=now + number, url="http://h/", status_code=503,
                latency_ms=1.0, error="HTTP 503", subscription_id="sub_x")))
    await store.transact(write)
    timeline = await store.task_timeline("tsk_1")
    assert [d.id for d in timeline.deliveries["evt_1"]] == ["dlv_2", "dlv_3"] and timeline.older_deliveries
    assert {delivery: [a.number for a in attempts] for delivery, attempts in timeline.attempts.items()} == {
        "dlv_2": [3], "dlv_3": [1, 5]}
    monkeypatch.setattr(console, "TIMELINE_LIMIT", 3)
    timeline = await store.task_timeline("tsk_1")
    assert [d.id for d in timeline.deliveries["evt_1"]] == ["dlv_1", "dlv_2", "dlv_3"]
    assert not timeline.older_deliveries
    assert (await store.task_timeline("tsk_none")).attempts == {}


def test_an_in_list_is_padded_to_a_power_of_two() -> None:
    """IN lists (a page's images, a timeline's attempts) come in ten statement texts, not one per count: each text
    is prepared on every pooled PostgreSQL connection. The padding repeats the last value, which selects nothing
    more."""
    assert q.padded_in(["a"]) == ("(?)", ["a"])
    assert q.padded_in(["a", "b", "c"]) == ("(?,?,?,?)", ["a", "b", "c", "c"])
    assert q.padded_in([str(n) for n in range(500)])[0].count("?") == 512
    assert {q.padded_in([str(n) for n in range(count)])[0] for count in range(1, 501)} == {
        f"({q.marks(1 << bits)})" for bits in range(10)}
