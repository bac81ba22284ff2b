"""The retention use cases of the store: delete old rows in bounded batches, and hand over image files to delete.

Backend-neutral like relay.store.base (which mixes this in); what counts as old is relay.retention's. Each
method is one short transaction over at most `limit` picked rows, so the API's transactions wait for one
batch at most, never for a whole sweep.

Image files and archives race; the argument that none loses its file:

    archive (relay.jobs.archive)                    deletion (delete_finished_tasks, expire_images)
    A1 hold: in one transaction, insert and at      D1 in one transaction: the rows go (or expire); per
       once delete the tombstone row of sha256 S       sha256 S they used, insert S's tombstone, then look
       (refused if one exists: a deletion is on),      for an image still using S (any status but expired);
       then set S on its (pending) image row           if one is, delete the tombstone again
    A2 put the file (a no-op if it is there)        D2 delete the file (after D1 commits)
    A3 record the image archived                    D3 delete the tombstone

A1 and D1 both insert S into image_deletions' primary key, so they are exclusive: PostgreSQL makes an insert of
a key another open transaction inserted wait until that one ends (whether it deleted the row again or not),
and SQLite runs one write transaction at a time. So either D1 came first, and A1 finds the tombstone (until D3)
and the archive tries again later, after which its put writes the file anew; or A1 came first, and D1's look
(a statement after its insert, so with a snapshot taken after A1 committed) finds A1's image using S and
deletes nothing. The hold is on the image row before any file is put, so no put can happen between D1's look
and D2's delete without a tombstone having refused its hold.

Only the tombstone's owner does D2 and D3: the sweep whose D1 inserted it, under a lease of OWNER_LEASE that it
renews right before each file it deletes (D2 is skipped if the tombstone has another owner by then). A crash
between D1 and D3 leaves the tombstone: once its lease has run out, a later sweep takes it over, deletes the file
again (harmless) and ends it; archives of S wait until then. Without owners, two sweeps at once (the housekeeping
job and `relay retention`) could both take a crash's leftover, and the slower one delete S after the other's D3
had let an archive hold S and put its file anew.
Files whose only users went in a crash of an archive (put, never recorded) are not looked for: a leak, not a loss.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from relay.errors import ArchiveError
from relay.store import queries as q
from relay.store.plumbing import StorePlumbing
from relay.store.tx import Row, Tx

IMAGE_BEING_DELETED = "image_being_deleted"
# How long a sweep owns an image deletion it decided or took over, from its last renewal (one per file, right
# before deleting it): longer than one file's deletion can take (S3's 300 s timeout, retried), so a live owner never
# loses one mid-delete; a crash's leftover waits this long before another sweep takes it over.
OWNER_LEASE = 3600.0


@dataclass(frozen=True)
class FileToDelete:
    sha256: str
    key: str
    owner: str       # the sweep's own token: only it deletes the file and ends the tombstone


@dataclass
class Swept:
    """One batch: how many rows were picked as old, how many went, and image files now free to delete."""

    picked: int = 0
    deleted: int = 0
    files: list[FileToDelete] = field(default_factory=list)


class RetentionCases(StorePlumbing):
    """Mixed into Store, whose plumbing (transact, _read) it uses."""

    async def delete_finished_tasks(self, before: float, limit: int, now: float, *, release_files: bool) -> Swept:
        """One transaction: up to `limit` tasks finished before `before` go with everything that points at them
        (their deliveries and attempts, events, callbacks, idempotency keys, jobs, images rows), children first.

        A task one of whose deliveries is pending (or was made pending again meanwhile: a manual retry) stays.
        With `release_files`, the files of its images that no other image uses are returned for deletion.
        """
        return await self._delete_finished(q.OLD_FINISHED_TASKS, "tasks", before, limit, now,
                                           release_files=release_files)

    async def _delete_finished(self, pick: str, owners: str, before: float, limit: int, now: float, *,
                               release_files: bool) -> Swept:
        """The one deletion of finished owners (tasks, archives: `pick` finds them in table `owners`) with the
        rows that name them by task_id; an owner with a pending delivery stays."""
        async def body(tx: Tx) -> Swept:
            picked = [r["id"] for r in await tx.all(pick, (before, limit))]
            if not picked:
                return Swept()
            gone = await _drop_settled_deliveries(tx, "task_id", picked)
            if not gone:
                return Swept(picked=len(picked))
            n = len(gone)
            for table in ("events", "inbox", "idempotency_keys", "jobs"):
                await tx.run(q.delete_in(table, "task_id", n), gone)
            images = await tx.all(q.delete_in("images", "task_id", n, returning="sha256, path"), gone)
            deleted = await tx.run(q.delete_in(owners, "id", n), gone)
            files = await _release(tx, images, now) if release_files else []
            return Swept(picked=len(picked), deleted=deleted, files=files)
        return await self.transact(body)

    async def delete_old_events(self, before: float, limit: int) -> Swept:
        """One transaction: up to `limit` events created before `before`, none with a pending delivery, go with
        their (settled) deliveries and those deliveries' attempts."""
        async def body(tx: Tx) -> Swept:
            picked = [r["id"] for r in await tx.all(q.OLD_EVENTS, (before, limit))]
            if not picked:
                return Swept()
            gone = await _drop_settled_deliveries(tx, "event_id", picked)
            deleted = await tx.run(q.delete_in("events", "id", len(gone)), gone) if gone else 0
            return Swept(picked=len(picked), deleted=deleted)
        return await self.transact(body)

    async def delete_old_attempts(self, before: float, limit: int) -> Swept:
        """One transaction: up to `limit` delivery attempts made before `before` (their deliveries stay)."""
        async def body(tx: Tx) -> Swept:
            deleted = await tx.run(q.DELETE_OLD_ATTEMPTS, (before, limit))
            return Swept(picked=deleted, deleted=deleted)
        return await self.transact(body)

    async def expire_images(self, before: float, limit: int, now: float, reason: str) -> Swept:
        """One transaction: up to `limit` images archived before `before` become `expired` (no longer served);
        the files no image still uses are returned for deletion."""
        async def body(tx: Tx) -> Swept:
            picked = [r["id"] for r in await tx.all(q.OLD_ARCHIVED_IMAGES, (before, limit))]
            if not picked:
                return Swept()
            rows = await tx.all(q.expire_images(len(picked)), (reason, *picked))
            return Swept(picked=len(picked), deleted=len(rows), files=await _release(tx, rows, now))
        return await self.transact(body)

    async def image_deletions(self, limit: int, now: float) -> list[FileToDelete]:
        """Files whose deletion was decided (D1) and not confirmed done (D3) by an owner whose lease has run out (a
        crash's leftovers): taken over, owned by this call's token from now on."""
        owner = uuid.uuid4().hex
        rows = await self._change(q.TAKE_OVER_IMAGE_DELETIONS,
                                  (owner, now + OWNER_LEASE, now, owner, now, owner, limit))
        return [FileToDelete(r["sha256"], r["key"], owner) for r in rows]

    async def disown_image_deletion(self, f: FileToDelete) -> None:
        """`f`'s file could not be deleted now (the image store failed): the next sweep takes it over at once,
        not after this sweep's lease (archives of those bytes wait until the file is gone)."""
        await self._change(q.DISOWN_IMAGE_DELETION, (f.sha256, f.owner))

    async def own_image_deletion(self, f: FileToDelete, now: float) -> bool:
        """Right before D2: renew the lease on `f`'s deletion; False if another sweep owns it by now (it took it over
        when this one's lease ran out) or it is done: the file is not this sweep's to delete."""
        return bool(await self._change(q.RENEW_IMAGE_DELETION, (now + OWNER_LEASE, f.sha256, f.owner)))

    async def image_deleted(self, files: Sequence[FileToDelete]) -> None:
        """D3: these files are gone; archives may take their sha256 again. A tombstone another sweep owns by now
        stays: that sweep ends it."""
        if not files:
            return

        async def body(tx: Tx) -> None:
            await tx.many(q.END_OWNED_IMAGE_DELETION, [(f.sha256, f.owner) for f in files])
        await self.transact(body)

    async def hold_image(self, image_id: str, sha256: str, now: float) -> None:
        """A1, before an archive puts the file of `sha256`: mark the (pending) image as using it, so no deletion
        decides the file is unused from now on. Raises a retryable ArchiveError while a deletion of it is on."""
        async def body(tx: Tx) -> bool:
            if not await tx.run(q.START_IMAGE_DELETION, (sha256, "", now, "", 0.0)):
                return False
            # Sent together at the commit on PostgreSQL (Tx.write): one round trip.
            await tx.write(q.END_IMAGE_DELETION, (sha256,))
            await tx.write(q.HOLD_IMAGE, (sha256, image_id))
            return True
        # Shared where the backend shares transactions (SQLite): one per archived image, 15 % of the writer
        # thread's transactions under bench.throughput, each independent of the others.
        if not await self.transact_shared(body):
            raise ArchiveError("the stored file with these bytes is being deleted by retention; trying again "
                               "once it is gone", code=IMAGE_BEING_DELETED)

    async def retention_counts(self, *, tasks_before: float | None, events_before: float | None,
                               attempts_before: float | None, images_before: float | None) -> dict[str, int]:
        """What a sweep with these cutoffs (None: that rule keeps everything) would delete now, rule by rule."""
        out: dict[str, int] = {}
        for name, sql, before in (("finished_tasks", q.COUNT_OLD_FINISHED_TASKS, tasks_before),
                                  ("events", q.COUNT_OLD_EVENTS, events_before),
                                  ("delivery_attempts", q.COUNT_OLD_ATTEMPTS, attempts_before),
                                  ("images", q.COUNT_OLD_ARCHIVED_IMAGES, images_before)):
            row = None if before is None else await self._read(sql, (before,))
            out[name] = 0 if row is None else int(row["n"])
        return out


    # ---- archives of any link, provider stats, uploaded inputs --------------------------------------------
    async def delete_finished_archives(self, before: float, limit: int, now: float, *, release_files: bool) -> Swept:
        """delete_finished_tasks for archives (arc_…): up to `limit` succeeded or failed before `before` go with
        their images rows, events, deliveries and attempts, idempotency keys and jobs; one with a pending
        delivery stays. With `release_files`, the files no remaining image (of any owner) or upload uses."""
        return await self._delete_finished(q.OLD_FINISHED_ARCHIVES, "archives", before, limit, now,
                                           release_files=release_files)

    async def delete_old_provider_stats(self, before: float, limit: int) -> Swept:
        """One transaction: up to `limit` provider_stats rows (one per provider and minute) of minutes before
        `before`, oldest first."""
        async def body(tx: Tx) -> Swept:
            deleted = await tx.run(q.DELETE_OLD_PROVIDER_STATS, (int(before), limit))
            return Swept(picked=deleted, deleted=deleted)
        return await self.transact(body)

    async def delete_old_dead_jobs(self, before: float, limit: int) -> Swept:
        """One transaction: up to `limit` dead jobs of no task (a delivery's, housekeeping's) that died before
        `before` (their run_at, set by bury_job), the longest dead first. A task's jobs go with their task."""
        async def body(tx: Tx) -> Swept:
            deleted = await tx.run(q.DELETE_OLD_DEAD_JOBS, (before, limit))
            return Swept(picked=deleted, deleted=deleted)
        return await self.transact(body)

    async def old_row_counts(self, *, archives_before: float | None, stats_before: float | None,
                             dead_jobs_before: float | None) -> dict[str, int]:
        """retention_counts for finished archives, provider stats and dead jobs of no task (None: that rule keeps
        everything)."""
        out: dict[str, int] = {}
        for name, sql, before in (("archives", q.COUNT_OLD_FINISHED_ARCHIVES, archives_before),
                                  ("provider_stats", q.COUNT_OLD_PROVIDER_STATS,
                                   None if stats_before is None else int(stats_before)),
                                  ("dead_jobs", q.COUNT_OLD_DEAD_JOBS, dead_jobs_before)):
            row = None if before is None else await self._read(sql, (before,))
            out[name] = 0 if row is None else int(row["n"])
        return out

    async def hold_upload(self, sha256: str, key: str, now: float) -> None:
        """A1 for an uploaded input, before its file is put: record the upload (kept, a user of `sha256` from now
        on). Raises a retryable ArchiveError while a deletion of that file is on."""
        async def body(tx: Tx) -> bool:
            if not await tx.run(q.START_IMAGE_DELETION, (sha256, "", now, "", 0.0)):
                return False
            await tx.run(q.END_IMAGE_DELETION, (sha256,))
            await tx.run(q.INSERT_UPLOAD, (sha256, key, now))
            return True
        if not await self.transact(body):
            raise ArchiveError("the stored file with these bytes is being deleted by retention; try again in a "
                               "moment", code=IMAGE_BEING_DELETED)

async def _drop_settled_deliveries(tx: Tx, column: str, picked: list[str]) -> list[str]:
    """Delete the settled deliveries (and their attempts) of the picked tasks or events; the picked ones left
    with no delivery at all, which may go now (a delivery made pending again meanwhile keeps its owner)."""
    deliveries = [r["id"] for r in await tx.all(q.settled_deliveries_of(column, len(picked)), picked)]
    for start in range(0, len(deliveries), 500):
        chunk = deliveries[start:start + 500]
        await tx.run(q.delete_in("delivery_attempts", "delivery_id", len(chunk)), chunk)
    kept = {r["id"] for r in await tx.all(q.still_delivered(column, len(picked)), picked)}
    return [p for p in picked if p not in kept]


async def _release(tx: Tx, images: Sequence[Row], now: float) -> list[FileToDelete]:
    """D1 for the files of images that just went or expired: the ones no other image uses get a tombstone, owned
    by this transaction's caller (a new token)."""
    keys = {r["sha256"]: r["path"] for r in images if r["sha256"] and r["path"]}
    files = []
    owner = uuid.uuid4().hex
    for sha256, key in sorted(keys.items()):
        if not await tx.run(q.START_IMAGE_DELETION, (sha256, key, now, owner, now + OWNER_LEASE)):
            continue        # already being deleted
        if await tx.one(q.IMAGE_IN_USE, (sha256, sha256)) is not None:
            await tx.run(q.END_IMAGE_DELETION, (sha256,))
            continue
        files.append(FileToDelete(sha256, key, owner))
    return files
