"""Routes of /v1: tasks, images, events, providers. Thin: parse, call a use case, present."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from relay.errors import InvalidRequest, NotFound, Unauthorized
from relay.models import Task, TaskStatus
from relay.present import task_object, with_image_urls
from relay.states import ALL_EVENT_TYPES
from relay.web.providers import list_providers   # capabilities, circuits, prices, costs per day
from relay.web.common import (idempotency_key, json_response, query_cursor, query_limit, read_json_body,
                              require_api_key, runtime_of, small_int)
from relay.web.stored import stored_file


def present(request: Request, task: Task) -> dict[str, object]:
    return task_object(task, image_url_maker(request))


def image_url_maker(request: Request):  # type: ignore[no-untyped-def]
    runtime = runtime_of(request)
    ctx = runtime.ctx

    def make(image_id: str) -> str:
        return ctx.signer.image_url(runtime.settings.server.public_url, image_id, now=ctx.clock.now(),
                                    ttl=runtime.settings.archive.link_ttl)
    return make


async def create_task(request: Request) -> Response:
    scope = require_api_key(request)
    key = idempotency_key(request)
    data = await read_json_body(request, runtime_of(request).settings.server.max_body_bytes)
    task, created = await runtime_of(request).tasks.create(data, scope=scope, idempotency_key=key)
    return json_response(present(request, task), status=202 if created else 200)


async def get_task(request: Request) -> Response:
    require_api_key(request)
    task = await runtime_of(request).tasks.get(request.path_params["task_id"])
    return json_response(present(request, task))


async def list_tasks(request: Request) -> Response:
    require_api_key(request)
    status = request.query_params.get("status")
    if status is not None and status not in {s.value for s in TaskStatus}:
        raise InvalidRequest(f"status must be one of {', '.join(s.value for s in TaskStatus)}", field="status")
    runtime = runtime_of(request)
    provider = request.query_params.get("provider")
    tasks, cursor = await runtime.store.list_tasks(status=status, provider=provider, limit=query_limit(request),
                                                   cursor=query_cursor(request, "cursor", "tsk"))
    return json_response({"data": [present(request, t) for t in tasks], "next_cursor": cursor})


async def cancel_task(request: Request) -> Response:
    require_api_key(request)
    task = await runtime_of(request).tasks.cancel(request.path_params["task_id"])
    return json_response(present(request, task))


async def get_image(request: Request) -> Response:
    """Archived bytes, by API key or by signed link (exp + sig)."""
    runtime = runtime_of(request)
    image_id = request.path_params["image_id"]
    exp, sig = request.query_params.get("exp"), request.query_params.get("sig")
    if exp is not None or sig is not None:
        # Links relay makes are ASCII with a short exp; anything else would trip int() or compare_digest (500).
        well_formed = small_int(exp) is not None and sig is not None and sig.isascii()
        if not well_formed or not runtime.ctx.signer.verify_image(image_id, exp, sig, now=runtime.ctx.clock.now()):
            raise Unauthorized("the image link is invalid or has expired")
    else:
        require_api_key(request)
    image = await runtime.store.get_image(image_id)
    if image is None or image.status != "archived" or image.path is None:
        raise NotFound(f"no archived image {image_id!r}")
    headers = {"ETag": f'"{image.sha256}"', "Cache-Control": "public, max-age=31536000, immutable"}
    if request.headers.get("if-none-match") == headers["ETag"]:
        return Response(status_code=304, headers=headers)   # the sha256 is the bytes: no need to ask the store
    return await stored_file(request, runtime.ctx.image_store, image.path, media_type=image.content_type,
                             headers=headers,
                             missing=NotFound(f"the file of image {image_id!r} is missing from the image store"))


async def list_events(request: Request) -> Response:
    """The ordered event log, oldest first after the cursor (a polling alternative to webhooks)."""
    require_api_key(request)
    runtime = runtime_of(request)
    type_ = request.query_params.get("type")
    if type_ is not None and type_ not in ALL_EVENT_TYPES:
        raise InvalidRequest(f"type must be one of {', '.join(ALL_EVENT_TYPES)}", field="type")
    after = query_cursor(request, "after", "evt")
    limit = query_limit(request)
    events = await runtime.store.list_events(after=after, type=type_, task_id=request.query_params.get("task_id"),
                                             limit=limit)
    if after is not None and not events and not await runtime.store.event_exists(after):
        # An unknown cursor would otherwise read as "from the beginning" to the store: say so instead.
        raise InvalidRequest(f"after: no event {after} in the log", field="after")
    make = image_url_maker(request)
    from relay.clock import rfc3339
    data = [{"id": e.id, "type": e.type, "timestamp": rfc3339(e.created_at), "sequence": e.sequence,
             "data": with_image_urls(e.data or {}, make)} for e in events]
    return json_response({"data": data, "next_cursor": data[-1]["id"] if data else None})


routes = [
    Route("/v1/tasks", create_task, methods=["POST"]),
    Route("/v1/tasks", list_tasks, methods=["GET"]),
    Route("/v1/tasks/{task_id}", get_task, methods=["GET"]),
    Route("/v1/tasks/{task_id}/cancel", cancel_task, methods=["POST"]),
    Route("/v1/images/{image_id}", get_image, methods=["GET", "HEAD"]),
    Route("/v1/events", list_events, methods=["GET"]),
    Route("/v1/providers", list_providers, methods=["GET"]),
]
