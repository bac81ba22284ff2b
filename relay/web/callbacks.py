"""POST /callbacks/{provider}/{task_id}/{token}: take a provider callback, record it durably, answer 200 at once.

The token is an HMAC of provider and task id, so the URL itself is the
credential; a wrong token (or an unknown provider) is a plain 404 that gives
no hint. Nothing is processed here: the raw body goes to the inbox with a job,
in one transaction, and the worker confirms and applies it later.
"""

from __future__ import annotations

import json
import time

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from relay import ids, metrics
from relay.errors import BadRequestBody, NotFound
from relay.models import Job
from relay.web.common import read_body, runtime_of

_OK = b'{"ok":true}'


async def receive_callback(request: Request) -> Response:
    started = time.perf_counter()
    runtime = runtime_of(request)
    ctx = runtime.ctx
    provider_name = request.path_params["provider"]
    task_id = request.path_params["task_id"]
    token = request.path_params["token"]
    provider = ctx.providers.get(provider_name)
    if provider is None or not provider.caps.callbacks or \
            not ctx.signer.verify_callback_token(provider_name, task_id, token):
        # The label only ever names a configured provider: the path is anyone's to make up.
        metrics.CALLBACKS.labels(provider_name if provider is not None else "unknown", "rejected").inc()
        raise NotFound("not found")
    body = await read_body(request, runtime.settings.server.max_body_bytes)
    try:
        text = body.decode()
        json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError):
        # RecursionError: JSON nested deeper than the parser's stack; it could not be processed later either.
        metrics.CALLBACKS.labels(provider_name, "rejected").inc()
        raise BadRequestBody("the callback body must be JSON") from None
    now = ctx.clock.now()
    inbox_id = ids.new_id("cbk", now)
    job = Job(id=ids.new_id("job", now), kind="callback", task_id=task_id, payload={"inbox_id": inbox_id},
              run_at=now, dedupe_key=f"callback:{inbox_id}")
    await runtime.store.receive_callback(inbox_id, provider_name, task_id, text, now, job)
    metrics.CALLBACKS.labels(provider_name, "acked").inc()
    metrics.CALLBACK_ACK_SECONDS.labels(provider_name).observe(time.perf_counter() - started)
    return Response(_OK, media_type="application/json")


routes = [Route("/callbacks/{provider}/{task_id}/{token}", receive_callback, methods=["POST"])]
