"""In-process relay + simulator for tests: real app objects in one process and event loop.

The simulator listens on a real socket of 127.0.0.1 (relay downloads images with aiohttp, which has no
in-process transport; see relay.fastclient), on one port for every harness of the test process; relay's
app is reached in process (ASGI transports) by the tests and by the simulator's callbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from relay.clock import Clock
from relay.config import PROVIDER_KINDS, load_settings
from relay.runtime import Runtime, open_runtime
from relay.simulator import SimulatorConfig, create_simulator_app
from relay.web.app import create_app
from tests.serving import serving

API_KEY = "rk_test_0123456789abcdefghij"


def _sim_port(seed: int) -> int:
    """A port for a simulator: below the kernel's ephemeral range (32768 and up), so no outgoing connection
    ever holds it between two harnesses; picked per process, so parallel runs differ."""
    rng = random.Random(seed)
    for _ in range(500):
        port = rng.randrange(20000, 32000)
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port for the simulator")


SIM_PORT = _sim_port(os.getpid())
SIM = f"http://127.0.0.1:{SIM_PORT}"     # the simulator of the (outermost) harness
_serving: set[int] = set()               # ports this process's harnesses serve a simulator on right now


@dataclass
class Harness:
    runtime: Runtime
    api: httpx.AsyncClient       # relay's HTTP API, authenticated
    sim: httpx.AsyncClient       # the simulator (control endpoints)

    async def create(self, **body: Any) -> dict[str, Any]:
        response = await self.api.post("/v1/tasks", json=body)
        assert response.status_code == 202, response.text
        return dict(response.json())

    async def task(self, task_id: str) -> dict[str, Any]:
        response = await self.api.get(f"/v1/tasks/{task_id}")
        assert response.status_code == 200, response.text
        return dict(response.json())

    async def wait_status(self, task_id: str, statuses: tuple[str, ...] = ("succeeded", "failed", "canceled"),
                          timeout: float = 15.0) -> dict[str, Any]:
        """Wait until the task reaches one of `statuses` (the worker runs in the background)."""
        last: dict[str, Any] = {}

        async def reached() -> bool:
            nonlocal last
            last = await self.task(task_id)
            return last["status"] in statuses
        await wait_for(reached, timeout, f"task {task_id} to reach {statuses} (last: {last.get('status')})")
        return last

    async def faults(self, **knobs: Any) -> None:
        response = await self.sim.post("/_sim/faults", json=knobs)
        assert response.status_code == 200, response.text


async def wait_for(predicate: Callable[[], Awaitable[bool] | bool], timeout: float, what: str) -> None:
    """Poll `predicate` (a coroutine function or a plain one) until true; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await _truth(predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def _truth(value: Awaitable[bool] | bool) -> bool:
    return bool(await value) if isinstance(value, Awaitable) else bool(value)


async def listed_events(store: Any, count: int, *, task_id: str | None = None, type: str | None = None,
                        timeout: float = 10.0) -> list[Any]:
    """store.list_events (oldest first, of the task and type if given) once it lists at least `count` events.

    Waited for, not read once: on PostgreSQL the log holds back events while a transaction that began before them
    may be open, and one of another database (another test's) that ends between a listing's snapshot and its look
    at pg_stat_activity counts as such (PostgresStore._visible_events: a delay, never a skipped event)."""
    found: list[Any] = []

    async def enough() -> bool:
        found[:] = await store.list_events(after=None, type=type, task_id=task_id, limit=max(1000, count))
        return len(found) >= count
    await wait_for(enough, timeout, f"{count} events listed")
    return found


def database_env(database: str) -> dict[str, str]:
    """The harness settings for a test's database (the `database` fixture: a SQLite path or a PostgreSQL DSN);
    PostgreSQL, a shared database, wants an explicit signing secret."""
    if database.startswith("postgresql"):
        return {"RELAY_STORAGE_DATABASE": database, "RELAY_AUTH_SIGNING_SECRET": "s" * 32}
    return {"RELAY_STORAGE_DATABASE": f"sqlite:///{database}"}


def settings_for(data_dir: Path, **env: str) -> Any:
    environ = {"RELAY_STORAGE_DATA_DIR": str(data_dir), "RELAY_AUTH_API_KEYS": API_KEY,
               "RELAY_POLLING_INITIAL_DELAY": "0.05", "RELAY_POLLING_MAX_DELAY": "0.2",
               "RELAY_WORKER_IDLE_POLL_SECONDS": "0.05", "RELAY_WORKER_RETRY_BASE": "0.05",
               "RELAY_WORKER_RETRY_CAP": "0.2", "RELAY_SERVER_PUBLIC_URL": "http://relay.test",
               # No housekeeping job: tests count the jobs their own work makes (tests/test_retention.py runs it).
               "RELAY_RETENTION_INTERVAL": "0", "RELAY_NETWORK_ALLOW": "127.0.0.0/8,::1/128,localhost"}
    for kind in PROVIDER_KINDS:
        environ[f"RELAY_PROVIDERS_{kind.upper()}_BASE_URL"] = f"{SIM}/{kind}"
        environ[f"RELAY_PROVIDERS_{kind.upper()}_RATE_LIMIT"] = "1000"
    environ.update(env)
    return load_settings(None, environ)


class _LateTransport(httpx.AsyncBaseTransport):
    """Forwards to a transport set after construction (the simulator is built before relay)."""

    inner: httpx.AsyncBaseTransport | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.inner is None:
            raise httpx.ConnectError("relay is not up yet", request=request)
        return await self.inner.handle_async_request(request)


@contextlib.asynccontextmanager
async def serving_simulator(app: Any, port: int) -> AsyncIterator[None]:
    """The simulator app on `port` (its lifespan run by uvicorn) for the duration of the block."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    _serving.add(port)
    try:
        async with serving(app, sock):
            yield
    finally:
        _serving.discard(port)


@contextlib.asynccontextmanager
async def harness(data_dir: Path, *, run_worker: bool = True, clock: Clock | None = None,
                  sim_duration: float = 0.05,
                  callback_path: Callable[[httpx.AsyncBaseTransport], httpx.AsyncBaseTransport] | None = None,
                  **env: str) -> AsyncIterator[Harness]:
    """relay + simulator in one process; `callback_path` can wrap the simulator → relay callback route."""
    relay_transport = _LateTransport()      # the relay app exists only later; callbacks go to it in process
    # A harness inside another (a second replica) gets a simulator of its own, on another port.
    port = SIM_PORT if SIM_PORT not in _serving else _sim_port(random.randrange(1 << 30))
    sim_url = f"http://127.0.0.1:{port}"
    sim_app = create_simulator_app(SimulatorConfig(public_url=sim_url, duration=sim_duration,
                                                   callback_retry_delays=(0.05, 0.1, 0.2),
                                                   callback_transport=relay_transport))
    settings = settings_for(data_dir, **{**{f"RELAY_PROVIDERS_{kind.upper()}_BASE_URL": f"{sim_url}/{kind}"
                                            for kind in PROVIDER_KINDS}, **env})
    async with serving_simulator(sim_app, port), open_runtime(settings, clock=clock) as runtime:
        app = create_app(runtime, run_worker=run_worker)
        relay_transport.inner = httpx.ASGITransport(app=app)
        if callback_path is not None:
            relay_transport.inner = callback_path(relay_transport.inner)
        async with app.router.lifespan_context(app), \
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://relay.test",
                                  headers={"authorization": f"Bearer {API_KEY}"}) as api, \
                httpx.AsyncClient(base_url=sim_url) as sim:
            yield Harness(runtime=runtime, api=api, sim=sim)
