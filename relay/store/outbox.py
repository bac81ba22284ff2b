"""What one state change writes, inside the transaction that makes it: the outbox of relay.

A transition (relay.states decided it) becomes the task row's new state, one event, the images the
provider reported with their archive jobs (ordered by how soon their links die), and one delivery with
its job for every subscriber whose filter takes the event. All of it commits together or not at all.
Backend-neutral: it speaks only through a Tx and the named statements of relay.store.queries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from relay import ids, jsontext
from relay.costs import cost_day
from relay.deliveries.models import matches
from relay.models import Archive, Event, ImageRecord, Job, Task
from relay.present import archive_object, task_object
from relay.states import Transition
from relay.store import queries as q
from relay.store.rows import dumps, image_from_row, job_row
from relay.store.tx import Row, Tx

# Archive jobs are ordered by how soon their source dies: run_at is moved back by the time a link
# has less than this horizon, so a backlog saves the soonest-dying images first.
ARCHIVE_HORIZON = 24 * 3600.0
TASK_TARGET = "task"       # the delivery target of a task's own webhook_url
# Prices an ended task (relay.costs.task_cost over the configured tables): {amount, currency, source} or None.
Pricing = Callable[[Task], dict[str, Any] | None]


def archive_job(image: ImageRecord, now: float, provider: str | None = None) -> Job:
    """`provider`: the task's, carried so the download is counted against it (relay.metrics)."""
    urgency = 0.0
    if image.source_expires_at is not None:
        urgency = max(0.0, ARCHIVE_HORIZON - max(0.0, image.source_expires_at - now))
    payload: dict[str, str] = {"image_id": image.id, **({"provider": provider} if provider else {})}
    return Job(id=ids.new_id("job", now), kind="archive", task_id=image.task_id,
               payload=payload, run_at=now - urgency, dedupe_key=f"archive:{image.id}")


def deliver_job(delivery_id: str, run_at: float, now: float) -> Job:
    """The wake-up job of a delivery: one live job per delivery."""
    return Job(id=ids.new_id("job", now), kind="deliver", payload={"delivery_id": delivery_id}, run_at=run_at,
               dedupe_key=f"deliver:{delivery_id}", max_attempts=10)


async def insert_jobs(tx: Tx, jobs: list[Job] | tuple[Job, ...]) -> int:
    """Insert jobs; one whose dedupe_key is live already is skipped. How many were added."""
    if not jobs:
        return 0
    return await tx.many(q.INSERT_JOB, [job_row(job) for job in jobs])


async def write_jobs(tx: Tx, jobs: list[Job] | tuple[Job, ...]) -> None:
    """insert_jobs where nobody reads how many were added: the inserts may be held and sent with the
    transaction's other writes (Tx.write)."""
    if jobs:
        await tx.write_many(q.INSERT_JOB, [job_row(job) for job in jobs])


async def images_of(tx: Tx, task_id: str) -> list[ImageRecord]:
    return [image_from_row(row) for row in await tx.all(q.IMAGES_OF_TASK, (task_id,))]


class Subscribers:
    """The enabled subscriptions a transition fans out to, kept from one transaction to the next while unchanged.

    Every change fan-out would see (a subscription added or removed, its url, events or enabled changed) writes a
    new random stamp into subscriptions_stamp in its own transaction (triggers, sql/020). A transition reads the
    stamp with its task, after the task's lock (queries.with_images); when it is the stamp of the rows kept here,
    those are the enabled subscriptions as that read saw them, and they are not read again: a round trip less
    on PostgreSQL, while the task's row is locked. Random rather than counted up, so that rows read inside a
    transaction that rolled back (its stamp never committed) cannot pass for those of a later change."""

    def __init__(self) -> None:
        self._kept: tuple[int | None, tuple[Row, ...]] = (None, ())     # (stamp, rows): replaced in one assignment

    async def enabled(self, tx: Tx, stamp: int | None) -> tuple[Row, ...]:
        """The enabled subscriptions, given the stamp this transaction read (None: unknown, read them)."""
        kept_stamp, rows = self._kept
        if stamp is None or stamp != kept_stamp:
            read = await tx.all(q.ENABLED_SUBSCRIPTIONS)
            rows = tuple(row for row in read if row["id"] is not None)
            self._kept = (read[0]["stamp"] if read else None, rows)
        return rows


def subscriptions_stamp(rows: list[Row]) -> int | None:
    """The subscriptions' stamp a queries.with_images read brought (None when it found nothing)."""
    return int(rows[0]["subscriptions_stamp"]) if rows else None


async def write_transition(tx: Tx, task: Task, t: Transition, now: float, *, subscriptions: Sequence[Row],
                           default_expiry: float, delivery_delay: float, pricing: Pricing | None = None,
                           jobs: list[Job] | tuple[Job, ...] = ()) -> Event:
    """Apply `t` to `task` (already read with its images, locked, in this transaction) and write everything it
    causes, and `jobs` along; `subscriptions` are the enabled ones (Subscribers.enabled, in this transaction).

    The subscriptions are read before, so that the writes here may be held and sent together (Tx.write):
    on PostgreSQL the task's row, its event, its deliveries and every job are one round trip when the task
    goes on, two when it ends (its watch jobs are deleted first). So the row is written once, usage and cost
    with it, and the jobs (archive, delivery and `jobs`) in one write: two writes of one table would be sent
    apart."""
    task.status = t.status
    task.sequence += 1
    task.updated_at = now
    if t.progress is not None:
        task.progress = t.progress
    if t.provider_task_id and not task.provider_task_id:
        task.provider_task_id = t.provider_task_id
    if t.error is not None:
        task.error = t.error
    if t.status.terminal:
        task.completed_at = now
    new_jobs = list(jobs)
    if t.images:
        # task.images were read with the task's row lock, so they are the images there are: the new ones are
        # added to them here rather than read back (a round trip less on PostgreSQL).
        known = {image.index for image in task.images}
        rows, added = [], []
        for index, source in enumerate(t.images):
            if index in known:
                continue
            expires = source.expires_at if source.expires_at is not None else now + default_expiry
            image = ImageRecord(id=ids.new_id("img", now), task_id=task.id, index=index, source_url=source.url,
                                source_expires_at=expires)
            rows.append((image.id, task.id, index, source.url, source.b64, expires))
            added.append(image)
        await tx.write_many(q.INSERT_IMAGE, rows)
        task.images = sorted([*task.images, *added], key=lambda image: image.index)
        new_jobs += [archive_job(img, now, task.provider) for img in task.images if img.status == "pending"]
    await _write_task_state(tx, task, t, now, pricing)
    if t.status.terminal:
        await tx.write(q.DELETE_WATCH_JOBS, (task.id,))    # nothing left to poll or confirm
    event = Event(id=ids.new_id("evt", now), type=t.event, task_id=task.id, sequence=task.sequence,
                  created_at=now, data=task_object(task))
    await tx.write(q.INSERT_EVENT, (event.id, event.type, event.task_id, event.sequence, dumps(event.data), now))
    new_jobs += await fan_out(tx, event, task, now + delivery_delay, now, subscriptions)
    await write_jobs(tx, new_jobs)
    return event


async def _write_task_state(tx: Tx, task: Task, t: Transition, now: float, pricing: Pricing | None) -> None:
    """The task row's new state, with the provider's usage report when it brings one and the task's cost when it
    ends (relay.costs), in one statement."""
    args: list[Any] = [task.status.value, task.sequence, now, task.progress, task.provider_task_id,
                       dumps(task.error), task.completed_at]
    usage = t.usage is not None and t.usage != task.usage
    if usage:
        task.usage = t.usage
        args.append(dumps(task.usage))
    cost = False
    if t.status.terminal and pricing is not None:
        task.cost = pricing(task)
        if task.cost is not None:
            cost = True
            args += [dumps(task.cost), task.cost["amount"], task.cost["currency"], cost_day(now)]
    await tx.write(q.update_task_state(usage=usage, cost=cost), (*args, task.id))


async def fan_out(tx: Tx, event: Event, task: Task | Archive, run_at: float, now: float,
                  subscriptions: Sequence[Row]) -> list[Job]:
    """One delivery per enabled subscription (`subscriptions`: Subscribers.enabled, as of this transaction's
    stamp) whose filter takes the event, and the task's own hook: the deliveries are written, their jobs
    returned for the caller to write with its others (write_jobs)."""
    targets: list[tuple[str, str | None, str]] = []   # (target, subscription id, url)
    for row in subscriptions:
        if matches(jsontext.loads(row["events"]), event.type):
            targets.append((row["id"], row["id"], row["url"]))
    if task.webhook_url and matches(task.webhook_events, event.type):
        targets.append((TASK_TARGET, None, task.webhook_url))
    if not targets:
        return []
    jobs, values = [], []
    for target, subscription_id, url in targets:
        delivery_id = ids.new_id("dlv", now)
        values.append((delivery_id, event.id, event.type, task.id, subscription_id, target, url, run_at, now, now))
        jobs.append(deliver_job(delivery_id, run_at, now))
    await tx.write_many(q.INSERT_DELIVERY, values)
    return jobs


async def write_archive_transition(tx: Tx, archive: Archive, t: Transition, now: float, *,
                                   subscriptions: Sequence[Row], delivery_delay: float) -> Event:
    """An archive's `t` (relay.states decided it on the archive, read and locked in this transaction): its row,
    its event (`archive.succeeded` / `archive.failed`, the archive object as data) and the event's fan-out to
    `subscriptions` (Subscribers.enabled, in this transaction)."""
    archive.status = t.status
    archive.sequence += 1
    archive.updated_at = now
    if t.error is not None:
        archive.error = t.error
    if t.status.terminal:
        archive.completed_at = now
    await tx.write(q.UPDATE_ARCHIVE_STATE, (archive.status.value, archive.sequence, now, dumps(archive.error),
                                          archive.completed_at, archive.id))
    event = Event(id=ids.new_id("evt", now), type="archive." + t.status.value, task_id=archive.id,
                  sequence=archive.sequence, created_at=now, data=archive_object(archive))
    await tx.write(q.INSERT_EVENT, (event.id, event.type, event.task_id, event.sequence, dumps(event.data), now))
    await write_jobs(tx, await fan_out(tx, event, archive, now + delivery_delay, now, subscriptions))
    return event
