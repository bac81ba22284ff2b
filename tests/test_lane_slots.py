"""The per-subscriber concurrency cap across processes: slots of a lane held in the store, under a lease."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from relay.clock import ManualClock
from relay.store.base import Store


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
