"""Pixazo gateway in front of fal.ai (seed 003): queue ticket, POST-to-poll, sync variant.

Mounted at /pixazo. Submit answers `{"status":"IN_QUEUE","request_id","response_url"}`
(response_url points at an internal host nobody may call) or, with the
`pixazo_sync` variant, the final COMPLETED body. The poll is a POST with
`{"request_id"}` → IN_QUEUE | IN_PROGRESS | COMPLETED | FAILED. Auth is the
`Ocp-Apim-Subscription-Key` header; errors are `{"error": "<text>"}`.
"""

from __future__ import annotations

import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..respond import hold_until, json_response, read_json
from ..sim import Simulator
from ..tasks import SimTask, parse_directives
from ..validate import PIXEL_SIZES, RATIO_TO_PIXELS, as_object, choice, integer, pixels, string

NAME = "pixazo"
API = "/gpt-image-1-5-api-923/v1"
# The documented response_url host is an internal worker; `.invalid` guarantees nobody reaches it.
RESPONSE_URL = "https://gateway-falai-automate.appypie.invalid/gpt-image-1-5-api-request-result"

_MESSAGES = {
    400: "Invalid request parameters", 401: "Invalid or missing authentication",
    403: "Access denied for this operation", 404: "Request not found",
    429: "Rate limit exceeded, please retry later",
    500: "An unexpected error occurred, please try again later",
}


def error(status: int, message: str | None = None, *, code: str | None = None,
          param: str | None = None, headers: dict[str, str] | None = None) -> Response:
    return json_response({"error": message or _MESSAGES.get(status, "Error")}, status, headers)


async def body(sim: Simulator, task: SimTask, now: float) -> dict[str, Any]:
    phase = task.phase(now)
    out: dict[str, Any] = {"request_id": task.id}
    wait = round(task.remaining(now) / 60, 3)
    if phase == "queued":
        out |= {"status": "IN_QUEUE", "queue_position": 2 if task.queued_early(now) else 1,
                "estimated_wait_minutes": wait}
    elif phase == "running":
        out |= {"status": "IN_PROGRESS", "queue_position": 0, "estimated_wait_minutes": wait}
    elif phase == "succeeded":
        images = []
        for i in range(task.n):
            info = await sim.images.get(task, i)  # size_bytes needs the real bytes
            images.append({"url": sim.file_url(task, i), "width": info.width, "height": info.height,
                           "content_type": info.content_type, "size_bytes": len(info.data)})
        req = task.request if isinstance(task.request, dict) else {}
        out |= {"status": "COMPLETED", "images": images, "metadata": {
            "prompt": task.prompt, "image_size": f"{task.width}x{task.height}",
            "quality": req.get("quality", "high"), "output_format": task.fmt,
            "processing_time_ms": int(task.duration * 1000)}}
    else:
        out |= {"status": "FAILED", "error": "Request cancelled" if phase == "cancelled" else
                (task.fail_code or "Content policy violation: the prompt was rejected by the safety system")}
    return out


def _validate(raw: Any) -> dict[str, Any]:
    req = as_object(raw)
    size = choice(req, "image_size", ("auto", *PIXEL_SIZES, *RATIO_TO_PIXELS), "1024x1024")
    fields = {
        "prompt": string(req, "prompt", required=True),
        "size": "1024x1024" if size == "auto" else size,
        "n": integer(req, "num_images", low=1, high=4, default=1),
        "fmt": choice(req, "output_format", ("png", "jpeg", "webp"), "png"),
        "background": choice(req, "background", ("auto", "transparent", "opaque"), "auto"),
    }
    choice(req, "quality", ("low", "medium", "high", "auto"), "high")
    return fields


def routes(sim: Simulator) -> list[Route]:
    async def submit(request: Request) -> Response:
        async def handle() -> Response:
            raw = await read_json(request)
            fields = _validate(raw)
            directives, prompt = parse_directives(fields["prompt"])
            width, height = pixels(fields["size"])
            task = sim.new_task(id=str(uuid.uuid4()), dialect=NAME, request=raw, n=fields["n"],
                                width=width, height=height, fmt=fields["fmt"], prompt=prompt,
                                background=fields["background"], directives=directives)
            sync = directives.sync if directives.sync is not None else sim.knobs.variants["pixazo_sync"]
            if sync:
                # The final answer, built at done_at at the earliest (a timer may fire a little early).
                await hold_until(request, task.done_at, sim.now)
                return json_response(await body(sim, task, max(sim.now(), task.done_at)))
            return json_response({"status": "IN_QUEUE", "request_id": task.id, "response_url": RESPONSE_URL})

        return await sim.serve(request, dialect=NAME, op="submit", error=error, handler=handle, auth="apim")

    async def poll(request: Request) -> Response:
        async def handle() -> Response:
            req = as_object(await read_json(request))
            task = sim.store.get(NAME, string(req, "request_id", required=True) or "")
            if task is None:
                return error(404)
            return json_response(await body(sim, task, sim.now()))

        return await sim.serve(request, dialect=NAME, op="poll", error=error, handler=handle, auth="apim")

    return [
        Route(f"{API}/gpt-image-1-5-api-request", submit, methods=["POST"]),
        Route(f"{API}/gpt-image-1-5-api-request-result", poll, methods=["POST"]),
    ]
