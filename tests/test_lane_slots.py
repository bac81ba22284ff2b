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
