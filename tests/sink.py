"""A subscriber for tests: records every webhook it gets and answers as scripted, over a real socket.

    sink = Sink()
    sink.script("/a", {"status": 503}, {"status": 503})    # the next two answers on /a, then the default
    sink.default("/slow", delay=2.0)                         # every answer on /slow after 2 s
    sink.script("/h", {"hang": True})                        # hold the request until sink.release()
    async with sink.serving():  ...                          # uvicorn in this event loop (in-process tests)
    with sink.serving_in_thread():  ...                      # uvicorn in a thread (tests driving processes)

A script entry may hold: status (default 200), body, headers, retry_after,
location, delay (seconds), hang (until release() or hang_limit). Each
request is recorded (path, headers, body, when, what was answered) before
it is answered, so a test can see a request that is still being held.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import uvicorn
from standardwebhooks.webhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from tests.serving import running


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float                      # time.time() when it arrived
    status: int                    # what the sink answered (or will answer, while held)

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]

    def verify(self, secret: str) -> Any:
        """Verify with the PyPI `standardwebhooks` library (real time, 5 min tolerance); returns the payload."""
        return Webhook(secret).verify(self.body, self.headers)

    def signed_by(self, secret: str) -> bool:
        """The `standardwebhooks` library's v1 signature for this message is among those sent (any timestamp).

        For tests that move a manual clock hours ahead, where `verify` would refuse the timestamp.
        """
        stamp = datetime.fromtimestamp(int(self.headers["webhook-timestamp"]), tz=timezone.utc)
        expected = Webhook(secret).sign(self.webhook_id, stamp, self.body.decode())
        return expected in self.headers["webhook-signature"].split(" ")


@dataclass
class _Paths:
    scripts: dict[str, deque[dict[str, Any]]] = field(default_factory=lambda: defaultdict(deque))
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    max_in_flight: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class Sink:
    def __init__(self, *, hang_limit: float = 60.0) -> None:
        self.received: list[Received] = []
        self.hang_limit = hang_limit
        self._paths = _Paths()
        self._lock = threading.Lock()
        self._released = threading.Event()
        self.port = 0
        self.app = Starlette(routes=[Route("/{path:path}", self._handle, methods=["POST", "GET", "PUT"])])

    # ---- scripting ----------------------------------------------------------------------------------
    def script(self, path: str, *answers: dict[str, Any]) -> None:
        """Answer the next requests on `path` with these, in order; then the default."""
        with self._lock:
            self._paths.scripts[path].extend(answers)

    def fail(self, path: str, times: int, status: int = 503, **extra: Any) -> None:
        self.script(path, *({"status": status, **extra} for _ in range(times)))

    def default(self, path: str, **answer: Any) -> None:
        """How `path` answers once its script is used up (initially 200)."""
        with self._lock:
            self._paths.defaults[path] = answer

    def release(self) -> None:
        """Let every held ("hang") request answer, now and from now on."""
        self._released.set()

    def url(self, path: str) -> str:
        assert self.port, "the sink is not serving"
        return f"http://127.0.0.1:{self.port}{path}"

    # ---- reading ------------------------------------------------------------------------------------
    def on(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.path == path]

    def delivered(self, path: str) -> list[Received]:
        """Requests on `path` that were answered 2xx."""
        return [r for r in self.on(path) if 200 <= r.status < 300]

    def max_in_flight(self, path: str) -> int:
        with self._lock:
            return self._paths.max_in_flight[path]

    def in_flight(self, path: str) -> int:
        with self._lock:
            return self._paths.in_flight[path]

    # ---- serving ------------------------------------------------------------------------------------
    async def _handle(self, request: Request) -> Response:
        try:
            body = await request.body()
        except ClientDisconnect:      # the sender died mid-request (relay SIGKILLed): nothing arrived
            return Response(status_code=400)
        path = request.url.path
        with self._lock:
            queue = self._paths.scripts[path]
            answer = queue.popleft() if queue else dict(self._paths.defaults.get(path, {}))
            record = Received(path=path, headers=dict(request.headers), body=body, at=time.time(),
                              status=int(answer.get("status", 200)))
            self.received.append(record)
            self._paths.in_flight[path] += 1
            self._paths.max_in_flight[path] = max(self._paths.max_in_flight[path], self._paths.in_flight[path])
        try:
            if answer.get("hang"):
                deadline = time.monotonic() + self.hang_limit
                while not self._released.is_set() and time.monotonic() < deadline:
                    if await request.is_disconnected():
                        break               # the sender gave up (its timeout): no longer in flight
                    await asyncio.sleep(0.01)
            if answer.get("delay"):
                await asyncio.sleep(float(answer["delay"]))
        finally:
            with self._lock:
                self._paths.in_flight[path] -= 1
        headers = dict(answer.get("headers", {}))
        if "retry_after" in answer:
            headers["retry-after"] = str(answer["retry_after"])
        if "location" in answer:
            headers["location"] = str(answer["location"])
        return Response(answer.get("body", "ok"), status_code=record.status, headers=headers)

    def _server(self) -> tuple[uvicorn.Server, socket.socket]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off", ws="none",
                                timeout_graceful_shutdown=1, timeout_keep_alive=30)
        server = uvicorn.Server(config)
        # The test process owns its signals: uvicorn must not take SIGINT/SIGTERM over.
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
        return server, sock

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[Sink]:
        """Serve on 127.0.0.1 (a free port) in the running event loop."""
        server, sock = self._server()
        try:
            async with running(server, sock):
                yield self
        finally:
            self.release()

    @contextlib.contextmanager
    def serving_in_thread(self) -> Iterator[Sink]:
        """Serve on 127.0.0.1 (a free port) from a background thread with its own event loop."""
        server, sock = self._server()
        thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the sink did not start"
            time.sleep(0.01)
        try:
            yield self
        finally:
            self.release()
            server.should_exit = True
            thread.join(timeout=10)
            sock.close()
