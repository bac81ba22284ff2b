"""Retention: what is old, in which order it goes, and in what bites (the `[retention]` settings).

One sweep, run by the housekeeping job (relay.jobs.housekeeping) or by `relay retention`:

    1. image files whose deletion a crash interrupted      (their tombstones; see relay.store.retention)
    2. finished tasks older than `finished_tasks`, with their deliveries, attempts, events, callbacks,
       idempotency keys, jobs and images rows; with `images` > 0, their files no kept image uses
       (then finished archives of any link, arc_…, the same way: their image rows are images like a task's)
    3. events older than `events` (of tasks still kept), with their settled deliveries and attempts; dead jobs of
       no task (a delivery's, whose delivery was settled as failed) that died before then
    4. delivery attempts older than `delivery_attempts`; provider request stats (relay.stats) older than `events`
    5. with `images` > 0, images archived longer ago become `expired`; their files no kept image uses go
    6. temporary download files a crash left (older than an hour)

An image file goes only when no remaining image row (a task's or an archive's) and no upload uses its sha256.
Files uploaded to the OpenAI-compatible edits endpoint are kept: a task holds only a signed link to its input,
which a provider may fetch whenever it runs the task (after a failover, a retry, a long queue), and nothing
records which tasks still need it; they are small (one request's inputs, at most `archive.input_max_bytes`)
and content-addressed (the same upload again costs nothing), like archived images with the default
`images` = 0. Their rows in `uploads` count as users of the sha256, so an image retention deletes never takes
a file an upload shares.

Tasks first, so that their events, attempts and images go with them in one transaction each rather than one
rule at a time. Nothing a pending delivery needs is deleted (its task, its event), whatever its age.
Each step deletes `batch_size` rows per transaction and then pauses as long as the transaction took (at
least PAUSE), so the API waits for one short batch at most and the sweep takes at most half of the writer.
A sweep stops after `budget` seconds and says there is more (its job comes back at once rather than holding
its lease through a backlog of millions).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from relay.config import RetentionSettings
from relay.errors import ArchiveError
from relay.images.store import ImageStore
from relay.store.base import Store
from relay.store.retention import FileToDelete, Swept

log = logging.getLogger("relay.retention")

TMP_MAX_AGE = 3600.0     # a download in progress is never this old (archive.timeout is 2 min by default)
PAUSE = 0.01             # at least this long between two batches: queued API transactions run in between
BUDGET = 60.0            # seconds one sweep runs before handing back (the rest: at once, in a new run)
FILES_PER_BATCH = 100
DAY = 86400.0


@dataclass(frozen=True)
class Cutoffs:
    """Rows older than these unix times go; None: that rule keeps everything."""

    finished_tasks: float | None
    events: float | None
    delivery_attempts: float | None
    images: float | None


def cutoffs(settings: RetentionSettings, now: float) -> Cutoffs:
    def before(age: float) -> float | None:
        return now - age if age > 0 else None
    return Cutoffs(finished_tasks=before(settings.finished_tasks), events=before(settings.events),
                   delivery_attempts=before(settings.delivery_attempts), images=before(settings.images))


def age_text(seconds: float) -> str:
    """'30 days', '36 h', 'kept forever': ages as people read them."""
    if seconds <= 0:
        return "kept forever"
    if seconds >= 2 * DAY:
        return f"{seconds / DAY:g} days"
    return f"{seconds / 3600:g} h"


@dataclass
class Report:
    """What one sweep deleted (or, for a dry run, would delete)."""

    finished_tasks: int = 0
    archives: int = 0
    events: int = 0
    delivery_attempts: int = 0
    images_expired: int = 0
    provider_stats: int = 0
    dead_jobs: int = 0
    files: int = 0
    tmp_files: int = 0
    more: bool = False           # stopped at its time budget with old rows left
    seconds: float = 0.0
    file_errors: list[str] = field(default_factory=list)

    def rows(self) -> list[tuple[str, int]]:
        return [("finished tasks", self.finished_tasks), ("finished archives", self.archives),
                ("events", self.events), ("dead jobs of no task", self.dead_jobs),
                ("delivery attempts", self.delivery_attempts),
                ("provider stats rows", self.provider_stats), ("images expired", self.images_expired),
                ("image files", self.files), ("temporary files", self.tmp_files)]


class Sweeper:
    """Runs the steps of the module docstring against one store and image store."""

    def __init__(self, store: Store, images: ImageStore, settings: RetentionSettings, *,
                 now: Callable[[], float], pause: float = PAUSE, budget: float = BUDGET) -> None:
        self.store = store
        self.images = images
        self.settings = settings
        self.now = now
        self.pause = pause
        self.budget = budget

    async def sweep(self) -> Report:
        """Delete what is old now; see the module docstring for the order. Never raises for a file that cannot be
        deleted (the image store is down): its tombstone stays and the next sweep tries again."""
        report = Report()
        started = time.monotonic()
        deadline = started + self.budget
        batch = self.settings.batch_size
        release = self.settings.images > 0
        c = cutoffs(self.settings, self.now())
        await self._delete_files(await self.store.image_deletions(FILES_PER_BATCH, self.now()), report)

        async def each(step: Callable[[], Awaitable[Swept]], limit: int) -> int:
            """Run one step batch after batch until a batch comes back short; how many rows went."""
            total = 0
            while not report.more:
                began = time.monotonic()
                swept = await step()
                took = time.monotonic() - began
                total += swept.deleted
                await self._delete_files(swept.files, report)
                if swept.picked < limit:
                    break
                if time.monotonic() >= deadline:
                    report.more = True
                    break
                # As long again as the batch took: the sweep never has more than half of the database's
                # writer (and of the process's CPU), however slow a batch is on this machine.
                await asyncio.sleep(max(self.pause, took) if self.pause else 0.0)
            return total

        if c.finished_tasks is not None:
            before = c.finished_tasks
            report.finished_tasks = await each(
                lambda: self.store.delete_finished_tasks(before, batch, self.now(), release_files=release), batch)
            report.archives = await each(
                lambda: self.store.delete_finished_archives(before, batch, self.now(), release_files=release), batch)
        if c.events is not None:
            events_before = c.events
            report.events = await each(lambda: self.store.delete_old_events(events_before, batch), batch)
            report.dead_jobs = await each(lambda: self.store.delete_old_dead_jobs(events_before, batch), batch)
        if c.delivery_attempts is not None:
            attempts_before = c.delivery_attempts
            report.delivery_attempts = await each(
                lambda: self.store.delete_old_attempts(attempts_before, batch), batch)
        if c.events is not None:
            stats_before = c.events
            report.provider_stats = await each(
                lambda: self.store.delete_old_provider_stats(stats_before, batch), batch)
        if c.images is not None:
            images_before, reason = c.images, f"expired: deleted by retention after {age_text(self.settings.images)}"
            report.images_expired = await each(
                lambda: self.store.expire_images(images_before, FILES_PER_BATCH, self.now(), reason),
                FILES_PER_BATCH)
        try:
            report.tmp_files = await self.images.sweep_tmp(TMP_MAX_AGE)
        except OSError as exc:
            report.file_errors.append(f"temporary files: {exc}")
        report.seconds = time.monotonic() - started
        return report

    async def _delete_files(self, files: list[FileToDelete], report: Report) -> None:
        """D2 and D3 of relay.store.retention: delete each file, then end its tombstone."""
        done = []
        for f in files:
            if not await self.store.own_image_deletion(f, self.now()):
                continue        # taken over by another sweep (this one's lease ran out), or done by it
            try:
                if await self.images.delete(f.key):
                    report.files += 1
            except (ArchiveError, ValueError) as exc:
                report.file_errors.append(f"{f.key}: {exc}")
                await self.store.disown_image_deletion(f)
                continue
            done.append(f)
        await self.store.image_deleted(done)

    async def preview(self) -> Report:
        """A dry run: what a sweep would delete now, rule by rule (nothing is deleted). Counted per rule, so an
        event of a task that goes is counted under both; image files are not counted (that takes the sweep)."""
        c = cutoffs(self.settings, self.now())
        counts = await self.store.retention_counts(tasks_before=c.finished_tasks, events_before=c.events,
                                                   attempts_before=c.delivery_attempts, images_before=c.images)
        more = await self.store.old_row_counts(archives_before=c.finished_tasks, stats_before=c.events,
                                               dead_jobs_before=c.events)
        old_tmp = await self.images.count_tmp(TMP_MAX_AGE)
        return Report(finished_tasks=counts["finished_tasks"], archives=more["archives"], events=counts["events"],
                      delivery_attempts=counts["delivery_attempts"], provider_stats=more["provider_stats"],
                      dead_jobs=more["dead_jobs"],
                      images_expired=counts["images"], tmp_files=old_tmp)

