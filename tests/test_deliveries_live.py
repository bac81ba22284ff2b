"""Delivery with the worker running on the real clock, and the SSRF guard at connect time."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay import ids
from relay.clock import ManualClock, SystemClock
from relay.config import load_settings
from relay.deliveries.handler import DeliverHandler
from relay.deliveries.models import Keys, Subscription
from relay.deliveries.secrets import SecretBox
from relay.deliveries.service import DeliveryService
from relay.links import Signer
from relay.models import Job, Task, TaskStatus
from relay.netguard import NetGuard
from relay.states import Transition
from relay.store.sqlite import SQLiteStore
from tests.delivery_harness import delivery_harness
from tests.harness import wait_for
from tests.sink import Sink


@dataclass
class RefusedSubscriber:
    """One process's delivery service on SQLite with one subscription whose name turns private after it is made
    (every attempt is refused by the SSRF guard at once: no network needed), and a task of `events` transitions:
    their deliver jobs claimed."""

    store: SQLiteStore
    service: DeliveryService
    sub_id: str
    jobs: list[Job]


@contextlib.asynccontextmanager
async def refused_subscriber(tmp_path: Path, *, shared_lanes: bool,
                             events: int = 1) -> AsyncIterator[RefusedSubscriber]:
    answers = iter([["93.184.216.34"]])     # public when the subscription is made, then refused by the guard

    async def resolver(host: str, port: int) -> list[str]:
        return next(answers, ["10.0.0.5"])

    settings = load_settings(None, {"RELAY_NETWORK_ALLOW": "", "RELAY_STORAGE_DATA_DIR": str(tmp_path),
                                    "RELAY_DELIVERIES_CONCURRENCY_PER_SUBSCRIPTION": "1"})
    store = SQLiteStore(tmp_path / "relay.db")
    await store.open()
    clock = ManualClock()
    service = DeliveryService(settings, store, clock, guard=NetGuard((), resolver=resolver), signer=Signer("s" * 40),
                              box=SecretBox("k" * 32), task_secret="whsec_" + "A" * 43, shared_lanes=shared_lanes)
    try:
        from relay.validation import parse_subscription_input
        sub, _ = await service.create_subscription(
            parse_subscription_input({"url": "http://hooks.example/h"}, partial=False))
        now = clock.now()
        task = Task(id=ids.new_id("tsk", now), provider="evolink", request={"prompt": "p"}, created_at=now,
                    updated_at=now)
        await store.create_task(task, [])
        for status in (TaskStatus.QUEUED, TaskStatus.RUNNING)[:events]:
            await store.apply(task.id, lambda t, s=status: Transition(s, f"task.{s.value}"), now)
        jobs = await store.claim(now, limit=10, lease_seconds=30, kinds=["deliver"])
        yield RefusedSubscriber(store, service, sub.id, jobs)
    finally:
        await service.close()
        await store.close()


async def test_a_slow_subscriber_does_not_delay_a_fast_one(tmp_path: Path) -> None:
    """Cap 2: while one subscriber holds every request, it has 2 in flight, and another gets all 20 events at once."""
    # Worker slots are kept above the 40 jobs: a saturated Worker spins (see the report on relay/queue.py).
    # The slow subscriber's requests are held past the end of the test (a delivery timeout of 60 s): a fast
    # subscriber made to wait for them would wait that long, far beyond the bound below.
    async with delivery_harness(tmp_path, run_worker=True, clock=SystemClock(), RELAY_WORKER_CONCURRENCY="64",
                                RELAY_DELIVERIES_CONCURRENCY_PER_SUBSCRIPTION="2",
                                RELAY_DELIVERIES_TIMEOUT="60") as d:
        slow = await d.subscribe("/slow")
        fast = await d.subscribe("/fast")
        d.sink.default("/slow", hang=True)
        task_id = await d.task()
        started = time.time()
        events = [await d.emit(task_id) for _ in range(20)]

        async def fast_done() -> bool:
            return len(d.sink.delivered("/fast")) == 20
        await wait_for(fast_done, 20, "the fast subscriber to get all 20 events")
        took = max(r.at for r in d.sink.delivered("/fast")) - started
        assert took < 10.0, f"the fast subscriber waited {took:.2f} s"
        assert sorted(r.webhook_id for r in d.sink.delivered("/fast")) == sorted(events)
        assert all(r.verify(fast["secret"]) for r in d.sink.delivered("/fast"))
        assert d.sink.max_in_flight("/slow") <= 2
        assert d.service.lanes.in_flight(slow["id"]) == 2

        async def only_slow_left() -> bool:       # the slow subscriber's jobs, parked or in flight
            return await d.h.runtime.store.job_counts() == {"deliver:queued": 20}
        await wait_for(only_slow_left, 5, "only the slow subscriber's 20 jobs to be left")
        d.sink.release()


async def test_connect_time_guard_refuses_a_name_that_turned_private(tmp_path: Path) -> None:
    """DNS rebinding: a name public at registration and 10.x when sending is refused at connect (no request),
    and the delivery fails at once: a refused address is policy, no retry would get through."""
    answers = iter([["93.184.216.34"]])

    async def resolver(host: str, port: int) -> list[str]:
        return next(answers, ["10.0.0.5"])

    settings = load_settings(None, {"RELAY_NETWORK_ALLOW": "", "RELAY_STORAGE_DATA_DIR": str(tmp_path)})
    store = SQLiteStore(tmp_path / "relay.db")
    await store.open()
    clock = ManualClock()
    service = DeliveryService(settings, store, clock, guard=NetGuard((), resolver=resolver),
                              signer=Signer("s" * 40), box=SecretBox("k" * 32), task_secret="whsec_" + "A" * 43)
    try:
        from relay.validation import parse_subscription_input
        sub, _ = await service.create_subscription(parse_subscription_input({"url": "http://rebind.example/h"},
                                                                            partial=False))
        now = clock.now()
        task = Task(id=ids.new_id("tsk", now), provider="evolink", request={"prompt": "p"}, created_at=now,
                    updated_at=now, webhook_url="http://10.9.9.9/hook")
        await store.create_task(task, [])
        await store.apply(task.id, lambda t: Transition(TaskStatus.QUEUED, "task.queued"), now)
        jobs = await store.claim(now, limit=10, lease_seconds=30, kinds=["deliver"])
        handler = DeliverHandler(service)
        for job in jobs:
            assert await handler.run(job) is None          # settled: not scheduled again
        found, _ = await store.list_deliveries(subscription_id=None, status=None, task_id=None, event_id=None,
                                               limit=10, cursor=None)
        assert len(found) == 2
        for delivery in found:
            assert delivery.status == "failed" and delivery.last_status_code is None and delivery.attempts == 1
            assert delivery.next_attempt_at is None
            assert delivery.last_error is not None and delivery.last_error.startswith("blocked_address"), delivery
        assert sub.id
    finally:
        await service.close()
        await store.close()


async def test_secrets_never_reach_the_logs(tmp_path: Path, caplog: object) -> None:
    """Creating, rotating and delivering log nothing that contains a secret."""
    import logging

    import pytest
    assert isinstance(caplog, pytest.LogCaptureFixture)
    caplog.set_level(logging.DEBUG)
    sink = Sink()
    async with delivery_harness(tmp_path, sink=sink) as d:
        sub = await d.subscribe("/a")
        new = (await d.h.api.post(f"/v1/subscriptions/{sub['id']}/rotate-secret")).json()
        d.sink.fail("/a", 1)
        await d.emit(await d.task())
        await d.drain()
        await d.advance(10)
        stored = await d.h.runtime.store.get_subscription(sub["id"])
        assert stored is not None and isinstance(d.service.keys_of(stored), Keys)
        assert isinstance(stored, Subscription) and len(d.sink.delivered("/a")) == 1
    text = caplog.text
    for secret in (sub["secret"], new["secret"], sub["secret"][6:], new["secret"][6:]):
        assert secret not in text


async def test_a_shared_slot_the_database_fails_to_give_leaves_the_process_lane_free(tmp_path: Path) -> None:
    """Replicas (shared lanes): taking the subscriber's slot in the database raises (the database is down). The
    job fails to the worker's backoff, and this process's own lane is given back: with a cap of 1, the next run
    sends at once instead of finding its lane held forever and parking."""
    async with refused_subscriber(tmp_path, shared_lanes=True) as r:
        real_take = r.store.take_lane_slot

        async def down(*args: object, **kwargs: object) -> int | None:
            raise ConnectionError("the database went away")
        [job] = r.jobs
        handler = DeliverHandler(r.service)
        r.store.take_lane_slot = down  # type: ignore[method-assign]
        with pytest.raises(ConnectionError):
            await handler.run(job)
        r.store.take_lane_slot = real_take  # type: ignore[method-assign]
        assert await handler.run(job) is None, "the lane was still held: the delivery parked"
        [delivery] = (await r.store.list_deliveries(subscription_id=None, status=None, task_id=None, event_id=None,
                                                    limit=10, cursor=None))[0]
        assert delivery.status == "failed" and delivery.attempts == 1


async def test_the_shared_slot_goes_back_with_the_record_or_alone_when_the_record_fails(tmp_path: Path) -> None:
    """Replicas (shared lanes): the subscriber's slot in the database is given back with the attempt's record. When
    recording raises (the database went away after the send), the slot is given back on its own: the next run, or
    another replica, finds it free at once rather than after the slot's lease (2 × timeout + 10 s)."""
    async with refused_subscriber(tmp_path, shared_lanes=True, events=2) as r:
        store, now = r.store, time.time()
        real_record = store.record_attempt

        async def down(*args: object, **kwargs: object) -> None:
            raise ConnectionError("the database went away")
        first, second = r.jobs
        handler = DeliverHandler(r.service)
        store.record_attempt = down  # type: ignore[method-assign]
        with pytest.raises(ConnectionError):
            await handler.run(first)
        store.record_attempt = real_record  # type: ignore[method-assign]
        assert await store.take_lane_slot(r.sub_id, 1, "dlv_probe", now, 30.0) == 0, "the slot was still held"
        await store.release_lane_slot(r.sub_id, 0, "dlv_probe")
        assert await handler.run(second) is None, "the lane was still held: the delivery parked"
        assert await store.take_lane_slot(r.sub_id, 1, "dlv_probe", now, 30.0) == 0, "not given back with the record"
        [done] = [d for d in (await store.list_deliveries(subscription_id=r.sub_id, status=None, task_id=None,
                                                          event_id=None, limit=10, cursor=None))[0]
                  if d.id == second.payload["delivery_id"]]
        assert done.status == "failed" and done.attempts == 1


async def test_without_shared_lanes_the_lane_is_free_while_the_attempt_is_recorded(tmp_path: Path) -> None:
    """One process (SQLite): the subscriber's lane is given back as soon as the answer is in, not after the record
    (which waits for the store's one writer): the next delivery to it goes out meanwhile."""
    import asyncio
    async with refused_subscriber(tmp_path, shared_lanes=False) as r:
        real_record = r.store.record_attempt
        recording, go_on = asyncio.Event(), asyncio.Event()

        async def slow_record(*args: object, **kwargs: object) -> object:
            recording.set()
            await go_on.wait()
            return await real_record(*args, **kwargs)  # type: ignore[arg-type]
        [job] = r.jobs
        r.store.record_attempt = slow_record  # type: ignore[method-assign]
        running = asyncio.create_task(DeliverHandler(r.service).run(job))
        await asyncio.wait_for(recording.wait(), 10)
        assert r.service.lanes.in_flight(r.sub_id) == 0, "the lane was held through the record"
        go_on.set()
        assert await asyncio.wait_for(running, 10) is None
