"""Serving an ASGI app under uvicorn on a real socket, inside the test's own event loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import uvicorn


class QuickServer(uvicorn.Server):
    """uvicorn for tests, stopped the moment it is asked: its main loop waits for `stop()` instead of polling
    every 0.1 s, and its shutdown closes idle connections without the fixed 0.1 s grace sleep (a harness is
    started and stopped hundreds of times in a run)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self.should_exit = True
        self._stop.set()

    async def main_loop(self) -> None:
        await self._stop.wait()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        async with asyncio.timeout(10):     # responses under way finish; their connections close after
            while self.server_state.connections:
                await asyncio.sleep(0.005)
        await self.lifespan.shutdown()


@contextlib.asynccontextmanager
async def running(server: uvicorn.Server, sock: socket.socket) -> AsyncIterator[int]:
    """Run `server` on `sock` for the block (started before it, stopped and the socket closed after); yields the
    port. The test process keeps its signals: uvicorn does not take SIGINT/SIGTERM over."""
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.005)
        yield int(sock.getsockname()[1])
    finally:
        if isinstance(server, QuickServer):
            server.stop()
        else:
            server.should_exit = True
        async with asyncio.timeout(10):
            await task
        sock.close()


@contextlib.asynccontextmanager
async def serving(app: Any, sock: socket.socket, **config: Any) -> AsyncIterator[int]:
    """`app` on `sock` (uvicorn.Config options in `config`; quiet, lifespan on by default); yields the port."""
    options: dict[str, Any] = {"log_config": None, "log_level": "warning", "access_log": False, "ws": "none",
                               "lifespan": "on", **config}
    async with running(QuickServer(uvicorn.Config(app, **options)), sock) as port:
        yield port
