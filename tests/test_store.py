"""Store contract: every backend must pass these (transactions, idempotency, leases, the event log)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from relay import ids
from relay.clock import ManualClock
from relay.errors import Conflict
from relay.models import Job, ProviderImage, ProviderStatus, Task, TaskStatus, TaskUpdate
from relay.states import Transition, on_update
from relay.store import queries as q
from relay.store.base import ArchiveResult, Store
from relay.store import sqlite as sqlite_store
from relay.store.sqlite import SQLiteStore, sqlite_spelling
from relay.store.tx import Tx
from tests.harness import listed_events, wait_for


def new_task(clock: ManualClock, provider: str = "gmicloud") -> Task:
    now = clock.now()
    return Task(id=ids.new_id("tsk", now), provider=provider, request={"prompt": "p", "n": 1}, created_at=now,
                updated_at=now)


def job(kind: str, task_id: str | None, run_at: float, key: str | None = None) -> Job:
    return Job(id=ids.new_id("job", run_at), kind=kind, task_id=task_id, run_at=run_at, dedupe_key=key)


async def test_create_and_get_task(store: Store, clock: ManualClock) -> None:
    """A created task reads back identically, with its first job queued."""
    task = new_task(clock)
    created, fresh = await store.create_task(task, [job("submit", task.id, clock.now(), f"submit:{task.id}")])
    assert fresh and created.id == task.id
    loaded = await store.get_task(task.id)
    assert loaded is not None and loaded.status == TaskStatus.PENDING and loaded.request == {"prompt": "p", "n": 1}
    assert (await store.job_counts()) == {"submit:queued": 1}


async def test_idempotency_key_same_body_returns_original(store: Store, clock: ManualClock) -> None:
    """The same key and body give back the first task; a different body is a conflict."""
    first, created = await store.create_task(new_task(clock), [], idempotency=("s", "k1", "h1"))
    again, created_again = await store.create_task(new_task(clock), [], idempotency=("s", "k1", "h1"))
    assert created and not created_again and again.id == first.id
    with pytest.raises(Conflict):
        await store.create_task(new_task(clock), [], idempotency=("s", "k1", "h2"))
    other, created_other = await store.create_task(new_task(clock), [], idempotency=("other-scope", "k1", "h2"))
    assert created_other and other.id != first.id


async def test_idempotency_key_expires_after_24h(store: Store, clock: ManualClock) -> None:
    """After 24 h the same key creates a new task."""
    first, _ = await store.create_task(new_task(clock), [], idempotency=("s", "k", "h"))
    clock.advance(24 * 3600 + 1)
    second, created = await store.create_task(new_task(clock), [], idempotency=("s", "k", "h"))
    assert created and second.id != first.id


async def test_apply_writes_one_event_per_transition(store: Store, clock: ManualClock) -> None:
    """Repeated updates write one transition and one event; sequence bumps once per change."""
    task = new_task(clock)
    await store.create_task(task, [])
    update = TaskUpdate(status=ProviderStatus.RUNNING, provider_task_id="p1")
    results = [await store.apply(task.id, lambda t: on_update(t, update), clock.now()) for _ in range(3)]
    assert results[0] is not None and results[1] is None and results[2] is None
    events = await listed_events(store, 1, task_id=task.id)
    assert [e.type for e in events] == ["task.running"]
    loaded = await store.get_task(task.id)
    assert loaded is not None and loaded.sequence == 2 and loaded.provider_task_id == "p1"
    assert events[0].sequence == 2 and events[0].data is not None and events[0].data["status"] == "running"


async def test_apply_opens_no_transaction_for_an_update_stale_on_the_task_seen(store: Store, clock: ManualClock,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """apply(seen=task): an update that changes nothing on the task as the caller read it opens no transaction (a
    task only moves forward, so it is stale on the row too); one that would change the task seen is decided again
    on the locked row, as it is now."""
    task = new_task(clock)
    await store.create_task(task, [])
    seen_pending = await store.get_task(task.id)
    running = TaskUpdate(status=ProviderStatus.RUNNING, provider_task_id="p1")
    assert seen_pending is not None
    assert await store.apply(task.id, lambda t: on_update(t, running), clock.now(), seen=seen_pending) is not None
    opened: list[str] = []
    for name in ("transact", "transact_shared"):
        def counted(original: Any, name: str = name) -> Any:
            async def transaction(body: Any) -> Any:
                opened.append(name)
                return await original(body)
            return transaction
        monkeypatch.setattr(store, name, counted(getattr(store, name)))
    seen_running = await store.get_task(task.id)
    assert seen_running is not None and seen_running.status == TaskStatus.RUNNING
    assert await store.apply(task.id, lambda t: on_update(t, running), clock.now(), seen=seen_running) is None
    assert opened == []
    # The pending task seen earlier would move: decided on the row, which is running already, nothing is written.
    assert await store.apply(task.id, lambda t: on_update(t, running), clock.now(), seen=seen_pending) is None
    assert opened       # (on PostgreSQL transact_shared is transact)
    events = await listed_events(store, 1, task_id=task.id)
    assert [e.type for e in events] == ["task.running"]


async def test_success_creates_images_and_archive_jobs_ordered_by_expiry(store: Store, clock: ManualClock) -> None:
    """Entering archiving writes image rows and one archive job each; the soonest-dying is claimed first."""
    task = new_task(clock)
    await store.create_task(task, [])
    now = clock.now()
    update = TaskUpdate(status=ProviderStatus.SUCCEEDED, images=(
        ProviderImage(url="https://x/late.png", expires_at=now + 20 * 3600),
        ProviderImage(url="https://x/soon.png", expires_at=now + 600)))
    applied = await store.apply(task.id, lambda t: on_update(t, update), now)
    assert applied is not None and applied.task.status == TaskStatus.ARCHIVING and len(applied.task.images) == 2
    claimed = await store.claim(now, limit=1, lease_seconds=30)
    assert claimed[0].payload["image_id"] == applied.task.images[1].id   # soon.png first


async def test_a_task_is_read_without_its_images_inline_sources(store: Store, clock: ManualClock) -> None:
    """OpenAI's images arrive as base64, megabytes each, kept in the image's row until it is archived: every read
    of the task or of its images leaves them out; only the archive job's read of the one image carries its own."""
    task = new_task(clock)
    await store.create_task(task, [])
    now = clock.now()
    sources = ["aGVsbG8=" * 4096, "d29ybGQ=" * 4096]
    applied = await store.apply(task.id, lambda t: on_update(t, TaskUpdate(
        status=ProviderStatus.SUCCEEDED, images=tuple(ProviderImage(b64=b64) for b64 in sources))), now)
    assert applied is not None and len(applied.task.images) == 2
    for sql, args in ((q.IMAGES_OF_TASK, (task.id,)), q.images_of_tasks([task.id]),
                      (q.LOAD_IMAGE, (applied.task.images[0].id,))):
        rows = await store._read_all(sql, args)     # noqa: SLF001 - what the task's reads fetch is the point
        assert rows and all("source_data" not in row.keys() and row["status"] == "pending" for row in rows), sql
    stored = await store.get_task(task.id)
    assert stored is not None and [image.id for image in stored.images] == [image.id for image in applied.task.images]
    for image, b64 in zip(applied.task.images, sources, strict=True):
        found = await store.get_image_source(image.id)
        assert found is not None and found[0].id == image.id and found[1] == b64


async def test_images_a_transition_adds_are_the_rows_stored_with_the_ones_already_there(store: Store,
                                                                                       clock: ManualClock) -> None:
    """The transition builds its new images instead of reading them back: what it returns, what its event carries
    and what the archive jobs name must be exactly the stored rows. An index the task already has keeps its row
    (the insert skips it), and only the new index gets one."""
    task = new_task(clock)
    await store.create_task(task, [])
    now = clock.now()
    first = await store.apply(task.id, lambda t: on_update(t, TaskUpdate(
        status=ProviderStatus.SUCCEEDED, images=(ProviderImage(url="https://x/0.png", expires_at=now + 600),))), now)
    assert first is not None
    [kept] = first.task.images
    again = await store.apply(task.id, lambda t: Transition(TaskStatus.ARCHIVING, "task.generated", images=(
        ProviderImage(url="https://x/other.png"), ProviderImage(url="https://x/1.png"))), now + 1, default_expiry=60)
    assert again is not None
    stored = await store.get_task(task.id)
    assert stored is not None
    assert again.task.images == stored.images, "the transition's images are not the stored rows"
    assert [img.index for img in stored.images] == [0, 1] and stored.images[0] == kept
    assert stored.images[1].source_url == "https://x/1.png" and stored.images[1].source_expires_at == now + 61
    assert [img["id"] for img in again.event.data["images"]] == [img.id for img in stored.images]
    jobs = await store.claim(now + 3600, limit=10, lease_seconds=30, kinds=["archive"])
    assert sorted(job.payload["image_id"] for job in jobs) == sorted(img.id for img in stored.images)


async def test_task_succeeds_when_last_image_archived(store: Store, clock: ManualClock) -> None:
    """image_archived succeeds the task only after every image is saved, writing task.succeeded once."""
    task = new_task(clock)
    await store.create_task(task, [])
    update = TaskUpdate(status=ProviderStatus.SUCCEEDED, images=(ProviderImage(url="https://x/1.png"),
                                                                 ProviderImage(url="https://x/2.png")))
    applied = await store.apply(task.id, lambda t: on_update(t, update), clock.now())
    assert applied is not None
    result = ArchiveResult(sha256="a" * 64, content_type="image/png", width=1, height=1, bytes=10, path="aa/a.png")
    first, second = applied.task.images
    assert await store.image_archived(first.id, result, clock.now()) is None
    done = await store.image_archived(second.id, result, clock.now())
    assert done is not None and done.task.status == TaskStatus.SUCCEEDED
    assert await store.image_archived(second.id, result, clock.now()) is None   # a rerun changes nothing
    types = [e.type for e in await listed_events(store, 2, task_id=task.id)]
    assert types == ["task.generated", "task.succeeded"]


async def test_image_failure_fails_task(store: Store, clock: ManualClock) -> None:
    """A permanently failed image fails the task with its reason."""
    task = new_task(clock)
    await store.create_task(task, [])
    update = TaskUpdate(status=ProviderStatus.SUCCEEDED, images=(ProviderImage(url="https://x/1.png"),))
    applied = await store.apply(task.id, lambda t: on_update(t, update), clock.now())
    assert applied is not None
    failed = await store.image_failed(applied.task.images[0].id, "source_gone", "HTTP 410", clock.now())
    assert failed is not None and failed.task.status == TaskStatus.FAILED
    assert failed.task.error == {"code": "source_gone", "message": "HTTP 410"}


async def test_dedupe_key_allows_one_live_job(store: Store, clock: ManualClock) -> None:
    """A second job with a live dedupe key is skipped; after the first finishes, the key is free."""
    assert await store.enqueue([job("poll", None, clock.now(), "poll:t1")]) == 1
    assert await store.enqueue([job("poll", None, clock.now(), "poll:t1")]) == 0
    [claimed] = await store.claim(clock.now(), limit=10, lease_seconds=30)
    await store.finish_job(claimed)
    assert await store.enqueue([job("poll", None, clock.now(), "poll:t1")]) == 1


async def test_claim_leases_and_expired_lease_is_reclaimed(store: Store, clock: ManualClock) -> None:
    """A claimed job is invisible until its lease runs out; then another worker gets it, one attempt more."""
    await store.enqueue([job("poll", None, clock.now())])
    [first] = await store.claim(clock.now(), limit=10, lease_seconds=30)
    assert first.attempts == 1
    assert await store.claim(clock.now(), limit=10, lease_seconds=30) == []
    clock.advance(31)
    [again] = await store.claim(clock.now(), limit=10, lease_seconds=30)
    assert again.id == first.id and again.attempts == 2
    await store.finish_job(first)     # the stale holder cannot finish it
    assert (await store.job_counts()) == {"poll:queued": 1}
    await store.finish_job(again)
    assert (await store.job_counts()) == {}


async def test_held_jobs_are_not_due_until_their_lease_runs_out(store: Store, clock: ManualClock) -> None:
    """A claimed job keeps its run_at but is not due (for the worker, for queue lag) until its lease runs out,
    which is when the worker looks again; a retry or a job brought forward ends the lease. (The console's
    counts: tests/test_store_console.py.)"""
    now = clock.now()
    await store.enqueue([job("a", None, now - 10), job("b", None, now + 100, "b")])
    [held] = await store.claim(now, limit=1, lease_seconds=30)
    assert held.kind == "a" and held.run_at == now - 10
    assert await store.next_run_at(now) == now + 30               # when its lease runs out (b is later)
    assert await store.oldest_due_jobs(now) == {}
    assert await store.extend_lease(held, now + 60)
    assert await store.next_run_at(now + 31) == now + 60          # extended: still held, until then
    assert await store.next_run_at(now + 61) == now - 10          # the lease ran out: due again, as it was
    assert await store.oldest_due_jobs(now + 61) == {"a": now - 10}
    await store.retry_job(held, now + 5, None)
    assert await store.next_run_at(now) == now + 5
    [again] = await store.claim(now + 5, limit=1, lease_seconds=30)
    assert again.attempts == 2
    # A held job brought forward (a delivery retried from the console: queries.JOB_DUE_NOW) is due at once.
    [b] = await store.claim(now + 100, limit=1, lease_seconds=30, kinds=["b"])
    await store.transact(lambda tx: tx.run(q.JOB_DUE_NOW, (now + 100, now + 100, "b")))
    assert [j.id for j in await store.claim(now + 100, limit=1, lease_seconds=30, kinds=["b"])] == [b.id]


async def test_the_worker_looks_for_the_kinds_it_runs(store: Store, clock: ManualClock) -> None:
    """next_run_at of the worker's kinds passes over a due job of another kind (one a later version added, or an
    earlier one left), which would have an idle worker look again at once, forever; so does a held one's lease."""
    now = clock.now()
    await store.enqueue([job("other", None, now - 5), job("k", None, now + 50), job("k2", None, now - 1)])
    assert await store.next_run_at(now) == now - 5
    assert await store.next_run_at(now, ["k"]) == now + 50
    [held] = await store.claim(now, limit=1, lease_seconds=30, kinds=["k2"])
    assert await store.next_run_at(now, ["k", "k2"]) == now + 30          # its lease's end, before now + 50
    assert await store.next_run_at(now, ["k"]) == now + 50


async def test_claim_respects_run_at_and_limit(store: Store, clock: ManualClock) -> None:
    """Only due jobs are claimed, oldest first, at most `limit`."""
    now = clock.now()
    await store.enqueue([job("a", None, now + 60), job("b", None, now - 5), job("c", None, now - 10)])
    claimed = await store.claim(now, limit=1, lease_seconds=30)
    assert [j.kind for j in claimed] == ["c"]
    claimed = await store.claim(now, limit=10, lease_seconds=30)
    assert [j.kind for j in claimed] == ["b"]


async def test_retry_and_bury(store: Store, clock: ManualClock) -> None:
    """retry_job reschedules with the error recorded; bury_job keeps it dead and frees its key."""
    await store.enqueue([job("a", None, clock.now(), "k")])
    [claimed] = await store.claim(clock.now(), limit=1, lease_seconds=30)
    await store.retry_job(claimed, clock.now() + 5, "boom")
    assert await store.claim(clock.now(), limit=1, lease_seconds=30) == []
    clock.advance(5)
    [again] = await store.claim(clock.now(), limit=1, lease_seconds=30)
    assert again.last_error == "boom" and again.attempts == 2
    await store.bury_job(again, "gave up", clock.now())
    assert (await store.job_counts()) == {"a:dead": 1}
    assert await store.enqueue([job("a", None, clock.now(), "k")]) == 1


async def test_list_tasks_paginates_newest_first(store: Store, clock: ManualClock) -> None:
    """Cursor pagination walks every task once, newest first, and filters by status."""
    made = []
    for _ in range(5):
        clock.advance(1)
        task = new_task(clock)
        await store.create_task(task, [])
        made.append(task.id)
    page1, cursor = await store.list_tasks(status=None, provider=None, limit=2, cursor=None)
    page2, cursor2 = await store.list_tasks(status=None, provider=None, limit=2, cursor=cursor)
    page3, cursor3 = await store.list_tasks(status=None, provider=None, limit=2, cursor=cursor2)
    assert [t.id for t in page1 + page2 + page3] == list(reversed(made)) and cursor3 is None
    none, _ = await store.list_tasks(status="succeeded", provider=None, limit=10, cursor=None)
    assert none == []


async def test_events_log_is_ordered_with_cursor(store: Store, clock: ManualClock) -> None:
    """GET /v1/events semantics: oldest first after the cursor event."""
    task = new_task(clock)
    await store.create_task(task, [])
    for status in (ProviderStatus.QUEUED, ProviderStatus.RUNNING, ProviderStatus.FAILED):
        await store.apply(task.id, lambda t, s=status: on_update(t, TaskUpdate(status=s)), clock.now())
    # Waited for, not read once: on PostgreSQL the log holds back events while a transaction that began before
    # them may still be open, and one in another database that ended between the statement's snapshot and its
    # look at pg_stat_activity counts as such (a delay, never a skipped event; PostgresStore._visible_events).
    events: list[Any] = []
    after: list[Any] = []

    async def listed() -> bool:
        events[:] = await store.list_events(after=None, type=None, task_id=None, limit=10)
        after[:] = await store.list_events(after=events[0].id, type=None, task_id=None, limit=10) if events else []
        return len(events) == 3 and len(after) == 2
    await wait_for(listed, 10, "the three events to be listed")
    assert [e.type for e in events] == ["task.queued", "task.running", "task.failed"]
    assert [e.id for e in after] == [e.id for e in events[1:]]


async def test_submit_mark_survives_and_clears(store: Store, clock: ManualClock) -> None:
    """mark_submit_started is kept; clear_submit_started removes it only before a provider id is known, and only
    the mark its caller made (another run's, made since, stays)."""
    task = new_task(clock)
    await store.create_task(task, [])
    marked = await store.mark_submit_started(task.id, clock.now())
    assert marked is not None and marked.submit_started_at == clock.now()
    await store.clear_submit_started(task.id, clock.now() - 1)         # a mark since replaced
    kept = await store.get_task(task.id)
    assert kept is not None and kept.submit_started_at == clock.now()
    await store.clear_submit_started(task.id, clock.now())
    loaded = await store.get_task(task.id)
    assert loaded is not None and loaded.submit_started_at is None


async def test_wal_is_checkpointed_off_the_write_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Automatic checkpoints are off on the writer (they stalled whole group commits); the store's own
    background checkpoints keep the WAL from growing without bound: after a 12 MB burst the WAL restarts
    and is cut back to the store's size limit (4 MB here: WAL_SIZE_LIMIT itself is larger than the burst).
    Without them it would stay over 12 MB."""
    limit = 4 * 1024 * 1024
    monkeypatch.setattr(sqlite_store, "WAL_SIZE_LIMIT", limit)
    store = SQLiteStore(tmp_path / "relay.db")
    await store.open()
    try:
        row = await (await store._writer.execute("PRAGMA wal_autocheckpoint")).fetchone()   # type: ignore[union-attr]
        assert row[0] == 0
        await store._writer.execute("CREATE TABLE filler (x BLOB)")                        # type: ignore[union-attr]
        wal = tmp_path / "relay.db-wal"
        # One transaction: no checkpoint can let the WAL start over (and be cut) halfway through the burst.
        async with store._tx() as db:
            await db.executemany("INSERT INTO filler VALUES (randomblob(4000))", [()] * 3000)
        assert wal.stat().st_size > 12_000_000

        async def checkpointed() -> bool:
            # After a complete checkpoint the next writer starts the WAL over from its beginning.
            async with store._tx() as db:
                await db.execute("INSERT INTO filler VALUES (x'00')")
            return wal.stat().st_size <= limit
        await wait_for(checkpointed, 10, "a background checkpoint to let the WAL restart")
    finally:
        await store.close()


def wal_started_over(wal: Path) -> int:
    """How many times the WAL has started over: its header's checkpoint sequence number (bytes 12-15)."""
    with wal.open("rb") as header:
        return int.from_bytes(header.read(16)[12:16], "big")


async def write_filler(store: SQLiteStore, megabytes: int) -> None:
    """`megabytes` of 40 kB transactions into a table `filler (x BLOB)`, back to back."""
    for _ in range(megabytes * 25):
        await store.transact(lambda tx: tx.many("INSERT INTO filler VALUES (randomblob(4000))", [()] * 10))


async def test_the_wal_is_checkpointed_sooner_while_writes_come(tmp_path: Path) -> None:
    """A checkpoint that finds anything committed since the last one says so, and the next comes after
    CHECKPOINT_WRITING_INTERVAL instead of CHECKPOINT_INTERVAL (each flushes less, stalling the writes made during
    its fdatasync for less: bench.callbacks ack p99); one that finds nothing new lets an idle relay sleep. The
    same amount written twice, the WAL started over in between (its frame counts back where they were), and a
    commit by another process's connection each count as writes."""
    import asyncio
    import sqlite3

    store = SQLiteStore(tmp_path / "relay.db")
    await store.open()
    assert store._checkpoints is not None
    store._checkpoints.cancel()                         # the looks below are the only ones
    await asyncio.gather(store._checkpoints, return_exceptions=True)
    try:
        await store._writer.execute("CREATE TABLE filler (x BLOB)")                        # type: ignore[union-attr]
        assert await store._checkpoint() is True        # the first look
        assert await store._checkpoint() is False       # nothing written since
        wal = tmp_path / "relay.db-wal"
        for _ in range(2):
            started = wal_started_over(wal)
            await write_filler(store, 1)
            assert wal_started_over(wal) == started + 1     # each burst begins a WAL copied to its end
            assert await store._checkpoint() is True
            assert await store._checkpoint() is False
        other = sqlite3.connect(tmp_path / "relay.db", isolation_level=None)
        try:
            other.execute("INSERT INTO filler VALUES (x'00')")
        finally:
            other.close()
        assert await store._checkpoint() is True
        assert await store._checkpoint() is False
    finally:
        await store.close()
    assert sqlite_store.CHECKPOINT_WRITING_INTERVAL < sqlite_store.CHECKPOINT_INTERVAL


async def test_a_checkpoint_kept_out_by_another_processs_leaves_the_restart_pause_alone(tmp_path: Path) -> None:
    """While another process checkpoints (`relay retention`'s RESTART, waiting for a read) a PASSIVE one is refused
    (busy, no frame counts): that round does nothing, and a pause after a restart round that found the WAL in use
    is kept, not taken for a WAL that started over on its own."""
    import asyncio
    import threading

    store = SQLiteStore(tmp_path / "relay.db")
    await store.open()
    assert store._checkpoints is not None
    store._checkpoints.cancel()
    await asyncio.gather(store._checkpoints, return_exceptions=True)
    reading = sqlite3.connect(tmp_path / "relay.db", isolation_level=None, check_same_thread=False)
    restarting = sqlite3.connect(tmp_path / "relay.db", isolation_level=None, check_same_thread=False)
    looking = sqlite3.connect(tmp_path / "relay.db", isolation_level=None)
    restart: threading.Thread | None = None
    try:
        await store._writer.execute("CREATE TABLE filler (x BLOB)")                        # type: ignore[union-attr]
        await write_filler(store, 1)
        reading.execute("BEGIN")
        reading.execute("SELECT count(*) FROM filler").fetchone()       # a read the RESTART must wait for
        restarting.execute("PRAGMA busy_timeout=20000")

        def restart_checkpoint() -> None:       # tried again while a probe below holds the checkpoint lock itself
            while restarting.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()[1] == -1:
                pass
        restart = threading.Thread(target=restart_checkpoint)
        restart.start()
        # The RESTART holds the checkpoint lock while it waits: a PASSIVE checkpoint elsewhere is refused.
        await wait_for(lambda: looking.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[0] == 1, 10,
                       "the other process's RESTART to hold the checkpoint lock")
        store._restart_pause, store._restart_again_at = 8.0, 1e12
        assert await store._checkpoint() is True
        assert (store._restart_pause, store._restart_again_at) == (8.0, 1e12)
    finally:
        if reading.in_transaction:
            reading.execute("COMMIT")
        if restart is not None:
            await asyncio.to_thread(restart.join, 30)
            assert not restart.is_alive()
        for conn in (reading, restarting, looking):
            conn.close()
        await store.close()


async def test_the_wal_starts_over_under_a_steady_stream_of_writes(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Writers that never pause (four at once, back to back) and a reader that never pauses either: a checkpoint
    alone copies the WAL but never lets it start over, since a write transaction is always open or frames are
    appended meanwhile, so the WAL grew with everything written (7.8 GB in a minute of claims). Once it is over
    WAL_RESTART_AT the checkpoint's second round starts it over: the WAL header's checkpoint sequence number,
    one more at each start, moves several times while they write (not at all without that round). They write
    until it has moved three times, up to 400 MB or a minute: on a fast machine 40 MB went by in two restarts."""
    import asyncio

    monkeypatch.setattr(sqlite_store, "CHECKPOINT_INTERVAL", 0.02)
    monkeypatch.setattr(sqlite_store, "WAL_RESTART_AT", 2 * 1024 * 1024)
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_RETRY_CAP", 0.1)     # a round kept out by a read: soon again
    store = SQLiteStore(tmp_path / "relay.db")
    await store.open()
    try:
        await store._writer.execute("CREATE TABLE filler (x BLOB)")                        # type: ignore[union-attr]
        wal = tmp_path / "relay.db-wal"
        before, writing = wal_started_over(wal), True

        deadline = asyncio.get_running_loop().time() + 60

        async def read() -> None:
            while writing:
                await store._read_all("SELECT rowid FROM filler ORDER BY rowid DESC LIMIT 1")

        async def write() -> None:
            for _ in range(100):        # 1 MB each, up to 100 MB per writer
                if wal_started_over(wal) - before >= 3 or asyncio.get_running_loop().time() > deadline:
                    return
                await write_filler(store, 1)
        reader = asyncio.create_task(read())
        try:
            await asyncio.gather(*(write() for _ in range(4)))
        finally:
            writing = False
            await reader
        assert wal_started_over(wal) - before >= 3
    finally:
        await store.close()


async def test_a_wal_that_starts_over_keeps_its_file_up_to_the_limit(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A WAL that starts over is written again from its beginning, in the file it has, as long as that file is
    no larger than WAL_SIZE_LIMIT (why: the comment there). test_wal_is_checkpointed_off_the_write_path shows
    a smaller limit cutting the same burst back."""
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_INTERVAL", 0.02)
    store = SQLiteStore(tmp_path / "relay.db")
    await store.open()
    try:
        await store._writer.execute("CREATE TABLE filler (x BLOB)")                        # type: ignore[union-attr]
        wal = tmp_path / "relay.db-wal"
        # One transaction: no checkpoint can let the WAL start over halfway through the burst.
        await store.transact(lambda tx: tx.many("INSERT INTO filler VALUES (randomblob(4000))", [()] * 3000))
        grown, before = wal.stat().st_size, wal_started_over(wal)
        assert 12_000_000 < grown <= sqlite_store.WAL_SIZE_LIMIT

        async def started_over() -> bool:
            await store.transact(lambda tx: tx.run("INSERT INTO filler VALUES (x'00')"))
            return wal_started_over(wal) > before
        await wait_for(started_over, 10, "the WAL to start over")
        assert wal.stat().st_size >= grown        # written again in place, not cut back
    finally:
        await store.close()


async def test_a_read_kept_in_the_wal_puts_off_its_start_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """A read that stays in the WAL (a backup, a long scan) keeps the second round from starting it over: that
    is logged, and tried again after a pause rather than with the writer held every round; once the read has
    ended, the WAL starts over."""
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_INTERVAL", 0.02)
    monkeypatch.setattr(sqlite_store, "WAL_RESTART_AT", 1024 * 1024)
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_RETRY_CAP", 0.2)
    path = tmp_path / "relay.db"
    store = SQLiteStore(path)
    await store.open()
    pin = sqlite3.connect(path, isolation_level=None)
    try:
        await store._writer.execute("CREATE TABLE filler (x BLOB)")                        # type: ignore[union-attr]
        wal = tmp_path / "relay.db-wal"
        await write_filler(store, 2)
        pin.execute("BEGIN")
        pin.execute("SELECT COUNT(*) FROM filler").fetchone()      # a read transaction left open: in the WAL
        await write_filler(store, 2)

        async def warned() -> bool:
            return "could not start over" in caplog.text
        await wait_for(warned, 10, "the round kept out by the read to be logged")
        before = wal_started_over(wal)
        pin.execute("ROLLBACK")

        async def started() -> bool:
            await store.transact(lambda tx: tx.run("INSERT INTO filler VALUES (x'00')"))
            return wal_started_over(wal) > before
        await wait_for(started, 10, "the WAL to start over once the read has ended")
    finally:
        pin.close()
        await store.close()


async def test_a_transaction_body_that_suspends_is_refused_and_rolled_back(tmp_path: Path) -> None:
    """Bodies run on the writer's thread (one hop per transaction) may await only the connection; one that
    awaits anything else is refused with a clear error, and what it wrote is rolled back."""
    import asyncio

    store = SQLiteStore(tmp_path / "relay.db")
    await store.open()
    try:
        async def body(tx: Tx) -> None:
            await tx.run("INSERT INTO idempotency_keys (scope, key, body_hash, task_id, created_at) "
                         "VALUES ('s', 'k', 'h', 't', 0)")
            await asyncio.sleep(0)      # suspends: not allowed on the writer's thread
        with pytest.raises(RuntimeError, match="suspends"):
            await store.transact(body)
        row = await (await store._r.execute("SELECT COUNT(*) FROM idempotency_keys")).fetchone()
        assert row[0] == 0
    finally:
        await store.close()


async def _analyzed(store: SQLiteStore) -> None:
    """Statistics of a busy relay's jobs in sqlite_stat1 (ANALYZE over 2,000 jobs: most queued for later, some due,
    some dead, five kinds), which can turn the planner to another index."""
    now, kinds = 1000.0, ["poll", "deliver", "archive", "submit", "callback"]
    rows = [(f"job_{n:06d}", kinds[n % 5], f"tsk_{n // 3}", "{}", now + (n % 50) * 10 - 20,
             "dead" if n % 20 == 0 else "queued", None if n % 20 == 0 else f"k{n}", 0, 12, now) for n in range(2000)]
    await store._write_many("INSERT INTO jobs (id, kind, task_id, payload, run_at, state, dedupe_key, attempts, "
                            "max_attempts, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
    await store._writer.execute("ANALYZE")          # type: ignore[union-attr]


@pytest.mark.parametrize("analyzed", [False, True])
@pytest.mark.parametrize("kinds", [0, 1, 5])
async def test_the_claim_walks_the_due_index_and_never_sorts_the_queue(tmp_path: Path, kinds: int,
                                                                       analyzed: bool) -> None:
    """The claim's plan walks jobs_due in run_at order and stops at its limit, with or without statistics; a plan
    that sorts every queued job (what the planner picked once jobs_by_state_kind existed: 0.5 s per claim at a
    million rows) fails."""
    from relay.store.sqlite import claim_sql

    store = SQLiteStore(tmp_path / "relay.db")
    await store.open()
    try:
        if analyzed:
            await _analyzed(store)
        inner = claim_sql(kinds).split("WHERE rowid IN (", 1)[1].rsplit(") RETURNING", 1)[0]
        args = (0.0, 0.0, *(["poll"] * kinds), 32)
        plan = " / ".join(row[3] for row in await store._writer.execute_fetchall(      # type: ignore[union-attr]
            "EXPLAIN QUERY PLAN " + inner, args))
        assert plan == "SEARCH jobs USING INDEX jobs_due (run_at<?)", plan
        # and the UPDATE reaches each job by its rowid, not through a second index (see claim_sql)
        whole = " / ".join(row[3] for row in await store._writer.execute_fetchall(      # type: ignore[union-attr]
            "EXPLAIN QUERY PLAN " + claim_sql(kinds), (1.0, "token", *args)))
        assert "INTEGER PRIMARY KEY (rowid=?)" in whole and "autoindex" not in whole, whole
    finally:
        await store.close()


@pytest.mark.parametrize("analyzed", [False, True])
async def test_the_looks_for_due_jobs_walk_the_due_index(tmp_path: Path, analyzed: bool) -> None:
    """next_run_at (the worker's sleep), oldest_due_jobs (queue lag on /metrics) and the console's queue by kind
    read jobs_due from its head as SQLiteStore runs them, with or without statistics. Left to the planner they went
    through jobs_by_state_kind and read every queued job: 0.6 s per look at a million rows (queries.BY_DUE)."""
    store = SQLiteStore(tmp_path / "relay.db")
    await store.open()
    try:
        if analyzed:
            await _analyzed(store)
        sent: list[str] = []
        aside: list[str] = []
        store._reader._conn.set_trace_callback(sent.append)        # type: ignore[union-attr]
        store._background._conn.set_trace_callback(aside.append)   # type: ignore[union-attr]
        await store.next_run_at(1.0)
        await store.next_run_at(1.0, ["poll", "submit"])
        await store.oldest_due_jobs(1.0)
        await store.queue_by_kind(1.0)
        store._reader._conn.set_trace_callback(None)               # type: ignore[union-attr]
        store._background._conn.set_trace_callback(None)           # type: ignore[union-attr]
        # The Queue page's count of every job runs beside the reader the API shares (SQLiteStore._read_whole).
        assert [sql for sql in aside if "FROM jobs" in sql] and not [sql for sql in sent if "COUNT(*)" in sql]
        looks = [sql for sql in sent + aside if "FROM jobs" in sql]
        assert len(looks) == 4, sent
        for sql in looks:
            plan = [row[3] for row in await store._writer.execute_fetchall(      # type: ignore[union-attr]
                "EXPLAIN QUERY PLAN " + sql)]
            walks = [step for step in plan if "SEARCH jobs" in step]
            assert walks and all(step.startswith("SEARCH jobs USING INDEX jobs_due") for step in walks), (sql, plan)
    finally:
        await store.close()


async def test_whole_table_reads_run_beside_the_reader_the_api_shares(tmp_path: Path) -> None:
    """The counts of every job and task (/metrics; the console's Queue page, every 3 s while open: 0.25 s at a
    million jobs), the console's task search (every task's metadata, every 1.5 s), its Providers and
    Subscriptions pages' counts (every live task, the window's callbacks and attempts: 0.1 s at 90,000 live
    tasks and 150,000 callbacks a day), the queue lag (every due job)
    and the cost totals (every costed task of the window) of each /metrics scrape go to SQLite's background
    connection, so the API's and workers' reads never queue behind them on the reader's one thread
    (SQLiteStore._read_whole). A page without a search stays on the reader."""
    store = SQLiteStore(tmp_path / "relay.db")
    await store.open()
    try:
        await store.enqueue([Job(id="job_1", kind="poll", run_at=1.0)])
        sent: list[str] = []
        aside: list[str] = []
        store._reader._conn.set_trace_callback(sent.append)        # type: ignore[union-attr]
        store._background._conn.set_trace_callback(aside.append)   # type: ignore[union-attr]
        assert await store.job_counts() == {"poll:queued": 1}
        assert await store.task_counts() == {}
        [kind] = await store.queue_by_kind(2.0)
        assert (kind.kind, kind.queued, kind.due) == ("poll", 1, 1)
        assert await store.search_tasks(status=None, provider=None, search="order-7", limit=10, cursor=None) == ([],
                                                                                                              None)
        assert await store.oldest_due_jobs(2.0) == {"poll": 1.0}
        assert await store.cost_totals(0) == []
        # The Providers and Subscriptions pages' counts of live tasks and of a window's callbacks and attempts.
        assert await store.in_flight_by_provider() == {}
        assert await store.callbacks_by_provider(0) == {}
        assert await store.delivery_health(0) == {}
        assert await store._latency_rank("sub_1", 0, 1, 0.5) is None
        assert not sent, sent
        await store.search_tasks(status="running", provider=None, search=None, limit=10, cursor=None)
        store._reader._conn.set_trace_callback(None)               # type: ignore[union-attr]
        store._background._conn.set_trace_callback(None)           # type: ignore[union-attr]
        assert len([sql for sql in aside if "COUNT(*) AS n" in sql]) == 6, aside
        assert [sql for sql in aside if "FROM inbox" in sql] and [sql for sql in aside if "OFFSET" in sql], aside
        assert len([sql for sql in aside if "LIKE" in sql]) == 1, aside
        assert [sql for sql in aside if "MIN(run_at)" in sql] and [sql for sql in aside if "SUM(cost_amount)" in sql]
        assert len(sent) == 1 and "FROM tasks" in sent[0], sent
    finally:
        await store.close()


@pytest.mark.parametrize("analyzed", [False, True])
async def test_the_in_flight_count_reads_only_the_live_tasks(store: Store, analyzed: bool) -> None:
    """Every submit counts the provider's tasks in flight under the writer's lock (reserve_submit). The count reads
    only live tasks (tasks_by_provider_status, tasks_submitting), with or without statistics, in the plan made for
    the values and (PostgreSQL) in the generic plan of the prepared statement. Through tasks_by_provider it read
    every task the provider was ever given: 32 ms per submit at 40,000 finished ones on SQLite."""
    history = [(f"tsk_{n:06d}", "evolink", "succeeded" if n >= 12 else ("queued", "running", "pending")[n % 3],
                None if n >= 12 or n % 3 != 2 else 1.0, "{}", n, 1.0, 1.0) for n in range(3000)]
    await store.transact(lambda tx: tx.many(
        "INSERT INTO tasks (id, provider, status, submit_started_at, request, sequence, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", history))
    args = ("evolink", "evolink", "tsk_x")
    if isinstance(store, SQLiteStore):
        if analyzed:
            await store._writer.execute("ANALYZE")                                          # type: ignore[union-attr]
        plans = [" / ".join(row[3] for row in await store._writer.execute_fetchall(        # type: ignore[union-attr]
            "EXPLAIN QUERY PLAN " + sqlite_spelling(q.COUNT_IN_FLIGHT), args))]
        count = await store._read(q.COUNT_IN_FLIGHT, args)
    else:
        from relay.store.postgres import PostgresStore, to_postgres
        assert isinstance(store, PostgresStore)
        async with store.pool.acquire() as conn:
            if analyzed:
                await conn.execute("ANALYZE tasks")
            plans = ["\n".join(row[0] for row in await conn.fetch("EXPLAIN " + to_postgres(q.COUNT_IN_FLIGHT), *args))]
            async with conn.transaction():
                await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
                await conn.execute("PREPARE count_in_flight AS " + to_postgres(q.COUNT_IN_FLIGHT))
                plans.append("\n".join(row[0] for row in await conn.fetch(
                    "EXPLAIN EXECUTE count_in_flight('evolink', 'evolink', 'tsk_x')")))
                await conn.execute("DEALLOCATE count_in_flight")
            count = await conn.fetchrow(to_postgres(q.COUNT_IN_FLIGHT), *args)
    assert count is not None and count["n"] == 12       # 4 queued, 4 running, 4 pending whose submit started
    for plan in plans:
        # Never every task of the provider (tasks_by_provider) or of the table. PostgreSQL may count the queued and
        # running ones of every provider (tasks_by_status) where it finds that cheaper: live tasks all the same.
        assert "tasks_by_provider " not in plan and "Seq Scan on tasks" not in plan, plan
        if isinstance(store, SQLiteStore):
            assert "tasks_by_provider_status" in plan and "tasks_submitting" in plan, plan


async def test_waiting_callbacks_are_settled_together(store: Store, clock: ManualClock) -> None:
    """waiting_callbacks lists only the task's callback jobs that no worker holds and that arrived by the cutoff;
    settle_waiting_callbacks deletes each one still waiting and writes its inbox row, passes over one a worker
    claimed in between (its own run settles it), and keeps the first outcome of one settled already (a run that
    settled it and failed after)."""
    from relay.jobs.callback import CALLBACK_JOB, callback_job, carried_callback
    task, other = new_task(clock, "evolink"), new_task(clock, "evolink")
    await store.create_task(task, [])
    await store.create_task(other, [])
    # Bodies as providers may send them (non-ASCII, an emoji, escapes), received at fractional times: the inbox
    # rows are made from the jobs' payloads by the database, and must hold them exactly.
    received = [callback_job("evolink", task.id, json.dumps({"n": n, "s": 'héllo 😀 "q" \\ \n\u2028'},
                                                            ensure_ascii=False), clock.now() + n - 0.123456789)
                for n in range(6)]
    elsewhere = callback_job("evolink", other.id, '{"n": 0}', clock.now() + 1)
    for made in (*received, elsewhere):
        await store.receive_callback(made)
    held = await store.claim(clock.now(), limit=1, lease_seconds=60, kinds=[CALLBACK_JOB])
    assert [j.id for j in held] == [received[0].id]          # a worker has the oldest
    waiting = await store.waiting_callbacks(task.id, CALLBACK_JOB, clock.now() + 4, "", 100)     # received[5] is later
    assert sorted(job_id for job_id, _, _ in waiting) == sorted(j.id for j in received[1:5])
    assert {(provider, body) for _, provider, body in waiting} == {("evolink", j.payload["body"]) for j in received[1:5]}

    clock.advance(10)
    claimed_meanwhile = await store.claim(clock.now(), limit=1, lease_seconds=60, kinds=[CALLBACK_JOB])
    assert [j.id for j in claimed_meanwhile] == [received[1].id]
    already = carried_callback(task.id, received[2].payload)
    await store.settle_callbacks([(already, "applied", "by its own run")], clock.now())
    settled = {job_id: ("evolink", "ignored", "together") for job_id, _, _ in waiting}
    done = await store.settle_waiting_callbacks(settled, clock.now())
    assert done == {("evolink", "ignored", "together"): 2}          # received[3] and [4]: [2] was settled already
    for made, expected in ((received[1], None), (received[2], ("applied", "by its own run")),
                           (received[3], ("ignored", "together")), (received[4], ("ignored", "together")),
                           (received[5], None), (elsewhere, None)):
        row = await store.get_callback(str(made.payload["inbox_id"]))
        assert (None if row is None else (row["status"], row["note"])) == expected, made.payload["body"]
        if row is not None:
            assert row["body"] == made.payload["body"] and row["task_id"] == task.id
            assert row["provider"] == "evolink" and row["received_at"] == made.payload["received_at"]
    left = await store._read_all("SELECT id FROM jobs WHERE kind = ? ORDER BY id", (CALLBACK_JOB,))  # type: ignore[attr-defined]
    assert sorted(r["id"] for r in left) == sorted(j.id for j in (received[0], received[1], received[5], elsewhere))
    assert await store.settle_waiting_callbacks(settled, clock.now()) == {}


async def test_waiting_callbacks_come_a_page_at_a_time(store: Store, clock: ManualClock) -> None:
    """waiting_callbacks pages by id after a cursor, so callbacks a page leaves waiting are not read again."""
    from relay.jobs.callback import CALLBACK_JOB, callback_job
    task = new_task(clock, "evolink")
    await store.create_task(task, [])
    made = [callback_job("evolink", task.id, f'{{"n": {n}}}', clock.now()) for n in range(5)]
    for job in made:
        await store.receive_callback(job)
    ids, after, pages = [], "", []
    while True:
        page = [job_id for job_id, _, _ in await store.waiting_callbacks(task.id, CALLBACK_JOB, clock.now(), after, 2)]
        pages.append(len(page))
        ids += page
        if len(page) < 2:
            break
        after = page[-1]
    assert pages == [2, 2, 1] and ids == sorted(j.id for j in made)


HELD_INSERT = ("INSERT INTO jobs (id, kind, task_id, payload, run_at, state, dedupe_key, attempts, max_attempts, "
               "created_at) VALUES (?, ?, ?, '{}', ?, 'queued', ?, 0, 5, ?) ON CONFLICT (dedupe_key) DO NOTHING")


async def test_held_writes_act_as_if_each_ran_at_once_in_order(store: Store, clock: ManualClock) -> None:
    """Writes a transaction does not read back (Tx.write, held and sent together on PostgreSQL) act as if each
    ran when it was made: of two inserts of one dedupe key the first stays, an update sees the row an earlier
    write added, a write reading another table sees that table's held changes, a second update of one row adds
    to the first, and a read in the transaction sees them all."""
    task = new_task(clock)
    await store.create_task(task, [])
    now = clock.now()

    async def body(tx: Tx) -> Any:
        await tx.write(HELD_INSERT, ("job_held_1", "poll", task.id, now, "held:key", now))
        await tx.write_many(HELD_INSERT, [("job_held_2", "archive", task.id, now, "held:key", now),
                                          ("job_held_3", "archive", task.id, now, "held:other", now)])
        await tx.write("UPDATE jobs SET run_at = run_at + 60 WHERE dedupe_key = ?", ("held:key",))
        # Reads the jobs held before it: 10 only if it sees the run_at moved just above.
        await tx.write("UPDATE tasks SET progress = 10 * (SELECT COUNT(*) FROM jobs WHERE task_id = ? AND run_at > ?) "
                       "WHERE id = ?", (task.id, now, task.id))
        await tx.write("UPDATE tasks SET progress = progress + 5 WHERE id = ?", (task.id,))
        return await tx.all("SELECT id, kind, run_at FROM jobs WHERE task_id = ? ORDER BY id", (task.id,))
    seen = await store.transact(body)
    assert [(r["id"], r["kind"], r["run_at"]) for r in seen] == [
        ("job_held_1", "poll", now + 60), ("job_held_3", "archive", now)]
    loaded = await store.get_task(task.id)
    assert loaded is not None and loaded.progress == 15


async def test_a_held_write_that_fails_fails_its_transaction(store: Store, clock: ManualClock) -> None:
    """A held write's error surfaces by the commit at the latest, and nothing of the transaction is written."""
    task = new_task(clock)
    await store.create_task(task, [])
    now = clock.now()

    async def body(tx: Tx) -> None:
        await tx.write("UPDATE tasks SET progress = 50 WHERE id = ?", (task.id,))
        await tx.write(HELD_INSERT, ("job_held_ok", "poll", task.id, now, "held:ok", now))
        await tx.write(HELD_INSERT, ("job_held_ok", "poll", task.id, now, "held:again", now))   # the same id
    with pytest.raises(Exception, match="(?i)unique|duplicate"):
        await store.transact(body)
    loaded = await store.get_task(task.id)
    assert loaded is not None and loaded.progress != 50
    assert await store.job_counts() == {}


async def test_held_writes_alone_are_all_or_nothing(store: Store, clock: ManualClock) -> None:
    """A transaction of held writes only writes all of them or none: one that fails undoes those before it."""
    task = new_task(clock)
    await store.create_task(task, [job("poll", task.id, clock.now(), "held:taken")])
    [taken] = await store.claim(clock.now(), limit=1, lease_seconds=60)
    now = clock.now()

    async def body(tx: Tx) -> None:
        await tx.write("UPDATE tasks SET progress = 50 WHERE id = ?", (task.id,))
        await tx.write(HELD_INSERT, (taken.id, "poll", task.id, now, "held:fresh", now))    # an id in use
    with pytest.raises(Exception, match="(?i)unique|duplicate"):
        await store.transact(body)
    loaded = await store.get_task(task.id)
    assert loaded is not None and loaded.progress != 50


async def _failed_deliveries(store: Store, now: float, times: Sequence[float]) -> tuple[str, dict[float, str]]:
    """A subscription and, for each time, a failed delivery to it created then: (subscription id, {time: id})."""
    from relay.deliveries.models import Subscription

    sub = Subscription(id="sub_window", url="https://hooks.example.com/in", events=["*"], keyring="opaque",
                       created_at=now, updated_at=now)
    await store.create_subscription(sub)
    task = Task(id="tsk_window", provider="gmicloud", request={"prompt": "p", "n": 1}, created_at=now,
                updated_at=now)
    await store.create_task(task, [])
    made = {at: ids.new_id("dlv", at) for at in times}
    await store.transact(lambda tx: tx.many(
        "INSERT INTO deliveries (id, event_id, event_type, task_id, subscription_id, target, url, status, created_at, "
        "updated_at) VALUES (?, ?, 'task.failed', ?, ?, ?, 'https://hooks.example.com/in', 'failed', ?, ?)",
        [(delivery_id, f"evt_{n}", task.id, sub.id, sub.id, at, at)
         for n, (at, delivery_id) in enumerate(made.items())]))
    return sub.id, made


async def _pending(store: Store) -> set[str]:
    return {row["id"] for row in await store._read_all("SELECT id FROM deliveries WHERE status = 'pending'")}


async def test_a_replay_window_takes_the_deliveries_created_in_it_to_the_millisecond(store: Store) -> None:
    """replay_deliveries walks the subscription's deliveries by id within the window's ids (an id holds its creation
    time, ids.id_range) and still filters by created_at: made at `since` or in the millisecond of `until` but
    before it is in; in the millisecond of `since` but before it, or at `until`, is out; a window from before 1970
    takes everything."""
    now = 1_800_000_000.0
    since, until = now + 100.0005, now + 200.0005      # each edge in the middle of a millisecond
    sub_id, made = await _failed_deliveries(store, now, (now, since - 0.0003, since, since + 50.0, until - 0.0003,
                                                         until, until + 0.0004, now + 900.0))
    assert await store.replay_deliveries(sub_id, since=since, until=until, statuses=["failed"],
                                         now=now) == (3, False)
    assert await _pending(store) == {made[since], made[since + 50.0], made[until - 0.0003]}
    assert await store.replay_deliveries(sub_id, since=-1e10, until=now + 1e9, statuses=["failed"],
                                         now=now) == (5, False)
    assert await _pending(store) == set(made.values())


async def test_a_replay_takes_each_status_once_and_none_for_no_status(store: Store) -> None:
    """The candidates are read a status at a time (queries.replay_candidates), so a status asked for twice is still
    one walk, each delivery restarted once; no status, no delivery."""
    now = 1_800_000_000.0
    sub_id, made = await _failed_deliveries(store, now, (now, now + 1, now + 2))
    assert await store.replay_deliveries(sub_id, since=now, until=now + 60, statuses=[], now=now) == (0, False)
    assert await store.replay_deliveries(sub_id, since=now, until=now + 60, statuses=["failed", "succeeded", "failed"],
                                         now=now) == (3, False)
    assert await _pending(store) == set(made.values())


async def test_a_replay_restarts_its_deliveries_a_batch_per_transaction(store: Store,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """REPLAY_BATCH deliveries per transaction (SQLite's writer is held for one batch at a time), each batch after
    the last id of the one before (a delivery restarted by an earlier batch that has failed again meanwhile is not
    taken twice), at most REPLAY_MAX in all, with "more" when some are left."""
    from relay.store import deliveries

    now = 1_800_000_000.0
    sub_id, made = await _failed_deliveries(store, now, [now + n for n in range(7)])
    monkeypatch.setattr(deliveries, "REPLAY_BATCH", 2)
    monkeypatch.setattr(deliveries, "REPLAY_MAX", 5)
    transactions = 0
    transact = store.transact

    async def counted(body: Any) -> Any:
        nonlocal transactions
        transactions += 1
        done = await transact(body)
        # The batch's deliveries are sent at once and fail again before the next batch.
        await transact(lambda tx: tx.run("UPDATE deliveries SET status = 'failed' WHERE status = 'pending'"))
        return done
    monkeypatch.setattr(store, "transact", counted)
    assert await store.replay_deliveries(sub_id, since=now, until=now + 60, statuses=["failed"], now=now) == (5, True)
    assert transactions == 3
    replayed = await store._read_all("SELECT id FROM deliveries WHERE round_origin = 'replay'")
    assert {row["id"] for row in replayed} == {made[now + n] for n in range(5)}
    monkeypatch.setattr(store, "transact", transact)
    assert await store.replay_deliveries(sub_id, since=now + 5, until=now + 60, statuses=["failed"],
                                         now=now) == (2, False)
    assert await _pending(store) == {made[now + 5], made[now + 6]}


@pytest.mark.parametrize("setting, level", [(None, 1), ("normal", 1), ("full", 2)])
async def test_sqlite_synchronous_is_set_on_every_connection(tmp_path: Path, setting: str | None, level: int) -> None:
    """storage.sqlite_synchronous reaches each of the store's connections (writer, readers, background): NORMAL (1)
    by default, FULL (2), an fsync per commit, when asked. Through the runtime's open_store, as relay serve does."""
    from relay.runtime import open_store
    from tests.harness import settings_for

    env = {"RELAY_STORAGE_SQLITE_SYNCHRONOUS": setting} if setting else {}
    store = open_store(settings_for(tmp_path, **env))
    assert isinstance(store, SQLiteStore)
    await store.open()
    try:
        connections = [store._writer, store._reader, store._background, store._key_reader]
        assert all(conn is not None for conn in connections)
        for conn in connections:
            row = await (await conn.execute("PRAGMA synchronous")).fetchone()   # type: ignore[union-attr]
            assert row is not None and row[0] == level
    finally:
        await store.close()


def test_sqlite_synchronous_takes_normal_or_full(tmp_path: Path) -> None:
    from relay.config import ConfigError
    from tests.harness import settings_for

    with pytest.raises(ConfigError, match="storage.sqlite_synchronous: must be one of normal, full"):
        settings_for(tmp_path, RELAY_STORAGE_SQLITE_SYNCHRONOUS="off")


async def test_a_canceled_tasks_provider_task_is_noted_once_and_the_note_runs_twice(store: Store,
                                                                                    clock: ManualClock) -> None:
    """note_canceled_provider_task is a _change (PostgreSQL runs it again after a lost connection): run twice it
    answers True twice; another provider task, or a task not canceled, is not noted."""
    from relay.states import on_cancel
    task = new_task(clock)
    await store.create_task(task, [])
    assert not await store.note_canceled_provider_task(task.id, "prov-1"), "not canceled"
    assert await store.apply(task.id, on_cancel, clock.now())
    assert await store.note_canceled_provider_task(task.id, "prov-1")
    assert await store.note_canceled_provider_task(task.id, "prov-1")
    assert not await store.note_canceled_provider_task(task.id, "prov-2")
    loaded = await store.get_task(task.id)
    assert loaded is not None and loaded.provider_task_id == "prov-1" and loaded.status.value == "canceled"
