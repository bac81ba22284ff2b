"""EvoLink-style callbacks: POST the task body to `callback_url` when the task ends.

Scheduled at creation for creation + duration, so completion is noticed with
no poll. Each delivery gets one try plus a retry after each configured delay
(1, 2, 4 s by default) on a non-2xx answer, a timeout or a connection error.
The callback knobs are read when the task is created, so a test sets them and
then submits. Every attempt is recorded on the task and in `log`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from relay.logs import redact_url

from .respond import wait_until

if TYPE_CHECKING:
    from .sim import Simulator
    from .tasks import SimTask

log = logging.getLogger("relay.simulator.callbacks")

BodyFn = Callable[["SimTask", float], dict[str, Any]]

# When the stale body is taken from: mid-run, so it says `processing`.
STALE_AT = 0.65


def wrong_token(url: str) -> str:
    """The same URL with the last path segment's last character changed (same length, wrong)."""
    parts = urlsplit(url)
    head, _, segment = parts.path.rpartition("/")
    if segment:
        segment = segment[:-1] + ("A" if segment[-1] != "A" else "B")
    else:
        segment = "wrong-token"
    return urlunsplit(parts._replace(path=f"{head}/{segment}"))


class CallbackSender:
    def __init__(self, sim: Simulator) -> None:
        self._sim = sim
        self._tasks: set[asyncio.Task[None]] = set()
        self._client: httpx.AsyncClient | None = None
        self.log: list[dict[str, Any]] = []

    def schedule(self, task: SimTask, body: BodyFn) -> None:
        """Start the background sender for `task` (call once, at creation)."""
        job = asyncio.get_running_loop().create_task(self._run(task, body))
        self._tasks.add(job)
        job.add_done_callback(self._tasks.discard)

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def cancel_all(self) -> None:
        jobs = list(self._tasks)
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)

    async def aclose(self) -> None:
        await self.cancel_all()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            # verify=False: local https receivers use self-signed certificates.
            self._client = httpx.AsyncClient(verify=False, follow_redirects=False, trust_env=False,
                                             timeout=self._sim.config.callback_timeout,
                                             transport=self._sim.config.callback_transport)
        return self._client

    async def _run(self, task: SimTask, body: BodyFn) -> None:
        knobs = task.callback_knobs
        stats = self._sim.stats
        # Not before done_at by the simulator's clock (asyncio timers may fire a little early): a callback
        # saying "completed" while a confirmation poll still says "processing" would contradict itself.
        await wait_until(task.done_at + float(knobs.get("delay", 0)), self._sim.now)
        if knobs.get("drop") or task.directives.callback == "drop":
            stats.bump(task.dialect, "callbacks_dropped")
            return
        url = task.callback_url or ""
        if knobs.get("wrong_token"):
            url = wrong_token(url)
        final = body(task, max(self._sim.now(), task.done_at))
        for copy in range(int(knobs.get("duplicate", 1))):
            await self._deliver(task, url, final, "final", copy)
        if knobs.get("reorder"):
            # A late, stale update: what a provider's delayed retry of an old event looks like.
            stale = body(task, task.created + STALE_AT * task.duration)
            await self._deliver(task, url, stale, "stale", 0)

    async def _deliver(self, task: SimTask, url: str, payload: dict[str, Any], kind: str, copy: int) -> None:
        delays = (0.0, *self._sim.config.callback_retry_delays)
        for attempt, wait in enumerate(delays):
            if wait:
                await asyncio.sleep(wait)
            record: dict[str, Any] = {
                "url": url, "kind": kind, "copy": copy, "attempt": attempt,
                "at": self._sim.now(), "body_status": payload.get("status"),
                "status_code": None, "error": None,
            }
            try:
                response = await self._http().post(url, json=payload, headers={"User-Agent": "EvoLink-Callback/sim"})
                record["status_code"] = response.status_code
                ok = 200 <= response.status_code < 300
            except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
                record["error"] = f"{type(exc).__name__}: {exc}"[:300]
                ok = False
            record["elapsed"] = round(self._sim.now() - record["at"], 4)
            task.callbacks.append(record)
            self.log.append({"task_id": task.id, **record})
            self._sim.stats.bump(task.dialect, "callbacks")
            if ok:
                return
            self._sim.stats.bump(task.dialect, "callback_failures")
        log.info("callback for %s to %s gave up after %d attempts", task.id, redact_url(url), len(delays))
