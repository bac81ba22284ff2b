"""APIMart and its white-labels such as gccai (seed 001): submit envelope, task poll, quirks.

Mounted at /apimart. Submit answers `{"code":200,"data":[{"status":"submitted","task_id"}]}`;
poll answers `{"code":200,"data":{...}}` with `result.images[].url` as a string or a
list of strings (variant `apimart_url_as_string`, alternating per task by default)
and a per-image `expires_at`. Honours `Idempotency-Key`. Errors are
`{"code": <status>, "error": {"code", "message", "type"}}`, sent as HTTP 200 when
the `apimart_error_as_200` variant is on (a 200 whose `code` is not 200 is an error).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ...ids import ulid
from ..respond import json_response, read_json
from ..sim import Simulator
from ..tasks import SimTask, parse_directives
from ..validate import RATIO_TO_PIXELS, Invalid, as_object, choice, integer, pixels, string, string_list

NAME = "apimart"
MODELS = ("gpt-image-1.5-official", "gpt-image-1-official")

_KINDS = {
    400: ("invalid_request_error", "invalid request"),
    401: ("authentication_error", "invalid or missing API key"),
    404: ("not_found_error", "task not found"),
    429: ("rate_limit_error", "rate limit exceeded, please retry later"),
    500: ("server_error", "internal server error"),
}
_STATUS = {"running": "processing", "succeeded": "completed", "failed": "failed", "cancelled": "cancelled"}


def make_error(sim: Simulator) -> Callable[..., Response]:
    def error(status: int, message: str | None = None, *, code: str | None = None,
              param: str | None = None, headers: dict[str, str] | None = None) -> Response:
        kind, default = _KINDS.get(status, ("api_error", "error"))
        err: dict[str, Any] = {"code": status, "message": message or default, "type": kind}
        if param:
            err["param"] = param
        # Refusals may come back as HTTP 200 with the real code only in the body.
        http = 200 if sim.knobs.variants["apimart_error_as_200"] and status in (400, 401, 404) else status
        return json_response({"code": status, "error": err}, http, headers)

    return error


def url_as_string(sim: Simulator, task: SimTask) -> bool:
    if task.directives.url is not None:
        return task.directives.url == "string"
    chosen = sim.knobs.variants["apimart_url_as_string"]
    return bool(task.seq % 2) if chosen is None else bool(chosen)


def body(sim: Simulator, task: SimTask, now: float) -> dict[str, Any]:
    phase = task.phase(now)
    if phase == "queued":
        status = "submitted" if task.queued_early(now) else "pending"
    else:
        status = _STATUS[phase]
    data: dict[str, Any] = {
        "id": task.id, "status": status, "progress": task.progress(now), "created": int(task.created),
        "estimated_time": max(1, math.ceil(task.duration)),
    }
    if phase == "succeeded":
        as_string = url_as_string(sim, task)
        data["result"] = {"images": [
            {"url": sim.file_url(task, i) if as_string else [sim.file_url(task, i)],
             # Rounded up: a whole-second expiry must not claim the link dies before it does.
             "expires_at": math.ceil(task.expires_at)}
            for i in range(task.n)
        ]}
    if phase in ("succeeded", "failed", "cancelled"):
        data["completed"] = int(task.done_at)
        data["actual_time"] = round(task.duration)
    if phase == "failed":
        data["error"] = {"code": 400, "type": task.fail_code or "moderation_blocked",
                         "message": "Your request was rejected by the safety system."}
    return {"code": 200, "data": data}


def _validate(raw: Any) -> dict[str, Any]:
    req = as_object(raw)
    model = string(req, "model", required=True)
    if model not in MODELS:
        raise Invalid(f"model must be one of {', '.join(MODELS)} (got {model!r})", "model")
    fields = {
        "model": model,
        "prompt": string(req, "prompt", required=True),
        "size": choice(req, "size", tuple(RATIO_TO_PIXELS), "1:1"),
        # APIMart documents clamping (≤0 → 1, >4 → 4), but a quoted number is an error.
        "n": integer(req, "n", low=1, high=4, default=1, clamp=True),
        "fmt": choice(req, "output_format", ("png", "jpeg"), "png"),
        "background": choice(req, "background", ("auto", "opaque", "transparent"), "auto"),
    }
    choice(req, "quality", ("auto", "low", "medium", "high"), "auto")
    choice(req, "moderation", ("auto", "low"), "auto")
    integer(req, "output_compression", low=0, high=100, default=100)
    images = string_list(req, "image_urls", max_items=15)
    if string(req, "mask_url") and not images:
        raise Invalid("mask_url must be used together with image_urls", "mask_url")
    return fields


def routes(sim: Simulator) -> list[Route]:
    error = make_error(sim)

    async def submit(request: Request) -> Response:
        async def handle() -> Response:
            raw = await read_json(request)
            key = request.headers.get("idempotency-key", "").strip()
            scoped = f"{request.headers.get('authorization', '')}|{key}"
            if key and scoped in sim.store.idempotency:
                # Same key, same task: the replay creates nothing.
                existing = sim.store.idempotency[scoped]
                return json_response({"code": 200, "data": [{"status": "submitted", "task_id": existing}]})
            fields = _validate(raw)
            directives, prompt = parse_directives(fields["prompt"])
            width, height = pixels(fields["size"])
            task = sim.new_task(id=f"task_{ulid()}", dialect=NAME, request=raw, n=fields["n"],
                                width=width, height=height, fmt=fields["fmt"], prompt=prompt,
                                background=fields["background"], directives=directives, model=fields["model"])
            if key:
                sim.store.idempotency[scoped] = task.id
            return json_response({"code": 200, "data": [{"status": "submitted", "task_id": task.id}]})

        return await sim.serve(request, dialect=NAME, op="submit", error=error, handler=handle)

    async def poll(request: Request) -> Response:
        async def handle() -> Response:
            task = sim.store.get(NAME, request.path_params["task_id"])
            if task is None:
                return error(404)
            return json_response(body(sim, task, sim.now()))

        return await sim.serve(request, dialect=NAME, op="poll", error=error, handler=handle)

    return [
        Route("/v1/images/generations", submit, methods=["POST"]),
        Route("/v1/tasks/{task_id}", poll, methods=["GET"]),
    ]
