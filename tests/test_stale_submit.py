"""A submit after a provider pause is not lost to a stale pooled connection (issue 8, 6d).

A provider (or the load balancer in front of it) gives up idle keep-alive
connections. When relay's next request goes out on such a connection before
relay can see it closed, the request fails after it was sent: a fetch is
simply retried, but a submit may have reached the provider and is not resent,
so the task used to fail as `submit_outcome_unknown`.

These tests run relay's runtime (guarded transport, real sockets) against a
small HTTP/1.1 server speaking just enough of the EvoLink (non-idempotent) and
APIMart (Idempotency-Key) dialects. The server keeps connections alive and
gives an idle one up after a short idle period, in one of two ways:

    fin     closes it (FIN). The client's pool notices the closed idle socket and
            drops it before reuse, so this case worked before the fix too.
    unseen  gives it up without relay being able to see it yet (its close crossed
            the next request on the wire, or a middlebox dropped the flow): it
            reports the connection closed, then resets it, unread, when bytes arrive.
            That is the failure mode: `test_the_server_strands_a_pooled_connection`
            shows a reused connection fails there after sending.

Every wait is on a condition (the server reporting the close), never a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay import ids
from relay.clock import ManualClock
from relay.fastclient import guarded_client
from relay.models import Job, Task
from relay.netguard import NetGuard
from relay.runtime import Runtime, open_runtime
from tests.harness import settings_for

IDLE = 0.2      # seconds the server keeps an idle connection


@dataclass
class Seen:
    conn: int
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class IdleClosingServer:
    """HTTP/1.1 with keep-alive over asyncio.start_server; idle connections are given up after IDLE seconds."""

    mode: str = "unseen"                                   # fin | unseen (see the module docstring)
    idle: float = IDLE                                     # seconds before an idle connection is given up
    requests: list[Seen] = field(default_factory=list)
    given_up: list[int] = field(default_factory=list)      # connections the server gave up while idle
    reset: list[int] = field(default_factory=list)         # given-up connections reset when bytes arrived
    client_closed: list[int] = field(default_factory=list) # connections the client closed itself
    port: int = 0
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _conns: int = 0
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)

    def submits(self, dialect: str) -> list[Seen]:
        return [r for r in self.requests if r.method == "POST" and r.path == f"/{dialect}/v1/images/generations"]

    async def wait(self, what: str, predicate: Any, timeout: float = 5.0) -> None:
        """Wait until `predicate()` holds; the server notifies on every change."""
        async with asyncio.timeout(timeout):
            async with self._changed:
                await self._changed.wait_for(predicate)
        assert predicate(), what

    async def _note(self, bucket: list[int], conn: int) -> None:
        async with self._changed:
            bucket.append(conn)
            self._changed.notify_all()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        self._conns += 1
        conn = self._conns
        self._writers.append(writer)
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.idle)
                except TimeoutError:
                    await self._give_up(conn, reader, writer)
                    return
                except (asyncio.IncompleteReadError, ConnectionError):
                    await self._note(self.client_closed, conn)
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                async with self._changed:
                    self.requests.append(Seen(conn, method, path, headers))
                    self._changed.notify_all()
                status, answer = respond(method, path, body)
                payload = json.dumps(answer).encode()
                writer.write(f"HTTP/1.1 {status} OK\r\ncontent-type: application/json\r\n"
                             f"content-length: {len(payload)}\r\n\r\n".encode() + payload)
                await writer.drain()
        finally:
            writer.close()

    async def _give_up(self, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "fin":
            writer.close()
            await self._note(self.given_up, conn)
            return
        await self._note(self.given_up, conn)
        if await reader.read(1):          # the client sent something on the connection given up: reset it
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            await self._note(self.reset, conn)

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[IdleClosingServer]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(server.sockets[0].getsockname()[1])
        try:
            yield self
        finally:
            server.close()
            for writer in self._writers:
                writer.close()          # every handler sees EOF and returns by itself
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await server.wait_closed()

    def url(self, dialect: str) -> str:
        return f"http://127.0.0.1:{self.port}/{dialect}"


def respond(method: str, path: str, body: bytes) -> tuple[int, Any]:
    """Just enough of EvoLink and APIMart: a submit makes task-1, a fetch says it is processing."""
    if path.startswith("/evolink/"):
        if method == "POST":
            return 200, {"id": "task-unified-1", "status": "pending", "progress": 0}
        return 200, {"id": path.rsplit("/", 1)[-1], "status": "processing", "progress": 10}
    if path.startswith("/apimart/"):
        if method == "POST":
            return 200, {"code": 200, "data": [{"task_id": "task-1", "status": "submitted"}]}
        return 200, {"code": 200, "data": {"id": path.rsplit("/", 1)[-1], "status": "processing"}}
    return 404, {"error": {"message": "no such route"}}


@contextlib.asynccontextmanager
async def relay_against(server: IdleClosingServer, tmp_path: Path) -> AsyncIterator[Runtime]:
    """relay's runtime with its real guarded network; EvoLink and APIMart are the test server."""
    settings = settings_for(tmp_path, RELAY_PROVIDERS_EVOLINK_BASE_URL=server.url("evolink"),
                            RELAY_PROVIDERS_APIMART_BASE_URL=server.url("apimart"))
    async with open_runtime(settings, clock=ManualClock(start=time.time())) as runtime:
        yield runtime


async def new_task(runtime: Runtime, provider: str) -> str:
    """A task row with its submit job, as POST /v1/tasks writes them."""
    now = runtime.ctx.clock.now()
    task = Task(id=ids.new_id("tsk", now), provider=provider, request={"prompt": "a lighthouse", "n": 1},
                created_at=now, updated_at=now, deadline_at=now + 3600)
    await runtime.store.create_task(task, [Job(id=ids.new_id("job", now), kind="submit", task_id=task.id,
                                               run_at=now, dedupe_key=f"submit:{task.id}")])
    return task.id


async def test_the_server_strands_a_pooled_connection(tmp_path: Path) -> None:
    """Control: in `unseen` mode a request reusing the idle pooled connection fails after it was sent."""
    async with IdleClosingServer(mode="unseen").serving() as server, \
            guarded_client(NetGuard(["127.0.0.0/8"])) as client:
        assert (await client.get(server.url("evolink") + "/v1/tasks/t0")).status_code == 200
        await server.wait("the idle connection given up", lambda: server.given_up == [1])
        with pytest.raises((httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)):
            await client.post(server.url("evolink") + "/v1/images/generations", json={"prompt": "p"})
        assert server.reset == [1] and server.submits("evolink") == []


@pytest.mark.parametrize("mode", ["unseen", "fin"])
async def test_a_submit_after_a_pause_goes_out_once_on_a_fresh_connection(tmp_path: Path, mode: str) -> None:
    """EvoLink has no idempotency key: after a poll and a pause the submit job still submits, exactly once,
    on a new connection that relay closes after the answer (never one that sat idle in a pool)."""
    async with IdleClosingServer(mode=mode).serving() as server, relay_against(server, tmp_path) as runtime:
        evolink = runtime.ctx.providers["evolink"]
        assert not evolink.caps.idempotent_submit
        await evolink.fetch("task-unified-0")                       # a poll leaves a pooled connection idle
        await server.wait("the idle connection given up", lambda: server.given_up == [1])
        # From here the server keeps idle connections open (longer than any wait below), so whatever closes
        # the submit's connection is relay, however slow a loaded machine makes the steps in between.
        server.idle = 60.0
        task_id = await new_task(runtime, "evolink")
        await runtime.worker.drain()
        task = await runtime.store.get_task(task_id)
        assert task is not None
        assert task.error is None, task.error
        assert task.status.value == "queued" and task.provider_task_id == "task-unified-1"
        [submit] = server.submits("evolink")
        assert submit.conn == 2 and server.reset == []
        await server.wait("relay to close the submit's connection", lambda: 2 in server.client_closed)


async def test_an_idempotent_submit_on_a_stale_connection_is_resent_with_the_same_key(tmp_path: Path) -> None:
    """APIMart dedupes by Idempotency-Key, so its submits share the pooled connections: one that went
    stale fails the first attempt after sending, the job retries, and the resend carries the same key."""
    async with IdleClosingServer(mode="unseen").serving() as server, relay_against(server, tmp_path) as runtime:
        apimart = runtime.ctx.providers["apimart"]
        assert apimart.caps.idempotent_submit and apimart.submit_http is apimart.http
        await apimart.fetch("task-0")
        await server.wait("the idle connection given up", lambda: server.given_up == [1])
        server.idle = 60.0      # the retry's new connection is kept, however long relay takes to send on it
        task_id = await new_task(runtime, "apimart")
        await runtime.worker.drain()                  # the first attempt: sent on the stale connection, reset
        assert server.reset == [1] and server.submits("apimart") == []
        task = await runtime.store.get_task(task_id)
        assert task is not None and task.status.value == "pending" and task.error is None
        assert task.submit_started_at is not None     # it may have been sent: the mark stays
        assert isinstance(runtime.ctx.clock, ManualClock)
        runtime.ctx.clock.advance(1.0)                # past the worker's retry backoff
        await runtime.worker.drain()
        task = await runtime.store.get_task(task_id)
        assert task is not None
        assert task.error is None, task.error
        assert task.status.value == "queued" and task.provider_task_id == "task-1"
        [submit] = server.submits("apimart")
        assert submit.headers["idempotency-key"] == task_id
