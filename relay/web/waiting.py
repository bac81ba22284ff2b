"""Waiting for a task to end within a request (the OpenAI-shaped endpoints answer only once it has)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from starlette.requests import Request

from relay.errors import NotFound
from relay.models import Event, Task, TaskStatus
from relay.web.common import runtime_of

MAX_POLL_INTERVAL = 2.0     # seconds between reads of the task when no in-process signal comes (other replicas)
# Requests one process lets wait at once: each holds a connection and reads its task every few seconds, so
# without a bound a client could hold the API (and the database) with idle waits. Past it, a 429 before any
# task is made.
MAX_WAITERS = 512


class TaskWaiter:
    """Wakes requests waiting on a task when this process records its end (Store.on_task_status); reads the
    task again with a growing interval as well, for a task that another replica or worker process finishes."""

    def __init__(self, limit: int = MAX_WAITERS) -> None:
        self._waiting: dict[str, set[asyncio.Event]] = {}
        self.limit = limit
        self.count = 0              # requests admitted and not yet answered

    @property
    def full(self) -> bool:
        return self.count >= self.limit

    @contextlib.contextmanager
    def admitted(self) -> Iterator[bool]:
        """Whether one more request may wait (True: it holds a place until the block ends)."""
        if self.full:
            yield False
            return
        self.count += 1
        try:
            yield True
        finally:
            self.count -= 1

    def told(self, task: Task, status: TaskStatus, event: Event | None) -> None:
        if status.terminal:
            for signal in self._waiting.get(task.id, ()):
                signal.set()

    async def wait(self, request: Request, task_id: str, timeout: float) -> Task:
        """The task once terminal, or as it is when `timeout` runs out (or the client went away)."""
        store = runtime_of(request).store
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        signal = asyncio.Event()
        self._waiting.setdefault(task_id, set()).add(signal)
        interval = 0.1
        try:
            while True:
                task = await store.get_task(task_id)
                if task is None:
                    raise NotFound(f"no task {task_id!r}")
                remaining = deadline - loop.time()
                if task.status.terminal or remaining <= 0 or await request.is_disconnected():
                    return task
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(signal.wait(), min(interval, remaining))
                signal.clear()
                interval = min(interval * 2, MAX_POLL_INTERVAL)
        finally:
            waiting = self._waiting.get(task_id, set())
            waiting.discard(signal)
            if not waiting:
                self._waiting.pop(task_id, None)


def waiter_of(request: Request) -> TaskWaiter:
    """The app's one waiter, registered with the store on first use."""
    state = request.app.state
    waiter: TaskWaiter | None = getattr(state, "openai_waiter", None)
    if waiter is None:
        waiter = TaskWaiter()
        runtime_of(request).store.on_task_status(waiter.told)
        state.openai_waiter = waiter
    return waiter
