"""relay's outbound HTTP, all through the SSRF guard (relay.netguard) on aiohttp: webhook deliveries and image
downloads on a GuardedSession directly, provider calls through httpx clients whose transport is one
(guarded_client, AiohttpTransport).

Why aiohttp: httpx's own transport costs far more CPU per request. Measured on this machine at the same
concurrency: a webhook POST 0.7 ms of CPU through httpx against 0.1 ms through aiohttp (bench.fanout's
sink, 8 at once), an image GET 1.6-1.7 ms against 0.12 ms (bench.archive's images, 32 at once): httpcore
walks its whole pool and checks every idle socket on each request, anyio adds cancel scopes and locks;
aiohttp has a C parser and a pool keyed by a dict. The provider dialects keep httpx's API (its requests,
responses and errors, and the tests' MockTransport); only the bytes go through aiohttp (AiohttpTransport).

How the guard holds: every name is resolved by GuardedResolver (each address vetted, with the guard's own
resolver, and only vetted addresses are connected to), an IP literal (which aiohttp connects to without
asking a resolver) is vetted before the request, no proxy from the environment, no redirect followed (a
caller that follows them asks again per hop; httpx's follow_redirects sends each hop through here), no
cookies kept by aiohttp, TCP only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import httpx
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.helpers import is_ip_address
from multidict import CIMultiDict
from yarl import URL

from relay import __version__
from relay.netguard import NetGuard


def basic_auth(url: URL) -> str:
    """The Basic credentials of a URL's userinfo: in Latin-1 where it can say them, as aiohttp sent them (so a
    subscriber that worked keeps working), else in UTF-8 (RFC 7617's one named charset, what browsers send).

    aiohttp itself fails before sending for anything beyond Latin-1: a webhook_url or image link with a user name
    in Chinese was accepted and then never sent. Its ValueError for a `:` in the user name (one written %3A) is
    not ours either: the user name ends at the first `:` of what is sent, as RFC 7617 reads it."""
    credentials = f"{url.user or ''}:{url.password or ''}"
    try:
        encoded = credentials.encode("latin-1")
    except UnicodeEncodeError:
        encoded = credentials.encode()
    return "Basic " + base64.b64encode(encoded).decode("ascii")


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


class GuardedSession:
    """One aiohttp session for every origin: its connector pools connections per origin (a dict lookup, so
    hundreds of origins cost nothing per request), each kept alive for reuse."""

    def __init__(self, guard: NetGuard, tls: ssl.SSLContext, *, keepalive_seconds: float = 30.0,
                 pooled: bool = True, max_connections: int = 0, decompress: bool = True) -> None:
        """`pooled=False`: every request on a connection of its own, closed after its answer.
        `max_connections`: 0 for no cap. `decompress=False`: bodies as sent (Content-Encoding left to the caller)."""
        self._guard = guard
        self._tls = tls
        self._keepalive = keepalive_seconds
        self._pooled = pooled
        self._max_connections = max_connections
        self._decompress = decompress
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        # Made on first use, inside the running loop (aiohttp binds its connector to it).
        keepalive = {"keepalive_timeout": self._keepalive} if self._pooled else {"force_close": True}
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self._guard), ssl=self._tls,
                                         limit=self._max_connections, limit_per_host=0, **keepalive)
        return aiohttp.ClientSession(connector=connector, trust_env=False, cookie_jar=aiohttp.DummyCookieJar(),
                                     headers={"User-Agent": f"relay/{__version__}"},
                                     auto_decompress=self._decompress)

    def request(self, method: str, url: str | URL, timeout: float | aiohttp.ClientTimeout, *,
                data: bytes | AsyncIterator[bytes] | None = None, headers: Any = None) -> Any:
        """`async with session.request(...) as response`: one request, never redirected. Raises BlockedAddress
        for an IP literal the guard refuses (a name is checked by the resolver when a connection is opened).
        `timeout`: seconds for the whole exchange, or aiohttp's own timeouts. Credentials in the URL's userinfo
        go as the Authorization header (basic_auth), the URL sent without them."""
        url = URL(url)
        if is_ip_address(url.host):      # aiohttp's own test for "connect to this without resolving"
            self._guard.check_ip(str(url.host))
        if url.user is not None or url.password is not None:
            headers = CIMultiDict(headers or ())
            headers["Authorization"] = basic_auth(url)         # in place of any the caller set, whatever its case
            url = url.with_user(None)
        if self._session is None or self._session.closed:
            self._session = self._open()
        if not isinstance(timeout, aiohttp.ClientTimeout):
            timeout = aiohttp.ClientTimeout(total=timeout)
        return self._session.request(method, url, data=data, headers=headers, allow_redirects=False,
                                     timeout=timeout)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


WRITE_CHUNK = 64 * 1024      # bodies larger than this are written a chunk at a time, each within the write timeout
# The most a provider's answer may hold once decoded: ten inline base64 images of the largest size (OpenAI's
# synchronous answer, about 4 MB each) fit many times over. Counted after httpx undoes a Content-Encoding, so a
# small gzip that would expand to gigabytes is stopped at this size, not after it filled the memory.
ANSWER_LIMIT = 256 * 1024 * 1024

# Hop-by-hop and framing headers aiohttp sets itself from the body it sends and the connection it uses.
_LEFT_TO_AIOHTTP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length"})


class AiohttpTransport(httpx.AsyncBaseTransport):
    """httpx's requests sent through a GuardedSession: the provider clients keep httpx's API (requests, responses,
    errors, the tests' MockTransport), and their bytes go over aiohttp's pool and C parser.

    Why: under bench.throughput's end-to-end load, provider calls through httpx's own transport (httpcore, anyio,
    h11) were about a fifth of the time relay's process held the GIL (py-spy --gil); httpcore also checks every
    pooled connection of the client on each request. aiohttp's errors become the httpx errors httpcore would have
    raised at the same point, so relay.providers.base tells "never sent" (ConnectError, ConnectTimeout: safe to
    send again) from "sent, no answer" (ReadTimeout, ReadError, RemoteProtocolError: a submit's outcome unknown)
    exactly as before. Bodies arrive as sent (no decompression here): httpx decodes Content-Encoding itself.
    """

    def __init__(self, session: GuardedSession) -> None:
        self._session = session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        limits = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(total=None, connect=limits.get("pool"), sock_connect=limits.get("connect"),
                                        sock_read=limits.get("read"))
        try:
            # Sent as UTF-8 by aiohttp: decoded as such, the bytes go out as httpx made them.
            headers = [(name.decode(), value.decode()) for name, value in request.headers.raw
                       if name.lower() not in _LEFT_TO_AIOHTTP]
        except UnicodeDecodeError:
            raise httpx.LocalProtocolError("a header is not UTF-8", request=request) from None
        body = await request.aread()       # built by httpx in memory (JSON, form, multipart): read once, kept
        # Credentials in the URL are httpx's to send: it has made them the Authorization header already.
        url = URL(str(request.url), encoded=True).with_user(None)
        data: bytes | AsyncIterator[bytes] | None = body or None
        clock: _WriteClock | None = None
        try:
            async with asyncio.timeout(None) as write_deadline:
                if len(body) > WRITE_CHUNK:
                    # aiohttp bounds reading the answer (sock_read), not writing the request: a server that stops
                    # reading a large body would hold it until the kernel gives up. Fed a chunk at a time, each
                    # chunk must be taken within httpx's write timeout (as with httpcore's WriteTimeout).
                    clock = _WriteClock(write_deadline, limits.get("write"))
                    data = _paced(body, clock)
                    headers.append(("Content-Length", str(len(body))))
                with _as_httpx_errors(request):    # turns aiohttp's own timeouts into httpx's
                    response = await self._session.request(request.method, url, timeout, data=data, headers=headers)
        except TimeoutError:        # only the write deadline is left to raise it: the body was partly sent
            raise httpx.WriteTimeout("the request body was not taken in time", request=request) from None
        finally:
            if clock is not None:
                clock.live = False
        return httpx.Response(status_code=response.status, headers=response.raw_headers,
                              stream=_Body(response, request),
                              extensions={"http_version": f"HTTP/{response.version.major}.{response.version.minor}"
                                          .encode(), "reason_phrase": (response.reason or "").encode("latin-1",
                                                                                                    "replace")})

    async def aclose(self) -> None:
        await self._session.aclose()


class _WriteClock:
    """The write deadline of one request: each chunk of its body rearms it, the end of the body clears it. Only while
    the request is still waiting for its answer: aiohttp may go on asking for chunks after an early answer (a 413
    sent before the body was read), when the deadline's block has ended and must not be touched."""

    def __init__(self, deadline: asyncio.Timeout, limit: float | None) -> None:
        self._deadline = deadline
        self._limit = limit
        self.live = True

    def chunk_taken(self) -> None:
        if self.live and self._limit is not None:
            self._deadline.reschedule(asyncio.get_running_loop().time() + self._limit)

    def body_done(self) -> None:
        if self.live:
            self._deadline.reschedule(None)


async def _paced(body: bytes, clock: _WriteClock) -> AsyncIterator[bytes]:
    """`body` in WRITE_CHUNK pieces; the next piece is asked for once the previous one is written, so each must be
    taken within the write timeout (see _WriteClock)."""
    view = memoryview(body)
    for start in range(0, len(body), WRITE_CHUNK):
        clock.chunk_taken()
        yield bytes(view[start:start + WRITE_CHUNK])
    clock.body_done()


class _Body(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _as_httpx_errors(self._request):
            async for chunk in self._response.content.iter_any():
                yield chunk

    async def aclose(self) -> None:
        self._response.release()      # back to the pool when read to its end, else the connection is closed


@contextlib.contextmanager
def _as_httpx_errors(request: httpx.Request) -> Iterator[None]:
    """aiohttp's errors as the httpx errors httpcore raises at the same point (see AiohttpTransport)."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:       # connecting, or waiting for a pooled connection
        raise httpx.ConnectTimeout(str(exc) or type(exc).__name__, request=request) from exc
    except TimeoutError as exc:                         # aiohttp's SocketTimeoutError is one: reading the answer
        raise httpx.ReadTimeout(str(exc) or type(exc).__name__, request=request) from exc
    except aiohttp.ClientConnectorError as exc:         # no connection was made: nothing was sent
        raise httpx.ConnectError(str(exc), request=request) from exc
    except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as exc:
        raise httpx.UnsupportedProtocol(str(exc), request=request) from exc
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientResponseError) as exc:
        raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__, request=request) from exc
    except (aiohttp.ClientError, OSError) as exc:       # reset, broken pipe: maybe after the request went out
        raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc
    except ValueError as exc:                           # a request aiohttp will not write (CR/LF in a header)
        raise httpx.LocalProtocolError(str(exc), request=request) from exc


class GuardedClient(httpx.AsyncClient):
    """httpx's AsyncClient over an AiohttpTransport, sending a plain request straight to its transport.

    Why: httpx's own path from send() to the transport (the auth flow's generators, the redirect loop, event hooks,
    the cookie jar's urllib shims, a log record) cost about as much CPU per provider call as the transport itself.
    relay's provider clients use none of it: no auth (keys go in headers), no redirects followed, no hooks, no
    cookies. A request that asks for any of those (an auth object, credentials in its URL, redirects, a stream)
    still goes httpx's whole way; the only thing a plain one loses is the cookie jar: cookies a provider sets are
    not sent back.
    """

    def __init__(self, transport: AiohttpTransport, **client_kwargs: Any) -> None:
        super().__init__(transport=transport, **client_kwargs)
        self._direct = transport

    async def send(self, request: httpx.Request, *, stream: bool = False,
                   auth: Any = httpx.USE_CLIENT_DEFAULT, follow_redirects: Any = httpx.USE_CLIENT_DEFAULT) -> httpx.Response:
        plain = (not stream and auth is httpx.USE_CLIENT_DEFAULT and self.auth is None and not request.url.userinfo
                 and not (self.follow_redirects if follow_redirects is httpx.USE_CLIENT_DEFAULT else follow_redirects)
                 and not any(self.event_hooks.values()))
        if not plain:
            return await super().send(request, stream=stream, auth=auth, follow_redirects=follow_redirects)
        if self.is_closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        request.extensions.setdefault("timeout", self.timeout.as_dict())
        started = time.perf_counter()
        response = await self._direct.handle_async_request(request)
        response.request = request
        try:
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():      # decoded: what aread() would join, bounded
                size += len(chunk)
                if size > ANSWER_LIMIT:
                    raise httpx.RemoteProtocolError(f"the answer is larger than {ANSWER_LIMIT} bytes", request=request)
                chunks.append(chunk)
            response._content = b"".join(chunks)     # as aread() keeps it: .content, .json() read it from there
        except BaseException:
            await response.aclose()
            raise
        response.elapsed = datetime.timedelta(seconds=time.perf_counter() - started)
        return response


def guarded_client(guard: NetGuard, *, verify: ssl.SSLContext | None = None, pooled: bool = True,
                   max_connections: int = 100, keepalive_seconds: float = 5.0,
                   **client_kwargs: Any) -> GuardedClient:
    """An httpx AsyncClient whose every connection goes through `guard` (AiohttpTransport over a GuardedSession).

    `pooled=False`: every request on a connection of its own, closed after its answer. The keep-alive of an
    idle pooled connection is httpx's default (5 s): the shorter it is, the rarer a request on a connection
    the server has just given up. `transport`, `mounts`, `proxy` and `app` are refused: each would open
    connections the guard never sees (and an explicit transport already keeps HTTP(S)_PROXY out); so are httpx's
    own transport options, which this transport would silently ignore.
    """
    for name in ("transport", "mounts", "proxy", "app"):
        if client_kwargs.get(name) is not None:
            raise ValueError(f"{name}= would bypass the SSRF guard; not supported")
    for name in ("limits", "http1", "http2", "cert"):
        if name in client_kwargs:
            raise TypeError(f"{name}= is not an option of the guarded transport")
    session = GuardedSession(guard, verify if verify is not None else httpx.create_ssl_context(),
                             keepalive_seconds=keepalive_seconds, pooled=pooled, max_connections=max_connections,
                             decompress=False)
    return GuardedClient(AiohttpTransport(session), **client_kwargs)
