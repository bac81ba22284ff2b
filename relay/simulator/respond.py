"""Response plumbing shared by the dialects: reading bodies, holding requests, broken bodies.

The fault kinds that are about the wire rather than a dialect (a request held
open, a body cut short, a body that is not what was promised) are built here.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

# Bodies beyond this are refused before parsing (real gateways cap far lower for JSON).
MAX_BODY = 64 * 1024 * 1024


class BodyError(Exception):
    """The request body could not be read as the expected kind; the message says why."""


async def read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise BodyError("request body too large")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY:
            raise BodyError("request body too large")
    return bytes(data)


async def read_json(request: Request) -> Any:
    """The parsed JSON body; BodyError for anything that is not JSON."""
    raw = await read_body(request)
    if not raw.strip():
        raise BodyError("request body is empty; expected JSON")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BodyError(f"request body is not valid JSON: {exc}") from None


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


async def hold(request: Request, seconds: float) -> bool:
    """Wait `seconds`, or less if the client goes away first. True if the client is still there.

    Watching for the disconnect keeps a held request from pinning a server that
    is shutting down, and mirrors a real provider that notices a dropped socket.
    """
    if seconds <= 0:
        return True

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({watcher}, timeout=seconds)
    finally:
        watcher.cancel()
        try:
            await watcher
        except (asyncio.CancelledError, Exception):  # the watcher's own end is of no interest
            pass
    return not done


# Bounds on topping up a wait that ended before the simulator's clock got there (see `wait_until`).
_TOPUPS = 100
_MIN_TOPUP = 0.001


async def wait_until(when: float, now: Callable[[], float],
                     wait: Callable[[float], Awaitable[bool | None]] | None = None) -> bool:
    """Wait until the simulator's clock `now()` reaches `when`; False if `wait` reports the client gone.

    asyncio's timers run on the monotonic clock and may fire a little early, while a task's phase is
    computed from the wall clock: a single sleep of `when - now()` can end just before `when`, and an
    answer built then would still say "running". So wait again for what is left (a bounded number of
    times, each at least a millisecond); callers also build the answer at `max(now(), when)`.
    """
    for _ in range(_TOPUPS):
        left = when - now()
        if left <= 0:
            return True
        if wait is None:
            await asyncio.sleep(max(left, _MIN_TOPUP))
        elif await wait(max(left, _MIN_TOPUP)) is False:
            return False
    return True


async def hold_until(request: Request, when: float, now: Callable[[], float]) -> bool:
    """`hold` the request until the simulator's clock reaches `when`. True if the client is still there."""
    return await wait_until(when, now, lambda seconds: hold(request, seconds))


class SimulatedTruncation(httpx.RemoteProtocolError):
    """Raised after sending part of a body. Under a real server the connection just closes;
    in-process (httpx.ASGITransport) the client sees this, a transport error like the real one."""

    def __init__(self) -> None:
        super().__init__("simulated truncation: connection closed before the full body was sent")


class TruncatedResponse(Response):
    """Announces the full Content-Length, sends half the body, then breaks the connection."""

    def __init__(self, original: Response) -> None:
        self._full = bytes(original.body)
        super().__init__(content=self._full, status_code=original.status_code,
                         headers={k: v for k, v in original.headers.items() if k != "content-length"},
                         media_type=original.media_type)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self._full[: len(self._full) // 2], "more_body": True})
        raise SimulatedTruncation()


def malformed(op: str, nth: int) -> Response:
    """A 200 that is not what the client expects; alternates between the two flavours."""
    if op == "download":
        # Claims to be an image, is not one: archivers must check magic bytes.
        return Response(b"<html><body>upstream cache error</body></html>", media_type="image/png")
    if nth % 2:
        return Response(b'{"status": "ok", "data": <html>502 Bad Gateway</html>', media_type="application/json")
    return JSONResponse({"ok": True, "result": None, "message": "unexpected shape"})
