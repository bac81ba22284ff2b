"""The per-subscriber concurrency cap across processes: slots of a lane held in the store, under a lease."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from relay import ids
from relay.clock import ManualClock
from relay.config import load_settings
from relay.deliveries.models import Attempt, Delivery, Subscription
from relay.deliveries.handler import DeliverHandler
from relay.deliveries.secrets import SecretBox
from relay.deliveries.service import DeliveryService
from relay.links import Signer
from relay.models import Task, TaskStatus
from relay.netguard import NetGuard
from relay.states import Transition
from relay.store.base import Store
from relay.store.deliveries import LaneSlot, lane_notice
from tests.harness import wait_for


async def test_replicas_together_hold_at_most_cap_slots(open_store: Callable[[], Awaitable[Store]],
                                                        clock: ManualClock) -> None:
    """Two stores on one database asking at the same instant for 3-slot lane get 3 slots between them."""
    first, second = await open_store(), await open_store()
    now = clock.now()
    taken = await asyncio.gather(*(store.take_lane_slot("sub_A", 3, f"dlv_{i}", now, 30.0)
                                   for i, store in enumerate((first, second) * 6)))
    held = [slot for slot in taken if slot is not None]
    assert sorted(held) == [0, 1, 2], taken
    assert await first.take_lane_slot("sub_B", 3, "dlv_x", now, 30.0) == 0, "lanes are independent"


async def test_a_released_or_expired_slot_is_free_again(store: Store, clock: ManualClock) -> None:
    """Release frees a slot for its holder only; a holder that died frees it when its lease runs out."""
    now = clock.now()
    assert await store.take_lane_slot("sub_A", 1, "dlv_1", now, 30.0) == 0
    assert await store.take_lane_slot("sub_A", 1, "dlv_2", now, 30.0) is None
    await store.release_lane_slot("sub_A", 0, "dlv_2")                 # not the holder: nothing happens
    assert await store.take_lane_slot("sub_A", 1, "dlv_2", now + 1, 30.0) is None
    await store.release_lane_slot("sub_A", 0, "dlv_1")
    assert await store.take_lane_slot("sub_A", 1, "dlv_2", now + 1, 30.0) == 0
    assert await store.take_lane_slot("sub_A", 1, "dlv_3", now + 31.5, 30.0) == 0, "dlv_2's lease ran out"
    assert await store.take_lane_slot("sub_A", 2, "dlv_4", now + 32, 30.0) == 1, "a larger cap adds slots"


async def test_replicas_racing_for_the_slots_of_a_known_lane_hold_at_most_cap(
        open_store: Callable[[], Awaitable[Store]], clock: ManualClock) -> None:
    """Once a lane's slots exist a slot is taken in one statement (no transaction around it on PostgreSQL): two
    stores asking twelve times at once still get exactly the 3 free slots, each to one holder."""
    first, second = await open_store(), await open_store()
    now = clock.now()
    for slot in range(3):                                  # the lane's slots made, then all free again
        assert await first.take_lane_slot("sub_K", 3, f"warm_{slot}", now, 30.0) == slot
    for slot in range(3):
        await first.release_lane_slot("sub_K", slot, f"warm_{slot}")
    holders = [f"dlv_{i}" for i in range(12)]
    taken = await asyncio.gather(*(store.take_lane_slot("sub_K", 3, holder, now + 1, 30.0)
                                   for holder, store in zip(holders, (first, second) * 6)))
    held = sorted(slot for slot in taken if slot is not None)
    assert held == [0, 1, 2], taken
    # Each slot is held by the one holder that was told it got it: releasing by anyone else changes nothing.
    for holder, slot in zip(holders, taken):
        if slot is not None:
            await second.release_lane_slot("sub_K", slot, "someone else")
            await first.release_lane_slot("sub_K", slot, holder)
    assert sorted([await first.take_lane_slot("sub_K", 3, f"after_{i}", now + 2, 30.0) for i in range(3)]) == [0, 1, 2]


async def test_a_take_run_again_keeps_the_slot_its_holder_already_has(store: Store, clock: ManualClock) -> None:
    """A take whose answer was lost is run again (PostgreSQL, a dropped connection): it finds the slot it already
    got, not a lower one freed meanwhile, so one holder never sits on two slots until a lease runs out."""
    now = clock.now()
    assert await store.take_lane_slot("sub_R", 2, "dlv_a", now, 30.0) == 0
    assert await store.take_lane_slot("sub_R", 2, "dlv_x", now, 30.0) == 1
    await store.release_lane_slot("sub_R", 0, "dlv_a")
    assert await store.take_lane_slot("sub_R", 2, "dlv_x", now, 30.0) == 1
    assert await store.take_lane_slot("sub_R", 2, "dlv_b", now, 30.0) == 0, "slot 0 is still free for another"


async def test_a_slot_given_back_is_told_to_every_process_that_asked(
        open_store: Callable[[], Awaitable[Store]], clock: ManualClock) -> None:
    """A process that finds every slot of a lane held asks to be told (want_lane_slot); the release is then told to
    the store's on_lane_freed listeners by the lane's notice: the releasing process's own, and on PostgreSQL (NOTIFY
    relay_lanes) every other process's too. A release nobody asked for is told to nobody else (a NOTIFY on each
    one cost too much). A lane of a task webhook's origin longer than NOTIFY's 8000-byte payload is given back and
    told like any other. Asking when a slot is free already says so (False)."""
    first, second = await open_store(), await open_store()
    told: dict[str, list[str | None]] = {"first": [], "second": []}
    first.on_lane_freed(told["first"].append)
    second.on_lane_freed(told["second"].append)
    now = clock.now()
    long_lane = "url:https://" + "é" * 4100 + ".example"           # 8,000+ bytes in UTF-8
    assert await first.take_lane_slot("sub_U", 1, "dlv_0", now, 30.0) == 0
    await first.release_lane_slot("sub_U", 0, "dlv_0")             # nobody asked
    for lane in ("sub_T", long_lane):
        assert await first.take_lane_slot(lane, 1, "dlv_1", now, 30.0) == 0
        assert await second.want_lane_slot(lane, 1, now), "every slot is held"
        await first.release_lane_slot(lane, 0, "dlv_1")
    asked = [lane_notice("sub_T"), lane_notice(long_lane)]
    if first.TELLS_LANE_RELEASES:
        # In commit order, the release nobody asked for left out (it would come first, so never equal).
        await wait_for(lambda: told["first"] == asked and told["second"] == asked, 5.0, "both processes to be told")
    else:       # SQLite: one process, which tells itself every release; another store learns nothing from the file
        assert told["first"] == [lane_notice("sub_U"), *asked] and told["second"] == []
    assert not await second.want_lane_slot("sub_T", 1, now), "its slot is free"
    assert await second.take_lane_slot(long_lane, 1, "dlv_2", now, 30.0) == 0, "the slot was given back"


async def _pending_delivery(store: Store, clock: ManualClock) -> Delivery:
    now = clock.now()
    sub = Subscription(id=ids.new_id("sub", now), url="https://subscriber.test/hook", events=["task.*"],
                       keyring="sealed", created_at=now, updated_at=now)
    await store.create_subscription(sub)
    task = Task(id=ids.new_id("tsk", now), provider="gmicloud", request={"prompt": "p"}, created_at=now,
                updated_at=now)
    await store.create_task(task, [])
    await store.apply(task.id, lambda t: Transition(TaskStatus.QUEUED, "task.queued"), now)
    [delivery], _ = await store.list_deliveries(subscription_id=sub.id, status=None, task_id=task.id, event_id=None,
                                                limit=10, cursor=None)
    return delivery


async def test_an_attempts_record_gives_back_the_slot_the_attempt_held(store: Store, clock: ManualClock) -> None:
    """record_attempt(release=…) gives the attempt's slot back with its record, whichever way the record goes: a
    retry (the delivery locked), a success (one statement), a success of a run that was overtaken (not counted,
    the slot given back all the same). Each release is told like release_lane_slot's."""
    told: list[str | None] = []
    store.on_lane_freed(told.append)
    delivery = await _pending_delivery(store, clock)
    lane, now = delivery.subscription_id or "", clock.now()

    async def attempt(number: int, code: int) -> object:
        assert await store.take_lane_slot(lane, 1, delivery.id, now, 30.0) == 0
        assert await store.take_lane_slot(lane, 1, "dlv_other", now, 30.0) is None, "held while it is sent"
        sent = Attempt(delivery_id=delivery.id, number=number, at=now, url=delivery.url, status_code=code,
                       latency_ms=1.0, error=None if code == 200 else f"HTTP {code}")
        recorded = await store.record_attempt(sent, outcome="succeeded" if code == 200 else "retry",
                                              next_attempt_at=None if code == 200 else now + 5,
                                              auto_disable_after=3 * 86400.0, now=now,
                                              release=LaneSlot(lane, 0, delivery.id))
        assert await store.take_lane_slot(lane, 1, "dlv_other", now, 30.0) == 0, "given back with the record"
        await store.release_lane_slot(lane, 0, "dlv_other")
        return recorded
    assert await attempt(1, 500) is not None
    assert await attempt(2, 200) is not None
    assert await attempt(2, 200) is None, "the attempt was counted already"
    assert [a.number for a in await store.list_attempts(delivery.id)] == [2, 2, 1]
    if not store.TELLS_LANE_RELEASES:       # PostgreSQL tells only releases asked for (want_lane_slot)
        assert told == [lane_notice(lane)] * 6


def _replica(store: Store, clock: ManualClock, *, cap: int = 2) -> DeliverHandler:
    """A replica's deliver handler on `store`, its subscribers' slots shared in the store (replicas)."""
    settings = load_settings(None, {"RELAY_DELIVERIES_CONCURRENCY_PER_SUBSCRIPTION": str(cap)})
    service = DeliveryService(settings, store, clock, guard=NetGuard(()), signer=Signer("s" * 40),
                              box=SecretBox("k" * 32), task_secret="whsec_" + "A" * 43, shared_lanes=True)
    return DeliverHandler(service)


async def test_a_delivery_waiting_for_a_shared_slot_takes_the_one_another_replica_gives_back(
        open_store: Callable[[], Awaitable[Store]], clock: ManualClock) -> None:
    """Another replica holds every slot of a quick subscriber: the delivery waits, and the moment one is given back
    (told through the store, not found by looking again at the end of the wait) it takes it instead of parking."""
    holder = await open_store()
    mine = await open_store() if holder.TELLS_LANE_RELEASES else holder    # SQLite: replicas are one process
    handler = _replica(mine, clock)
    try:
        lanes = handler.service.lanes
        lanes.wait_seconds = 60.0        # only being told can end the wait within the test's 10 s
        # This process has timed the subscriber answering quickly (an attempt of its own still in flight keeps the
        # lane, and its timing, from being forgotten as idle).
        assert await lanes.acquire("sub_W", 2) and await lanes.acquire("sub_W", 2)
        await lanes.release("sub_W", latency_ms=5.0)
        now = clock.now()
        assert [await holder.take_lane_slot("sub_W", 2, f"other_{i}", now, 30.0) for i in range(2)] == [0, 1]
        asked = asyncio.Event()
        want = mine.want_lane_slot

        async def asking(lane: str, cap: int, at: float) -> bool:
            every_slot_held = await want(lane, cap, at)
            if every_slot_held:
                asked.set()
            return every_slot_held
        mine.want_lane_slot = asking  # type: ignore[method-assign]
        taking = asyncio.create_task(handler._take_shared_slot("sub_W", 2, "dlv_mine", now))
        await asyncio.wait_for(asked.wait(), 5.0)      # the held slots are asked for: from here only a tell wakes it
        assert not taking.done() and handler.service.shared_releases.watchers("sub_W") == 1
        await holder.release_lane_slot("sub_W", 1, "other_1")
        assert await asyncio.wait_for(taking, 10.0) == 1
        assert handler.service.shared_releases.watchers("sub_W") == 0
    finally:
        await handler.service.close()


async def test_a_delivery_parks_when_no_shared_slot_comes_back_or_its_subscriber_is_slow(
        store: Store, clock: ManualClock) -> None:
    """Nobody gives a slot back within the lanes' wait: None (the caller parks). A subscriber this process has not
    timed yet (it may be slow), a slow one, or a cap of one (a failing subscriber) is not waited for at all."""
    handler = _replica(store, clock)
    try:
        now = clock.now()
        assert [await store.take_lane_slot("sub_S", 2, f"other_{i}", now, 30.0) for i in range(2)] == [0, 1]
        lanes = handler.service.lanes
        lanes.wait_seconds = 60.0
        assert await asyncio.wait_for(handler._take_shared_slot("sub_S", 2, "dlv_u", now), 10.0) is None, "untimed"
        assert await lanes.acquire("sub_S", 2) and await lanes.acquire("sub_S", 2)
        await lanes.release("sub_S", latency_ms=5.0)             # timed quick, one attempt still in flight
        assert await asyncio.wait_for(handler._take_shared_slot("sub_S", 1, "dlv_b", now), 10.0) is None
        lanes.wait_seconds = 0.3
        assert await asyncio.wait_for(handler._take_shared_slot("sub_S", 2, "dlv_a", now), 10.0) is None
        assert handler.service.shared_releases.watchers("sub_S") == 0
        lanes.wait_seconds = 60.0
        await lanes.release("sub_S", latency_ms=20_000.0)        # now slow on average
        assert not lanes.quick("sub_S")
        assert await asyncio.wait_for(handler._take_shared_slot("sub_S", 2, "dlv_c", now), 10.0) is None
    finally:
        await handler.service.close()
