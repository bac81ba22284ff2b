"""relay.web.corked: a response's head and body leave in one socket write; nothing else about HTTP changes."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvicorn
import uvloop
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from relay.cli import server_config
from relay.web.corked import HOLD_BYTES, CorkedHttpToolsProtocol, CorkedTransport
from tests.harness import settings_for, wait_for
from tests.serving import QuickServer, running


class RecordingTransport:
    """What reaches the real transport, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.calls.append(("write", bytes(data)))

    def close(self) -> None:
        self.calls.append(("close", None))
        self.closing = True

    def abort(self) -> None:
        self.calls.append(("abort", None))
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 7

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return f"extra:{name}"


async def test_writes_in_one_turn_reach_the_socket_as_one_write() -> None:
    real = RecordingTransport()
    corked = CorkedTransport(real, asyncio.get_running_loop())   # type: ignore[arg-type]
    corked.write(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n")
    corked.write(b'{"ok":true}')
    assert real.calls == []                      # held until the turn ends
    assert corked.get_write_buffer_size() == 7 + 39 + 11
    await asyncio.sleep(0)                       # the loop's turn ends: one write of both
    assert real.calls == [("write", b'HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n{"ok":true}')]
    corked.write(b"next")
    await asyncio.sleep(0)
    assert real.calls[-1] == ("write", b"next")
    assert corked.get_extra_info("peername") == "extra:peername"     # the rest is the real transport's


async def test_writes_after_write_eof_are_dropped_as_after_close() -> None:
    """A handler answering after relay ended its side (a refusal's lingering close) must not make the real
    transport raise (asyncio and uvloop refuse a write after write_eof)."""
    real = RecordingTransport()
    real.write_eof = lambda: real.calls.append(("write_eof", None))  # type: ignore[attr-defined]
    corked = CorkedTransport(real, asyncio.get_running_loop())   # type: ignore[arg-type]
    corked.write(b"431")
    corked.write_eof()
    corked.write(b"a late answer")
    await asyncio.sleep(0)
    assert real.calls == [("write", b"431"), ("write_eof", None)]


async def test_close_sends_what_is_held_first_and_abort_drops_it() -> None:
    real = RecordingTransport()
    corked = CorkedTransport(real, asyncio.get_running_loop())   # type: ignore[arg-type]
    corked.write(b"head")
    corked.write(b"body")
    corked.close()
    assert real.calls == [("write", b"headbody"), ("close", None)]
    await asyncio.sleep(0)                       # the scheduled flush finds nothing more to send
    assert real.calls == [("write", b"headbody"), ("close", None)]

    real = RecordingTransport()
    corked = CorkedTransport(real, asyncio.get_running_loop())   # type: ignore[arg-type]
    corked.write(b"lost with the connection")
    corked.abort()
    assert corked.get_write_buffer_size() == 7       # nothing held any more
    await asyncio.sleep(0)
    assert real.calls == [("abort", None)]


class _CountedWrites:
    """The real transport, its writes counted (a proxy: uvloop's transports take no new attributes)."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        CountingProtocol.writes.append(len(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CountingProtocol(CorkedHttpToolsProtocol):
    """Counts the writes that reach the real socket transport, under the corked one, and the pauses."""

    writes: list[int] = []
    paused = 0

    def pause_writing(self) -> None:
        CountingProtocol.paused += 1
        super().pause_writing()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        _small_buffer(transport.get_extra_info("socket"), socket.SO_SNDBUF)
        super().connection_made(_CountedWrites(transport))  # type: ignore[arg-type]


SOCKET_BUFFER = 64 * 1024


def _small_buffer(sock: Any, option: int) -> None:
    """Cap a socket's kernel buffer (Linux doubles what is asked: 128 KiB): left to autotuning, loopback buffers grow
    to what the machine allows (32 MB of receive buffer here), enough to swallow the whole streamed body without
    the server ever pausing."""
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)


async def _open_small(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client connection whose receive buffer is capped before it connects (the window scale is set at the
    handshake)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    _small_buffer(sock, socket.SO_RCVBUF)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock, limit=4096)


def _app() -> Starlette:
    async def small(request: Request) -> Response:
        return JSONResponse({"ok": True, "n": request.query_params.get("n")})

    async def big(request: Request) -> Response:
        async def chunks() -> Any:
            for i in range(64):
                yield bytes([i]) * 65536
        return StreamingResponse(chunks(), media_type="application/octet-stream")

    return Starlette(routes=[Route("/small", small), Route("/big", big)])


def _listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


async def _read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    return head, await reader.readexactly(length)


LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}    # relay serve runs on uvloop


def on_loop(kind: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[kind]) as runner:
        runner.run(asyncio.wait_for(main(), 60))


@pytest.mark.parametrize("loop", LOOPS)
def test_a_real_server_answers_keep_alive_pipelined_and_close_with_one_write_each(loop: str) -> None:
    async def main() -> None:
        CountingProtocol.writes = []
        config = uvicorn.Config(_app(), log_level="warning", lifespan="off", http=CountingProtocol)
        async with running(QuickServer(config), _listening()) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            # Keep-alive, one at a time: one write per response.
            for n in range(5):
                writer.write(f"GET /small?n={n} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
                head, body = await asyncio.wait_for(_read_response(reader), 10)
                assert head.startswith(b"HTTP/1.1 200") and body == b'{"ok":true,"n":"%d"}' % n
            assert len(CountingProtocol.writes) == 5
            # Pipelined: answered in order, one write each at most.
            writer.write(b"".join(f"GET /small?n=p{n} HTTP/1.1\r\nhost: x\r\n\r\n".encode() for n in range(3)))
            for n in range(3):
                _, body = await asyncio.wait_for(_read_response(reader), 10)
                assert body == b'{"ok":true,"n":"p%d"}' % n
            assert len(CountingProtocol.writes) <= 8
            # Connection: close: the whole response arrives before the end of the stream.
            writer.write(b"GET /small?n=last HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            rest = await asyncio.wait_for(reader.read(), 10)
            assert rest.startswith(b"HTTP/1.1 200") and rest.endswith(b'{"ok":true,"n":"last"}')
            assert len(CountingProtocol.writes) <= 9
            writer.close()
    on_loop(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_peer_that_half_closes_after_its_request_still_gets_the_answer(loop: str) -> None:
    """A request followed by shutdown(SHUT_WR) (nc -N, some probes): uvicorn lets the real transport close
    itself on the end of stream, and the answer written in that turn must be sent before it does."""
    async def main() -> None:
        config = uvicorn.Config(_app(), log_level="warning", lifespan="off", http=CorkedHttpToolsProtocol)
        async with running(QuickServer(config), _listening()) as port:
            for n in range(20):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(f"GET /small?n={n} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
                writer.write_eof()
                answer = await asyncio.wait_for(reader.read(), 10)
                assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'"n":"%d"}' % n), answer
                writer.close()
    on_loop(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_streamed_response_to_a_slow_reader_arrives_whole(loop: str) -> None:
    """4 MiB in 64 chunks from a producer that never suspends, to a reader that reads nothing until the server
    has paused writing: the held bytes are capped (no write gathers the whole body in memory), the real
    transport's flow control pauses the producer, and every byte arrives in order."""
    async def main() -> None:
        CountingProtocol.writes, CountingProtocol.paused = [], 0
        config = uvicorn.Config(_app(), log_level="warning", lifespan="off", http=CountingProtocol)
        async with running(QuickServer(config), _listening()) as port:
            reader, writer = await _open_small(port)
            try:
                writer.write(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
                await wait_for(lambda: CountingProtocol.paused > 0, 10, "the server to pause writing")
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                received = bytearray()
                while not received.endswith(b"\r\n0\r\n\r\n"):
                    data = await asyncio.wait_for(reader.read(65536), 10)
                    assert data, "the stream ended early"
                    received += data
                payload, view = bytearray(), bytes(received)
                while True:                    # undo the chunked framing
                    size_end = view.index(b"\r\n")
                    size = int(view[:size_end], 16)
                    if size == 0:
                        break
                    payload += view[size_end + 2:size_end + 2 + size]
                    view = view[size_end + 2 + size + 2:]
                assert payload == b"".join(bytes([i]) * 65536 for i in range(64))
                assert max(CountingProtocol.writes) <= HOLD_BYTES + 65536 + 64     # one chunk past the cap at most
            finally:     # a failure must not leave the connection to be finalized in a later test
                writer.close()
    on_loop(loop, main)


def test_relay_serve_uses_the_corked_protocol(tmp_path: Any) -> None:
    config = server_config(_app(), settings_for(tmp_path), "warning")
    assert isinstance(config.http, type) and issubclass(config.http, CorkedHttpToolsProtocol)
