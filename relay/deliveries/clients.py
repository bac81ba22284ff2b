"""The HTTP client webhooks are sent with: aiohttp, through the SSRF guard.

Why aiohttp here when relay speaks httpx to providers: deliveries are relay's
most frequent outbound requests, and in bench.fanout a webhook POST through
httpx cost about 0.7 ms of CPU (httpcore's pool bookkeeping, anyio cancel
scopes and locks per request) against about 0.1 ms through aiohttp (its C
HTTP parser, a per-host pool keyed by a dict). Provider calls are a few per
task and keep httpx (and its MockTransport/ASGITransport in tests).

The guard holds as on httpx's GuardedTransport: every name is resolved by
GuardedResolver (each address vetted, with the guard's own resolver), an IP
literal (which aiohttp connects to without asking a resolver) is vetted before
the request, no proxy from the environment, no redirect followed, TCP only.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.helpers import is_ip_address
from yarl import URL

from relay.netguard import NetGuard


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver: the guard's DNS, every address checked (BlockedAddress otherwise)."""

    def __init__(self, guard: NetGuard) -> None:
        self._guard = guard

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        ips = await self._guard.resolve_checked(host, port)   # OSError when it does not resolve: retried later
        return [ResolveResult(hostname=host, host=ip, port=port,
                              family=socket.AF_INET6 if ":" in ip else socket.AF_INET, proto=0,
                              flags=socket.AI_NUMERICHOST) for ip in ips]

    async def close(self) -> None:
        return None


class WebhookClient:
    """One aiohttp session for every subscriber: its connector pools connections per origin (a dict lookup,
    so hundreds of subscribers cost nothing per request), each kept alive for reuse."""

    def __init__(self, guard: NetGuard, tls: ssl.SSLContext, *, keepalive_seconds: float = 30.0) -> None:
        self._guard = guard
        self._tls = tls
        self._keepalive = keepalive_seconds
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        # Made on first use, inside the running loop (aiohttp binds its connector to it).
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self._guard), ssl=self._tls, limit=0,
                                         limit_per_host=0, keepalive_timeout=self._keepalive)
        return aiohttp.ClientSession(connector=connector, trust_env=False, cookie_jar=aiohttp.DummyCookieJar(),
                                     auto_decompress=True, skip_auto_headers=("User-Agent",))

    def post(self, url: str, body: bytes, headers: dict[str, str], timeout: float) -> Any:
        """`async with client.post(...) as response`: one POST, never redirected. Raises BlockedAddress for an
        IP literal the guard refuses (a name is checked by the resolver when a connection is opened)."""
        host = URL(url).host
        if is_ip_address(host):      # aiohttp's own test for "connect to this without resolving"
            self._guard.check_ip(str(host))
        if self._session is None or self._session.closed:
            self._session = self._open()
        return self._session.post(url, data=body, headers=headers, allow_redirects=False,
                                  timeout=aiohttp.ClientTimeout(total=timeout))

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
