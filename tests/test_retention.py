"""Retention: old rows go in batches, in foreign-key order, never what a pending delivery needs; image files go
only when no image still uses their sha256, also against an archive of the same bytes at the same moment;
crash leftovers (tombstones, temp files) are finished; one housekeeping job per database; `relay retention`.

Store-level tests run on SQLite and PostgreSQL (the `store` fixtures), image files in a real local directory and
in moto's real S3 server.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from relay import ids
from relay.clock import ManualClock
from relay.config import ConfigError, RetentionSettings, load_settings
from relay.deliveries.models import Attempt, Subscription
from relay.errors import ArchiveError
from relay.images.s3 import S3ImageStore
from relay.images.store import ImageStore, LocalImageStore, image_key
from relay.jobs.callback import callback_job
from relay.jobs.housekeeping import HousekeepingHandler, schedule
from relay.models import Archive, Job, ProviderImage, ProviderStatus, Task, TaskStatus, TaskUpdate
from relay.queue import Worker
from relay.retention import TMP_MAX_AGE, Report, Sweeper
from relay.sourcelinks import url_key
from relay.states import on_update
from relay.store.base import ArchiveResult, Store
from relay.store.retention import IMAGE_BEING_DELETED, OWNER_LEASE
from tests.s3server import REGION, MotoS3

DAY = 86400.0
KEEP = RetentionSettings()                                  # the defaults: 30 d / 30 d / 14 d / images kept
FILES = replace(KEEP, images=365 * DAY)                     # files go with their last image


# ---- building old state through the store's own use cases -------------------------------------------------
async def subscribe(store: Store, clock: ManualClock) -> str:
    sub = Subscription(id=ids.new_id("sub", clock.now()), url="https://hooks.example.com/in", events=["*"],
                       keyring="opaque", created_at=clock.now(), updated_at=clock.now())
    await store.create_subscription(sub)
    return sub.id


async def count(store: Store, sql: str, *args: object) -> int:
    row = await store._read(sql, args)
    assert row is not None
    return int(row["n"])


async def finished_task(store: Store, clock: ManualClock, data: bytes, images: ImageStore | None = None, *,
                        settle: bool = True) -> Task:
    """A task as relay leaves it: idempotency key, a callback, two events delivered to every subscription
    (with one attempt each, when `settle`), its image archived (its file put in `images`), succeeded."""
    now = clock.now()
    task = Task(id=ids.new_id("tsk", now), provider="gmicloud", request={"prompt": "p", "n": 1}, created_at=now,
                updated_at=now)
    await store.create_task(task, [], idempotency=("scope", uuid.uuid4().hex, "h"))
    callback = callback_job("gmicloud", task.id, "{}", now)
    await store.receive_callback(replace(callback, run_at=now + 3600))
    await store.settle_callbacks([({"id": callback.payload["inbox_id"], "provider": "gmicloud", "task_id": task.id,
                                    "body": "{}", "received_at": now}, "applied", "applied task.succeeded")], now)
    update = TaskUpdate(status=ProviderStatus.SUCCEEDED, images=(ProviderImage(url="https://x/1.png"),))
    applied = await store.apply(task.id, lambda t: on_update(t, update), now)
    assert applied is not None
    image = applied.task.images[0]
    sha = hashlib.sha256(data).hexdigest()
    await archive(store, images, image.id, data, now)
    done = await store.get_task(task.id)
    assert done is not None and done.status == TaskStatus.SUCCEEDED
    if settle:
        for delivery in await deliveries_of(store, task.id):
            attempt = Attempt(delivery_id=delivery, number=1, at=now, url="https://h/", status_code=200)
            await store.record_attempt(attempt, outcome="succeeded", next_attempt_at=None, auto_disable_after=DAY,
                                       now=now)
    assert done.images[0].sha256 == sha
    return done


async def archive(store: Store, images: ImageStore | None, image_id: str, data: bytes, now: float) -> None:
    """What the archive job does with verified bytes: hold the sha256, put the file, record it."""
    sha = hashlib.sha256(data).hexdigest()
    await store.hold_image(image_id, sha, now)
    key = image_key(sha, "png")
    if images is not None:
        tmp = images.tmp_dir() / f"dl-{uuid.uuid4().hex}.part"
        tmp.write_bytes(data)
        key = await images.put_file(tmp, sha, "png")
    await store.image_archived(image_id, ArchiveResult(sha256=sha, content_type="image/png", width=1, height=1,
                                                       bytes=len(data), path=key), now)


async def deliveries_of(store: Store, task_id: str) -> list[str]:
    return [r["id"] for r in await store._read_all("SELECT id FROM deliveries WHERE task_id = ?", (task_id,))]


async def rows_of(store: Store, task_id: str) -> dict[str, int]:
    """Every row that points at the task, by table."""
    out = {}
    for table, column in (("tasks", "id"), ("images", "task_id"), ("events", "task_id"), ("deliveries", "task_id"),
                          ("inbox", "task_id"), ("idempotency_keys", "task_id"), ("jobs", "task_id")):
        out[table] = await count(store, f"SELECT COUNT(*) AS n FROM {table} WHERE {column} = ?", task_id)
    out["delivery_attempts"] = await count(
        store, "SELECT COUNT(*) AS n FROM delivery_attempts a JOIN deliveries d ON d.id = a.delivery_id "
               "WHERE d.task_id = ?", task_id)
    return out


def sweeper(store: Store, images: ImageStore, clock: ManualClock, settings: RetentionSettings = KEEP) -> Sweeper:
    return Sweeper(store, images, settings, now=clock.now, pause=0.0)


@pytest.fixture
def images(tmp_path: Path) -> LocalImageStore:
    return LocalImageStore(tmp_path / "images")


# ---- rows ---------------------------------------------------------------------------------------------------
async def test_a_finished_task_goes_with_every_row_that_points_at_it(store: Store, clock: ManualClock,
                                                                     images: LocalImageStore) -> None:
    """Past finished_tasks, a task goes with its images rows, events, deliveries, attempts, callbacks, idempotency
    keys and jobs; a task finished later stays whole."""
    await subscribe(store, clock)
    old = await finished_task(store, clock, b"old", images)
    clock.advance(20 * DAY)
    young = await finished_task(store, clock, b"young", images)
    before = await rows_of(store, old.id)
    assert all(n > 0 for n in before.values()), before
    young_rows = await rows_of(store, young.id)
    clock.advance(11 * DAY)
    report = await sweeper(store, images, clock).sweep()
    assert report.finished_tasks == 1
    assert all(n == 0 for n in (await rows_of(store, old.id)).values())
    assert await rows_of(store, young.id) == young_rows
    assert await store.get_task(old.id) is None


async def test_a_task_with_a_pending_delivery_stays_until_it_settles(store: Store, clock: ManualClock,
                                                                     images: LocalImageStore) -> None:
    """However old, a task whose delivery is still pending keeps its rows (the delivery needs its event)."""
    await subscribe(store, clock)
    task = await finished_task(store, clock, b"x", images, settle=False)
    clock.advance(60 * DAY)
    assert (await sweeper(store, images, clock).sweep()).finished_tasks == 0
    assert (await rows_of(store, task.id))["events"] == 2
    for delivery in await deliveries_of(store, task.id):
        await store.settle_delivery(delivery, "failed", "gave up", clock.now())
    assert (await sweeper(store, images, clock).sweep()).finished_tasks == 1
    assert await store.get_task(task.id) is None


async def test_old_events_go_only_without_a_pending_delivery(store: Store, clock: ManualClock,
                                                             images: LocalImageStore) -> None:
    """Events past their age go with their settled deliveries; one whose delivery is pending stays."""
    await subscribe(store, clock)
    settled = await finished_task(store, clock, b"a")
    pending = await finished_task(store, clock, b"b", settle=False)
    clock.advance(31 * DAY)
    settings = replace(KEEP, finished_tasks=0.0)       # tasks kept: the events rule alone
    report = await sweeper(store, images, clock, settings).sweep()
    assert report.events == 2
    assert (await rows_of(store, settled.id))["events"] == 0
    assert (await rows_of(store, settled.id))["deliveries"] == 0
    assert (await rows_of(store, pending.id))["events"] == 2
    assert (await rows_of(store, settled.id))["tasks"] == 1


async def test_attempts_go_by_age_and_their_deliveries_stay(store: Store, clock: ManualClock,
                                                             images: LocalImageStore) -> None:
    """Attempts past delivery_attempts go; the delivery keeps its outcome and counters."""
    await subscribe(store, clock)
    task = await finished_task(store, clock, b"a")
    clock.advance(15 * DAY)
    report = await sweeper(store, images, clock).sweep()
    assert report.delivery_attempts == 2 and report.finished_tasks == 0
    rows = await rows_of(store, task.id)
    assert rows["delivery_attempts"] == 0 and rows["deliveries"] == 2


async def test_a_sweep_deletes_in_batches_of_batch_size(store: Store, clock: ManualClock,
                                                        images: LocalImageStore) -> None:
    """A transaction takes at most batch_size old tasks, oldest first; a sweep goes on until all are gone."""
    made = []
    for n in range(8):
        made.append(await finished_task(store, clock, bytes([n]), images))
        clock.advance(1)
    clock.advance(31 * DAY)
    one = await store.delete_finished_tasks(clock.now() - 30 * DAY, 3, clock.now(), release_files=False)
    assert (one.picked, one.deleted) == (3, 3)
    assert [await store.get_task(t.id) is None for t in made[:4]] == [True, True, True, False]
    report = await sweeper(store, images, clock, replace(KEEP, batch_size=3)).sweep()
    assert report.finished_tasks == 5
    assert [await store.get_task(t.id) for t in made] == [None] * 8


# ---- image files --------------------------------------------------------------------------------------------
async def test_a_file_goes_only_when_no_remaining_image_uses_it(store: Store, clock: ManualClock,
                                                                images: LocalImageStore) -> None:
    """Two tasks with the same bytes share one file: it stays while the younger task does, goes with it."""
    first = await finished_task(store, clock, b"same bytes", images)
    clock.advance(10 * DAY)
    await finished_task(store, clock, b"same bytes", images)
    key = first.images[0].path
    assert key is not None and await images.exists(key)
    clock.advance(25 * DAY)
    report = await sweeper(store, images, clock, FILES).sweep()
    assert report.finished_tasks == 1 and report.files == 0 and await images.exists(key)
    clock.advance(10 * DAY)
    report = await sweeper(store, images, clock, FILES).sweep()
    assert report.finished_tasks == 1 and report.files == 1 and not await images.exists(key)
    assert await count(store, "SELECT COUNT(*) AS n FROM image_deletions") == 0


async def test_images_zero_keeps_files_after_their_tasks_go(store: Store, clock: ManualClock,
                                                            images: LocalImageStore) -> None:
    """With the default images = 0, the archive outlives the rows: files stay when their task goes."""
    task = await finished_task(store, clock, b"keep me", images)
    clock.advance(31 * DAY)
    report = await sweeper(store, images, clock).sweep()
    assert report.finished_tasks == 1 and report.files == 0
    assert task.images[0].path is not None and await images.exists(task.images[0].path)


async def test_images_past_their_age_expire_and_their_files_go(store: Store, clock: ManualClock,
                                                               images: LocalImageStore) -> None:
    """With images = 10 days, an image archived 11 days ago is `expired` (no longer served), its file deleted,
    while its task (finished_tasks 30 days) stays."""
    task = await finished_task(store, clock, b"short-lived", images)
    clock.advance(11 * DAY)
    report = await sweeper(store, images, clock, replace(KEEP, images=10 * DAY)).sweep()
    assert report.images_expired == 1 and report.files == 1 and report.finished_tasks == 0
    image = await store.get_image(task.images[0].id)
    assert image is not None and image.status == "expired" and image.error and "10 days" in image.error
    assert task.images[0].path is not None and not await images.exists(task.images[0].path)


async def test_an_archive_is_refused_while_its_bytes_are_being_deleted(store: Store, clock: ManualClock,
                                                                       images: LocalImageStore) -> None:
    """Between deciding a file is unused and deleting it (a tombstone), an archive of the same bytes is told to try
    again (retryable); after the deletion it archives and its file is there."""
    old = await finished_task(store, clock, b"contested", images)
    clock.advance(31 * DAY)
    swept = await store.delete_finished_tasks(clock.now() - 30 * DAY, 10, clock.now(), release_files=True)
    assert [f.key for f in swept.files] == [old.images[0].path]
    young = await pending_image(store, clock)
    with pytest.raises(ArchiveError) as refused:
        await archive(store, images, young, b"contested", clock.now())
    assert refused.value.code == IMAGE_BEING_DELETED
    # The deletion (D2, D3) is finished by a later sweep, once the interrupted one's lease has run out.
    clock.advance(OWNER_LEASE)      # the lease of the sweep that decided the deletion runs out: it was interrupted
    report = await sweeper(store, images, clock, FILES).sweep()
    assert report.files == 1
    await archive(store, images, young, b"contested", clock.now())
    image = await store.get_image(young)
    assert image is not None and image.status == "archived" and image.path and await images.exists(image.path)


async def test_images_held_at_once_are_each_refused_or_held_on_their_own(store: Store, clock: ManualClock,
                                                                         images: LocalImageStore) -> None:
    """Archives holding their bytes at once (SQLite: in one shared transaction): the one whose bytes are being
    deleted is refused, the others hold theirs, and a later deletion of those keeps their files."""
    old = await finished_task(store, clock, b"contested", images)
    others = [await finished_task(store, clock, f"kept {n}".encode(), images) for n in range(3)]
    clock.advance(31 * DAY)
    swept = await store.delete_finished_tasks(clock.now() - 30 * DAY, 1, clock.now(), release_files=True)
    assert [f.key for f in swept.files] == [old.images[0].path]       # a deletion of b"contested" is on
    young = [await pending_image(store, clock) for _ in range(4)]
    shas = [hashlib.sha256(data).hexdigest() for data in (b"kept 0", b"contested", b"kept 1", b"kept 2")]
    results = await asyncio.gather(*(store.hold_image(image, sha, clock.now()) for image, sha in zip(young, shas)),
                                   return_exceptions=True)
    assert isinstance(results[1], ArchiveError) and results[1].code == IMAGE_BEING_DELETED
    assert results[:1] + results[2:] == [None, None, None]
    clock.advance(OWNER_LEASE)      # the lease of the sweep that decided the deletion runs out: it was interrupted
    report = await sweeper(store, images, clock, FILES).sweep()
    assert report.finished_tasks == 3 and report.files == 1        # only the contested file, never a held one
    for task in others:
        assert task.images[0].path is not None and await images.exists(task.images[0].path)


async def test_an_image_held_before_the_deletion_decides_keeps_the_file(store: Store, clock: ManualClock,
                                                                         images: LocalImageStore) -> None:
    """An archive that took the sha256 (hold) before the old task's rows went keeps the file: the deletion
    sees the pending image using it and deletes nothing, even though the archive has not recorded it yet."""
    old = await finished_task(store, clock, b"shared", images)
    clock.advance(31 * DAY)
    young = await pending_image(store, clock)
    await store.hold_image(young, hashlib.sha256(b"shared").hexdigest(), clock.now())
    report = await sweeper(store, images, clock, FILES).sweep()
    assert report.finished_tasks == 1 and report.files == 0
    assert old.images[0].path is not None and await images.exists(old.images[0].path)


async def pending_image(store: Store, clock: ManualClock) -> str:
    """A new task's image, reported by the provider and not archived yet; its id."""
    now = clock.now()
    task = Task(id=ids.new_id("tsk", now), provider="gmicloud", request={"prompt": "p", "n": 1}, created_at=now,
                updated_at=now)
    await store.create_task(task, [])
    update = TaskUpdate(status=ProviderStatus.SUCCEEDED, images=(ProviderImage(url="https://x/2.png"),))
    applied = await store.apply(task.id, lambda t: on_update(t, update), now)
    assert applied is not None
    return applied.task.images[0].id


async def test_archives_racing_deletions_of_the_same_bytes_never_lose_a_file(
        open_store: Callable[[], Awaitable[Store]], clock: ManualClock, images: LocalImageStore) -> None:
    """Two replicas: one sweeps old tasks away while the other archives new images of the very same bytes, many
    rounds at once; whenever an image ends archived, its file exists (the tombstone protocol of
    relay.store.retention; an archive refused meanwhile tries again, as its job would)."""
    sweeping, archiving = await open_store(), await open_store()
    for round_ in range(12):
        data = f"round {round_}".encode()
        await finished_task(sweeping, clock, data, images)
        clock.advance(31 * DAY)
        young = await pending_image(archiving, clock)

        async def archive_until_done() -> None:
            while True:
                try:
                    await archive(archiving, images, young, data, clock.now())
                    return
                except ArchiveError as exc:
                    assert exc.code == IMAGE_BEING_DELETED
                    await asyncio.sleep(0)

        await asyncio.gather(sweeper(sweeping, images, clock, FILES).sweep(), archive_until_done())
        await sweeper(sweeping, images, clock, FILES).sweep()      # finishes a deletion the race left half done
        image = await archiving.get_image(young)
        assert image is not None and image.status == "archived" and image.path
        assert await images.exists(image.path), f"round {round_}: the archived image lost its file"


async def test_a_deletion_a_crash_interrupted_is_finished_by_the_next_sweep(store: Store, clock: ManualClock,
                                                                            images: LocalImageStore) -> None:
    """A tombstone left by a crash between deciding and deleting: the first sweep after its owner's lease has run out
    deletes the file and ends it."""
    old = await finished_task(store, clock, b"crashy", images)
    clock.advance(31 * DAY)
    await store.delete_finished_tasks(clock.now() - 30 * DAY, 10, clock.now(), release_files=True)   # then "crash"
    assert old.images[0].path is not None and await images.exists(old.images[0].path)
    report = await sweeper(store, images, clock, replace(FILES, finished_tasks=0.0)).sweep()
    assert report.files == 0, "taken over while the sweep that decided it may still be deleting it"
    clock.advance(OWNER_LEASE)      # the lease of the sweep that decided the deletion runs out: it was interrupted
    report = await sweeper(store, images, clock, replace(FILES, finished_tasks=0.0)).sweep()
    assert report.files == 1 and not await images.exists(old.images[0].path)
    assert await count(store, "SELECT COUNT(*) AS n FROM image_deletions") == 0


async def test_two_sweeps_at_once_never_delete_a_file_archived_again_in_between(
        open_store: Callable[[], Awaitable[Store]], clock: ManualClock, images: LocalImageStore) -> None:
    """Two sweeps on one database (the housekeeping job and `relay retention`, or two replicas) look for a crash's
    leftover deletion of the same file at once: one takes it over, the other gets nothing. The first deletes the
    file and ends the tombstone; an archive of the same bytes then holds them and puts the file anew; the second
    sweep's deletions after that leave it. Without owners both listed the file, and the second deleted the new one."""
    first, second = await open_store(), await open_store()
    old = await finished_task(first, clock, b"twice", images)
    clock.advance(31 * DAY)
    await first.delete_finished_tasks(clock.now() - 30 * DAY, 10, clock.now(), release_files=True)   # then "crash"
    clock.advance(OWNER_LEASE)
    listed = await asyncio.gather(first.image_deletions(100, clock.now()), second.image_deletions(100, clock.now()))
    assert sorted(len(files) for files in listed) == [0, 1], listed
    assert [f.key for files in listed for f in files] == [old.images[0].path]
    stores = (first, second)
    taker = 0 if listed[0] else 1
    done_taker, done_other = Report(), Report()
    await sweeper(stores[taker], images, clock, FILES)._delete_files(listed[taker], done_taker)
    young = await pending_image(second, clock)
    await archive(second, images, young, b"twice", clock.now())
    await sweeper(stores[1 - taker], images, clock, FILES)._delete_files(listed[1 - taker], done_other)
    assert (done_taker.files, done_other.files) == (1, 0)
    image = await second.get_image(young)
    assert image is not None and image.status == "archived" and image.path and await images.exists(image.path)


async def test_a_sweep_that_outlived_its_lease_leaves_the_deletion_to_the_sweep_that_took_it_over(
        open_store: Callable[[], Awaitable[Store]], clock: ManualClock, images: LocalImageStore) -> None:
    """A sweep that decided a deletion and stalled past its lease (OWNER_LEASE) before deleting the file: another
    sweep has taken the deletion over. The stalled one, going on, neither deletes the file nor ends the tombstone
    (which keeps archives of those bytes waiting); the one that took it over does both."""
    stalled, other = await open_store(), await open_store()
    old = await finished_task(stalled, clock, b"stalled", images)
    clock.advance(31 * DAY)
    swept = await stalled.delete_finished_tasks(clock.now() - 30 * DAY, 10, clock.now(), release_files=True)
    assert await other.image_deletions(100, clock.now()) == [], "its owner's lease has not run out"
    clock.advance(OWNER_LEASE)
    taken = await other.image_deletions(100, clock.now())
    assert [f.key for f in taken] == [f.key for f in swept.files] == [old.images[0].path]
    late = Report()
    await sweeper(stalled, images, clock, FILES)._delete_files(swept.files, late)
    assert late.files == 0 and old.images[0].path and await images.exists(old.images[0].path)
    assert await count(stalled, "SELECT COUNT(*) AS n FROM image_deletions") == 1
    done = Report()
    await sweeper(other, images, clock, FILES)._delete_files(taken, done)
    assert done.files == 1 and not await images.exists(old.images[0].path)
    assert await count(other, "SELECT COUNT(*) AS n FROM image_deletions") == 0


# ---- temp files, the job, the CLI, the settings ----------------------------------------------------------------
async def test_housekeeping_is_one_job_per_database_and_sweeps_old_temp_files(
        open_store: Callable[[], Awaitable[Store]], clock: ManualClock, images: LocalImageStore) -> None:
    """Every replica schedules it, one job exists; a run sweeps temp files older than an hour (a crash's
    downloads), keeps younger ones, and plans the next run `interval` later."""
    first, second = await open_store(), await open_store()
    assert await schedule(first, KEEP, clock.now()) is True
    assert await schedule(second, KEEP, clock.now()) is False
    assert await first.job_counts() == {"housekeeping:queued": 1}
    stale, fresh = images.tmp_dir() / "dl-stale.part", images.tmp_dir() / "dl-fresh.part"
    stale.write_bytes(b"half a download")
    fresh.write_bytes(b"in progress")
    os.utime(stale, (time.time() - TMP_MAX_AGE - 60, time.time() - TMP_MAX_AGE - 60))
    worker = Worker(first, {"housekeeping": HousekeepingHandler(first, images, KEEP, clock)}, clock)
    assert await worker.drain() == 1
    assert not stale.exists() and fresh.exists()
    assert await worker.drain() == 0                       # not due again before the interval
    clock.advance(KEEP.interval)
    assert await worker.drain() == 1
    assert await first.job_counts() == {"housekeeping:queued": 1}


async def test_no_housekeeping_job_when_interval_is_zero(store: Store, clock: ManualClock) -> None:
    """retention.interval = 0 schedules nothing (an operator running `relay retention` from cron)."""
    assert await schedule(store, replace(KEEP, interval=0.0), clock.now()) is False
    assert await store.job_counts() == {}


def test_relay_retention_dry_run_shows_counts_and_deletes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`relay retention --dry-run` prints a table of what would go and deletes nothing; without it, it deletes."""
    from relay.cli import main
    from relay.store.sqlite import SQLiteStore

    clock = ManualClock(start=time.time() - 40 * DAY)
    db = tmp_path / "relay.db"

    async def seed() -> None:
        store = SQLiteStore(db)
        await store.open()
        try:
            await subscribe(store, clock)
            for n in range(3):
                await finished_task(store, clock, bytes([n]))
        finally:
            await store.close()
    asyncio.run(seed())
    monkeypatch.setenv("RELAY_STORAGE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["retention", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would delete" in out
    lines = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") >= 3}
    assert lines["finished tasks"].split("│")[3].strip() == "3"
    assert lines["delivery attempts"].split("│")[3].strip() == "6"

    async def remaining() -> int:
        store = SQLiteStore(db)
        await store.open()
        try:
            return await count(store, "SELECT COUNT(*) AS n FROM tasks")
        finally:
            await store.close()
    assert asyncio.run(remaining()) == 3
    assert main(["retention"]) == 0
    assert "deleted" in capsys.readouterr().out and asyncio.run(remaining()) == 0


def test_retention_settings_from_toml_and_environment(tmp_path: Path) -> None:
    """[retention] reads from TOML and RELAY_RETENTION_*; defaults: 30 d tasks and events, 14 d attempts, images kept;
    a negative age names its key."""
    assert load_settings(None, {}).retention == RetentionSettings(
        finished_tasks=30 * DAY, events=30 * DAY, delivery_attempts=14 * DAY, images=0.0, interval=3600.0,
        batch_size=500)
    config = tmp_path / "relay.toml"
    config.write_text("[retention]\nfinished_tasks = 86400\nimages = 604800\n\n"
                      "[providers.evolink]\nbase_url = \"https://api.evolink.ai\"\napi_key = \"k\"\n")
    settings = load_settings(config, {"RELAY_RETENTION_BATCH_SIZE": "50"})
    assert (settings.retention.finished_tasks, settings.retention.images, settings.retention.batch_size) == (
        DAY, 7 * DAY, 50)
    with pytest.raises(ConfigError) as bad:
        load_settings(None, {"RELAY_RETENTION_EVENTS": "-1", "RELAY_RETENTION_BATCH_SIZE": "0"})
    assert any(p.startswith("retention.events:") for p in bad.value.problems)
    assert any(p.startswith("retention.batch_size:") for p in bad.value.problems)
    # Finished tasks deleted within the Idempotency-Key window would let a retry bill a second task.
    with pytest.raises(ConfigError) as short:
        load_settings(None, {"RELAY_RETENTION_FINISHED_TASKS": "3600"})
    assert any(p.startswith("retention.finished_tasks:") and "Idempotency-Key" in p for p in short.value.problems)
    assert load_settings(None, {"RELAY_RETENTION_FINISHED_TASKS": "86400"}).retention.finished_tasks == 86400


# ---- the S3 image store -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    server = MotoS3(tmp_path_factory.mktemp("moto-retention")).start()
    try:
        server.provision("relay-retention")
        yield server
    finally:
        server.stop()


async def test_s3_objects_go_only_when_no_remaining_image_uses_them(store: Store, clock: ManualClock, moto: MotoS3,
                                                                    tmp_path: Path) -> None:
    """The same rules on a bucket: delete() removes an object (idempotently), and a sweep deletes the object of the
    last task using it, keeping one still in use."""
    bucket = S3ImageStore("relay-retention", f"t-{uuid.uuid4().hex[:8]}", tmp_root=tmp_path / "tmp",
                          endpoint_url=moto.endpoint, region=REGION, access_key_id="k", secret_access_key="s")
    gone = await finished_task(store, clock, b"object one", bucket)
    clock.advance(10 * DAY)
    kept = await finished_task(store, clock, b"object two", bucket)
    clock.advance(25 * DAY)
    report = await sweeper(store, bucket, clock, FILES).sweep()
    assert report.finished_tasks == 1 and report.files == 1
    gone_key, kept_key = gone.images[0].path, kept.images[0].path
    assert gone_key is not None and kept_key is not None
    assert await bucket.stat(gone_key) is None and await bucket.exists(kept_key)
    assert await bucket.delete(kept_key) is True and await bucket.delete(kept_key) is False


# ---- archives of any link, provider stats, uploaded inputs ----------------------------------------------------
async def finished_archive(store: Store, clock: ManualClock, data: bytes | None, images: ImageStore | None = None,
                           *, settle: bool = True) -> Archive:
    """An archive as relay leaves it: idempotency key, its image archived (`data`; None: the link failed), its
    outcome event delivered to every subscription (one attempt each, when `settle`)."""
    now = clock.now()
    url = f"https://cdn.test/{uuid.uuid4().hex}.png"
    made = Archive(id=ids.new_id("arc", now), source_url=url, url_key=url_key(url), expires_at=now + 3600,
                   created_at=now, updated_at=now)
    [(created, _)] = await store.create_archives([made], now, idempotency=("scope", uuid.uuid4().hex, "h"))
    image = created.images[0].id
    if data is None:
        await store.image_failed(image, "source_expired", "the link died", now)
    else:
        await archive(store, images, image, data, now)
    if settle:
        for delivery in await deliveries_of(store, created.id):
            attempt = Attempt(delivery_id=delivery, number=1, at=now, url="https://h/", status_code=200)
            await store.record_attempt(attempt, outcome="succeeded", next_attempt_at=None, auto_disable_after=DAY,
                                       now=now)
    done = await store.get_archive(created.id)
    assert done is not None and done.status in (TaskStatus.SUCCEEDED, TaskStatus.FAILED)
    return done


async def archive_rows(store: Store, archive_id: str) -> dict[str, int]:
    rows = await rows_of(store, archive_id)
    rows["archives"] = await count(store, "SELECT COUNT(*) AS n FROM archives WHERE id = ?", archive_id)
    del rows["tasks"], rows["inbox"]        # an archive has neither
    return rows


async def test_a_finished_archive_goes_with_every_row_that_points_at_it(store: Store, clock: ManualClock,
                                                                        images: LocalImageStore) -> None:
    """Past finished_tasks, succeeded and failed archives go with their images rows, events, deliveries, attempts,
    idempotency keys and jobs; a younger archive stays whole; the same link may then be archived anew."""
    await subscribe(store, clock)
    succeeded = await finished_archive(store, clock, b"arc", images)
    failed = await finished_archive(store, clock, None)
    clock.advance(20 * DAY)
    young = await finished_archive(store, clock, b"young arc", images)
    for old in (succeeded, failed):
        before = await archive_rows(store, old.id)
        assert all(before[t] > 0 for t in ("archives", "images", "events", "deliveries", "idempotency_keys",
                                           "delivery_attempts")), before
    young_rows = await archive_rows(store, young.id)
    clock.advance(11 * DAY)
    report = await sweeper(store, images, clock).sweep()
    assert report.archives == 2 and ("finished archives", 2) in report.rows()
    for old in (succeeded, failed):
        assert all(n == 0 for n in (await archive_rows(store, old.id)).values())
        assert await store.get_archive(old.id) is None
    assert await archive_rows(store, young.id) == young_rows
    again = replace(succeeded, id=ids.new_id("arc", clock.now()), images=[], status=TaskStatus.PENDING)
    [(_, created)] = await store.create_archives([again], clock.now())
    assert created


async def test_an_archive_with_a_pending_delivery_stays_until_it_settles(store: Store, clock: ManualClock,
                                                                         images: LocalImageStore) -> None:
    """However old, an archive whose outcome event is still being delivered keeps its rows."""
    await subscribe(store, clock)
    kept = await finished_archive(store, clock, b"x", images, settle=False)
    clock.advance(60 * DAY)
    assert (await sweeper(store, images, clock).sweep()).archives == 0
    for delivery in await deliveries_of(store, kept.id):
        await store.settle_delivery(delivery, "failed", "gave up", clock.now())
    assert (await sweeper(store, images, clock).sweep()).archives == 1
    assert await store.get_archive(kept.id) is None


async def test_archive_images_count_as_users_of_a_file(store: Store, clock: ManualClock,
                                                       images: LocalImageStore) -> None:
    """A task and a younger archive saved the same bytes: the file stays when the task goes (the archive's image
    uses it), and goes with the archive; and the other way round."""
    task = await finished_task(store, clock, b"shared", images)
    clock.advance(10 * DAY)
    arc = await finished_archive(store, clock, b"shared", images)
    key = task.images[0].path
    assert key is not None and arc.images[0].path == key
    clock.advance(25 * DAY)
    report = await sweeper(store, images, clock, FILES).sweep()
    assert (report.finished_tasks, report.archives, report.files) == (1, 0, 0) and await images.exists(key)
    clock.advance(10 * DAY)
    report = await sweeper(store, images, clock, FILES).sweep()
    assert (report.archives, report.files) == (1, 1) and not await images.exists(key)

    arc = await finished_archive(store, clock, b"shared again", images)
    clock.advance(10 * DAY)
    task = await finished_task(store, clock, b"shared again", images)
    clock.advance(25 * DAY)
    report = await sweeper(store, images, clock, FILES).sweep()
    assert (report.finished_tasks, report.archives, report.files) == (0, 1, 0)
    assert task.images[0].path is not None and await images.exists(task.images[0].path)


async def test_provider_stats_older_than_events_go_in_batches(store: Store, clock: ManualClock,
                                                              images: LocalImageStore) -> None:
    """provider_stats rows of minutes older than the `events` age go, batch_size rows per transaction; the
    newer minutes stay; with events = 0 they are all kept."""
    now = int(clock.now()) // 60 * 60
    rows = [(provider, now - (40 * DAY) + 60 * n, 1, 0, 0, "[1]") for n in range(5) for provider in ("a", "b")]
    rows.append(("a", now, 2, 1, 0, "[2]"))
    await store.add_provider_stats(rows)
    assert (await sweeper(store, images, clock, replace(KEEP, events=0.0)).sweep()).provider_stats == 0
    assert (await sweeper(store, images, clock).preview()).provider_stats == 10
    one = await store.delete_old_provider_stats(clock.now() - 30 * DAY, 3)
    assert (one.picked, one.deleted) == (3, 3)
    report = await sweeper(store, images, clock, replace(KEEP, batch_size=3)).sweep()
    assert report.provider_stats == 7
    assert await count(store, "SELECT COUNT(*) AS n FROM provider_stats") == 1
    assert (await store.provider_stats(now - 60))["a"].requests == 2


async def test_an_uploaded_input_keeps_a_file_it_shares_with_expired_images(store: Store, clock: ManualClock,
                                                                           images: LocalImageStore) -> None:
    """An upload to /openai/v1/images/edits is kept (never swept) and counts as a user of its sha256: when an image
    of the same bytes expires and its task goes, the file stays for the task that takes the upload as input."""
    data = b"edit me"
    sha = hashlib.sha256(data).hexdigest()
    task = await finished_task(store, clock, data, images)
    await store.hold_upload(sha, image_key(sha, "png"), clock.now())
    clock.advance(400 * DAY)
    report = await sweeper(store, images, clock, FILES).sweep()
    assert (report.finished_tasks, report.files) == (1, 0)
    assert task.images[0].path is not None and await images.exists(task.images[0].path)
    assert await count(store, "SELECT COUNT(*) AS n FROM uploads") == 1


async def test_an_upload_is_refused_while_its_bytes_are_being_deleted(store: Store, clock: ManualClock,
                                                                      images: LocalImageStore) -> None:
    """Between the decision to delete a file and its deletion, an upload of the same bytes is told to try again
    (so its file is not put and then deleted); once the file is gone the upload is recorded."""
    old = await finished_task(store, clock, b"contested upload", images)
    clock.advance(31 * DAY)
    swept = await store.delete_finished_tasks(clock.now() - 30 * DAY, 10, clock.now(), release_files=True)
    assert swept.files
    sha = old.images[0].sha256
    assert sha is not None
    with pytest.raises(ArchiveError) as refused:
        await store.hold_upload(sha, image_key(sha, "png"), clock.now())
    assert refused.value.code == IMAGE_BEING_DELETED
    clock.advance(OWNER_LEASE)      # the lease of the sweep that decided the deletion runs out: it was interrupted
    await sweeper(store, images, clock, FILES).sweep()
    await store.hold_upload(sha, image_key(sha, "png"), clock.now())
    assert await count(store, "SELECT COUNT(*) AS n FROM uploads WHERE sha256 = ?", sha) == 1


async def test_a_dry_run_counts_old_archives(store: Store, clock: ManualClock, images: LocalImageStore) -> None:
    """preview() counts finished archives past finished_tasks and deletes nothing."""
    arc = await finished_archive(store, clock, b"counted", images)
    clock.advance(31 * DAY)
    assert (await sweeper(store, images, clock).preview()).archives == 1
    assert await store.get_archive(arc.id) is not None


async def dead_job(store: Store, clock: ManualClock, kind: str, task_id: str | None = None,
                   due: float | None = None) -> str:
    """A job of `kind` (due at `due`, default now) that failed for good now (claimed, then buried as the worker
    does); its id."""
    job = Job(id=ids.new_id("job", clock.now()), kind=kind, task_id=task_id,
              run_at=clock.now() if due is None else due,
              payload={"delivery_id": "dlv_gone"} if kind == "deliver" else {})
    await store.enqueue([job])
    [claimed] = await store.claim(clock.now(), limit=1, lease_seconds=60, kinds=[kind])
    await store.bury_job(claimed, "boom", clock.now())
    return job.id


async def test_dead_jobs_of_no_task_go_after_the_events_age(store: Store, clock: ManualClock,
                                                           images: LocalImageStore) -> None:
    """A delivery's job (which has no task) that failed for good stays `dead` for the operator, its delivery settled
    as failed: nothing else ever deleted it, so they piled up forever. It goes once dead for longer than the
    `events` age, with the event its delivery was for; a dead job of a task goes with its task, one that died
    lately stays (also one due long before it died), and events = 0 keeps them all."""
    old_delivery_job = await dead_job(store, clock, "deliver")
    of_a_task = await dead_job(store, clock, "poll", task_id="tsk_still_running")
    clock.advance(31 * DAY)
    new_delivery_job = await dead_job(store, clock, "deliver")
    long_due = await dead_job(store, clock, "deliver", due=clock.now() - 40 * DAY)
    assert (await sweeper(store, images, clock, replace(KEEP, events=0.0)).sweep()).dead_jobs == 0
    assert (await sweeper(store, images, clock).preview()).dead_jobs == 1
    assert await store.get_job(old_delivery_job) is not None
    report = await sweeper(store, images, clock).sweep()
    assert report.dead_jobs == 1
    assert await store.get_job(old_delivery_job) is None
    listed, _ = await store.list_jobs(state="dead", kind=None, limit=10, cursor=None)
    assert [job.id for job in listed] == [long_due, new_delivery_job, of_a_task]


async def test_dead_jobs_go_in_batches_of_batch_size(store: Store, clock: ManualClock,
                                                     images: LocalImageStore) -> None:
    for _ in range(5):
        await dead_job(store, clock, "deliver")
    clock.advance(31 * DAY)
    one = await store.delete_old_dead_jobs(clock.now() - 30 * DAY, 2)
    assert (one.picked, one.deleted) == (2, 2)
    assert (await sweeper(store, images, clock, replace(KEEP, batch_size=2)).sweep()).dead_jobs == 3
    assert (await store.list_jobs(state="dead", kind=None, limit=10, cursor=None))[0] == []


async def test_a_file_the_store_failed_to_delete_is_taken_over_by_the_next_sweep_at_once(
        store: Store, clock: ManualClock, images: LocalImageStore) -> None:
    """The image store failed the delete: the sweep reports it and gives the deletion up, so the next sweep (the
    housekeeping job's next run, or `relay retention` now) deletes the file, not one an hour later."""
    from relay.errors import ArchiveError as Failed
    old = await finished_task(store, clock, b"flaky store", images)
    clock.advance(31 * DAY)
    real_delete = images.delete
    failures = iter([True])

    async def flaky_delete(key: str) -> bool:
        if next(failures, False):
            raise Failed("the disk is busy", code="image_store_unavailable")
        return await real_delete(key)
    images.delete = flaky_delete  # type: ignore[method-assign]
    first = await sweeper(store, images, clock, FILES).sweep()
    assert first.finished_tasks == 1 and first.files == 0 and first.file_errors, first
    second = await sweeper(store, images, clock, FILES).sweep()
    assert second.files == 1 and not await images.exists(old.images[0].path or "")
    assert await count(store, "SELECT COUNT(*) AS n FROM image_deletions") == 0


async def test_taking_over_run_again_answers_the_same_deletions(store: Store, clock: ManualClock,
                                                                images: LocalImageStore) -> None:
    """The takeover statement run twice by one owner (PostgreSQL runs a _change again after a lost connection)
    answers the rows the first run took, not nothing (they would stay owned by a token nobody holds)."""
    from relay.store import queries as q
    await finished_task(store, clock, b"taken twice", images)
    clock.advance(31 * DAY)
    await store.delete_finished_tasks(clock.now() - 30 * DAY, 10, clock.now(), release_files=True)
    clock.advance(OWNER_LEASE)
    now = clock.now()
    args = ("owner-x", now + OWNER_LEASE, now, "owner-x", now, "owner-x", 10)
    first = await store._change(q.TAKE_OVER_IMAGE_DELETIONS, args)
    again = await store._change(q.TAKE_OVER_IMAGE_DELETIONS, args)
    assert len(first) == 1 and [r["sha256"] for r in again] == [r["sha256"] for r in first]
