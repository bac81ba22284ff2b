"""What the operator's console and /v1/jobs read from the store, and the one thing they change: a dead job retried.

Backend-neutral like relay.store.base (which mixes this in); the SQL is the "console" section of
relay.store.queries. Reads run outside any write transaction and see committed data only. Percentiles are
nearest-rank, read one rank at a time with ORDER BY … OFFSET, so both backends compute the same numbers
without SQLite needing percentile_cont and without pulling a day of latencies into Python.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from relay.deliveries.models import Attempt, Delivery
from relay.errors import Conflict
from relay.models import Event, Task
from relay.store import queries as q
from relay.store.plumbing import StorePlumbing
from relay.store.rows import attempt_from_row, delivery_from_row, loads, task_from_row
from relay.store.tx import Row, Tx

JOB_STATES = q.JOB_STATES
TIMELINE_LIMIT = 500          # events and deliveries shown for one task
# How far ahead of now a held job's run_at may lie and still count as running on the Queue page (queries.
# QUEUE_BY_KIND): a replica whose clock runs ahead of this one, or a lease carried over by migration 021 (run_at =
# the lease's end, at most the worker's lease_seconds, 60 by default). Past it such a job shows as queued only.
HELD_AHEAD_SECONDS = 600.0


@dataclass(frozen=True)
class JobInfo:
    """A job row as /v1/jobs and the Queue page show it."""

    id: str
    kind: str
    task_id: str | None
    state: str
    payload: dict[str, Any]
    run_at: float
    attempts: int
    max_attempts: int
    last_error: str | None
    created_at: float
    leased: bool                    # a worker claimed it and has not ended it (retried, buried, finished)
    lease_until: float | None = None     # when that claim's lease runs out (the job is due again after)


@dataclass(frozen=True)
class KindStats:
    """The queue of one job kind: depth, what is due and running, how late the oldest due job is."""

    kind: str
    queued: int = 0
    due: int = 0
    running: int = 0
    dead: int = 0
    oldest_due_at: float | None = None


@dataclass(frozen=True)
class DeliveryHealth:
    """A subscription's attempts over a window: how many, how many 2xx, latency p50/p99 (ms)."""

    attempts: int = 0
    succeeded: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None

    @property
    def success_rate(self) -> float | None:
        return None if not self.attempts else self.succeeded / self.attempts


@dataclass(frozen=True)
class TaskTimeline:
    """A task's events in order, each with its deliveries, each delivery with every attempt (oldest first)."""

    events: list[Event]
    deliveries: dict[str, list[Delivery]] = field(default_factory=dict)      # by event id
    attempts: dict[str, list[Attempt]] = field(default_factory=dict)         # by delivery id
    older_deliveries: bool = False      # the task has more than TIMELINE_LIMIT: only the newest are here


def job_info(row: Row) -> JobInfo:
    payload = loads(row["payload"]) or {}
    if isinstance(payload.get("body"), str):
        # A callback job's raw provider body may carry signed result links: its size is shown, not its text.
        payload["body"] = f"({len(payload['body'])} characters, not shown)"
    return JobInfo(id=row["id"], kind=row["kind"], task_id=row["task_id"], state=row["state"],
                   payload=payload, run_at=row["run_at"], attempts=row["attempts"],
                   max_attempts=row["max_attempts"], last_error=row["last_error"], created_at=row["created_at"],
                   leased=row["lease_token"] is not None, lease_until=row["lease_until"])


def _like(text: str) -> str:
    """`%text%` for LIKE … ESCAPE '\\', with the text's own wildcards taken literally."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


class ConsoleCases(StorePlumbing):
    """Mixed into Store, whose plumbing (transact, _read, _read_all, _wake) it uses."""

    # ---- tasks ------------------------------------------------------------------------------------
    async def search_tasks(self, *, status: str | None, provider: str | None, search: str | None, limit: int,
                           cursor: str | None) -> tuple[list[Task], str | None]:
        """Newest first, with their images; `search` matches the task id, the provider task id, or any text in
        the metadata. The cursor is the last id of the previous page."""
        filters, args = [], []
        for column, value in (("status", status), ("provider", provider)):
            if value:
                filters.append(f"{column} = ?")
                args.append(value)
        if search:
            filters.append(q.TASK_SEARCH)
            args += [search, search, _like(search.lower())]
        # A search reads every task's metadata (95-111 ms at 200,000 tasks on SQLite, again at each 1.5 s refresh
        # of the page): read as _read_whole reads, apart from the API's reads.
        return await self._page_with_images("tasks", filters, args, cursor=cursor, limit=limit, build=task_from_row,
                                            scan=bool(search))

    async def task_timeline(self, task_id: str) -> TaskTimeline:
        """The task's events (oldest first), their deliveries and every attempt of each. Of a task with more than
        TIMELINE_LIMIT deliveries (a hundred subscriptions, six events) or events, the newest: those of its last
        events, which say whether its outcome reached everyone."""
        rows = await self._read_all(q.EVENTS_OF_TASK, (task_id, TIMELINE_LIMIT))
        events = [Event(id=r["id"], type=r["type"], task_id=r["task_id"], sequence=r["sequence"],
                        created_at=r["created_at"], data=None) for r in reversed(rows)]
        newest = await self._read_all(q.DELIVERIES_OF_TASK, (task_id, TIMELINE_LIMIT + 1))
        timeline = TaskTimeline(events=events, older_deliveries=len(newest) > TIMELINE_LIMIT)
        shown = []
        for row in reversed(newest[:TIMELINE_LIMIT]):
            delivery = delivery_from_row(row)
            timeline.deliveries.setdefault(delivery.event_id, []).append(delivery)
            shown.append(delivery.id)
        if shown:
            for row in await self._read_all(*q.attempts_of_deliveries(shown)):
                attempt = attempt_from_row(row)
                timeline.attempts.setdefault(attempt.delivery_id, []).append(attempt)
        return timeline

    # ---- subscriptions ----------------------------------------------------------------------------
    async def delivery_health(self, since: float,
                              subscription_ids: Sequence[str] | None = None) -> dict[str, DeliveryHealth]:
        """Per subscription with attempts at or after `since` (of `subscription_ids`, if given): counts and latency
        p50/p99. The Subscriptions page asks for the page's subscriptions only: each one's percentiles are two more
        statements, and with every subscription that was 40,000 statements a view at 10,000 subscriptions."""
        out: dict[str, DeliveryHealth] = {}
        wanted = None if subscription_ids is None else set(subscription_ids)
        # The window's attempts (every subscription's), counted and ranked each refresh of the Subscriptions page:
        # read as _read_whole reads, apart from the API's reads.
        for row in await self._read_whole(q.SUBSCRIPTION_ATTEMPT_COUNTS, (since,)):
            sub_id, n = row["subscription_id"], int(row["n"])
            if wanted is not None and sub_id not in wanted:
                continue
            p50 = await self._latency_rank(sub_id, since, n, 0.50)
            p99 = await self._latency_rank(sub_id, since, n, 0.99)
            out[sub_id] = DeliveryHealth(attempts=n, succeeded=int(row["ok"] or 0), p50_ms=p50, p99_ms=p99)
        return out

    async def _latency_rank(self, sub_id: str, since: float, n: int, p: float) -> float | None:
        rank = max(0, math.ceil(p * n) - 1)
        rows = await self._read_whole(q.SUBSCRIPTION_LATENCY_AT, (sub_id, since, rank))
        return float(rows[0]["latency_ms"]) if rows else None

    async def last_delivery_error(self, subscription_id: str, since: float) -> tuple[float, str] | None:
        """(when, error) of the subscription's latest failed attempt at or after `since`."""
        row = await self._read(q.SUBSCRIPTION_LAST_ERROR, (subscription_id, since))
        return None if row is None else (float(row["at"]), str(row["error"]))

    # ---- providers --------------------------------------------------------------------------------
    async def in_flight_by_provider(self) -> dict[str, int]:
        """Tasks being submitted, queued or running at each provider (what max_in_flight caps). A count of every
        live task (36-48 ms with 90,000 on SQLite, at each refresh of the Providers page): read as _read_whole
        reads."""
        return {r["provider"]: int(r["n"]) for r in await self._read_whole(q.IN_FLIGHT_BY_PROVIDER)}

    async def callbacks_by_provider(self, since: float) -> dict[str, dict[str, int]]:
        """Callbacks received at or after `since`, per provider and inbox status (applied | ignored | rejected;
        received, for one recorded by an earlier relay and not processed yet). A callback enters the inbox when
        its job has processed it, normally milliseconds after its 200."""
        out: dict[str, dict[str, int]] = {}
        # Every callback of the window (59 ms for 150,000 a day on SQLite): read as _read_whole reads.
        for row in await self._read_whole(q.CALLBACKS_BY_PROVIDER, (since,)):
            out.setdefault(row["provider"], {})[row["status"]] = int(row["n"])
        return out

    # ---- jobs -------------------------------------------------------------------------------------
    async def queue_by_kind(self, now: float) -> list[KindStats]:
        """Per job kind: queued (depth), due now, running (leased), dead, and the oldest due job's run_at."""
        kinds: dict[str, dict[str, Any]] = {}
        # A count of every job (250 ms at a million on SQLite; the Queue page asks every 3 s): _read_whole.
        for row in await self._read_whole(q.QUEUE_BY_KIND, (now, now, now, now, now, now + HELD_AHEAD_SECONDS)):
            entry = kinds.setdefault(row["kind"], {"kind": row["kind"]})
            if row["state"] == "dead":
                entry["dead"] = int(row["n"])
            else:
                entry.update(queued=int(row["n"]), due=int(row["due"] or 0), running=int(row["running"] or 0),
                             oldest_due_at=None if row["oldest_due"] is None else float(row["oldest_due"]))
        return [KindStats(**kinds[kind]) for kind in sorted(kinds)]

    async def list_jobs(self, *, state: str, kind: str | None, limit: int,
                        cursor: str | None) -> tuple[list[JobInfo], str | None]:
        """Jobs in `state` (queued | dead), newest first; the cursor is the last id of the previous page."""
        table, filters = q.jobs_listing(state, bool(kind))
        return await self._page(table, filters, [kind] if kind else [], cursor=cursor, limit=limit, build=job_info)

    async def get_job(self, job_id: str) -> JobInfo | None:
        row = await self._read(q.LOAD_JOB, (job_id,))
        return None if row is None else job_info(row)

    async def retry_dead_job(self, job_id: str, now: float) -> JobInfo | None:
        """One transaction: a dead job is queued again, due now, with its attempts reset and its dedupe key back.

        When a live job already holds that key (the same work was queued again since, also while this ran: the
        key taken meanwhile runs it again), the dead one is deleted instead and the live one returned: never two
        live jobs for one key. None if unknown; Conflict if the job is not dead. Locks the job's row.
        """
        async def body(tx: Tx) -> JobInfo | None:
            row = await tx.one(q.LOCK_JOB, (job_id,))
            if row is None:
                return None
            if row["state"] != "dead":
                raise Conflict(f"job {job_id} is {row['state']}, not dead: only a dead job can be retried")
            key = row["dead_key"]
            live = None if key is None else await tx.one(q.LIVE_JOB_WITH_KEY, (key,))
            if live is not None:
                await tx.run(q.DELETE_DEAD_JOB, (job_id,))
                found = await tx.one(q.LOAD_JOB, (live["id"],))
            else:
                await tx.run(q.REQUEUE_DEAD_JOB, (key, now, job_id))
                found = await tx.one(q.LOAD_JOB, (job_id,))
            return None if found is None else job_info(found)
        job = await self.transact(body, again_if_key_taken=True)
        self._wake()
        return job
