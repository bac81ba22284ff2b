"""EvoLink (seed 002): one task object for submit, poll and callback alike.

Mounted at /evolink. Status pending → processing → completed | failed |
cancelled; images in `results`; failures in `error.code` (a string business
code such as content_policy_violation). A `callback_url` gets the poll body
POSTed when the task ends (see callbacks.py). HTTP errors are
`{"error": {"code", "message", "type", "fallback_suggestion"?}}`.
"""

from __future__ import annotations

import math
import secrets
import string as string_mod
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..respond import json_response, read_json
from ..sim import Simulator
from ..tasks import SimTask, parse_directives
from ..validate import (PIXEL_SIZES, RATIO_TO_PIXELS, Invalid, as_object, choice, integer, pixels,
                        string, string_list)

NAME = "evolink"
MODELS = ("gpt-image-1.5", "gpt-image-1.5-lite")
_ALNUM = string_mod.ascii_lowercase + string_mod.digits

_KINDS = {
    400: ("invalid_request_error", "Invalid request parameters", None),
    401: ("authentication_error", "Invalid or missing API key", None),
    404: ("not_found_error", "Task not found or expired", None),
    429: ("rate_limit_error", "Rate limit exceeded", "retry after 60 seconds"),
    500: ("internal_server_error", "Internal server error", None),
    503: ("service_unavailable_error", "Service temporarily unavailable", "retry after 30 seconds"),
}
_STATUS = {"queued": "pending", "running": "processing", "succeeded": "completed",
           "failed": "failed", "cancelled": "cancelled"}


def error(status: int, message: str | None = None, *, code: str | None = None,
          param: str | None = None, headers: dict[str, str] | None = None) -> Response:
    kind, default, suggestion = _KINDS.get(status, ("api_error", "Error", None))
    err: dict[str, Any] = {"code": status, "message": message or default, "type": kind}
    if param:
        err["param"] = param
    if suggestion:
        err["fallback_suggestion"] = suggestion
    return json_response({"error": err}, status, headers)


def body(sim: Simulator, task: SimTask, now: float) -> dict[str, Any]:
    """The task object: submit response, poll response and callback body are all this."""
    phase = task.phase(now)
    out: dict[str, Any] = {
        "created": int(task.created), "id": task.id, "model": task.model,
        "object": "image.generation.task", "progress": task.progress(now), "status": _STATUS[phase],
        "task_info": {"can_cancel": phase in ("queued", "running"),
                      "estimated_time": math.ceil(task.remaining(now))},
        "type": "image",
        "usage": {"billing_rule": "per_call", "credits_reserved": 2.5, "user_group": "default"},
    }
    if phase == "succeeded":
        out["results"] = [sim.file_url(task, i) for i in range(task.n)]
    elif phase == "failed":
        out["error"] = {"code": task.fail_code or "content_policy_violation",
                        "message": "Content policy violation.\nYour request was blocked by safety filters."}
    elif phase == "cancelled":
        out["error"] = {"code": "request_cancelled", "message": "Task was cancelled."}
    return out


def _callback_url(sim: Simulator, req: dict[str, Any]) -> str | None:
    url = string(req, "callback_url")
    if url is None:
        return None
    parts = urlsplit(url)
    schemes = ("https", "http") if sim.config.allow_http_callbacks else ("https",)
    if len(url) > 2048:
        raise Invalid("callback_url must not exceed 2048 characters", "callback_url")
    if parts.scheme not in schemes or not parts.hostname:
        raise Invalid("callback_url must be an HTTPS URL", "callback_url")
    return url


def _validate(sim: Simulator, raw: Any) -> dict[str, Any]:
    req = as_object(raw)
    model = string(req, "model", default="gpt-image-1.5")
    if model not in MODELS:
        raise Invalid(f"model must be one of {', '.join(MODELS)} (got {model!r})", "model")
    fields = {
        "model": model,
        "prompt": string(req, "prompt", required=True, max_len=2000),
        "size": choice(req, "size", (*RATIO_TO_PIXELS, *PIXEL_SIZES), "1024x1024"),
        "callback_url": _callback_url(sim, req),
    }
    choice(req, "quality", ("low", "medium", "high", "auto"), "high")
    integer(req, "n", low=1, high=1, default=1)  # "currently only supports 1"
    string_list(req, "image_urls", max_items=16)
    return fields


def _task_id(now: float) -> str:
    return f"task-unified-{int(now)}-{''.join(secrets.choice(_ALNUM) for _ in range(8))}"


def routes(sim: Simulator) -> list[Route]:
    async def submit(request: Request) -> Response:
        async def handle() -> Response:
            raw = await read_json(request)
            fields = _validate(sim, raw)
            directives, prompt = parse_directives(fields["prompt"])
            width, height = pixels(fields["size"])
            task = sim.new_task(id=_task_id(sim.now()), dialect=NAME, request=raw, n=1, width=width,
                                height=height, fmt="png", prompt=prompt, directives=directives,
                                model=fields["model"], callback_url=fields["callback_url"])
            if task.callback_url:
                task.callback_knobs = dict(sim.knobs.callbacks)
                sim.callbacks.schedule(task, lambda t, at: body(sim, t, at))
            return json_response(body(sim, task, sim.now()))

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
