"""Serving an ASGI app under uvicorn on a real socket, inside the test's own event loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import uvicorn


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
                await asyncio.sleep(0.01)
        yield int(sock.getsockname()[1])
    finally:
        server.should_exit = True
        async with asyncio.timeout(10):
            await task
        sock.close()


@contextlib.asynccontextmanager
async def serving(app: Any, sock: socket.socket, **config: Any) -> AsyncIterator[int]:
    """`app` on `sock` (uvicorn.Config options in `config`; quiet, lifespan on by default); yields the port."""
    options: dict[str, Any] = {"log_config": None, "log_level": "warning", "access_log": False, "ws": "none",
                               "lifespan": "on", **config}
    async with running(uvicorn.Server(uvicorn.Config(app, **options)), sock) as port:
        yield port
