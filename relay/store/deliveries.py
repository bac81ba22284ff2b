"""The delivery use cases of the store: subscriptions, deliveries, attempts, retries and replays.

Backend-neutral like relay.store.base (which mixes this in): each method is one transaction over a Tx,
its decisions made here. Attempts are recorded optimistically: an attempt whose delivery moved on
meanwhile (a second run of the same job after a lease ran out, a manual retry) is kept in the history
but changes nothing; the delivery's row is locked while that is decided.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Sequence
from typing import NamedTuple

from relay import ids, jsontext
from relay.deliveries.models import (DISABLED_FAILING, DISABLED_GONE, DISABLED_MANUAL, Attempt, Delivery, Recorded,
                                     SendTarget, Subscription)
from relay.store import queries as q
from relay.store.outbox import deliver_job, insert_jobs
from relay.store.plumbing import StorePlumbing
from relay.store.rows import (SUBSCRIPTION_COLUMNS, attempt_from_row, attempt_row, delivery_from_row,
                              subscription_from_row, subscription_row)
from relay.store.tx import Row, Tx

REPLAY_MAX = 10_000
REPLAY_BATCH = 500     # deliveries a replay restarts per transaction (replay_deliveries)


class LaneSlot(NamedTuple):
    """A slot of a lane held in the store (take_lane_slot), as RELEASE_LANE_SLOT's arguments."""
    lane: str
    slot: int
    holder: str


def lane_notice(lane: str) -> str:
    """What a lane slot given back is told by (Store.on_lane_freed): the SHA-256 of the lane's UTF-8 in hex, as
    PostgreSQL's trigger sends it (sql/postgres/017): a fixed size whatever the lane (a task webhook's holds its URL's
    origin), the same bytes whatever the server's encoding."""
    return hashlib.sha256(lane.encode()).hexdigest()


class DeliveryCases(StorePlumbing):
    """Mixed into Store; speaks through relay.store.plumbing."""

    # ---- subscriptions ----------------------------------------------------------------------------
    async def create_subscription(self, sub: Subscription) -> Subscription:
        async def body(tx: Tx) -> None:
            await tx.run(q.INSERT_SUBSCRIPTION, subscription_row(sub))
        await self.transact(body)
        return sub

    async def get_subscription(self, subscription_id: str) -> Subscription | None:
        row = await self._read(q.LOAD_SUBSCRIPTION, (subscription_id,))
        return None if row is None else subscription_from_row(row)

    async def list_subscriptions(self, *, limit: int, cursor: str | None) -> tuple[list[Subscription], str | None]:
        """Newest first; the cursor is the last id of the previous page."""
        return await self._page("subscriptions", [], [], cursor=cursor, limit=limit, build=subscription_from_row)

    async def update_subscription(self, subscription_id: str, change: Callable[[Subscription], Subscription],
                                  now: float) -> Subscription | None:
        """One transaction: read (locked), `change` (a pure function of the row), write. None if unknown.

        Disabling cancels the pending deliveries; enabling forgets the failures.
        """
        async def body(tx: Tx) -> Subscription | None:
            row = await tx.one(q.LOCK_SUBSCRIPTION, (subscription_id,))
            if row is None:
                return None
            before = subscription_from_row(row)
            after = change(subscription_from_row(row))
            if after.enabled and not before.enabled:
                after.disabled_reason, after.failing_since = None, None
            elif before.enabled and not after.enabled:
                after.disabled_reason = after.disabled_reason or DISABLED_MANUAL
                await _cancel_pending(tx, subscription_id, "the subscription was disabled", now)
            after.updated_at = now
            await tx.run(q.UPDATE_SUBSCRIPTION, (
                after.url, jsontext.dumps(after.events), after.description, int(after.enabled), after.disabled_reason,
                after.keyring, after.public_key, after.previous_public_key, after.previous_expires_at,
                after.failing_since, now, subscription_id))
            return after
        return await self.transact(body)

    async def delete_subscription(self, subscription_id: str, now: float) -> bool:
        """Remove it and cancel its pending deliveries (their history stays). False if unknown."""
        async def body(tx: Tx) -> bool:
            if not await tx.run(q.DELETE_SUBSCRIPTION, (subscription_id,)):
                return False
            await _cancel_pending(tx, subscription_id, "the subscription was deleted", now)
            return True
        return await self.transact(body)

    # ---- the per-subscriber cap across processes ----------------------------------------------------
    async def take_lane_slot(self, lane: str, cap: int, holder: str, now: float, lease: float) -> int | None:
        """Hold one of the `cap` slots of `lane` for `holder` until `now + lease`: the slot's number, or None
        when all are held. A slot whose lease ran out (its holder's process died) is free again. Locks the slot it
        takes (TAKE_LANE_SLOT), so processes sharing the database never hold more than `cap` together."""
        args = (holder, now + lease, lane, lane, cap, holder, now, holder)
        # Usually one statement: the lane's slots exist, and one is free or none is.
        taken = await self._change(q.TAKE_LANE_SLOT, args)
        if taken:
            return int(taken[0]["slot"])
        counted = await self._read(q.COUNT_LANE_SLOTS, (lane, cap))
        if counted is not None and int(counted["n"]) >= cap:
            return None

        # A new lane, or a larger cap: its missing slots are made, then one is taken by the same rule.
        async def body(tx: Tx) -> int | None:
            await tx.many(q.INSERT_LANE_SLOT, [(lane, slot) for slot in range(cap)])
            rows = await tx.all(q.TAKE_LANE_SLOT, args)
            return int(rows[0]["slot"]) if rows else None
        return await self.transact(body)

    async def release_lane_slot(self, lane: str, slot: int, holder: str) -> None:
        """Give a slot back (only if `holder` still holds it: a lease that ran out may have moved it on). Not through
        the group commit (`_write`): the process's lane waits for this, and a commit shared under load kept lanes
        held long enough to park deliveries (2.4 runs per delivery instead of 1.1 in bench.throughput)."""
        await self._change(q.RELEASE_LANE_SLOT, (lane, slot, holder))
        self._tell_lane_released(LaneSlot(lane, slot, holder))

    def _tell_lane_released(self, released: LaneSlot) -> None:
        if not self.TELLS_LANE_RELEASES:        # else the database tells every process, this one included
            self._lane_freed(lane_notice(released.lane))

    async def want_lane_slot(self, lane: str, cap: int, now: float) -> bool:
        """Ask to be told (on_lane_freed, in every process) when a slot of `lane` held now is given back: True, or
        False when one of its `cap` slots is free by now (one given back before this asked was not told: look
        again). Where the database does not tell other processes, the releasing process tells itself anyway."""
        return len(await self._change(q.WANT_LANE_SLOT, (lane, cap, now))) >= cap

    # ---- deliveries -------------------------------------------------------------------------------
    async def get_delivery(self, delivery_id: str) -> Delivery | None:
        row = await self._read(q.LOAD_DELIVERY, (delivery_id,))
        return None if row is None else delivery_from_row(row)

    async def list_deliveries(self, *, subscription_id: str | None, status: str | None, task_id: str | None,
                              event_id: str | None, limit: int,
                              cursor: str | None) -> tuple[list[Delivery], str | None]:
        """Newest first; the cursor is the last id of the previous page."""
        filters, args = [], []
        for column, value in (("subscription_id", subscription_id), ("status", status), ("task_id", task_id),
                              ("event_id", event_id)):
            if value is not None:
                filters.append(f"{column} = ?")
                args.append(value)
        table = q.deliveries_listing(subscription=subscription_id is not None, status=status is not None,
                                     task=task_id is not None, event=event_id is not None)
        return await self._page(table, filters, args, cursor=cursor, limit=limit, build=delivery_from_row)

    async def list_attempts(self, delivery_id: str, *, limit: int = 100) -> list[Attempt]:
        """A delivery's latest attempts, newest first."""
        return [attempt_from_row(r) for r in await self._read_all(q.LIST_ATTEMPTS, (delivery_id, limit))]

    async def delivery_counts(self) -> dict[str, int]:
        """Deliveries by status."""
        return {r["status"]: int(r["n"]) for r in await self._read_all(q.DELIVERY_COUNTS)}

    async def load_send_target(self, delivery_id: str) -> SendTarget | None:
        """A delivery with its event and subscription, for the deliver job (None if either is unknown)."""
        row = await self._read_key(q.LOAD_SEND_TARGET, (delivery_id,))
        if row is None:
            return None
        sub = None
        if row["sub_id"] is not None:
            sub = subscription_from_row({key: row[f"sub_{key}"] for key in SUBSCRIPTION_COLUMNS})
        return SendTarget(delivery=delivery_from_row(row), event_data=jsontext.loads(row["event_data"]),
                          event_created_at=row["event_created_at"], subscription=sub)

    async def record_attempt(self, attempt: Attempt, *, outcome: str, next_attempt_at: float | None,
                             auto_disable_after: float, now: float,
                             release: LaneSlot | None = None) -> Recorded | None:
        """One transaction: the attempt, the delivery's next state, the subscription's failure clock (and disabling),
        and `release`, the lane slot the attempt held in the store, given back (release_lane_slot's rule) in the
        same statement: a round trip per delivery fewer on PostgreSQL than giving it back on its own.

        `outcome` is succeeded | gone | retry | refused; a retry with no `next_attempt_at` has exhausted its
        schedule; refused (the SSRF guard would not connect) fails it at once. Either counts as a failure of
        the subscription (its failure clock, auto-disable). None when the delivery is no longer at this
        attempt (a duplicate run): the attempt is still kept.

        A success is first recorded without the locked read (_record_success); only when that finds the delivery
        moved on or its subscription's failure clock running does it go this way too, its attempt kept already.
        """
        kept = False
        if outcome == "succeeded":
            recorded = await self._record_success(attempt, now, release)
            if release is not None:
                self._tell_lane_released(release)
            if recorded is not None:
                return recorded
            kept = True     # and the slot given back

        async def body(tx: Tx) -> Recorded | None:
            row = await tx.one(q.LOCK_DELIVERY_FOR_ATTEMPT, (attempt.delivery_id,))
            # Kept whether or not it counts. After the lock's read, so that on PostgreSQL it goes with the
            # delivery's new state, one round trip for both (Tx.write).
            if not kept:
                await tx.write(q.INSERT_ATTEMPT, attempt_row(attempt))
                if release is not None:
                    await tx.write(q.RELEASE_LANE_SLOT, release)
            if row is None:
                return None
            delivery = delivery_from_row(row)
            if delivery.status != "pending" or delivery.attempts != attempt.number - 1:
                return None
            sub_id = delivery.subscription_id
            failing = sub_id is not None and row["sub_failing_since"] is not None
            status, next_at, error, disabled = await _next_state(tx, attempt, outcome, next_attempt_at,
                                                                 auto_disable_after, sub_id, failing, now)
            if disabled is not None and sub_id is not None:
                await tx.run(q.DISABLE_SUBSCRIPTION, (disabled, now, sub_id))
                why = ("the subscriber answered 410 Gone" if disabled == DISABLED_GONE
                       else "the subscription failed continuously for too long")
                await _cancel_pending(tx, sub_id, f"{why}: subscription disabled", now)
                if outcome != "gone":
                    error = f"{error}; {why}: subscription disabled"
            await tx.write(q.RECORD_DELIVERY_ATTEMPT, (
                status, next_at, attempt.at, attempt.status_code, error, attempt.url, now,
                None if status == "pending" else now, delivery.id))
            delivery.status, delivery.next_attempt_at = status, next_at
            delivery.attempts += 1
            delivery.round_attempts += 1
            delivery.last_attempt_at, delivery.last_status_code = attempt.at, attempt.status_code
            delivery.last_error, delivery.url, delivery.updated_at = error, attempt.url, now
            if status != "pending":
                delivery.completed_at = now
            return Recorded(delivery=delivery, disabled=disabled)
        recorded = await self.transact_shared(body)
        if release is not None and not kept:
            self._tell_lane_released(release)
        return recorded

    async def _record_success(self, attempt: Attempt, now: float, release: LaneSlot | None) -> Recorded | None:
        """record_attempt of a success without reading the delivery first: the attempt (kept in any case), and
        the delivery's new state only if it is still at this attempt and its subscription's failure clock is not
        running (the clock is then left alone, as the locked path would). None: not recorded so (moved on, or the
        clock must be stopped with the delivery locked): record_attempt takes the locked path. On PostgreSQL one
        statement, one round trip (Tx.last), where BEGIN, the locked read, the writes and COMMIT were four, for
        the most frequent outcome by far."""
        async def body(tx: Tx) -> list[Row]:
            await tx.write(q.INSERT_ATTEMPT, attempt_row(attempt))
            if release is not None:
                await tx.write(q.RELEASE_LANE_SLOT, release)
            return await tx.last(q.RECORD_DELIVERY_SUCCESS, (
                "succeeded", None, attempt.at, attempt.status_code, None, attempt.url, now, now, attempt.delivery_id,
                attempt.number - 1))
        rows = await self.transact_shared(body)
        return Recorded(delivery=delivery_from_row(rows[0]), disabled=None) if rows else None

    async def settle_delivery(self, delivery_id: str, status: str, reason: str, now: float) -> None:
        """End a pending delivery without an attempt (canceled: nobody to send to; failed: gave up)."""
        async def body(tx: Tx) -> None:
            await tx.run(q.SETTLE_DELIVERY, (status, reason, now, now, delivery_id))
        await self.transact(body)

    async def retry_delivery(self, delivery_id: str, now: float) -> Delivery | None:
        """Attempt now: a pending delivery's next attempt is brought forward; a settled one starts a new round."""
        async def body(tx: Tx) -> Delivery | None:
            row = await tx.one(q.LOCK_DELIVERY, (delivery_id,))
            if row is None:
                return None
            if row["status"] == "pending":
                await tx.run(q.DELIVERY_DUE_NOW, (now, now, delivery_id))
            else:
                await tx.run(q.RESTART_DELIVERY, ("retry", now, now, delivery_id))
            await _due_now(tx, delivery_id, now)
            found = await tx.one(q.LOAD_DELIVERY, (delivery_id,))
            return None if found is None else delivery_from_row(found)
        delivery = await self.transact(body)
        self._wake()
        return delivery

    async def replay_deliveries(self, subscription_id: str, *, since: float, until: float,
                                statuses: Sequence[str], now: float) -> tuple[int, bool]:
        """New rounds for the subscription's deliveries in [since, until) with these statuses, oldest first, at
        most REPLAY_MAX. (count, more left)

        REPLAY_BATCH deliveries per transaction: SQLite's one writer, which every callback's acknowledgement waits
        for, is held for one batch at a time, not the 0.4-0.6 s of 10,000 at once. Each batch goes on after the
        last id of the one before, so a delivery the replay restarted and that ended meanwhile is not taken again.
        Interrupted, the batches done stay done: their deliveries are pending, which no replay takes."""
        after, high = ids.id_range("dlv", since, until)    # `id > low` holds for every id of the window
        statuses = list(dict.fromkeys(statuses))            # one walk per status: each status once
        if not statuses:
            return 0, False

        async def batch(tx: Tx) -> tuple[list[str], int, bool]:
            want = min(REPLAY_BATCH, REPLAY_MAX - taken)
            each = [(subscription_id, status, since, until, after, high, want + 1) for status in statuses]
            rows = await tx.all(q.replay_candidates(len(statuses)), [*itertools.chain(*each), want + 1])
            chosen = [r["id"] for r in rows[:want]]
            restarted = 0
            for delivery_id in chosen:
                # Restarted only if still settled: a replay running at the same time may have taken it first,
                # and its job (maybe being sent) must not be made due again, nor the delivery counted twice.
                if await tx.run(q.RESTART_DELIVERY, ("replay", now, now, delivery_id)):
                    await _due_now(tx, delivery_id, now)
                    restarted += 1
            return chosen, restarted, len(rows) > want
        taken, count, more = 0, 0, True
        while more and taken < REPLAY_MAX:
            chosen, restarted, more = await self.transact(batch)
            taken, count = taken + len(chosen), count + restarted
            if chosen:
                after = chosen[-1]
            if restarted:
                self._wake()
        return count, more

    async def wake_delivery(self, delivery_id: str, now: float) -> bool:
        """Make a waiting (unleased) delivery job due now (a parked delivery whose subscriber has a free lane)."""
        async def body(tx: Tx) -> bool:
            return await tx.run(q.WAKE_JOB, (now, f"deliver:{delivery_id}", now)) > 0
        woken = await self.transact(body)
        if woken:
            self._wake()
        return woken

    async def requeue_orphaned_deliveries(self, now: float) -> int:
        """Give a job to every pending delivery that has none (a safety net run at start). Returns how many."""
        rows = await self._read_all(q.ORPHANED_DELIVERIES)
        if not rows:
            return 0

        async def body(tx: Tx) -> int:
            return await insert_jobs(tx, [deliver_job(r["id"], r["next_attempt_at"] or now, now) for r in rows])
        added = await self.transact(body)
        self._wake()
        return added


async def _next_state(tx: Tx, attempt: Attempt, outcome: str, next_attempt_at: float | None,
                      auto_disable_after: float, sub_id: str | None, failing: bool,
                      now: float) -> tuple[str, float | None, str | None, str | None]:
    """(status, next attempt, error, disabled reason) of a delivery after this attempt; moves the failure clock.
    `failing`: the subscription's failure clock was running when the delivery was locked."""
    if outcome == "succeeded":
        if sub_id and failing:
            await tx.run(q.SUBSCRIPTION_HEALTHY, (sub_id,))
        return "succeeded", None, None, None
    if outcome == "gone":
        return "failed", None, attempt.error, DISABLED_GONE if sub_id else None
    # refused (the SSRF guard would not connect) fails at once; a retry with no next attempt has run out.
    retry = outcome == "retry" and next_attempt_at is not None
    status, next_at = ("pending", next_attempt_at) if retry else ("failed", None)
    if sub_id:
        since = await tx.one(q.SUBSCRIPTION_FAILING, (attempt.at, sub_id))
        if since is not None and now - since["failing_since"] >= auto_disable_after:
            return "failed", None, attempt.error, DISABLED_FAILING
    return status, next_at, attempt.error, None


async def _cancel_pending(tx: Tx, subscription_id: str, reason: str, now: float) -> None:
    # Their jobs find the delivery settled and finish without sending.
    await tx.run(q.CANCEL_PENDING_DELIVERIES, (reason, now, now, subscription_id))


async def _due_now(tx: Tx, delivery_id: str, now: float) -> None:
    """Make the delivery's job due now: a new job, or the live one brought forward (and its lease voided).

    A job leased by a running worker loses its lease: whatever that run does next cannot finish the job,
    so the new round is never dropped by a run that read the old state (at worst the subscriber gets one
    more copy, with the same webhook-id).
    """
    if not await insert_jobs(tx, [deliver_job(delivery_id, now, now)]):
        await tx.run(q.JOB_DUE_NOW, (now, now, f"deliver:{delivery_id}"))
