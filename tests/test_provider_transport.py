"""Provider calls go out through aiohttp under httpx's API (relay.fastclient.AiohttpTransport), over real sockets.

What the provider code relies on must hold exactly as it did on httpx's own transport: an error says whether
the request could have reached the provider (ConnectError / ConnectTimeout: never sent; ReadTimeout, ReadError,
RemoteProtocolError: sent, no answer, so a submit's outcome is unknown), bodies are decoded once, requests and
responses arrive byte for byte (multipart uploads, repeated headers, encoded query strings, credentials in the
base URL), and a client that must not reuse connections never does. Each server below is a raw asyncio server
that does exactly one thing wrong (or right), so each case is the wire, not a mock.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import httpx
import pytest

from relay.errors import BlockedAddress, ProviderUnavailable, SubmitOutcomeUnknown
from relay.fastclient import guarded_client
from relay.netguard import NetGuard
from relay.providers.base import map_transport_errors
from tests.harness import wait_for

LOCAL = NetGuard(["127.0.0.0/8"])
Handler = Callable[["RawServer", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A TCP server on 127.0.0.1 running `handler` per connection; counts connections and the closes it saw."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.closed_by_client = 0
        self.requests: list[tuple[bytes, dict[str, str], bytes]] = []
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@contextlib.asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[RawServer]:
    server = RawServer(handler)
    listening = await asyncio.start_server(server._serve, "127.0.0.1", 0)
    server.port = listening.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listening.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str], bytes]:
    """One HTTP/1.1 request: (request line, headers lower-cased, body by Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    line, *header_lines = head[:-4].split(b"\r\n")
    headers: dict[str, str] = {}
    for raw in header_lines:
        name, _, value = raw.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return line, headers, body


def answer(status: int, body: bytes, *extra: str) -> bytes:
    lines = [f"HTTP/1.1 {status} X", f"content-length: {len(body)}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@contextlib.asynccontextmanager
async def answering_server(status: int = 200, body: bytes = b'{"ok":true}', *extra: str) -> AsyncIterator[RawServer]:
    """A keep-alive server answering every request alike, recording each."""
    async def handle(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                request = await read_request(reader)
            except asyncio.IncompleteReadError:       # the client closed the connection
                server.closed_by_client += 1
                return
            server.requests.append(request)
            writer.write(answer(status, body, *extra))
            await writer.drain()
    async with raw_server(handle) as server:
        yield server


# ---------------------------------------------------------------- whether the request could have landed

@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A port bound for the test and not listening: connecting to it is refused (held, so nobody else takes it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


async def test_a_refused_connection_is_a_connect_error_so_a_submit_is_safe_to_resend() -> None:
    with closed_port() as port:
        async with guarded_client(LOCAL) as client:
            with pytest.raises(httpx.ConnectError):
                await client.post(f"http://127.0.0.1:{port}/v1/tasks", json={})
            with pytest.raises(ProviderUnavailable):         # not SubmitOutcomeUnknown: nothing was sent
                async with map_transport_errors(submit=True):
                    await client.post(f"http://127.0.0.1:{port}/v1/tasks", json={})


async def test_no_free_connection_in_time_is_a_connect_timeout_so_a_submit_is_safe_to_resend() -> None:
    """With every pooled connection busy, a request that waited its pool timeout out was never sent."""
    release = asyncio.Event()

    async def slow(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await release.wait()
        writer.write(answer(200, b"{}"))
        await writer.drain()
    async with raw_server(slow) as server, \
            guarded_client(LOCAL, max_connections=1, timeout=httpx.Timeout(5.0, pool=1.0)) as client:
        first = asyncio.create_task(client.get(server.url("/v1/tasks/1")))
        await wait_for(lambda: server.connections == 1, 5, "the first request to hold the only connection")
        try:
            with pytest.raises(ProviderUnavailable, match="ConnectTimeout"):
                async with map_transport_errors(submit=True):
                    await client.post(server.url("/v1/tasks"), json={})
        finally:
            release.set()
        assert (await first).status_code == 200
        assert server.connections == 1


async def test_a_server_that_reads_the_request_and_hangs_up_leaves_a_submit_unknown() -> None:
    async def hang_up(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
    async with raw_server(hang_up) as server, guarded_client(LOCAL) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post(server.url("/v1/tasks"), json={"prompt": "p"})
        with pytest.raises(SubmitOutcomeUnknown):
            async with map_transport_errors(submit=True):
                await client.post(server.url("/v1/tasks"), json={"prompt": "p"})
        with pytest.raises(ProviderUnavailable):       # a fetch is simply retried
            async with map_transport_errors(submit=False):
                await client.get(server.url("/v1/tasks/1"))


async def test_no_answer_within_the_read_timeout_is_a_read_timeout() -> None:
    release = asyncio.Event()

    async def silent(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await release.wait()
    async with raw_server(silent) as server, guarded_client(LOCAL, timeout=httpx.Timeout(5.0, read=0.2)) as client:
        try:
            with pytest.raises(SubmitOutcomeUnknown):
                async with map_transport_errors(submit=True):
                    await client.post(server.url("/v1/tasks"), json={})
            with pytest.raises(httpx.ReadTimeout):
                await client.get(server.url("/v1/tasks/1"))
        finally:
            release.set()


async def test_a_server_that_stops_reading_a_large_body_is_a_write_timeout() -> None:
    """aiohttp bounds reading the answer, not writing the request: the transport bounds each chunk of a large body
    by httpx's write timeout, and a submit cut off mid-body is one whose outcome is unknown."""
    release = asyncio.Event()

    async def deaf(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")      # the head, then never another byte read
        await release.wait()
    body = b"x" * (32 * 1024 * 1024)                 # far more than the socket buffers hold
    async with raw_server(deaf) as server, guarded_client(LOCAL, timeout=httpx.Timeout(5.0, write=0.3)) as client:
        try:
            with pytest.raises(httpx.WriteTimeout):
                await client.post(server.url("/v1/images/edits"), content=body)
            with pytest.raises(SubmitOutcomeUnknown, match="WriteTimeout"):
                async with map_transport_errors(submit=True):
                    await client.post(server.url("/v1/images/edits"), content=body)
        finally:
            release.set()


async def test_a_large_body_arrives_whole() -> None:
    """A body of several MiB (reference images) is written a chunk at a time, with its Content-Length."""
    body = bytes(range(256)) * (12 * 1024)          # 3 MiB
    async with answering_server() as server, guarded_client(LOCAL) as client:
        assert (await client.post(server.url("/v1/images/edits"), content=body)).status_code == 200
        [(_, headers, received)] = server.requests
        assert received == body and headers["content-length"] == str(len(body))


async def test_an_answer_before_the_body_is_read_is_the_answer() -> None:
    """A gateway may refuse a large body (413) before reading it, then drain the rest: that answer is the result,
    read in full, while aiohttp still writes the body out (and no write deadline is left behind to fire)."""
    async def early(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 X\r\ncontent-length: 9\r\nconnection: close\r\n\r\ntoo ")
        await writer.drain()
        left = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        while left > 0:                                  # drain the body, then finish the answer
            left -= len(await reader.read(min(left, 1 << 16)))
        writer.write(b"large")
        await writer.drain()
    body = b"x" * (8 * 1024 * 1024)
    async with raw_server(early) as server, guarded_client(LOCAL, timeout=httpx.Timeout(5.0, write=2.0)) as client:
        async with asyncio.timeout(10):      # with a write deadline left behind, the answer's read hung unbounded
            response = await client.post(server.url("/v1/images/edits"), content=body)
        assert response.status_code == 413 and response.content == b"too large"


async def test_a_body_cut_short_is_a_protocol_error() -> None:
    async def short(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"x" * 10)
        await writer.drain()
    async with raw_server(short) as server, guarded_client(LOCAL) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(server.url("/v1/tasks/1"))


async def test_a_refused_address_is_refused_before_any_connection() -> None:
    async with answering_server() as server, guarded_client(NetGuard()) as client:
        with pytest.raises(BlockedAddress):
            await client.get(server.url())
        with pytest.raises(BlockedAddress):
            await client.get(f"http://localhost:{server.port}/")
    assert server.connections == 0


# ---------------------------------------------------------------- the bytes, both ways

async def test_a_gzip_body_is_decoded_once() -> None:
    payload = json.dumps({"status": "done", "pad": "x" * 2000}).encode()
    async with answering_server(200, gzip.compress(payload), "content-encoding: gzip",
                                "content-type: application/json") as server, guarded_client(LOCAL) as client:
        response = await client.get(server.url())
        assert response.json()["status"] == "done" and response.content == payload
        assert "gzip" in server.requests[0][1]["accept-encoding"]


async def test_a_multipart_upload_arrives_as_httpx_built_it() -> None:
    image = bytes(range(256)) * 40
    async with answering_server() as server, guarded_client(LOCAL) as client:
        response = await client.post(server.url("/v1/images/edits"), data={"prompt": "a cat"},
                                     files={"image": ("in.png", image, "image/png")})
        assert response.status_code == 200
        [(line, headers, body)] = server.requests
        assert line == b"POST /v1/images/edits HTTP/1.1"
        assert headers["content-type"].startswith("multipart/form-data; boundary=")
        boundary = headers["content-type"].split("boundary=", 1)[1].encode()
        assert int(headers["content-length"]) == len(body) and body.endswith(b"--" + boundary + b"--\r\n")
        assert image in body and b'name="prompt"\r\n\r\na cat' in body


async def test_paths_queries_headers_and_url_credentials_go_out_as_given() -> None:
    async with answering_server(200, b"{}", "set-cookie: a=1", "set-cookie: b=2", "x-request-id: r1") as server, \
            guarded_client(LOCAL) as client:
        url = f"http://user:pa%40ss@127.0.0.1:{server.port}/v1/tasks/a%2Fb?cursor=x%2By&q=%C3%A9"
        response = await client.get(url, headers={"x-api-key": "k", "x-label": "café".encode()})
        assert response.headers.get_list("set-cookie") == ["a=1", "b=2"]
        assert response.headers["x-request-id"] == "r1"
        [(line, headers, _)] = server.requests
        assert line == b"GET /v1/tasks/a%2Fb?cursor=x%2By&q=%C3%A9 HTTP/1.1"        # not re-encoded
        assert headers["x-api-key"] == "k"
        assert headers["x-label"].encode("latin-1") == "café".encode()          # the bytes httpx made, once
        assert headers["authorization"] == "Basic " + base64.b64encode(b"user:pa@ss").decode()
        assert headers["host"] == f"127.0.0.1:{server.port}"


async def test_a_header_aiohttp_will_not_write_is_refused_before_anything_is_sent() -> None:
    """CR/LF in a header value (httpx lets it through) would split the request: refused, nothing sent, so a
    submit is safe to resend rather than unknown."""
    async with answering_server() as server, guarded_client(LOCAL) as client:
        with pytest.raises(httpx.LocalProtocolError):
            await client.get(server.url(), headers={"x-a": "a\r\nx-injected: 1"})
        with pytest.raises(ProviderUnavailable):
            async with map_transport_errors(submit=True):
                await client.post(server.url("/v1/tasks"), json={}, headers={"x-a": "a\r\nx-injected: 1"})
    assert server.requests == []


# ---------------------------------------------------------------- connections

async def test_a_pooled_client_reuses_its_connection() -> None:
    async with answering_server() as server, guarded_client(LOCAL) as client:
        for _ in range(3):
            assert (await client.get(server.url())).status_code == 200
        assert server.connections == 1


async def test_an_unpooled_client_never_reuses_a_connection_and_closes_each() -> None:
    """The submit client of a dialect without idempotency keys: a submit never rides a connection that sat idle."""
    async with answering_server() as server, guarded_client(LOCAL, pooled=False) as client:
        for _ in range(3):
            assert (await client.post(server.url("/v1/tasks"), json={})).status_code == 200
        assert server.connections == 3
        await wait_for(lambda: server.closed_by_client == 3, 5, "the client to close all three")


def test_options_that_would_bypass_the_guard_or_be_ignored_are_refused() -> None:
    for name in ("transport", "mounts", "proxy", "app"):
        with pytest.raises(ValueError, match="bypass"):
            guarded_client(LOCAL, **{name: object()})
    for name in ("limits", "http1", "http2", "cert"):       # httpx's own transport's: this one has none of them
        with pytest.raises(TypeError, match="not an option"):
            guarded_client(LOCAL, **{name: None})


async def test_what_the_direct_send_leaves_out_still_goes_httpx_s_whole_way() -> None:
    """GuardedClient sends a plain request straight to its transport; redirects followed, an auth object, event hooks
    and streams still work as httpx does them (they go its whole way), and a plain client returns a 3xx as it is."""
    hooked: list[int] = []

    async def handle(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            line, headers, body = await read_request(reader)
            server.requests.append((line, headers, body))
            if line.startswith(b"GET /old"):
                writer.write(answer(302, b"", "location: /new"))
            else:
                writer.write(answer(200, json.dumps({"line": line.decode(), "auth": headers.get("authorization")})
                                    .encode()))
            await writer.drain()

    async def hook(response: httpx.Response) -> None:
        hooked.append(response.status_code)

    async with raw_server(handle) as server:
        async with guarded_client(LOCAL, follow_redirects=False) as plain:
            assert (await plain.get(server.url("/old"))).status_code == 302        # not followed
            followed = await plain.get(server.url("/old"), follow_redirects=True)
            assert followed.json()["line"] == "GET /new HTTP/1.1" and len(followed.history) == 1
            authed = await plain.get(server.url("/a"), auth=("user", "pw"))
            assert authed.json()["auth"] == "Basic " + base64.b64encode(b"user:pw").decode()
            async with plain.stream("GET", server.url("/streamed")) as streamed:
                assert not streamed.is_stream_consumed, "a stream is the caller's to read"
                assert json.loads(await streamed.aread())["line"] == "GET /streamed HTTP/1.1"
        async with guarded_client(LOCAL, event_hooks={"response": [hook]}) as hooking:
            assert (await hooking.get(server.url("/h"))).status_code == 200
        assert hooked == [200]


async def test_a_plain_request_goes_straight_to_the_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    """What GuardedClient is for: a plain request (no auth, no redirects followed, no hooks) never enters httpx's
    auth and redirect machinery, and its answer is whole, with its request and how long it took."""
    def machinery(*args: object, **kwargs: object) -> None:
        raise AssertionError("a plain request went through httpx's auth and redirect flow")
    monkeypatch.setattr(httpx.AsyncClient, "_send_handling_auth", machinery)
    async with answering_server() as server, guarded_client(LOCAL) as client:
        response = await client.post(server.url("/v1/x"), json={"a": 1}, headers={"authorization": "Bearer k"})
        assert response.json() == {"ok": True} and response.request.url == server.url("/v1/x")
        assert response.elapsed.total_seconds() >= 0
        assert server.requests[0][1]["authorization"] == "Bearer k"


async def test_an_answer_that_decodes_past_the_limit_is_stopped_there(monkeypatch: pytest.MonkeyPatch) -> None:
    """A small gzip that expands past ANSWER_LIMIT (a bomb) is refused as the provider's protocol error (a submit's
    outcome then unknown: it was answered), counted as it is decoded; an answer at the limit is read whole."""
    from relay import fastclient

    monkeypatch.setattr(fastclient, "ANSWER_LIMIT", 1_000_000)
    bomb = gzip.compress(b"0" * 20_000_000)          # 20 MB of zeros in about 20 kB
    assert len(bomb) < 100_000
    async with answering_server(200, bomb, "content-encoding: gzip") as server, guarded_client(LOCAL) as client:
        with pytest.raises(httpx.RemoteProtocolError, match="larger than 1000000 bytes"):
            await client.get(server.url("/v1/tasks/1"))
        with pytest.raises(SubmitOutcomeUnknown):
            async with map_transport_errors(submit=True):
                await client.post(server.url("/v1/tasks"), json={})
    exact = b"1" * 1_000_000
    async with answering_server(200, gzip.compress(exact), "content-encoding: gzip") as server, \
            guarded_client(LOCAL) as client:
        assert (await client.get(server.url("/v1/tasks/1"))).content == exact
