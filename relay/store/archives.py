"""Archives of any link and adopted provider tasks: their use cases, mixed into Store.

An archive (arc_…) owns one image row and one archive job, exactly as a task owns its images: the same
archive job saves it (SSRF guard, size cap, verification, content addressing, expiry-ordered backlog,
retries while the link lives), and Store._settle_image hands the outcome here when the image's owner id
is an archive's. Its events go through the same event log and fan-out as a task's. Why an archive has a
table of its own rather than being a kind of task: see relay/store/sql/012_archives.sql.

An adopted task is an ordinary task row that relay never submits (it is created with the provider's
task id and a poll job); the adoptions table makes adopting one provider task twice find the first.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from relay import ids
from relay.models import Archive, ImageRecord, Job, Task, TaskStatus
from relay.states import Transition
from relay.store import queries as q
from relay.store.idempotency import replay_or_claim
from relay.store.outbox import archive_job, images_of, insert_jobs, subscriptions_stamp, write_archive_transition
from relay.store.plumbing import StorePlumbing, owner_with_images
from relay.store.rows import dumps, loads, task_row
from relay.store.tx import Row, Tx

ARCHIVE_PREFIX = "arc"
# Told of each archive created and each status change after its commit: (archive id, the status reached).
ArchiveListener = Callable[[str, TaskStatus], None]
ARCHIVE_METRICS_LABEL = "link"      # the "provider" an archive's download is counted against (relay.metrics)


def is_archive_id(owner_id: str) -> bool:
    """Whether an image's (or event's, delivery's, key's) owner id names an archive rather than a task."""
    return owner_id.startswith(ARCHIVE_PREFIX + "_")


def archive_from_row(row: Row) -> Archive:
    return Archive(id=row["id"], source_url=row["source_url"], url_key=row["url_key"], expires_at=row["expires_at"],
                   status=TaskStatus(row["status"]), error=loads(row["error"]), metadata=loads(row["metadata"]),
                   webhook_url=row["webhook_url"], sequence=row["sequence"], created_at=row["created_at"],
                   updated_at=row["updated_at"], completed_at=row["completed_at"])


def archive_row(a: Archive) -> tuple[Any, ...]:
    """The values of INSERT_ARCHIVE, in its column order."""
    return (a.id, a.source_url, a.url_key, a.expires_at, a.status.value, dumps(a.error), dumps(a.metadata),
            a.webhook_url, a.sequence, a.created_at, a.updated_at, a.completed_at)


class ArchiveCases(StorePlumbing):
    """Mixed into Store, whose plumbing and task helpers it uses."""

    delivery_initial_delay: float

    @abc.abstractmethod
    async def _load_task(self, tx: Tx, task_id: str) -> Task | None: ...

    @abc.abstractmethod
    async def _replayed_task(self, tx: Tx, idempotency: tuple[str, str, str] | None, task: Task) -> Task | None: ...

    # ---- archives --------------------------------------------------------------------------------
    async def create_archives(self, archives: Sequence[Archive], now: float, *,
                              idempotency: tuple[str, str, str] | None = None) -> list[tuple[Archive, bool]]:
        """One transaction: each archive with its image row and archive job, unless an archive of the same
        link (url_key) exists that has not failed: then that one, unchanged. Returns (archive, created) in the
        given order.

        `idempotency` = (scope, key, body_hash): a key used with another body within 24 h raises Conflict;
        with the same body the answer is the same archives (every link is found again by its url_key).
        Concurrent creates of one link serialize on its url_key: one archive, whichever commits first.
        """
        async def body(tx: Tx) -> list[tuple[Archive, bool]]:
            replay = None
            if idempotency is not None and archives:
                replay = await replay_or_claim(tx, idempotency, archives[0].id, now,
                                               lambda owner: tx.one(q.LOAD_ARCHIVE, (owner,)))
            out: list[tuple[Archive, bool]] = []
            jobs: list[Job] = []
            for archive in archives:
                if replay is None:
                    # A new request for a link whose archive failed tries again; a replay (same key, same
                    # body) answers what the first request got, failures included.
                    await tx.run(q.RETIRE_FAILED_ARCHIVE, (archive.url_key,))
                if await tx.run(q.INSERT_ARCHIVE, archive_row(archive)):
                    image = ImageRecord(id=ids.new_id("img", now), task_id=archive.id, index=0,
                                        source_url=archive.source_url, source_expires_at=archive.expires_at)
                    await tx.run(q.INSERT_IMAGE, (image.id, archive.id, 0, archive.source_url, None,
                                                  archive.expires_at))
                    archive.images = [image]
                    jobs.append(archive_job(image, now, ARCHIVE_METRICS_LABEL))
                    out.append((archive, True))
                    continue
                row = await tx.one(q.ARCHIVE_BY_URL_KEY, (archive.url_key,))
                assert row is not None
                existing = archive_from_row(row)
                existing.images = await images_of(tx, existing.id)
                out.append((existing, False))
            await insert_jobs(tx, jobs)
            return out
        result = await self.transact(body)
        if any(created for _, created in result):
            self._wake()
        for archive, created in result:
            if created:
                self._archive_told(archive.id, TaskStatus.PENDING)
        return result

    async def get_archive(self, archive_id: str) -> Archive | None:
        return await self._one_with_images(q.LOAD_ARCHIVE_WITH_IMAGES, archive_id, archive_from_row)

    async def list_archives(self, *, status: str | None, limit: int,
                            cursor: str | None) -> tuple[list[Archive], str | None]:
        """Newest first; the cursor is the last id of the previous page (as tasks)."""
        filters, args = [], []
        if status:
            filters.append("status = ?")
            args.append(status)
        return await self._page_with_images("archives", filters, args, cursor=cursor, limit=limit,
                                            build=archive_from_row)

    async def archive_started(self, archive_id: str, now: float) -> None:
        """pending → archiving, when the archive job first takes the link (no event: only outcomes have one)."""
        async def body(tx: Tx) -> int:
            return await tx.run(q.ARCHIVE_STARTED, (now, archive_id))
        if await self.transact(body):
            self._archive_told(archive_id, TaskStatus.ARCHIVING)

    async def _settle_archive_image(self, tx: Tx, archive_id: str, sql: str, args: Sequence[Any],
                                    decide: Callable[[Task | Archive], Awaitable[Transition | None]],
                                    now: float) -> Archive | None:
        """Store._settle_image for an image an archive owns: record the image, let `decide` judge the archive
        (locked), write its transition. Inside the caller's transaction. The archive if its status changed (the
        caller tells _archive_told after the commit)."""
        if not await tx.lock(q.LOCK_ARCHIVE_ROW, archive_id) or not await tx.run(sql, args):   # settled meanwhile
            return None
        rows = await tx.all(q.LOAD_ARCHIVE_WITH_IMAGES, (archive_id,))
        archive = owner_with_images(rows, archive_from_row)
        assert archive is not None      # locked: nobody removed it since
        if archive.status == TaskStatus.PENDING:
            archive.status = TaskStatus.ARCHIVING     # the job saved it before it could say it started
        transition = await decide(archive)
        if transition is None:
            return None
        await write_archive_transition(tx, archive, transition, now,
                                       subscriptions=await self.subscribers.enabled(tx, subscriptions_stamp(rows)),
                                       delivery_delay=self.delivery_initial_delay)
        return archive

    # ---- adopted tasks ---------------------------------------------------------------------------
    async def adopt_task(self, task: Task, jobs: Sequence[Job], *,
                         idempotency: tuple[str, str, str] | None = None) -> tuple[Task, bool]:
        """Insert `task` (its provider_task_id set: never submitted) with `jobs`, unless relay already tracks
        that provider task: adopted before, or submitted by relay itself. Returns (task, created).

        Locks the (provider, provider task id) row of adoptions: two adoptions at once make one task.
        """
        assert task.provider_task_id is not None
        provider, provider_task_id = task.provider, task.provider_task_id

        async def body(tx: Tx) -> tuple[Task, bool]:
            replayed = await self._replayed_task(tx, idempotency, task)
            if replayed is not None:
                return replayed, False
            await tx.run(q.CLAIM_ADOPTION, (provider, provider_task_id, task.id, task.created_at))
            row = await tx.one(q.LOCK_ADOPTION, (provider, provider_task_id))
            assert row is not None
            known = row["task_id"] if row["task_id"] != task.id else None
            if known is None:
                own = await tx.one(q.TASK_BY_PROVIDER_TASK, (provider_task_id, provider))
                known = own["id"] if own is not None else None
            if known is not None:
                existing = await self._load_task(tx, known)
                if existing is not None:
                    await tx.run(q.SET_ADOPTION, (existing.id, provider, provider_task_id))
                    return existing, False
                await tx.run(q.SET_ADOPTION, (task.id, provider, provider_task_id))   # its task was deleted
            await tx.run(q.INSERT_TASK, task_row(task))
            await insert_jobs(tx, list(jobs))
            return task, True
        return self._task_created(await self.transact(body))

    # ---- archive status listeners ------------------------------------------------------------------
    def on_archive_status(self, listener: ArchiveListener) -> None:
        """Register a listener told of each archive created (pending) and each status it reaches, after the
        commit (relay.metrics: archives have no provider, so they are not task status changes)."""
        self._archive_listeners = [*getattr(self, "_archive_listeners", []), listener]

    def _archive_told(self, archive_id: str, status: TaskStatus) -> None:
        for listener in getattr(self, "_archive_listeners", []):
            listener(archive_id, status)
