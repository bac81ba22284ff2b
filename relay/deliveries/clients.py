"""HTTP clients for deliveries: one small connection pool per subscriber origin.

httpcore's pool scans every connection it holds on each request (and checks
idle ones for readability), so one shared pool with hundreds of subscribers'
connections gets slower with every subscriber. A pool per origin (scheme,
host, port) stays as small as that origin's concurrency cap. Every client
goes through the SSRF guard's transport and never follows redirects. Idle
clients beyond `max_clients` are closed, least recently used first.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

import httpx


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


class ClientsByOrigin:
    def __init__(self, make: Callable[[], httpx.AsyncClient], *, max_clients: int = 512) -> None:
        self._make = make
        self._max = max_clients
        self._clients: OrderedDict[str, httpx.AsyncClient] = OrderedDict()
        self._in_use: dict[str, int] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._clients)

    @contextlib.asynccontextmanager
    async def client(self, url: str) -> AsyncIterator[httpx.AsyncClient]:
        key = origin(url)
        found = self._clients.get(key)
        if found is None:
            found = self._clients[key] = self._make()
            self._evict()
        self._clients.move_to_end(key)
        self._in_use[key] = self._in_use.get(key, 0) + 1
        try:
            yield found
        finally:
            left = self._in_use[key] - 1
            if left:
                self._in_use[key] = left
            else:
                del self._in_use[key]

    def _evict(self) -> None:
        for key in list(self._clients):
            if len(self._clients) <= self._max:
                return
            if key not in self._in_use:
                client = self._clients.pop(key)
                task = asyncio.create_task(client.aclose())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        clients = list(self._clients.values())
        self._clients.clear()
        await asyncio.gather(*(c.aclose() for c in clients), *self._closing, return_exceptions=True)
