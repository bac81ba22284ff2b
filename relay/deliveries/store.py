"""The SQLite side of delivery, mixed into SQLiteStore: fan-out, subscriptions, deliveries, attempts.

`_fan_out_deliveries` runs inside the transaction that writes an event (the
outbox): one delivery row and one `deliver` job per enabled subscription whose
filter takes the event, and one for the task's own `webhook_url`. Either all of
it commits with the event or none of it does.

Everything else here is one use case, one transaction. Attempts are recorded
optimistically: an attempt whose delivery moved on meanwhile (a second run of
the same job after a lease ran out, a manual retry) is kept in the history but
changes nothing.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import aiosqlite

from relay import ids
from relay.deliveries.models import (DISABLED_FAILING, DISABLED_GONE, DISABLED_MANUAL, Attempt, Delivery, Recorded,
                                     SendTarget, Subscription, matches)
from relay.models import Event, Job, Task

TASK_TARGET = "task"
REPLAY_MAX = 10_000


_T = TypeVar("_T")
_INSERT_ATTEMPT = ("INSERT INTO delivery_attempts (delivery_id, number, at, url, origin, status_code, latency_ms, "
                   "response, error) VALUES (?,?,?,?,?,?,?,?,?)")


def deliver_job(delivery_id: str, run_at: float, now: float) -> Job:
    """The wake-up job of a delivery: one live job per delivery."""
    return Job(id=ids.new_id("job", now), kind="deliver", payload={"delivery_id": delivery_id}, run_at=run_at,
               dedupe_key=f"deliver:{delivery_id}", max_attempts=10)


class SQLiteDeliveries:
    """Mixin for SQLiteStore (uses its `_tx`, `_tx_in_thread`, `_r`, `_insert_jobs`, `_wake`)."""

    delivery_initial_delay: float = 0.0

    if TYPE_CHECKING:
        @property
        def _r(self) -> aiosqlite.Connection: ...

        def _tx(self) -> contextlib.AbstractAsyncContextManager[aiosqlite.Connection]: ...

        async def _tx_in_thread(self, work: Callable[[sqlite3.Connection], _T]) -> _T: ...

        async def _insert_jobs(self, db: aiosqlite.Connection, jobs: Sequence[Job]) -> int: ...

        def _wake(self) -> None: ...

    def set_delivery_options(self, *, initial_delay: float) -> None:
        """The delay of a new delivery's first attempt (the schedule's first entry)."""
        self.delivery_initial_delay = initial_delay

    # ---- fan-out (inside the event's transaction) -------------------------------------------------
    async def _fan_out_deliveries(self, db: aiosqlite.Connection, event: Event, task: Task, now: float) -> None:
        targets: list[tuple[str, str | None, str]] = []   # (target, subscription id, url)
        rows = await (await db.execute("SELECT id, url, events FROM subscriptions WHERE enabled = 1")).fetchall()
        for row in rows:
            if matches(json.loads(row["events"]), event.type):
                targets.append((row["id"], row["id"], row["url"]))
        if task.webhook_url and matches(task.webhook_events, event.type):
            targets.append((TASK_TARGET, None, task.webhook_url))
        if not targets:
            return
        run_at = now + self.delivery_initial_delay
        jobs, values = [], []
        for target, subscription_id, url in targets:
            delivery_id = ids.new_id("dlv", now)
            values.append((delivery_id, event.id, event.type, task.id, subscription_id, target, url, run_at, now, now))
            jobs.append(deliver_job(delivery_id, run_at, now))
        await db.executemany(
            "INSERT INTO deliveries (id, event_id, event_type, task_id, subscription_id, target, url, status, "
            "next_attempt_at, created_at, updated_at) VALUES (?,?,?,?,?,?,?,'pending',?,?,?) "
            "ON CONFLICT (event_id, target) DO NOTHING", values)
        await self._insert_jobs(db, jobs)

    # ---- subscriptions ----------------------------------------------------------------------------
    async def create_subscription(self, sub: Subscription) -> Subscription:
        async with self._tx() as db:
            await db.execute(
                "INSERT INTO subscriptions (id, url, events, description, enabled, disabled_reason, signing, keyring, "
                "public_key, previous_public_key, previous_expires_at, failing_since, created_at, updated_at) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (sub.id, sub.url, json.dumps(sub.events), sub.description, int(sub.enabled), sub.disabled_reason,
                 sub.signing, sub.keyring, sub.public_key, sub.previous_public_key, sub.previous_expires_at,
                 sub.failing_since, sub.created_at, sub.updated_at))
        return sub

    async def get_subscription(self, subscription_id: str) -> Subscription | None:
        return await self._load_subscription(self._r, subscription_id)

    async def list_subscriptions(self, *, limit: int, cursor: str | None) -> tuple[list[Subscription], str | None]:
        """Newest first; the cursor is the last id of the previous page."""
        sql, args = "SELECT * FROM subscriptions", []
        if cursor:
            sql += " WHERE id < ?"
            args.append(cursor)
        rows = await (await self._r.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit + 1))).fetchall()
        subs = [_subscription_from_row(r) for r in rows[:limit]]
        return subs, (subs[-1].id if len(rows) > limit else None)

    async def update_subscription(self, subscription_id: str, change: Callable[[Subscription], Subscription],
                                  now: float) -> Subscription | None:
        """Read, change (a pure function of the row), write.

        Disabling cancels the pending deliveries; enabling forgets the failures.
        """
        async with self._tx() as db:
            before = await self._load_subscription(db, subscription_id)
            if before is None:
                return None
            after = change(before)
            if after.enabled and not before.enabled:
                after.disabled_reason, after.failing_since = None, None
            elif before.enabled and not after.enabled:
                after.disabled_reason = after.disabled_reason or DISABLED_MANUAL
                await self._cancel_pending(db, subscription_id, "the subscription was disabled", now)
            after.updated_at = now
            await db.execute(
                "UPDATE subscriptions SET url = ?, events = ?, description = ?, enabled = ?, disabled_reason = ?, "
                "keyring = ?, public_key = ?, previous_public_key = ?, previous_expires_at = ?, failing_since = ?, "
                "updated_at = ? WHERE id = ?",
                (after.url, json.dumps(after.events), after.description, int(after.enabled), after.disabled_reason,
                 after.keyring, after.public_key, after.previous_public_key, after.previous_expires_at,
                 after.failing_since, now, subscription_id))
            return after

    async def delete_subscription(self, subscription_id: str, now: float) -> bool:
        """Remove it; its pending deliveries are canceled, its history stays."""
        async with self._tx() as db:
            cursor = await db.execute("DELETE FROM subscriptions WHERE id = ?", (subscription_id,))
            if cursor.rowcount == 0:
                return False
            await self._cancel_pending(db, subscription_id, "the subscription was deleted", now)
            return True

    async def _cancel_pending(self, db: aiosqlite.Connection, subscription_id: str, reason: str, now: float) -> None:
        # Their jobs find the delivery settled and finish without sending.
        await db.execute(
            "UPDATE deliveries SET status = 'canceled', last_error = ?, next_attempt_at = NULL, completed_at = ?, "
            "updated_at = ? WHERE subscription_id = ? AND status = 'pending'", (reason, now, now, subscription_id))

    # ---- deliveries -------------------------------------------------------------------------------
    async def get_delivery(self, delivery_id: str) -> Delivery | None:
        row = await (await self._r.execute("SELECT * FROM deliveries WHERE id = ?", (delivery_id,))).fetchone()
        return None if row is None else _delivery_from_row(row)

    async def list_deliveries(self, *, subscription_id: str | None, status: str | None, task_id: str | None,
                              event_id: str | None, limit: int,
                              cursor: str | None) -> tuple[list[Delivery], str | None]:
        """Newest first; the cursor is the last id of the previous page."""
        where, args = [], []
        for column, value in (("subscription_id", subscription_id), ("status", status), ("task_id", task_id),
                              ("event_id", event_id)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if cursor:
            where.append("id < ?")
            args.append(cursor)
        sql = "SELECT * FROM deliveries" + (" WHERE " + " AND ".join(where) if where else "")
        rows = await (await self._r.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit + 1))).fetchall()
        found = [_delivery_from_row(r) for r in rows[:limit]]
        return found, (found[-1].id if len(rows) > limit else None)

    async def list_attempts(self, delivery_id: str, *, limit: int = 100) -> list[Attempt]:
        """The latest attempts of a delivery, newest first."""
        rows = await (await self._r.execute(
            "SELECT * FROM delivery_attempts WHERE delivery_id = ? ORDER BY id DESC LIMIT ?",
            (delivery_id, limit))).fetchall()
        return [_attempt_from_row(r) for r in rows]

    async def delivery_counts(self) -> dict[str, int]:
        rows = await (await self._r.execute("SELECT status, COUNT(*) AS n FROM deliveries GROUP BY status")).fetchall()
        return {r["status"]: r["n"] for r in rows}

    async def load_send_target(self, delivery_id: str) -> SendTarget | None:
        """The delivery with its event and subscription (None if the delivery or its event is unknown)."""
        row = await (await self._r.execute(
            "SELECT d.*, e.data AS event_data, e.created_at AS event_created_at, s.id AS sub_id, s.url AS sub_url, "
            "s.events AS sub_events, s.description AS sub_description, s.enabled AS sub_enabled, "
            "s.disabled_reason AS sub_disabled_reason, s.signing AS sub_signing, s.keyring AS sub_keyring, "
            "s.public_key AS sub_public_key, s.previous_public_key AS sub_previous_public_key, "
            "s.previous_expires_at AS sub_previous_expires_at, s.failing_since AS sub_failing_since, "
            "s.created_at AS sub_created_at, s.updated_at AS sub_updated_at "
            "FROM deliveries d JOIN events e ON e.id = d.event_id "
            "LEFT JOIN subscriptions s ON s.id = d.subscription_id WHERE d.id = ?", (delivery_id,))).fetchone()
        if row is None:
            return None
        sub = None
        if row["sub_id"] is not None:
            sub = _subscription_from_row({key: row[f"sub_{key}"] for key in _SUBSCRIPTION_COLUMNS})
        return SendTarget(delivery=_delivery_from_row(row), event_data=json.loads(row["event_data"]),
                          event_created_at=row["event_created_at"], subscription=sub)

    async def record_attempt(self, attempt: Attempt, *, outcome: str, next_attempt_at: float | None,
                             auto_disable_after: float, now: float) -> Recorded | None:
        """Keep the attempt; move the delivery on (and its subscription's failure clock) unless it moved already.

        `outcome` is succeeded | gone | retry | refused; a retry with no `next_attempt_at` has exhausted its
        schedule; refused (the SSRF guard would not connect) fails the delivery at once. Either counts as a
        failure of the subscription (its failure clock, auto-disable).
        None when the delivery is no longer at this attempt (a duplicate run): the attempt is still kept.
        """
        attempt_row = (attempt.delivery_id, attempt.number, attempt.at, attempt.url, attempt.origin,
                       attempt.status_code, attempt.latency_ms, attempt.response, attempt.error)
        if outcome == "succeeded":
            # The common case, as one transaction run on the writer's thread in one hop; the update checks
            # that the delivery is still at this attempt.
            def succeeded(conn: sqlite3.Connection) -> sqlite3.Row | None:
                conn.execute(_INSERT_ATTEMPT, attempt_row)
                row: sqlite3.Row | None = conn.execute(
                    "UPDATE deliveries SET status = 'succeeded', attempts = attempts + 1, "
                    "round_attempts = round_attempts + 1, next_attempt_at = NULL, last_attempt_at = ?, "
                    "last_status_code = ?, last_error = NULL, url = ?, updated_at = ?, completed_at = ? "
                    "WHERE id = ? AND status = 'pending' AND attempts = ? RETURNING *",
                    (attempt.at, attempt.status_code, attempt.url, now, now, attempt.delivery_id,
                     attempt.number - 1)).fetchone()
                if row is not None and row["subscription_id"]:
                    conn.execute("UPDATE subscriptions SET failing_since = NULL "
                                 "WHERE id = ? AND failing_since IS NOT NULL", (row["subscription_id"],))
                return row
            row = await self._tx_in_thread(succeeded)
            return None if row is None else Recorded(delivery=_delivery_from_row(row))
        async with self._tx() as db:
            await db.execute(_INSERT_ATTEMPT, attempt_row)
            row = await (await db.execute("SELECT * FROM deliveries WHERE id = ?", (attempt.delivery_id,))).fetchone()
            if row is None:
                return None
            delivery = _delivery_from_row(row)
            if delivery.status != "pending" or delivery.attempts != attempt.number - 1:
                return None
            sub_id = delivery.subscription_id
            disabled: str | None = None
            error = attempt.error
            if outcome == "gone":
                status, next_at = "failed", None
                if sub_id:
                    disabled = DISABLED_GONE
            else:
                retry = outcome == "retry" and next_attempt_at is not None
                status, next_at = ("pending", next_attempt_at) if retry else ("failed", None)
                if sub_id:
                    since = await (await db.execute(
                        "UPDATE subscriptions SET failing_since = COALESCE(failing_since, ?) WHERE id = ? "
                        "AND enabled = 1 RETURNING failing_since", (attempt.at, sub_id))).fetchone()
                    if since is not None and now - since[0] >= auto_disable_after:
                        disabled = DISABLED_FAILING
                        status, next_at = "failed", None
            if disabled is not None and sub_id is not None:
                await db.execute("UPDATE subscriptions SET enabled = 0, disabled_reason = ?, updated_at = ? "
                                 "WHERE id = ? AND enabled = 1", (disabled, now, sub_id))
                why = ("the subscriber answered 410 Gone" if disabled == DISABLED_GONE
                       else "the subscription failed continuously for too long")
                await self._cancel_pending(db, sub_id, f"{why}: subscription disabled", now)
                if outcome != "gone":
                    error = f"{error}; {why}: subscription disabled"
            await db.execute(
                "UPDATE deliveries SET status = ?, attempts = attempts + 1, round_attempts = round_attempts + 1, "
                "next_attempt_at = ?, last_attempt_at = ?, last_status_code = ?, last_error = ?, url = ?, "
                "updated_at = ?, completed_at = ? WHERE id = ?",
                (status, next_at, attempt.at, attempt.status_code, error, attempt.url, now,
                 None if status == "pending" else now, delivery.id))
            delivery.status, delivery.next_attempt_at = status, next_at
            delivery.attempts += 1
            delivery.round_attempts += 1
            delivery.last_attempt_at, delivery.last_status_code = attempt.at, attempt.status_code
            delivery.last_error = error
            return Recorded(delivery=delivery, disabled=disabled)

    async def settle_delivery(self, delivery_id: str, status: str, reason: str, now: float) -> None:
        """End a pending delivery without an attempt (canceled: nobody to send to; failed: gave up)."""
        async with self._tx() as db:
            await db.execute(
                "UPDATE deliveries SET status = ?, last_error = ?, next_attempt_at = NULL, completed_at = ?, "
                "updated_at = ? WHERE id = ? AND status = 'pending'", (status, reason, now, now, delivery_id))

    async def retry_delivery(self, delivery_id: str, now: float) -> Delivery | None:
        """Send now: a pending delivery's next attempt is brought forward; a settled one starts a new round."""
        async with self._tx() as db:
            row = await (await db.execute("SELECT * FROM deliveries WHERE id = ?", (delivery_id,))).fetchone()
            if row is None:
                return None
            if row["status"] == "pending":
                await db.execute("UPDATE deliveries SET next_attempt_at = ?, updated_at = ? WHERE id = ?",
                                 (now, now, delivery_id))
            else:
                await self._restart(db, delivery_id, "retry", now)
            await self._due_now(db, delivery_id, now)
            row = await (await db.execute("SELECT * FROM deliveries WHERE id = ?", (delivery_id,))).fetchone()
        self._wake()
        return _delivery_from_row(row)

    async def replay_deliveries(self, subscription_id: str, *, since: float, until: float,
                                statuses: Sequence[str], now: float) -> tuple[int, bool]:
        """Start a new round for the subscription's settled deliveries created in [since, until). (count, more left)"""
        marks = ",".join("?" * len(statuses))
        async with self._tx() as db:
            rows = await (await db.execute(
                f"SELECT id FROM deliveries WHERE subscription_id = ? AND status IN ({marks}) AND created_at >= ? "
                "AND created_at < ? ORDER BY id LIMIT ?",
                (subscription_id, *statuses, since, until, REPLAY_MAX + 1))).fetchall()
            chosen = [r["id"] for r in rows[:REPLAY_MAX]]
            for delivery_id in chosen:
                await self._restart(db, delivery_id, "replay", now)
                await self._due_now(db, delivery_id, now)
        self._wake()
        return len(chosen), len(rows) > REPLAY_MAX

    async def _restart(self, db: aiosqlite.Connection, delivery_id: str, origin: str, now: float) -> None:
        await db.execute(
            "UPDATE deliveries SET status = 'pending', round_attempts = 0, round_origin = ?, next_attempt_at = ?, "
            "completed_at = NULL, updated_at = ? WHERE id = ?", (origin, now, now, delivery_id))

    async def _due_now(self, db: aiosqlite.Connection, delivery_id: str, now: float) -> None:
        """Make the delivery's job due now: a new job, or the live one brought forward.

        A job leased by a running worker loses its lease: whatever that run does next cannot
        finish the job, so the new round is never dropped by a run that read the old state
        (at worst the subscriber gets one more copy, with the same webhook-id).
        """
        added = await self._insert_jobs(db, [deliver_job(delivery_id, now, now)])
        if not added:
            await db.execute("UPDATE jobs SET run_at = MIN(run_at, ?), lease_token = NULL WHERE dedupe_key = ? "
                             "AND state = 'queued'", (now, f"deliver:{delivery_id}"))

    async def wake_delivery(self, delivery_id: str, now: float) -> bool:
        """Make a waiting (unleased) delivery job due now; False if there is none to wake."""
        def wake(conn: sqlite3.Connection) -> bool:
            return conn.execute("UPDATE jobs SET run_at = ? WHERE dedupe_key = ? AND state = 'queued' "
                                "AND lease_token IS NULL AND run_at > ?",
                                (now, f"deliver:{delivery_id}", now)).rowcount > 0
        woken = await self._tx_in_thread(wake)
        if woken:
            self._wake()
        return woken

    async def requeue_orphaned_deliveries(self, now: float) -> int:
        """Give a job to every pending delivery that has none (a safety net run at start). Returns how many."""
        rows = await (await self._r.execute(
            "SELECT d.id, d.next_attempt_at FROM deliveries d WHERE d.status = 'pending' AND NOT EXISTS "
            "(SELECT 1 FROM jobs j WHERE j.dedupe_key = 'deliver:' || d.id)")).fetchall()
        if not rows:
            return 0
        async with self._tx() as db:
            added = await self._insert_jobs(db, [deliver_job(r["id"], r["next_attempt_at"] or now, now) for r in rows])
        self._wake()
        return added

    # ---- loading ----------------------------------------------------------------------------------
    async def _load_subscription(self, db: aiosqlite.Connection, subscription_id: str) -> Subscription | None:
        row = await (await db.execute("SELECT * FROM subscriptions WHERE id = ?", (subscription_id,))).fetchone()
        return None if row is None else _subscription_from_row(row)


_SUBSCRIPTION_COLUMNS = ("id", "url", "events", "description", "enabled", "disabled_reason", "signing", "keyring",
                         "public_key", "previous_public_key", "previous_expires_at", "failing_since", "created_at",
                         "updated_at")


def _subscription_from_row(row: Any) -> Subscription:
    return Subscription(
        id=row["id"], url=row["url"], events=json.loads(row["events"]), description=row["description"],
        enabled=bool(row["enabled"]), disabled_reason=row["disabled_reason"], signing=row["signing"],
        keyring=row["keyring"], public_key=row["public_key"], previous_public_key=row["previous_public_key"],
        previous_expires_at=row["previous_expires_at"], failing_since=row["failing_since"],
        created_at=row["created_at"], updated_at=row["updated_at"])


def _delivery_from_row(row: Any) -> Delivery:
    return Delivery(
        id=row["id"], event_id=row["event_id"], event_type=row["event_type"], task_id=row["task_id"],
        subscription_id=row["subscription_id"], url=row["url"], status=row["status"], attempts=row["attempts"],
        round_attempts=row["round_attempts"], round_origin=row["round_origin"], next_attempt_at=row["next_attempt_at"],
        last_attempt_at=row["last_attempt_at"], last_status_code=row["last_status_code"],
        last_error=row["last_error"], created_at=row["created_at"], updated_at=row["updated_at"],
        completed_at=row["completed_at"])


def _attempt_from_row(row: Any) -> Attempt:
    return Attempt(id=row["id"], delivery_id=row["delivery_id"], number=row["number"], at=row["at"], url=row["url"],
                   origin=row["origin"], status_code=row["status_code"], latency_ms=row["latency_ms"],
                   response=row["response"], error=row["error"])
