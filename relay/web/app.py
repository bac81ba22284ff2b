"""The Starlette app factory: routes, the one error handler, health, and the worker's lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from relay import __version__
from relay.errors import ApiError, ArchiveError
from relay.metrics import exposition
from relay.runtime import Runtime
from relay.validation import NUL
from relay.web import archives, console, jobs, openai_compat, subscriptions, tasks
from relay.web.callbacks import CallbackDoor
from relay.web.common import json_response, runtime_of
from relay.web.openapi import openapi_document

log = logging.getLogger("relay.web")

_HTTP_CODES = {400: "invalid_request", 401: "unauthorized", 404: "not_found", 405: "invalid_request",
               409: "conflict", 413: "payload_too_large", 429: "rate_limited"}


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return json_response(exc.body(), status=exc.status, headers=exc.headers)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "invalid_request" if exc.status_code < 500 else "internal")
    message = {404: "no such endpoint", 405: f"method {request.method} is not allowed here"}.get(
        exc.status_code, str(exc.detail))
    return json_response({"error": {"code": code, "message": message}}, status=exc.status_code,
                         headers=dict(exc.headers or {}))


async def client_gone(request: Request, exc: Exception) -> Response:
    """The client went away while its body was being read (or was cut off: relay.web.httplimits): nobody to
    answer, and nothing wrong with relay. Not logged as an error; what is returned is never sent."""
    log.debug("client gone during %s %s", request.method, request.url.path)
    return Response(status_code=400)


async def internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return json_response({"error": {"code": "internal", "message": "internal error"}}, status=500)


async def healthz(request: Request) -> Response:
    return json_response({"ok": True, "version": __version__})


async def readyz(request: Request) -> Response:
    runtime = runtime_of(request)
    problems = {}
    try:
        await runtime.store.ping()
    except Exception as exc:
        problems["database"] = type(exc).__name__
    # A full disk still answers the ping (a read) while every write fails: the worker's own calls tell.
    outage = runtime.worker.store_outage.problem()
    if outage is not None:
        problems["database"] = outage
    try:
        await runtime.ctx.image_store.check()    # a bucket: one quick list request with a short deadline
    except ArchiveError as exc:
        problems["image_store"] = exc.message    # what is wrong and what to fix; never a credential
    except Exception as exc:
        problems["image_store"] = type(exc).__name__
    if problems:
        return json_response({"ok": False, "problems": problems}, status=503)
    return json_response({"ok": True})


async def openapi(request: Request) -> Response:
    return json_response(openapi_document(runtime_of(request)))


async def metrics(request: Request) -> Response:
    """Prometheus text exposition (relay.metrics)."""
    runtime = runtime_of(request)
    body, content_type = await exposition(runtime.store, runtime.ctx.clock.now(), runtime.settings.providers)
    return Response(body, headers={"content-type": content_type})


class RelayApp(Starlette):
    """Starlette, with provider callbacks answered in front of its router and middleware (relay.web.callbacks)."""

    def __init__(self, *args: Any, runtime: Runtime, callbacks: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        stack = refuse_nul(super().__call__)
        self._entry = CallbackDoor(stack, runtime) if callbacks else stack

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._entry(scope, receive, send)


def refuse_nul(app: ASGIApp) -> ASGIApp:
    """A path or query string that decodes to a NUL character is refused before any route sees it (404 for a
    path: nothing is named so; 422 for a query, naming the parameter), in front of every route, as no id, name or
    filter holds one (relay.validation.NUL). Not under /openai/, whose answers take OpenAI's shape: its routes
    take no id or filter to the database (an input's name meets its signature first). The callback door is ahead
    of this: its token check refuses such a path anyway."""
    async def refusing(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith("/openai/"):
            if NUL in scope["path"]:
                await json_response({"error": {"code": "not_found", "message": "no such resource"}},
                                    status=404)(scope, receive, send)
                return
            query = scope["query_string"]
            if b"%00" in query:
                pairs = urllib.parse.parse_qsl(query.decode("latin-1"), keep_blank_values=True)
                field = next((name for name, value in pairs if NUL in name or NUL in value), None)
                if field is not None:
                    field = field.replace(NUL, "\ufffd")
                    await json_response({"error": {"code": "invalid_request", "field": field, "message":
                                                   f"{field} holds a NUL character (%00)"}},
                                        status=422)(scope, receive, send)
                    return
        await app(scope, receive, send)
    return refusing


def create_app(runtime: Runtime, *, run_worker: bool = True, serve_api: bool = True) -> Starlette:
    """The relay app over an open Runtime. With `run_worker`, the worker runs for the app's lifetime.

    Without `serve_api` (role `worker`) only the operations endpoints answer: a worker replica is no way
    around the API replicas' placement, and its port serves health checks and metrics.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        worker_task = None
        if run_worker:
            worker_task = asyncio.create_task(runtime.worker.run_forever(), name="relay-worker")
        try:
            yield
        finally:
            if worker_task is not None:
                await runtime.worker.stop()
                worker_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await worker_task

    operations = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    routes = operations if not serve_api else [
        *operations,
        Route("/openapi.json", openapi, methods=["GET"]),
        *tasks.routes,
        *openai_compat.routes,    # OpenAI's Images API shapes under /openai/v1 (its SDKs' base_url)
        *archives.routes,
        *subscriptions.routes,
        *jobs.routes,
        *console.routes(),     # the operator's dashboard: GET / and /console/…
    ]
    app = RelayApp(routes=routes, lifespan=lifespan, runtime=runtime, callbacks=serve_api, exception_handlers={
        ApiError: api_error, HTTPException: http_error, ClientDisconnect: client_gone, Exception: internal_error})
    app.state.runtime = runtime
    return app
