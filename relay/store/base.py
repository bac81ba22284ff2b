"""The store's use-case interface: the only way the rest of relay touches the database.

Each method is one use case and one transaction. Backends (SQLite now,
PostgreSQL for several replicas) implement it and pass one contract suite.
No correctness may rest on a single writer or on one process's memory: job
claims are leases written in the table, and idempotency lives in rows.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from relay.deliveries.models import Attempt, Delivery, Recorded, SendTarget, Subscription
from relay.models import Event, ImageRecord, Job, Task
from relay.states import Transition

# A pure decision over the current task row (see relay.states).
Decide = Callable[[Task], Transition | None]


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


class Store(abc.ABC):
    # ---- lifecycle ------------------------------------------------------------------------------
    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and apply pending migrations."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise if the database cannot answer (readiness)."""

    def on_enqueue(self, callback: Callable[[], None]) -> None:
        """Register a wake-up called after a transaction that enqueued due jobs commits."""
        self._wakeups = [*getattr(self, "_wakeups", []), callback]

    def _wake(self) -> None:
        for callback in getattr(self, "_wakeups", []):
            callback()

    # ---- tasks -----------------------------------------------------------------------------------
    @abc.abstractmethod
    async def create_task(self, task: Task, jobs: Sequence[Job], *,
                          idempotency: tuple[str, str, str] | None = None) -> tuple[Task, bool]:
        """Insert the task with its first jobs. `idempotency` = (scope, key, body_hash).

        Returns (task, created). A known key with the same body returns the original task and
        False; with another body raises Conflict. Keys older than 24 h are forgotten.
        """

    @abc.abstractmethod
    async def get_task(self, task_id: str) -> Task | None: ...

    @abc.abstractmethod
    async def list_tasks(self, *, status: str | None, provider: str | None, limit: int,
                         cursor: str | None) -> tuple[list[Task], str | None]:
        """Newest first; the cursor is the last id of the previous page."""

    @abc.abstractmethod
    async def apply(self, task_id: str, decide: Decide, now: float, *,
                    default_expiry: float = 86400.0, jobs: Sequence[Job] = ()) -> Applied | None:
        """One transaction: read the task, decide, write the change, its event, its archive jobs and `jobs`.

        None (and nothing written) when the task is unknown or `decide` says the signal is stale.
        """

    @abc.abstractmethod
    async def mark_submit_started(self, task_id: str, now: float) -> Task | None:
        """Record that a submit request is about to be sent (so a crash after it is never resent blindly)."""

    @abc.abstractmethod
    async def clear_submit_started(self, task_id: str) -> None:
        """The provider certainly did not accept the submit (refused, 429, 5xx): a resend is safe."""

    @abc.abstractmethod
    async def reserve_submit(self, task_id: str, provider: str, max_in_flight: int, now: float) -> bool:
        """Atomically: if `provider` has fewer than `max_in_flight` tasks in flight (being submitted, queued
        or running there), mark this task's submit as started (as `mark_submit_started`) and return True;
        otherwise change nothing and return False."""

    # ---- provider callbacks (the inbox) ----------------------------------------------------------
    @abc.abstractmethod
    async def receive_callback(self, inbox_id: str, provider: str, task_id: str, body: str, now: float,
                               job: Job) -> None:
        """Durably record a raw callback with the job that will process it (one transaction)."""

    @abc.abstractmethod
    async def get_callback(self, inbox_id: str) -> dict[str, Any] | None:
        """The inbox row: id, provider, task_id, body, received_at, status, note."""

    @abc.abstractmethod
    async def settle_callback(self, inbox_id: str, status: str, note: str | None, now: float) -> None:
        """Record what processing made of a callback: applied | ignored | rejected."""

    # ---- images ----------------------------------------------------------------------------------
    @abc.abstractmethod
    async def get_image(self, image_id: str) -> ImageRecord | None: ...

    @abc.abstractmethod
    async def get_image_source(self, image_id: str) -> tuple[ImageRecord, str | None] | None:
        """The image and its inline base64 source, if any."""

    @abc.abstractmethod
    async def image_archived(self, image_id: str, result: ArchiveResult, now: float) -> Applied | None:
        """Record the saved image; if it was the task's last, the task succeeds (same transaction)."""

    @abc.abstractmethod
    async def image_failed(self, image_id: str, code: str, message: str, now: float) -> Applied | None:
        """Record a permanently failed image; the task fails with that reason (same transaction)."""

    # ---- events ----------------------------------------------------------------------------------
    @abc.abstractmethod
    async def list_events(self, *, after: str | None, type: str | None, task_id: str | None,
                          limit: int) -> list[Event]:
        """The ordered event log, oldest first after the cursor event id (an unknown id: nothing after it)."""

    @abc.abstractmethod
    async def event_exists(self, event_id: str) -> bool:
        """Whether the event log holds this id (tells an unknown cursor from the end of the log)."""

    # ---- subscriptions and deliveries (relay.deliveries) -----------------------------------------
    # New events fan out to deliveries inside `apply`'s transaction (SQLite: `_fan_out`).
    @abc.abstractmethod
    def set_delivery_options(self, *, initial_delay: float) -> None:
        """The delay of a new delivery's first attempt."""

    @abc.abstractmethod
    async def create_subscription(self, sub: Subscription) -> Subscription: ...

    @abc.abstractmethod
    async def get_subscription(self, subscription_id: str) -> Subscription | None: ...

    @abc.abstractmethod
    async def list_subscriptions(self, *, limit: int, cursor: str | None) -> tuple[list[Subscription], str | None]:
        """Newest first; the cursor is the last id of the previous page."""

    @abc.abstractmethod
    async def update_subscription(self, subscription_id: str, change: Callable[[Subscription], Subscription],
                                  now: float) -> Subscription | None:
        """One transaction: read, `change`, write. Disabling cancels its pending deliveries. None if unknown."""

    @abc.abstractmethod
    async def delete_subscription(self, subscription_id: str, now: float) -> bool:
        """Remove it and cancel its pending deliveries (their history stays). False if unknown."""

    @abc.abstractmethod
    async def get_delivery(self, delivery_id: str) -> Delivery | None: ...

    @abc.abstractmethod
    async def list_deliveries(self, *, subscription_id: str | None, status: str | None, task_id: str | None,
                              event_id: str | None, limit: int,
                              cursor: str | None) -> tuple[list[Delivery], str | None]:
        """Newest first; the cursor is the last id of the previous page."""

    @abc.abstractmethod
    async def list_attempts(self, delivery_id: str, *, limit: int = 100) -> list[Attempt]:
        """A delivery's latest attempts, newest first."""

    @abc.abstractmethod
    async def delivery_counts(self) -> dict[str, int]:
        """Deliveries by status."""

    @abc.abstractmethod
    async def load_send_target(self, delivery_id: str) -> SendTarget | None:
        """A delivery with its event and subscription, for the deliver job."""

    @abc.abstractmethod
    async def record_attempt(self, attempt: Attempt, *, outcome: str, next_attempt_at: float | None,
                             auto_disable_after: float, now: float) -> Recorded | None:
        """One transaction: the attempt, the delivery's next state, the subscription's failure clock (and disabling).

        None (the attempt still kept) when the delivery already moved past this attempt.
        """

    @abc.abstractmethod
    async def settle_delivery(self, delivery_id: str, status: str, reason: str, now: float) -> None:
        """End a pending delivery without an attempt (canceled or failed)."""

    @abc.abstractmethod
    async def retry_delivery(self, delivery_id: str, now: float) -> Delivery | None:
        """Attempt now: bring a pending delivery forward, or start a new round for a settled one."""

    @abc.abstractmethod
    async def replay_deliveries(self, subscription_id: str, *, since: float, until: float,
                                statuses: Sequence[str], now: float) -> tuple[int, bool]:
        """New rounds for the subscription's deliveries in [since, until) with these statuses. (count, more left)"""

    @abc.abstractmethod
    async def wake_delivery(self, delivery_id: str, now: float) -> bool:
        """Make a waiting delivery job due now (a parked delivery whose subscriber has a free lane)."""

    @abc.abstractmethod
    async def requeue_orphaned_deliveries(self, now: float) -> int:
        """Give a job to every pending delivery without one. Returns how many."""

    # ---- jobs ------------------------------------------------------------------------------------
    @abc.abstractmethod
    async def enqueue(self, jobs: Sequence[Job]) -> int:
        """Insert jobs; a job whose dedupe_key is live already is skipped. Returns how many were added."""

    @abc.abstractmethod
    async def claim(self, now: float, *, limit: int, lease_seconds: float,
                    kinds: Sequence[str] | None = None) -> list[Job]:
        """Lease up to `limit` due jobs (oldest run_at first), counting an attempt for each."""

    @abc.abstractmethod
    async def extend_lease(self, job: Job, until: float) -> bool:
        """Heartbeat: keep holding a running job until `until`. False if the lease was lost."""

    @abc.abstractmethod
    async def finish_job(self, job: Job) -> None:
        """The job is done: remove it (only if this lease still holds it)."""

    @abc.abstractmethod
    async def retry_job(self, job: Job, run_at: float, error: str | None, *,
                        payload: dict[str, Any] | None = None, reset_attempts: bool = False) -> None:
        """Run the job again at `run_at` (a retry after an error, or a planned next poll)."""

    @abc.abstractmethod
    async def bury_job(self, job: Job, error: str) -> None:
        """The job failed for good: keep it as `dead` for inspection, free its dedupe key."""

    @abc.abstractmethod
    async def job_counts(self) -> dict[str, int]:
        """Jobs by kind and state, e.g. {"poll:queued": 3, "archive:dead": 1}."""

    @abc.abstractmethod
    async def next_run_at(self) -> float | None:
        """When the earliest queued job is due (for the worker's sleep)."""
