"""In-process relay (tests.harness) plus a subscriber sink on a real socket, and helpers to make events.

Events are made straight through the store (a task row, then transitions), so
a test controls exactly which events exist; the worker is drained by hand and
time is a ManualClock started at the real time (so the `standardwebhooks`
library, which checks timestamps against the real clock, verifies first
attempts; later ones are checked with `Received.signed_by`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay import ids
from relay.clock import Clock, ManualClock
from relay.deliveries.service import DeliveryService
from relay.models import Task, TaskStatus
from relay.states import Transition
from tests.harness import Harness, harness
from tests.sink import Sink

EVENT_FOR = {"task.queued": TaskStatus.QUEUED, "task.running": TaskStatus.RUNNING,
             "task.failed": TaskStatus.FAILED, "task.canceled": TaskStatus.CANCELED}


@dataclass
class DeliveryHarness:
    h: Harness
    sink: Sink
    clock: Clock

    @property
    def service(self) -> DeliveryService:
        assert self.h.runtime.deliveries is not None
        return self.h.runtime.deliveries

    async def subscribe(self, path: str, *, status: int = 201, **body: Any) -> dict[str, Any]:
        body.setdefault("url", self.sink.url(path))
        response = await self.h.api.post("/v1/subscriptions", json=body)
        assert response.status_code == status, response.text
        return dict(response.json())

    async def task(self, *, webhook_url: str | None = None, webhook_events: list[str] | None = None) -> str:
        """A task row (no jobs): events are made with `emit`."""
        now = self.clock.now()
        task = Task(id=ids.new_id("tsk", now), provider="evolink", request={"prompt": "p", "n": 1},
                    webhook_url=webhook_url, webhook_events=webhook_events, created_at=now, updated_at=now)
        await self.h.runtime.store.create_task(task, [])
        return task.id

    async def emit(self, task_id: str, event: str = "task.queued") -> str:
        """Write one transition of the task (and so one event, fanned out); returns the event id."""
        status = EVENT_FOR[event]
        applied = await self.h.runtime.store.apply(task_id, lambda t: Transition(status, event), self.clock.now())
        assert applied is not None
        return applied.event.id

    async def deliveries(self, **params: Any) -> list[dict[str, Any]]:
        response = await self.h.api.get("/v1/deliveries", params={"limit": 200, **params})
        assert response.status_code == 200, response.text
        return list(response.json()["data"])

    async def delivery(self, delivery_id: str) -> dict[str, Any]:
        response = await self.h.api.get(f"/v1/deliveries/{delivery_id}")
        assert response.status_code == 200, response.text
        return dict(response.json())

    async def drain(self) -> int:
        return await self.h.runtime.worker.drain()

    async def advance(self, seconds: float) -> int:
        """Move time on and run whatever became due."""
        assert isinstance(self.clock, ManualClock)
        self.clock.advance(seconds)
        return await self.drain()


@contextlib.asynccontextmanager
async def delivery_harness(tmp_path: Path, *, sink: Sink | None = None, run_worker: bool = False,
                           clock: Clock | None = None, **env: str) -> AsyncIterator[DeliveryHarness]:
    sink = sink or Sink()
    clock = clock or ManualClock(start=time.time())
    env.setdefault("RELAY_DELIVERIES_TIMEOUT", "2")
    async with sink.serving(), harness(tmp_path, run_worker=run_worker, clock=clock, **env) as h:
        yield DeliveryHarness(h=h, sink=sink, clock=clock)
