"""The store: relay's use cases over a database, written once for every backend.

Each use case is one transaction and says what it is atomic with and which rows it locks. The
decisions (the state machine's verdict, idempotency windows, the in-flight cap, image completion,
fan-out matching, auto-disable) are made here, in Python, over rows read inside the transaction; a
backend (relay.store.sqlite, relay.store.postgres) is only SQL plumbing (the first three are
declared once, in relay.store.plumbing, the base of Store and of every use-case mixin):

    transact(body)       run `body(tx)` in one write transaction (commit on return, roll back on raise)
    _read / _read_all    a read outside any write transaction (committed data only)
    _write(sql, args)    one small independent write (SQLite group-commits these)
    claim(...)           lease due jobs (SQLite: its one writer; PostgreSQL: FOR UPDATE SKIP LOCKED)
    lock_provider(tx, p) serialize in-flight counting per provider (PostgreSQL: an advisory lock)

No correctness rests on a single writer: where two replicas could race, the use case reads the row it
decides on with a row lock (`FOR_UPDATE` in relay.store.queries), takes the provider's lock, or changes the
row only from the state it decided on (a compare-and-set: the shared rate buckets), and the concurrent
contract tests run every such case against two store instances on one database.
"""

from __future__ import annotations

import abc
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from relay.errors import Conflict
from relay.models import Archive, Event, ImageRecord, Job, Task
from relay.states import ALL_EVENT_TYPES, Transition, on_archived, on_failure
from relay.stats import ProviderStats, StatsRow, merge_buckets, parse_buckets, summarize
from relay.store import queries as q
from relay.store.archives import ArchiveCases, is_archive_id
from relay.store.console import ConsoleCases
from relay.store.deliveries import DeliveryCases
from relay.store.idempotency import replay_or_claim
from relay.store.outbox import Pricing, insert_jobs, subscriptions_stamp, write_jobs, write_transition
from relay.store.plumbing import StorePlumbing, owner_with_images
from relay.store.retention import RetentionCases
from relay.store.routing import RoutingCases
from relay.store.rows import dumps, image_from_row, job_from_row, job_row, loads, task_from_row, task_row
from relay.store.tx import Row, Tx


# A pure decision over the current task row (see relay.states).
Decide = Callable[[Task], Transition | None]
SettledCallback = tuple[dict[str, Any], str, str]      # a callback (fields of an inbox row), its status and note


def _settled_callback(callback: dict[str, Any], status: str, note: str | None, now: float) -> tuple[Any, ...]:
    """The values of SETTLE_CALLBACK."""
    return (callback["id"], callback["provider"], callback["task_id"], callback["body"], callback["received_at"],
            status, note, now)


BUCKET_SWAP_TRIES = 3      # compare-and-set takes of a rate bucket lost to other processes before locking it
BUCKETS_REMEMBERED = 256   # rate buckets whose last state a store keeps (login limits make one per address)

Reservation = Literal["reserved", "full", "taken"]      # Store.reserve_submit's answers


def take_from_bucket(seen: tuple[float, float], rate: float, burst: float, now: float,
                     wanted: int) -> tuple[int, float, tuple[float, float]]:
    """The token bucket's rule: from the bucket as seen (tokens, updated_at), refilled at `rate` per second up to
    `burst`, take up to `wanted` whole tokens. Returns (taken, the seconds until one is due when none were, and
    the bucket's (tokens, updated_at) after)."""
    held, updated_at = seen
    # A clock that stepped back refills nothing rather than draining the bucket.
    tokens = min(burst, held + max(0.0, now - updated_at) * rate)
    taken = max(0, min(wanted, math.floor(tokens)))
    return taken, 0.0 if taken else (1.0 - tokens) / rate, (tokens - taken, max(now, updated_at))


@dataclass(frozen=True)
class Applied:
    """A transition that was written, with the task as it is now and the event it produced."""

    task: Task
    transition: Transition
    event: Event


@dataclass(frozen=True)
class ArchiveResult:
    sha256: str
    content_type: str
    width: int
    height: int
    bytes: int
    path: str


class Store(DeliveryCases, ConsoleCases, RetentionCases, RoutingCases, ArchiveCases, StorePlumbing):
    delivery_initial_delay: float = 0.0
    pricing: Pricing | None = None     # prices a task when it ends (relay.costs; set by the runtime)

    # ---- plumbing: what a backend provides ------------------------------------------------------
    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and apply pending migrations (safe when several replicas start at once)."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise if the database cannot answer (readiness)."""

    async def lock_provider(self, tx: Tx, provider: str) -> None:
        """Serialize `reserve_submit` per provider across replicas (SQLite's one writer already does)."""

    def _applied(self, applied: Applied | None) -> None:
        if applied is not None and applied.transition.status_changed:
            self._told(applied.task, applied.transition.status, applied.event)

    def set_delivery_options(self, *, initial_delay: float) -> None:
        """The delay of a new delivery's first attempt (the schedule's first entry)."""
        self.delivery_initial_delay = initial_delay

    # ---- tasks -----------------------------------------------------------------------------------
    async def create_task(self, task: Task, jobs: Sequence[Job], *,
                          idempotency: tuple[str, str, str] | None = None) -> tuple[Task, bool]:
        """Insert the task with its first jobs. `idempotency` = (scope, key, body_hash).

        Returns (task, created). A known key with the same body returns the original task and
        False; with another body raises Conflict. Keys older than 24 h are forgotten.
        Locks the key's row: the same key sent to two replicas at once makes one task.
        """
        async def body(tx: Tx) -> tuple[Task, bool] | Conflict:
            try:
                existing = await self._replayed_task(tx, idempotency, task)
            except Conflict as refused:
                # Nothing written yet: refused once the transaction is over, so that a shared one goes on for the
                # other bodies instead of rolling back and running each again alone (a client reusing a key
                # with other bodies must not cost every concurrent request that).
                return refused
            if existing is not None:
                return existing, False
            await tx.write(q.INSERT_TASK, task_row(task))
            if task.candidates or task.route:
                await tx.write(q.SET_TASK_ROUTE, (dumps(task.candidates), task.route, task.id))
            await write_jobs(tx, list(jobs))
            return task, True
        # Shared where the backend shares transactions (SQLite), as reservations and transitions are: after them
        # the most frequent transaction on its one writer (bench.throughput: 12 % of the writer thread's). A key
        # claimed by an earlier body of the same transaction is replayed here as if that one had committed.
        outcome = await self.transact_shared(body)
        if isinstance(outcome, Conflict):
            raise outcome
        return self._task_created(outcome)

    async def _replayed_task(self, tx: Tx, idempotency: tuple[str, str, str] | None, task: Task) -> Task | None:
        """The task an Idempotency-Key already stands for (relay.store.idempotency.replay_or_claim); None: go on
        creating `task` (no key, or the key now names it)."""
        if idempotency is None:
            return None
        return await replay_or_claim(tx, idempotency, task.id, task.created_at,
                                     lambda owner: self._load_task(tx, owner))

    async def get_task(self, task_id: str, *, images: bool = True) -> Task | None:
        """The task; without its images (one read instead of two) when `images` is False."""
        if not images:
            row = await self._read_key(q.LOAD_TASK, (task_id,))
            return None if row is None else task_from_row(row)
        return await self._one_with_images(q.LOAD_TASK_WITH_IMAGES, task_id, task_from_row)

    async def list_tasks(self, *, status: str | None, provider: str | None, limit: int,
                         cursor: str | None) -> tuple[list[Task], str | None]:
        """Newest first, with their images; the cursor is the last id of the previous page."""
        filters, args = [], []
        for column, value in (("status", status), ("provider", provider)):
            if value:
                filters.append(f"{column} = ?")
                args.append(value)
        return await self._page_with_images("tasks", filters, args, cursor=cursor, limit=limit, build=task_from_row)

    async def apply(self, task_id: str, decide: Decide, now: float, *, default_expiry: float = 86400.0,
                    jobs: Sequence[Job] = (), seen: Task | None = None) -> Applied | None:
        """One transaction: read the task (locked), decide, write the change, its event, its archive jobs and `jobs`.

        None (and nothing written) when the task is unknown or `decide` says the signal is stale.

        `seen`: the task as the caller read it before. A task only moves forward (relay.states), and a signal
        stale for one version of it is stale for every later one, so when `decide(seen)` is None there is no
        transaction at all: a repeated callback or an unchanged poll answer holds no writer and no row lock
        (bench.callbacks with workers: one such transaction per group of callbacks, 1.2 ms of SQLite's writer
        each, on the writer's thread).
        """
        if seen is not None and decide(seen) is None:
            assert seen.id == task_id
            return None
        async def body(tx: Tx) -> Applied | None:
            if not await tx.lock(q.LOCK_TASK_ROW, task_id):
                return None
            task, stamp = await self._locked_task(tx, task_id)
            transition = decide(task)
            if transition is None:
                return None
            return await self._transition(tx, task, stamp, transition, now, default_expiry, jobs)
        applied = await self.transact_shared(body)
        self._wake()
        self._applied(applied)
        return applied

    async def mark_submit_started(self, task_id: str, now: float) -> Task | None:
        """Record that a submit request is about to be sent (so a crash after it is never resent blindly), if it
        was not marked before; no count of the provider's tasks (reserve_submit counts and marks)."""
        async def body(tx: Tx) -> Task | None:
            await tx.run(q.MARK_SUBMIT_STARTED, (now, task_id, None))
            return await self._load_task(tx, task_id)
        return await self.transact(body)

    async def note_canceled_provider_task(self, task_id: str, provider_task_id: str) -> bool:
        """The provider accepted a submit for a task canceled while it was on its way: record its task (the task
        stays canceled), so that it can be canceled there and is not left running unknown. False if the task is
        not canceled, or has another provider task already."""
        return bool(await self._change(q.NOTE_CANCELED_PROVIDER_TASK + " RETURNING id",
                                       (provider_task_id, task_id, provider_task_id)))

    async def clear_submit_started(self, task_id: str, mark: float) -> None:
        """The provider certainly did not accept the submit (refused, 429, 5xx): a resend is safe. Only `mark`, the
        caller's own (reserve_submit's `now`): another run's mark made since stays."""
        await self._write(q.CLEAR_SUBMIT_STARTED, (task_id, mark))

    async def provider_has_room(self, task_id: str, provider: str, max_in_flight: int) -> bool:
        """Whether `provider` holds fewer than `max_in_flight` tasks in flight now, not counting this one: a look,
        without the lock; reserve_submit decides."""
        row = await self._read(q.COUNT_IN_FLIGHT, (provider, provider, task_id))
        return row is not None and int(row["n"]) < max_in_flight

    async def reserve_submit(self, task_id: str, provider: str, max_in_flight: int, now: float,
                             seen: float | None = None) -> Reservation:
        """Atomically: if `provider` has fewer than `max_in_flight` tasks in flight (being submitted, queued or
        running there), mark this task's submit as started: "reserved"; else change nothing: "full".

        `seen` is the task's submit mark as the caller read it (None: not started). The mark is made only if it
        is still that, no provider task is recorded and the task has not ended; else nothing changes and the
        answer is "taken": another run of the submit (this one's job lease ran out while it stalled, and the job
        was claimed again) or the provider's callback got there first, and this run must not send.

        Holds the provider's lock for the count and the mark, so replicas sharing one provider account
        never reserve past its cap together.
        """
        async def body(tx: Tx) -> Reservation:
            await self.lock_provider(tx, provider)
            row = await tx.one(q.COUNT_IN_FLIGHT, (provider, provider, task_id))
            if row is None or int(row["n"]) >= max_in_flight:
                return "full"
            return "reserved" if await tx.run(q.MARK_SUBMIT_STARTED, (now, task_id, seen)) else "taken"
        # Shared with concurrent transactions where the backend shares them (SQLite): a reservation is the most
        # frequent transaction there is (bench.throughput: 60 % of the writer thread's transactions, each
        # holding the one writer 1.2 ms at p50 for a few statements, hop included). Each body counts the marks
        # made before it in the shared transaction, so the cap holds as it does alone.
        return await self.transact_shared(body)

    async def _transition(self, tx: Tx, task: Task, stamp: int | None, t: Transition, now: float,
                          default_expiry: float, jobs: Sequence[Job] = ()) -> Applied:
        """Write `t` of `task` (_locked_task, which read `stamp` with it)."""
        event = await write_transition(tx, task, t, now, subscriptions=await self.subscribers.enabled(tx, stamp),
                                       default_expiry=default_expiry, delivery_delay=self.delivery_initial_delay,
                                       pricing=self.pricing, jobs=tuple(jobs))
        return Applied(task=task, transition=t, event=event)

    async def _load_task(self, tx: Tx, task_id: str) -> Task | None:
        """The task with its images."""
        return owner_with_images(await tx.all(q.LOAD_TASK_WITH_IMAGES, (task_id,)), task_from_row)

    async def _locked_task(self, tx: Tx, task_id: str) -> tuple[Task, int | None]:
        """The task whose row this transaction has locked (Tx.lock), read after the lock in a statement of its own,
        so with its row and images as whoever held the lock before committed them (see queries.with_images), and
        the subscriptions' stamp (outbox.Subscribers)."""
        rows = await tx.all(q.LOAD_TASK_WITH_IMAGES, (task_id,))
        task = owner_with_images(rows, task_from_row)
        assert task is not None     # locked: nobody removed it since
        return task, subscriptions_stamp(rows)

    # ---- provider callbacks (the inbox) ----------------------------------------------------------
    async def receive_callback(self, job: Job) -> None:
        """Durably record a received callback: its job, which carries the raw body (one row; group-committed
        with concurrent small writes). Its inbox row is written when the job settles it (settle_callbacks)."""
        await self._write(q.INSERT_JOB, job_row(job))
        self._wake()

    async def get_callback(self, inbox_id: str) -> dict[str, Any] | None:
        """The inbox row: id, provider, task_id, body, received_at, status, note."""
        row = await self._read(q.LOAD_CALLBACK, (inbox_id,))
        return None if row is None else dict(row)

    async def settle_callbacks(self, settled: list[SettledCallback], now: float) -> None:
        """Record what processing made of callbacks (applied | ignored | rejected) in the inbox, one row each,
        committed together (the group commit): each callback is its inbox row, or the fields its job carried (id,
        provider, task_id, body, received_at), with its status and note."""
        await self._write_many(q.SETTLE_CALLBACK, [_settled_callback(*one, now) for one in settled])

    async def waiting_callbacks(self, task_id: str, kind: str, received_by: float, after: str,
                                limit: int) -> list[tuple[str, str, str]]:
        """(job id, provider, body) of the task's callback jobs (of `kind`) that no worker holds and that were
        received by `received_by`: the first `limit` by id after the id `after` ("" for the first page)."""
        rows = await self._read_all(q.WAITING_CALLBACK_JOBS, (task_id, kind, received_by, after, limit))
        return [(row["id"], row["provider"], row["body"]) for row in rows]

    async def settle_waiting_callbacks(self, settled: dict[str, tuple[str, str, str]],
                                       now: float) -> dict[tuple[str, str, str], int]:
        """One transaction: the jobs (by id: their callback's provider, the status and note to settle it with)
        still waiting for a worker (none took one meanwhile) are deleted, and the callback each carried gets its
        inbox row, made from the job's payload. A callback settled already (by a run that failed after settling
        it) keeps its first outcome. Returns how many callbacks this call settled, by (provider, status, note)."""
        async def body(tx: Tx) -> dict[tuple[str, str, str], int]:
            ids = sorted(settled)
            taken = [row["id"] for row in await tx.all(q.lock_waiting_jobs(len(ids)), ids)]
            if not taken:
                return {}
            alike: dict[tuple[str, str, str], list[str]] = {}
            for job_id in taken:
                alike.setdefault(settled[job_id], []).append(job_id)
            done = {outcome: await tx.run(q.settle_carried_callbacks(len(jobs)), (outcome[1], outcome[2], now, *jobs))
                    for outcome, jobs in alike.items()}
            await tx.run(q.delete_in("jobs", "id", len(taken)), taken)
            return done
        return await self.transact(body) if settled else {}

    # ---- images ----------------------------------------------------------------------------------
    async def get_image(self, image_id: str) -> ImageRecord | None:
        row = await self._read(q.LOAD_IMAGE, (image_id,))
        return None if row is None else image_from_row(row)

    async def get_image_source(self, image_id: str) -> tuple[ImageRecord, str | None] | None:
        """The image and its inline base64 source, if any."""
        row = await self._read(q.LOAD_IMAGE_WITH_SOURCE, (image_id,))
        return None if row is None else (image_from_row(row), row["source_data"])

    async def image_archived(self, image_id: str, result: ArchiveResult, now: float, *,
                             owner_id: str | None = None) -> Applied | None:
        """Record the saved image; if it was the task's last, the task succeeds (same transaction).

        Locks the task row before looking at its images, so two images finishing at once on two
        replicas cannot both see the other still pending. `owner_id`: the image's task (or archive), when the
        caller read the image: the transaction does not read it again to find it.
        """
        args = (result.sha256, result.content_type, result.width, result.height, result.bytes, result.path, now,
                image_id)

        async def settle(task: Task | Archive) -> Transition | None:
            return on_archived(task, all(img.status == "archived" for img in task.images))
        return await self._settle_image(image_id, q.IMAGE_ARCHIVED, args, settle, now, owner_id)

    async def image_failed(self, image_id: str, code: str, message: str, now: float) -> Applied | None:
        """Record a permanently failed image; the task fails with that reason (same transaction)."""
        async def settle(task: Task | Archive) -> Transition | None:
            return on_failure(task, code, message)
        return await self._settle_image(image_id, q.IMAGE_FAILED, (f"{code}: {message}", image_id), settle, now)

    async def _settle_image(self, image_id: str, sql: str, args: Sequence[Any],
                            decide: Callable[[Task | Archive], Awaitable[Transition | None]],
                            now: float, owner_id: str | None = None) -> Applied | None:
        """The image's owner decides: a task (below), or an archive (relay.store.archives; None is returned).
        `sql` settles the image only while it is pending; `owner_id`: its owner, if the caller knows it."""
        settled: list[Archive] = []

        async def body(tx: Tx) -> Applied | None:
            settled.clear()
            owner = owner_id
            if owner is None:
                image = await tx.one(q.LOAD_IMAGE, (image_id,))
                if image is None or image["status"] != "pending":
                    return None
                owner = str(image["task_id"])
            if is_archive_id(owner):
                archive = await self._settle_archive_image(tx, owner, sql, args, decide, now)
                settled.extend([archive] if archive is not None else [])
                return None
            # The task is read, with its images, once this one is settled.
            if not await tx.lock(q.LOCK_TASK_ROW, owner) or not await tx.run(sql, args):   # settled meanwhile
                return None
            task, stamp = await self._locked_task(tx, owner)
            transition = await decide(task)
            if transition is None:
                return None
            return await self._transition(tx, task, stamp, transition, now, 0.0)
        applied = await self.transact_shared(body)
        self._wake()
        self._applied(applied)
        for archive in settled:
            self._archive_told(archive.id, archive.status)
        return applied

    # ---- events ----------------------------------------------------------------------------------
    # Only events every reader can already see in full (PostgreSQL: see its backend's override).
    _visible_events = ""

    async def list_events(self, *, after: str | None, type: str | None, task_id: str | None,
                          limit: int) -> list[Event]:
        """The ordered event log, oldest first after the cursor event id (an unknown id: nothing after it)."""
        filters, args = [], []
        if after:
            filters.append("seq > (SELECT seq FROM events WHERE id = ?)")
            args.append(after)
        if type in ALL_EVENT_TYPES:
            # Written into the statement (one of a fixed few), so each type is its own prepared statement, planned
            # for its value: a rare one through events_by_type. As a parameter, PostgreSQL's generic plan (which
            # asyncpg's statements take after five runs) guessed every type common and walked the whole log in
            # seq order: 57-96 ms at 770,000 events for a type it never found.
            filters.append(f"type = '{type}'")
        elif type:
            filters.append("type = ?")
            args.append(type)
        if task_id:
            filters.append("task_id = ?")
            args.append(task_id)
        if self._visible_events:
            filters.append(self._visible_events)
        # A task's events through the task's (SQLite walked every event of the type for one task's: 0.14-0.19 s
        # at 800,000 events).
        table = "events" + (q.indexed_by("events_by_task") if task_id else "")
        rows = await self._read_all(q.filtered(table, filters, order="seq"), (*args, limit))
        return [Event(id=r["id"], type=r["type"], task_id=r["task_id"], sequence=r["sequence"],
                      created_at=r["created_at"], data=loads(r["data"])) for r in rows]

    async def event_exists(self, event_id: str) -> bool:
        """Whether the event log holds this id (tells an unknown cursor from the end of the log)."""
        return await self._read(q.EVENT_EXISTS, (event_id,)) is not None

    # ---- shared request rates --------------------------------------------------------------------
    async def take_token(self, key: str, rate: float, burst: float, now: float) -> float:
        """Take one request's token from the bucket `key` (refilled at `rate` per second up to `burst`):
        0.0 when taken, else the seconds until one is due (nothing taken)."""
        taken, wait = await self.take_tokens(key, rate, burst, now, 1)
        return 0.0 if taken else wait

    async def take_tokens(self, key: str, rate: float, burst: float, now: float, wanted: int) -> tuple[int, float]:
        """Take up to `wanted` tokens from the bucket `key`, as many as it holds: (how many were taken, and when
        none were, the seconds until one is due). Every process sharing this database draws from one bucket.

        The row changes only from the state the take was worked out from (a compare-and-set: one statement, one
        round trip on PostgreSQL instead of four for BEGIN, a locking read, the write and COMMIT), starting from
        the state this process last left it in: one round trip while no other process takes from the bucket.
        When another did meanwhile, the swap misses, the row is read and the take worked out again (three round
        trips); after BUCKET_SWAP_TRIES misses, the first included, or for a bucket not made yet, the row is
        locked instead (a transaction). A swap that PostgreSQL runs again after losing its connection finds the
        row changed and takes again: tokens may be wasted that way, never spent twice."""
        seen = self._bucket_states().get(key)
        for _ in range(BUCKET_SWAP_TRIES):
            if seen is None:
                row = await self._read(q.READ_BUCKET, (key,))
                if row is None:     # the bucket's first use: made below, under the row's lock
                    break
                seen = (row["tokens"], row["updated_at"])
            taken, wait, after = take_from_bucket(seen, rate, burst, now, wanted)
            if await self._change(q.SWAP_BUCKET, (*after, key, *seen)):
                self._remember_bucket(key, after)
                return taken, wait
            seen = None

        async def body(tx: Tx) -> tuple[int, float, tuple[float, float]]:
            row = await tx.one(q.LOCK_BUCKET, (key,))
            if row is None:      # the bucket's first use: it starts full
                await tx.run(q.CLAIM_BUCKET, (key, float(burst), float(now)))
                row = await tx.one(q.LOCK_BUCKET, (key,))
                assert row is not None
            taken, wait, after = take_from_bucket((row["tokens"], row["updated_at"]), rate, burst, now, wanted)
            await tx.run(q.UPDATE_BUCKET, (*after, key))
            return taken, wait, after
        taken, wait, after = await self.transact(body)
        self._remember_bucket(key, after)
        return taken, wait

    def _remember_bucket(self, key: str, state: tuple[float, float]) -> None:
        """Keep the bucket's state as this process left it, the most recently used BUCKETS_REMEMBERED of them: a
        forgotten one costs its next take a read, never a wrong take."""
        states = self._bucket_states()
        states[key] = state
        states.move_to_end(key)
        while len(states) > BUCKETS_REMEMBERED:
            states.popitem(last=False)      # the one used longest ago

    def _bucket_states(self) -> OrderedDict[str, tuple[float, float]]:
        """(tokens, updated_at) of rate buckets as this process last left them, least recently used first (see
        take_tokens)."""
        states: OrderedDict[str, tuple[float, float]] | None = getattr(self, "_buckets_left", None)
        if states is None:
            states = OrderedDict()
            self._buckets_left: OrderedDict[str, tuple[float, float]] = states
        return states

    # ---- jobs ------------------------------------------------------------------------------------
    async def enqueue(self, jobs: Sequence[Job]) -> int:
        """Insert jobs; a job whose dedupe_key is live already is skipped. Returns how many were added."""
        if not jobs:
            return 0

        async def body(tx: Tx) -> int:
            return await insert_jobs(tx, list(jobs))
        added = await self.transact(body)
        self._wake()
        return added

    @abc.abstractmethod
    async def claim(self, now: float, *, limit: int, lease_seconds: float,
                    kinds: Sequence[str] | None = None) -> list[Job]:
        """Lease up to `limit` due jobs (oldest run_at first), counting an attempt for each.

        A job leased here is leased nowhere else until its lease runs out: its lease_until, which the claim sets
        (and extend_lease moves); run_at stays what it was (queries.NOT_LEASED).
        """

    async def extend_lease(self, job: Job, until: float) -> bool:
        """Heartbeat: keep holding a running job until `until`. False if the lease was lost."""
        async def body(tx: Tx) -> bool:
            return await tx.run(q.EXTEND_LEASE, (until, job.id, job.lease_token)) == 1
        return await self.transact(body)

    async def finish_job(self, job: Job) -> None:
        """The job is done: remove it (only if this lease still holds it)."""
        await self._write(q.FINISH_JOB, (job.id, job.lease_token))

    async def finish_jobs(self, jobs: list[Job]) -> None:
        """finish_job for several jobs at once (a group run: relay.queue.GroupHandler)."""
        await self._write_many(q.FINISH_JOB, [(job.id, job.lease_token) for job in jobs])

    async def retry_job(self, job: Job, run_at: float, error: str | None, *,
                        payload: dict[str, Any] | None = None, reset_attempts: bool = False) -> None:
        """Run the job again at `run_at` (a retry after an error, or a planned next poll)."""
        await self._write(q.RETRY_JOB, (float(run_at), error, dumps(payload), int(reset_attempts), job.id,
                                        job.lease_token))
        self._wake()

    async def bury_job(self, job: Job, error: str, now: float) -> None:
        """The job failed for good: keep it as `dead` for inspection (its run_at now the time it died), free its
        dedupe key."""
        async def body(tx: Tx) -> None:
            await tx.run(q.BURY_JOB, (error, now, job.id, job.lease_token))
        await self.transact(body)

    async def job_counts(self) -> dict[str, int]:
        """Jobs by kind and state, e.g. {"poll:queued": 3, "archive:dead": 1}."""
        return {f"{r['kind']}:{r['state']}": int(r["n"]) for r in await self._read_whole(q.JOB_COUNTS)}

    async def next_run_at(self, now: float, kinds: Sequence[str] | None = None) -> float | None:
        """When the earliest queued job no worker holds is due, or a held one's lease runs out (the worker's
        sleep); of these kinds, if given (queries.next_run_at_sql)."""
        picked = list(kinds or ())
        row = await self._read(q.next_run_at_sql(len(picked)), (float(now), *picked, float(now), float(now), *picked))
        return None if row is None or row["due"] is None else float(row["due"])

    async def task_counts(self) -> dict[tuple[str, str], int]:
        """Tasks by (provider, status), for the /metrics gauge."""
        return {(r["provider"], r["status"]): int(r["n"]) for r in await self._read_whole(q.TASK_COUNTS)}

    async def oldest_due_jobs(self, now: float) -> dict[str, float]:
        """Per job kind, the run_at of the oldest job due by `now` that no worker holds (queue lag). It reads every
        due job (92 ms with 20,000 due on SQLite, 0.4-0.5 s with a backlog of 270,000), at every /metrics scrape:
        _read_whole, as the scrape's other counts."""
        rows = await self._read_whole(q.OLDEST_DUE_JOBS, (float(now), float(now)))
        return {r["kind"]: float(r["due"]) for r in rows}

    # ---- provider request stats (relay.stats) ----------------------------------------------------
    async def add_provider_stats(self, rows: Sequence[StatsRow]) -> None:
        """Add (provider, minute, requests, errors, rate_limited, latency_buckets JSON) to each row's sums,
        in one transaction. Locks each (provider, minute) row, in sorted order, so replicas flushing the same
        minutes at once add up instead of overwriting each other (and do not deadlock)."""
        async def body(tx: Tx) -> None:
            for provider, minute, requests, errors, limited, buckets in sorted(rows):
                await tx.run(q.CLAIM_PROVIDER_STATS, (provider, int(minute)))
                row = await tx.one(q.LOCK_PROVIDER_STATS, (provider, int(minute)))
                assert row is not None
                merged = merge_buckets(parse_buckets(row["latency_buckets"]), parse_buckets(buckets))
                await tx.run(q.UPDATE_PROVIDER_STATS, (
                    int(row["requests"]) + requests, int(row["errors"]) + errors,
                    int(row["rate_limited"]) + limited, dumps(merged), provider, int(minute)))
        if rows:
            await self.transact(body)

    async def provider_stats(self, since: float) -> dict[str, ProviderStats]:
        """Per provider, the requests of every process summed over the minutes starting at or after `since`."""
        sums: dict[str, tuple[int, int, int, list[int]]] = {}
        for r in await self._read_all(q.PROVIDER_STATS_SINCE, (math.ceil(since),)):
            requests, errors, limited, buckets = sums.get(r["provider"], (0, 0, 0, []))
            sums[r["provider"]] = (requests + int(r["requests"]), errors + int(r["errors"]),
                                   limited + int(r["rate_limited"]),
                                   merge_buckets(buckets, parse_buckets(r["latency_buckets"])))
        return {name: summarize(name, *values) for name, values in sums.items()}

    @staticmethod
    def jobs_from_rows(rows: Sequence[Row]) -> list[Job]:
        return [job_from_row(row) for row in rows]
