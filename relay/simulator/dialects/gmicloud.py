"""GMI Cloud request queue (seed 000): submit, poll, and the "synchronous" final POST variant.

Mounted at /gmicloud. Statuses queued → dispatched → processing → success |
failed | cancelled; images at `outcome.media_urls[].url`; failure text in `error`.
Errors are `{"error": "<text>"}` (GMI documents no error schema; clients read `error`).
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
from ..validate import PIXEL_SIZES, Invalid, as_object, choice, integer, pixels, string

NAME = "gmicloud"
PREFIX = "/api/v1/ie/requestqueue/apikey"
MODEL = "gpt-image-1.5"

_MESSAGES = {
    400: "invalid request", 401: "unauthorized: invalid or missing API key", 404: "request not found",
    429: "rate limit exceeded", 500: "internal server error",
}
_STATUS = {"running": "processing", "succeeded": "success", "failed": "failed", "cancelled": "cancelled"}


def error(status: int, message: str | None = None, *, code: str | None = None,
          param: str | None = None, headers: dict[str, str] | None = None) -> Response:
    return json_response({"error": message or _MESSAGES.get(status, "error")}, status, headers)


def body(sim: Simulator, task: SimTask, now: float) -> dict[str, Any]:
    phase = task.phase(now)
    if phase == "queued":
        status = "queued" if task.queued_early(now) else "dispatched"
    else:
        status = _STATUS[phase]
    out: dict[str, Any] = {
        "request_id": task.id, "model": task.model, "status": status,
        "created_at": int(task.created), "updated_at": int(min(now, task.done_at)),
        "queued_at": int(task.created),
    }
    if phase == "succeeded":
        out["outcome"] = {"media_urls": [{"id": f"{task.id}-{i}", "url": sim.file_url(task, i)}
                                         for i in range(task.n)]}
    elif phase == "failed":
        out["error"] = task.fail_code or "request rejected by the safety system: content policy violation"
    elif phase == "cancelled":
        out["error"] = "request cancelled"
    return out


def _validate(raw: Any) -> dict[str, Any]:
    envelope = as_object(raw)
    model = string(envelope, "model", required=True)
    if model != MODEL:
        raise Invalid(f"model must be \"{MODEL}\" (got {model!r})", "model")
    payload = as_object(envelope.get("payload"), "payload")
    fields = {
        "prompt": string(payload, "prompt", required=True, what="payload.prompt"),
        "size": choice(payload, "size", PIXEL_SIZES, "1024x1024", "payload.size"),
        "quality": choice(payload, "quality", ("low", "medium", "high", "auto"), "medium", "payload.quality"),
        "n": integer(payload, "n", low=1, high=10, default=1, what="payload.n"),
        "fmt": choice(payload, "output_format", ("png", "jpeg", "webp"), "png", "payload.output_format"),
        "background": choice(payload, "background", ("auto", "transparent", "opaque"), "auto",
                             "payload.background"),
    }
    integer(payload, "output_compression", low=0, high=100, default=100, what="payload.output_compression")
    image = string(payload, "image", what="payload.image")
    if string(payload, "mask", what="payload.mask") and not image:
        raise Invalid("payload.mask needs payload.image", "payload.mask")
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
                                background=fields["background"], directives=directives, model=MODEL)
            sync = directives.sync if directives.sync is not None else sim.knobs.variants["gmicloud_sync"]
            if sync:
                # GMI's queue endpoint waits for the model, then answers with the final state: built at
                # done_at at the earliest, so a timer that fires early cannot make it say "processing".
                await hold_until(request, task.done_at, sim.now)
                return json_response(body(sim, task, max(sim.now(), task.done_at)))
            return json_response(body(sim, task, sim.now()))

        return await sim.serve(request, dialect=NAME, op="submit", error=error, handler=handle)

    async def poll(request: Request) -> Response:
        async def handle() -> Response:
            task = sim.store.get(NAME, request.path_params["request_id"])
            if task is None:
                return error(404)
            return json_response(body(sim, task, sim.now()))

        return await sim.serve(request, dialect=NAME, op="poll", error=error, handler=handle)

    async def models(request: Request) -> Response:
        if not sim.authorized(request, "bearer"):
            return error(401)
        return json_response({"model_ids": [MODEL]})

    return [
        Route(f"{PREFIX}/requests", submit, methods=["POST"]),
        Route(f"{PREFIX}/requests/{{request_id}}", poll, methods=["GET"]),
        Route(f"{PREFIX}/models", models, methods=["GET"]),
    ]
