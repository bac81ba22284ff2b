"""relay.web.httplimits: a request head is bounded in size and in time; bodies, pipelines and slow answers are not
cut. Real uvicorn on a real socket, on asyncio's loop and on uvloop (what relay serve runs)."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from relay.cli import server_config
from relay.web.app import create_app
from relay.web.httplimits import HEAD_BYTES, LimitedHttpToolsProtocol
from tests.harness import API_KEY, harness, settings_for, wait_for
from tests.serving import QuickServer, running, serving
from tests.test_corked import LOOPS, _listening, _read_response, on_loop

QUICK_HEAD_SECONDS = 0.3


class QuickHead(LimitedHttpToolsProtocol):
    head_seconds = QUICK_HEAD_SECONDS


def _app() -> Starlette:
    async def echo(request: Request) -> Response:
        body = await request.body()
        return JSONResponse({"size": len(body)})

    async def slow(request: Request) -> Response:
        # Answers well after the head deadline: the deadline is for heads, not for the work a request asks.
        await asyncio.sleep(QUICK_HEAD_SECONDS * 3)
        return JSONResponse({"slow": True})

    async def early(request: Request) -> Response:
        return JSONResponse({"error": "no"}, status_code=401)        # answered before its body is read

    return Starlette(routes=[Route("/echo", echo, methods=["GET", "POST"]), Route("/slow", slow),
                             Route("/early", early, methods=["POST"])])


def _serve(protocol: type[LimitedHttpToolsProtocol] = LimitedHttpToolsProtocol) -> QuickServer:
    return QuickServer(uvicorn.Config(_app(), log_level="warning", lifespan="off", http=protocol))


async def _closed(reader: asyncio.StreamReader, within: float = 10) -> bytes:
    """Everything the server sends until it closes the connection (fails if it has not within `within` s)."""
    return await asyncio.wait_for(reader.read(), within)


def _error(answer: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("where", ["header", "url", "many headers"])
def test_a_head_that_never_ends_is_answered_431_and_closed(loop: str, where: str) -> None:
    async def main() -> None:
        async with running(_serve(), _listening()) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                start = {"header": b"GET /echo HTTP/1.1\r\nhost: x\r\nx-long: ",
                         "url": b"GET /echo?q=", "many headers": b"GET /echo HTTP/1.1\r\nhost: x\r\n"}[where]
                piece = b"x-h: 0123456789abcdef\r\n" if where == "many headers" else b"a" * 4096
                writer.write(start)
                sent = len(start)
                # Far past the limit, in pieces as a slow client would send them; the server stops it on the way.
                while sent < HEAD_BYTES * 4 and not reader.at_eof():
                    writer.write(piece)
                    sent += len(piece)
                    await writer.drain()
                status, body = _error(await _closed(reader))
                assert status == 431
                assert body["error"]["code"] == "payload_too_large"
                assert str(HEAD_BYTES) in body["error"]["message"]
            finally:
                writer.close()
    on_loop(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_trailers_that_never_end_are_cut_as_a_head_would_be(loop: str) -> None:
    """A chunked body's trailers come after its headers, when the head's deadline no longer runs, and httptools
    grows them as it grows headers: the bytes that are not body are bounded the same way (431)."""
    async def main() -> None:
        async with running(_serve(), _listening()) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
                             b"5\r\nhello\r\n0\r\nx-trailer: ")
                sent = 0     # the bound is the limit and one read (the one that ended the head): well past both
                while sent < HEAD_BYTES * 16 and not reader.at_eof():
                    writer.write(b"t" * 4096)
                    sent += 4096
                    await writer.drain()
                status, body = _error(await _closed(reader))
                assert status == 431 and body["error"]["code"] == "payload_too_large"
            finally:
                writer.close()
    on_loop(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_body_read_and_dropped_does_not_widen_the_next_heads_limit(loop: str) -> None:
    """A request answered before its body was read (a 401): uvicorn reads and drops the body, 4 MiB here. The
    next request's head is held to the limit as any head is (give or take the read where it began), not to the
    limit plus an eighth of that body (512 KiB more)."""
    async def main() -> None:
        async with running(_serve(), _listening()) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                body = b"b" * (4 * 1024 * 1024)
                writer.write(b"POST /early HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % len(body))
                head, _ = await asyncio.wait_for(_read_response(reader), 10)
                assert head.startswith(b"HTTP/1.1 401")
                writer.write(body)
                writer.write(b"GET /echo HTTP/1.1\r\nhost: x\r\nx-long: " + b"l" * (HEAD_BYTES * 8) + b"\r\n\r\n")
                status, answer = _error(await _closed(reader))
                assert status == 431 and answer["error"]["code"] == "payload_too_large"
            finally:
                writer.close()
    on_loop(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_chunked_body_of_small_chunks_is_served(loop: str) -> None:
    """Framing grows with the body: 2 MiB in chunks of 256 bytes (24 kB of chunk lines) is no head."""
    async def main() -> None:
        async with running(_serve(), _listening()) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                chunk = b"100\r\n" + b"c" * 256 + b"\r\n"
                writer.write(b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
                             + chunk * 8192 + b"0\r\n\r\n")
                head, answer = await asyncio.wait_for(_read_response(reader), 10)
                assert head.startswith(b"HTTP/1.1 200") and json.loads(answer) == {"size": 256 * 8192}
            finally:
                writer.close()
    on_loop(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_one_read_too_large_and_unparsable_is_refused_once(loop: str) -> None:
    """A read that is both over the head limit and not HTTP: one answer (the parser's 400), no second refusal
    written after the first's end of stream (which the loop would report as a fatal protocol error)."""
    async def main() -> None:
        async with running(_serve(), _listening()) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(b"GET /echo HTTP/1.1\r\nbad header line " + b"x" * (HEAD_BYTES * 2) + b"\r\n\r\n")
                answer = await _closed(reader)
                assert answer.count(b"HTTP/1.1") == 1
                status, _ = _error(answer)
                assert status == 400
            finally:
                writer.close()
    on_loop(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_bodies_and_pipelines_larger_than_the_head_limit_are_served(loop: str) -> None:
    """Only head bytes count: a body of many times the limit sent in the same writes as its head, and pipelined
    requests whose heads add up to more than the limit, are answered."""
    async def main() -> None:
        async with running(_serve(), _listening()) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                body = b"b" * (HEAD_BYTES * 8)
                writer.write(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
                head, answer = await asyncio.wait_for(_read_response(reader), 10)
                assert head.startswith(b"HTTP/1.1 200") and json.loads(answer) == {"size": len(body)}
                one = b"GET /echo HTTP/1.1\r\nhost: x\r\nx-pad: " + b"p" * 4000 + b"\r\n\r\n"
                count = HEAD_BYTES // len(one) * 3
                writer.write(one * count)
                for _ in range(count):
                    head, answer = await asyncio.wait_for(_read_response(reader), 10)
                    assert head.startswith(b"HTTP/1.1 200") and json.loads(answer) == {"size": 0}
            finally:
                writer.close()
    on_loop(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_connection_that_sends_no_head_in_time_is_closed(loop: str) -> None:
    """Silent from the start, or trickling a head a byte at a time (each byte would cancel uvicorn's keep-alive
    timer), or silent... then trickling after a first response: closed once the head deadline passes."""
    async def main() -> None:
        async with running(_serve(QuickHead), _listening()) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await _closed(reader) == b""                   # sent nothing: closed, nothing answered
            writer.close()

            for first in (False, True):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                try:
                    if first:
                        writer.write(b"GET /echo HTTP/1.1\r\nhost: x\r\n\r\n")
                        head, _ = await asyncio.wait_for(_read_response(reader), 10)
                        assert head.startswith(b"HTTP/1.1 200")
                    trickle = b"GET /echo HTTP/1.1\r\nhost: x\r\nx-slow: " + b"s" * 10_000

                    async def drip() -> None:
                        for byte in trickle:      # paced as a slowloris client paces: a stimulus, not a wait
                            writer.write(bytes([byte]))
                            await asyncio.sleep(QUICK_HEAD_SECONDS / 10)
                    dripping = asyncio.create_task(drip())
                    try:
                        assert await _closed(reader) == b""
                    finally:
                        dripping.cancel()
                        await asyncio.gather(dripping, return_exceptions=True)
                finally:
                    writer.close()
    on_loop(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_slow_answer_and_a_prompt_next_request_are_not_cut(loop: str) -> None:
    async def main() -> None:
        async with running(_serve(QuickHead), _listening()) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
                head, answer = await asyncio.wait_for(_read_response(reader), 10)
                assert head.startswith(b"HTTP/1.1 200") and json.loads(answer) == {"slow": True}
                writer.write(b"GET /echo HTTP/1.1\r\nhost: x\r\n\r\n")    # on the same connection, in time
                head, _ = await asyncio.wait_for(_read_response(reader), 10)
                assert head.startswith(b"HTTP/1.1 200")
            finally:
                writer.close()
    on_loop(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_request_httptools_cannot_parse_is_answered_in_the_error_shape(loop: str) -> None:
    async def main() -> None:
        async with running(_serve(), _listening()) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(b"GET /echo HTTP/1.1\r\nhost: x\r\nbad header line\r\n\r\n")
                status, body = _error(await _closed(reader))
                assert status == 400 and body["error"]["code"] == "invalid_request"
            finally:
                writer.close()
    on_loop(loop, main)


def test_relay_serve_uses_the_limited_protocol(tmp_path: Any) -> None:
    config = server_config(_app(), settings_for(tmp_path), "warning")
    assert config.http is LimitedHttpToolsProtocol


async def test_a_relay_endpoint_whose_body_is_cut_off_logs_no_error(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """relay's own app: a POST /v1/tasks whose trailers are refused mid-body. Its handler finds the client gone
    (Starlette's ClientDisconnect), which is nobody's error: logged at debug, not as an unhandled error."""
    caplog.set_level(logging.DEBUG, logger="relay.web")
    async with harness(tmp_path, run_worker=False) as h:
        app = create_app(h.runtime, run_worker=False)
        async with serving(app, _listening(), http=LimitedHttpToolsProtocol, lifespan="off") as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(f"POST /v1/tasks HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {API_KEY}\r\n"
                             "content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
                             "2\r\n{}\r\n0\r\nx-trailer: ".encode())
                writer.write(b"t" * (HEAD_BYTES * 16))        # past the limit and the read that ended the head
                status, _ = _error(await _closed(reader))
                assert status == 431
            finally:
                writer.close()
            await wait_for(lambda: any("client gone" in r.getMessage() for r in caplog.records), 10,
                           "the handler to find its client gone")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text[-2000:]
