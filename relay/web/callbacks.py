"""POST /callbacks/{provider}/{task_id}/{token}: take a provider callback, record it durably, answer 200 at once.

The token is an HMAC of provider and task id, so the URL itself is the
credential; a wrong token (or an unknown provider) is a plain 404 that gives
no hint. Nothing is processed here: the raw body becomes the callback job's
payload (one row, group-committed with concurrent callbacks), and the worker
confirms and applies it later (relay.jobs.callback), recording the outcome in
the inbox.

This is relay's hottest endpoint (providers call back in bursts), so it is
served as raw ASGI, ahead of Starlette's router and middleware: `CallbackDoor`
answers `POST /callbacks/a/b/c` itself and hands every other request to the
app. Its answers keep API.md's error shape; it adds nothing else a route would
have (no cookies, no session), so nothing is lost by skipping the stack.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relay import jsontext, metrics
from relay.errors import ApiError, BadRequestBody, NotFound, PayloadTooLarge
from relay.jobs.callback import callback_job
from relay.runtime import Runtime

log = logging.getLogger("relay.web")

PREFIX = "/callbacks/"
_OK = b'{"ok":true}'
_JSON_HEADERS = [(b"content-type", b"application/json")]


async def accept_callback(runtime: Runtime, provider_name: str, task_id: str, token: str, receive: Receive,
                          declared_size: int | None) -> None:
    """Check the URL's token, read the body (bounded), record it with its job. Raises ApiError."""
    started = time.perf_counter()
    ctx = runtime.ctx
    provider = ctx.providers.get(provider_name)
    if provider is None or not provider.caps.callbacks or \
            not ctx.signer.verify_callback_token(provider_name, task_id, token):
        # The label only ever names a configured provider: the path is anyone's to make up.
        metrics.labeled(metrics.CALLBACKS, provider_name if provider is not None else "unknown", "rejected").inc()
        raise NotFound("not found")
    body = await _read_body(receive, runtime.settings.server.max_body_bytes, declared_size)
    try:
        text = body.decode()
        json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError):
        # RecursionError: JSON nested deeper than the parser's stack; it could not be processed later either.
        metrics.labeled(metrics.CALLBACKS, provider_name, "rejected").inc()
        raise BadRequestBody("the callback body must be JSON") from None
    await runtime.store.receive_callback(callback_job(provider_name, task_id, text, ctx.clock.now()))
    metrics.labeled(metrics.CALLBACKS, provider_name, "acked").inc()
    metrics.labeled(metrics.CALLBACK_ACK_SECONDS, provider_name).observe(time.perf_counter() - started)


class _Gone(Exception):
    """The client went away before its body arrived: nothing to answer."""


async def _read_body(receive: Receive, limit: int, declared: int | None) -> bytes:
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"the body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Gone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _declared_size(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() and len(value) <= 18 else None
    return None


class CallbackDoor:
    """Raw ASGI front for the callback endpoint; every other request goes to `app`."""

    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith(PREFIX):
            await self.app(scope, receive, send)
            return
        parts = path[len(PREFIX):].split("/")
        if len(parts) != 3 or not all(parts):
            await self.app(scope, receive, send)       # the router's 404, as for any unknown path
            return
        if scope["method"] != "POST":
            await _answer(send, 405, {"error": {"code": "invalid_request",
                                                "message": f"method {scope['method']} is not allowed here"}},
                          [(b"allow", b"POST")])
            return
        try:
            await accept_callback(self.runtime, parts[0], parts[1], parts[2], receive, _declared_size(scope))
        except _Gone:
            return
        except ApiError as exc:
            await _answer(send, exc.status, exc.body(), [(k.lower().encode(), v.encode())
                                                         for k, v in exc.headers.items()])
            return
        except Exception:
            log.exception("unhandled error on POST /callbacks/%s/…", parts[0])
            await _answer(send, 500, {"error": {"code": "internal", "message": "internal error"}})
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*_JSON_HEADERS, (b"content-length", str(len(_OK)).encode())]})
        await send({"type": "http.response.body", "body": _OK})


async def _answer(send: Send, status: int, payload: dict[str, Any],
                  headers: list[tuple[bytes, bytes]] | None = None) -> None:
    # It may come before the body was read (a wrong token, a declared size over the limit): uvicorn reads and drops
    # the rest, and the next head's deadline (relay.web.httplimits), running from this answer, ends a body that
    # never does. Closed at once instead, the unread bytes would make the kernel reset the connection, which can
    # reach the provider before the answer.
    body = jsontext.http_body(payload)
    start: Message = {"type": "http.response.start", "status": status,
                      "headers": [*_JSON_HEADERS, (b"content-length", str(len(body)).encode()), *(headers or [])]}
    await send(start)
    await send({"type": "http.response.body", "body": body})
