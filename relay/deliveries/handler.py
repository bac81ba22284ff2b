"""The deliver job: one attempt of one delivery, then the next one planned or the delivery settled.

The delivery row decides, not the job: a job that wakes before the delivery's
next attempt (after a crash, a lease that ran out) goes back to sleep; one
whose delivery is settled just ends. The delivery's own schedule drives its
retries (returned as `Again`, which does not count against the worker's
generic attempts); only an unexpected error reaches the worker's backoff, and
its `give_up` settles the delivery as failed.

Per-subscription cap: before sending, the job takes one of the subscription's
lanes in this process (`concurrency_per_subscription`, or 1 while the
subscription is failing; see lanes.py). With none free it waits briefly if
the subscriber answers quickly, else it is parked, not blocked: it returns
`Again` (frees its worker slot) and is woken when a lane of its subscriber
frees up, or by its own growing timer. So a slow subscriber holds at most its
cap of the worker's slots and everyone else keeps flowing. The cap is per
process, and with replicas on one database (PostgreSQL) also a slot of the
subscriber's in the store (Store.take_lane_slot, leased), so N replicas
together still send at most cap at a time to one subscriber; a delivery that
finds them all held by other replicas waits briefly for one to be given back
(the store tells every replica) before it parks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

from relay import metrics
from relay.deliveries import schedule
from relay.deliveries.lanes import url_lane
from relay.deliveries.models import Delivery
from relay.deliveries.service import DeliveryService, Sent
from relay.logs import redact_text
from relay.models import Job
from relay.queue import Again
from relay.store.deliveries import LaneSlot

log = logging.getLogger("relay.deliveries")

HAND_OFF_CANDIDATES = 4
PARK_BASE = 0.05
PARK_MAX = 30.0


def park_delay(parked: int) -> float:
    """When a parked delivery looks again by itself: 50 ms, doubling, up to 30 s (it is normally woken sooner)."""
    return float(min(PARK_MAX, PARK_BASE * 2 ** min(parked, 10)) * random.uniform(0.5, 1.5))


class DeliverHandler:
    def __init__(self, service: DeliveryService) -> None:
        self.service = service

    async def run(self, job: Job) -> Again | None:
        svc = self.service
        delivery_id = str(job.payload.get("delivery_id"))
        target = await svc.store.load_send_target(delivery_id)
        if target is None or target.delivery.status != "pending":
            return None
        delivery = target.delivery
        now = svc.clock.now()
        if delivery.next_attempt_at is not None and delivery.next_attempt_at > now:
            return Again(delivery.next_attempt_at - now, payload={"delivery_id": delivery_id})
        sub = target.subscription
        cap = svc.options.concurrency_per_subscription
        if delivery.subscription_id is not None:
            if sub is None or not sub.enabled:
                why = "deleted" if sub is None else "disabled"
                await svc.store.settle_delivery(delivery_id, "canceled", f"the subscription was {why}", now)
                return None
            url, lane = sub.url, sub.id
            keys = svc.signing_keys(sub, now)
            if sub.failing_since is not None:
                cap = 1      # a failing subscriber gets one attempt at a time: it cannot hog the workers
        else:
            url, lane = delivery.url, url_lane(delivery.url)
            keys = [svc.task_secret]
        while not await svc.lanes.acquire(lane, cap, may_wait=cap > 1, delivery_id=delivery_id):
            if svc.lanes.park(lane, delivery_id):
                parked = int(job.payload.get("parked", 0))
                return Again(park_delay(parked), payload={"delivery_id": delivery_id, "parked": parked + 1})
        shared_slot = None
        if svc.shared_lanes:
            # Replicas on one database: the cap is the subscriber's, so a slot is also held in the store.
            try:
                shared_slot = await self._take_shared_slot(lane, cap, delivery_id, svc.clock.now())
            except BaseException:
                await svc.lanes.release(lane, None, refill=False)     # the database failed us: the lane is not lost
                raise
            if shared_slot is None:     # other replicas hold every slot: look again on the parked timer
                await self._hand_off(lane, await svc.lanes.release(lane, None, refill=False))
                parked = int(job.payload.get("parked", 0))
                return Again(park_delay(parked), payload={"delivery_id": delivery_id, "parked": parked + 1})
        latency = None
        if shared_slot is None:
            # This process's lane alone: given back as soon as the answer is in, before the record (which waits
            # for the store's writer), so the next delivery to the subscriber goes out meanwhile.
            try:
                sent = await svc.send(url, delivery.event_id, svc.body(target, now), keys, now)
                latency = sent.latency_ms
            finally:
                wake = await svc.lanes.release(lane, latency)
            await self._hand_off(lane, wake)
            return await self._record(delivery_id, target.delivery, url, now, sent, None)
        # The store's slot is given back with the attempt's record (one statement on PostgreSQL), or on its own if
        # the send or the record fails; this process's lane after it: a delivery handed the lane must find the
        # store's slot free too.
        held: LaneSlot | None = LaneSlot(lane, shared_slot, delivery_id)
        try:
            sent = await svc.send(url, delivery.event_id, svc.body(target, now), keys, now)
            latency = sent.latency_ms
            again = await self._record(delivery_id, target.delivery, url, now, sent, held)
            held = None
        finally:
            try:
                if held is not None:
                    await svc.store.release_lane_slot(*held)
            finally:
                wake = await svc.lanes.release(lane, latency)
        await self._hand_off(lane, wake)
        return again

    async def _take_shared_slot(self, lane: str, cap: int, delivery_id: str, now: float) -> int | None:
        """One of the subscriber's slots in the store (replicas), or None when other replicas hold them all.

        Then, for a subscriber this process has timed answering quickly (as for its own lane, Lanes.acquire; one
        it has not timed yet may be slow, and waiting for a slow one would hold worker slots for nothing), wait up
        to the lanes' wait for any replica to give a slot back (the store tells every process: on_lane_freed) and
        look again, instead of parking on a timer at once. With two replicas delivering to nine subscriptions, a fifth
        of the takes found every slot held; each became a parked run and another claim and run 50 ms or more later
        (bench.scaling's fan-out load)."""
        svc = self.service
        loop = asyncio.get_running_loop()
        deadline = loop.time() + svc.lanes.wait_seconds
        with svc.shared_releases.watch(lane) as freed:
            while True:
                freed.clear()       # before the look: a slot given back after it ends the wait below
                slot = await svc.store.take_lane_slot(lane, cap, delivery_id, now, svc.lane_lease)
                remaining = deadline - loop.time()
                if slot is not None or remaining <= 0 or cap <= 1 or not svc.lanes.quick(lane, unknown=False):
                    return slot
                # Only releases of slots asked for are told (a NOTIFY on every one cost a single process 6-10 % of
                # its deliveries/s). A slot free by the time of the asking (given back untold after the look, or its
                # lease run out) is looked for again instead: only a wait on slots all asked for is ended by a tell.
                if await svc.store.want_lane_slot(lane, cap, svc.clock.now()):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(freed.wait(), remaining)
                now = svc.clock.now()

    async def _hand_off(self, lane: str, delivery_id: str | None) -> None:
        """Wake the oldest parked delivery of this subscriber for the slot just freed (its timer is the safety net).

        Its job may be between parking and being written back (leased for a moment more): try again
        shortly; if it is gone (settled, or already running), try the next one.
        """
        svc = self.service
        for _ in range(HAND_OFF_CANDIDATES):
            if delivery_id is None:
                return
            for _ in range(3):
                if await svc.store.wake_delivery(delivery_id, svc.clock.now()):
                    return
                await asyncio.sleep(0.02)
            delivery_id = svc.lanes.next_parked(lane)

    async def _record(self, delivery_id: str, delivery: Delivery, url: str, at: float, sent: Sent,
                      held: LaneSlot | None) -> Again | None:
        svc = self.service
        outcome = schedule.classify(sent.status_code, blocked=sent.blocked)
        metrics.labeled(metrics.DELIVERY_ATTEMPTS, outcome).inc()
        metrics.labeled(metrics.DELIVERY_SECONDS, outcome).observe(sent.latency_ms / 1000)
        # The URL is redacted by the log filter like any other (a subscriber's ?token= stays out).
        log.log(logging.INFO if outcome == schedule.SUCCEEDED else logging.WARNING,
                "delivery %s attempt %d to %s: %s (%s) in %.0f ms", delivery_id, delivery.attempts + 1, url, outcome,
                sent.status_code if sent.status_code is not None else sent.error, sent.latency_ms,
                extra={"delivery_id": delivery_id, "event_id": delivery.event_id, "task_id": delivery.task_id,
                       "subscription_id": delivery.subscription_id, "outcome": outcome,
                       "status_code": sent.status_code, "latency_ms": sent.latency_ms})
        now = svc.clock.now()
        next_at = None
        if outcome == schedule.RETRY:
            delay = schedule.next_delay(delivery.round_attempts + 1, svc.options.schedule, svc.options.jitter,
                                        sent.retry_after)
            next_at = None if delay is None else now + delay
        recorded = await svc.store.record_attempt(svc.attempt(delivery, url, at, sent), outcome=outcome,
                                                  next_attempt_at=next_at,
                                                  auto_disable_after=svc.options.auto_disable_after, now=now,
                                                  release=held)
        if recorded is None:
            return None      # another run moved this delivery on; its job carries it
        if recorded.disabled:
            log.warning("subscription %s disabled (%s) after delivery %s", delivery.subscription_id,
                        recorded.disabled, delivery_id)
        if recorded.delivery.status == "pending" and next_at is not None:
            return Again(max(0.0, next_at - svc.clock.now()), payload={"delivery_id": delivery_id})
        if recorded.delivery.status == "failed":
            log.info("delivery %s failed for good after %d attempts: %s", delivery_id, recorded.delivery.attempts,
                     redact_text(recorded.delivery.last_error or ""))
        return None

    async def give_up(self, job: Job, reason: str) -> None:
        delivery_id = str(job.payload.get("delivery_id"))
        await self.service.store.settle_delivery(delivery_id, "failed", f"internal error: {reason}",
                                                 self.service.clock.now())
