"""Per-subscriber concurrency caps in this process: how many attempts may be in flight to one key.

A key is a subscription id (or url_lane of a task's webhook_url). When a
key is at its cap, a delivery either waits briefly for a slot or is parked:
the caller reschedules its job (freeing the worker slot) and the lane
remembers it. When a slot frees up, it goes to a waiting delivery if there is
one, and the lane hands the oldest parked delivery the next place (`release`
returns its id and the caller makes its job due now), so a backlog drains as
fast as the subscriber answers without parked jobs polling for a slot; their
own timer is only the safety net.

A delivery may wait (instead of parking) only when the key answers quickly
(its recent latency is low) and few others wait already: then a wait is
short, and cheaper than a round trip through the job queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx

from relay.netguard import connect_port
from relay.store.deliveries import lane_notice

MAX_LANES = 10_000       # beyond this many keys, idle lanes are forgotten even if slow
FAST_MS = 250.0          # below this recent latency a key counts as quick: worth a short wait for its slot
WAIT_SECONDS = 1.0       # the longest a delivery waits for a slot before it is parked


def url_lane(url: str) -> str:
    """The lane of a task's own webhook_url: `url:` and the server it reaches (scheme, host as IDNA, port).

    Not the URL's userinfo: the key stays short whatever the userinfo holds (a host is at most 253 characters,
    relay.validation), and credentials stay out of the key. The lane used to be the URL's netloc: PostgreSQL
    refuses an index entry over 2,704 bytes (lane_slots, the table processes share), so a webhook_url with 2,000
    CJK characters of userinfo (2,048 characters are allowed) never got its shared slot and was never sent.
    A URL that httpx cannot parse (stored by a relay that checked URLs less strictly) gets a lane of its own,
    named by its digest: the attempt then fails as a connection error, recorded like any other."""
    try:
        parsed = httpx.URL(url)      # the parser relay.validation accepts URLs with
    except (httpx.InvalidURL, ValueError):
        return "url:sha256:" + hashlib.sha256(url.encode()).hexdigest()
    host = parsed.raw_host.decode("ascii").lower()
    return f"url:{parsed.scheme}://{f'[{host}]' if ':' in host else host}:{connect_port(parsed)}"


@dataclass
class _Lane:
    in_flight: int = 0
    cap: int = 1                                         # as last asked for
    waiting: int = 0
    latency_ms: float | None = None                      # moving average of recent attempts
    parked: OrderedDict[str, None] = field(default_factory=OrderedDict)   # delivery ids, oldest first
    # Parked deliveries woken to take a waiter's place (release), not back in a slot or the waiting room yet: one
    # that finds no room when it comes back parks again at the front, where it was, not behind those that came
    # meanwhile.
    woken: OrderedDict[str, float] = field(default_factory=OrderedDict)    # id → when, oldest first
    freed: asyncio.Condition = field(default_factory=asyncio.Condition)


class Lanes:
    def __init__(self, *, fast_ms: float = FAST_MS, wait_seconds: float = WAIT_SECONDS) -> None:
        self._lanes: dict[str, _Lane] = {}
        # The recent latency of lanes forgotten while idle, newest last (at most MAX_LANES): a lane whose every
        # attempt here finds the store's slots held elsewhere is idle between them, and must stay known as quick.
        self._timings: OrderedDict[str, float] = OrderedDict()
        self.fast_ms = fast_ms
        self.wait_seconds = wait_seconds

    def in_flight(self, key: str) -> int:
        lane = self._lanes.get(key)
        return 0 if lane is None else lane.in_flight

    def parked(self, key: str) -> int:
        lane = self._lanes.get(key)
        return 0 if lane is None else len(lane.parked)

    async def acquire(self, key: str, cap: int, *, may_wait: bool = True, delivery_id: str | None = None) -> bool:
        """Take a slot of `key`; False if none came free. A delivery that gets a slot is no longer parked."""
        lane = self._lane(key)
        lane.cap = cap
        if lane.in_flight < cap:
            return self._take(lane, delivery_id)
        if not (may_wait and self.quick(key) and lane.waiting < cap):
            return False
        if delivery_id is not None:
            lane.parked.pop(delivery_id, None)      # waiting now (its own timer brought it): not to be woken
            lane.woken.pop(delivery_id, None)
        lane.waiting += 1
        try:
            async with lane.freed:
                await asyncio.wait_for(lane.freed.wait_for(lambda: lane.in_flight < cap), self.wait_seconds)
                return self._take(lane, delivery_id)
        except TimeoutError:
            return False
        finally:
            lane.waiting -= 1
            self._forget_if_idle(key, lane)

    def _take(self, lane: _Lane, delivery_id: str | None) -> bool:
        lane.in_flight += 1
        if delivery_id is not None:
            lane.parked.pop(delivery_id, None)
            lane.woken.pop(delivery_id, None)
        return True

    def quick(self, key: str, *, unknown: bool = True) -> bool:
        """Whether `key` answers quickly enough that a short wait for its slot pays; `unknown` when no attempt of
        it has been timed yet (or it was forgotten while idle)."""
        lane = self._lanes.get(key)
        latency = lane.latency_ms if lane is not None else self._timings.get(key)
        if latency is None:
            return unknown
        return latency < self.fast_ms

    def _lane(self, key: str) -> _Lane:
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(latency_ms=self._timings.pop(key, None))
        return lane

    def park(self, key: str, delivery_id: str) -> bool:
        """Remember a delivery that found no slot, to hand it the next one that frees up.

        False if a slot is free by now (it freed while the delivery was deciding): try again instead.
        """
        lane = self._lane(key)
        if lane.in_flight < lane.cap:
            return False
        lane.parked[delivery_id] = None
        if lane.woken.pop(delivery_id, None) is not None:     # woken for a place it did not find: first again
            lane.parked.move_to_end(delivery_id, last=False)
        return True

    def next_parked(self, key: str) -> str | None:
        """The oldest parked delivery, if the lane has a free slot for it (the last hand-off found nobody)."""
        lane = self._lanes.get(key)
        if lane is None or not lane.parked or lane.in_flight >= lane.cap:
            return None
        delivery_id, _ = lane.parked.popitem(last=False)
        return delivery_id

    async def release(self, key: str, latency_ms: float | None = None, *, refill: bool = True) -> str | None:
        """Free a slot: to a delivery waiting for one, if any. Returns the oldest parked delivery, to be woken (its job
        made due now) whether or not one was waiting: it then takes the place of the waiter that got the slot, or
        the slot itself. Woken only when nobody waited, it started its way back through the job queue (a claim, a
        run, the store's reads) only once the waiters had run out, and the lane's slots stood empty meanwhile: with
        one subscription and a backlog, 734-1,110 deliveries/s (median 947) before, 976-1,231 (median 1,187) after
        (bench.fanout, six alternating pairs, faster in every one). Counting the woken ones against the waiting
        room (no more on their way than it has places) took the gain back: 955 / 978 / 1,002 against 958 / 963 /
        783 in three pairs. `refill` False: only the freed slot is handed on (where a woken delivery could not use
        the room: every replica's slot of the subscriber is held elsewhere)."""
        lane = self._lanes.get(key)
        if lane is None:
            return None
        lane.in_flight -= 1
        if latency_ms is not None:
            lane.latency_ms = latency_ms if lane.latency_ms is None else 0.7 * lane.latency_ms + 0.3 * latency_ms
        wake = None
        if lane.waiting:
            async with lane.freed:
                lane.freed.notify(1)
            # The waiter leaves the room for the slot: a parked delivery comes to take its place. One woken that
            # has not come back within the wait (settled meanwhile: it never will) is forgotten.
            now = asyncio.get_running_loop().time()
            while lane.woken and next(iter(lane.woken.values())) < now - self.wait_seconds:
                lane.woken.popitem(last=False)
            if refill and lane.parked:
                wake, _ = lane.parked.popitem(last=False)
                lane.woken[wake] = now
        elif lane.parked:
            wake, _ = lane.parked.popitem(last=False)
        self._forget_if_idle(key, lane)
        return wake

    def _forget_if_idle(self, key: str, lane: _Lane) -> None:
        # Keys come and go (task webhook origins): keep only lanes in use, and a slow key whole (its latency
        # decides that its deliveries park); a quick one forgotten keeps its latency in _timings.
        if lane.in_flight <= 0 and lane.waiting <= 0 and not lane.parked and (
                lane.latency_ms is None or lane.latency_ms < self.fast_ms or len(self._lanes) > MAX_LANES):
            self._lanes.pop(key, None)
            if lane.latency_ms is not None:
                self._timings[key] = lane.latency_ms
                self._timings.move_to_end(key)
                while len(self._timings) > MAX_LANES:
                    self._timings.popitem(last=False)


class SharedReleases:
    """Waits for a slot of a key held in the store (replicas: relay.store's lane slots) to be given back by any
    process; `freed` is the store's on_lane_freed callback, told each release by the lane's notice."""

    def __init__(self) -> None:
        self._watching: dict[str, set[asyncio.Event]] = {}      # lane notice → the waits for it

    def freed(self, notice: str | None) -> None:
        """A slot of the lane with this notice was given back (None: of any lane, as far as anyone knows)."""
        watchers = self._watching.get(notice, ()) if notice is not None else [
            event for events in self._watching.values() for event in events]
        for event in watchers:
            event.set()

    def watchers(self, key: str) -> int:
        """How many wait for a slot of `key` now."""
        return len(self._watching.get(lane_notice(key), ()))

    @contextlib.contextmanager
    def watch(self, key: str) -> Iterator[asyncio.Event]:
        """An event set on each release of `key` while inside (clear it before each look at the store: a release
        between that look and the wait then still ends the wait)."""
        notice = lane_notice(key)
        event = asyncio.Event()
        self._watching.setdefault(notice, set()).add(event)
        try:
            yield event
        finally:
            events = self._watching.get(notice)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._watching[notice]
