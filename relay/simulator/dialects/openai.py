"""OpenAI Images API (synchronous): generations (JSON) and edits (multipart), b64_json out.

Mounted at /openai. The answer comes after a short delay (duration/3, at most
5 s, or the prompt's `[sim:duration=…]`) with `data[].b64_json`; nothing to poll.
The task id is returned in the `x-request-id` header for `/_sim/tasks/openai/{id}`.
A `[sim:fail]` (or `[sim:cancel]`) task answers 400 `moderation_blocked`.
Errors are `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from relay import multipart
from relay.errors import ApiError

from ..respond import hold_until, json_response, read_body, read_json
from ..sim import Simulator
from ..validate import PIXEL_SIZES, Invalid, as_object, choice, integer, pixels, string
from ..tasks import parse_directives

NAME = "openai"
MODELS = ("gpt-image-1.5", "gpt-image-1", "gpt-image-1-mini")
MAX_DELAY = 5.0
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"))

_KINDS = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    404: ("invalid_request_error", None, "Not found."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests. Please try again later."),
    500: ("server_error", None, "The server had an error while processing your request."),
}
_OUTPUT_TOKENS = {"low": 272, "medium": 1056, "high": 4160, "auto": 1056}


def error(status: int, message: str | None = None, *, code: str | None = None,
          param: str | None = None, headers: dict[str, str] | None = None) -> Response:
    kind, default_code, default = _KINDS.get(status, ("api_error", None, "Error."))
    if code == "moderation_blocked":
        kind = "image_generation_user_error"
    body = {"error": {"message": message or default, "type": kind, "param": param, "code": code or default_code}}
    return json_response(body, status, headers)


def _image_kind(data: bytes) -> str | None:
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _validate(req: dict[str, Any]) -> dict[str, Any]:
    model = string(req, "model", required=True)
    if model not in MODELS:
        raise Invalid(f"Invalid value for 'model': {model!r}. The simulator answers {', '.join(MODELS)}.", "model")
    if req.get("stream") not in (None, False, "false"):
        raise Invalid("Streaming is not supported by the simulator.", "stream")
    if "response_format" in req:
        raise Invalid("Unknown parameter: 'response_format'.", "response_format")
    size = choice(req, "size", ("auto", *PIXEL_SIZES), "auto")
    fields = {
        "model": model,
        "prompt": string(req, "prompt", required=True, max_len=32000),
        "size": "1024x1024" if size == "auto" else size,
        "n": integer(req, "n", low=1, high=10, default=1),
        "quality": choice(req, "quality", ("auto", "low", "medium", "high"), "auto"),
        "background": choice(req, "background", ("auto", "transparent", "opaque"), "auto"),
        "fmt": choice(req, "output_format", ("png", "jpeg", "webp"), "png"),
    }
    if fields["background"] == "transparent" and fields["fmt"] == "jpeg":
        raise Invalid("Transparent background requires output_format png or webp.", "background")
    integer(req, "output_compression", low=0, high=100, default=100)
    choice(req, "moderation", ("auto", "low"), "auto")
    return fields


def _form_fields(parts: list[multipart.Part]) -> tuple[dict[str, Any], list[multipart.Part], multipart.Part | None]:
    """Multipart text fields typed like JSON (numbers as ints), plus the image and mask files."""
    fields: dict[str, Any] = {}
    images, mask = [], None
    for part in parts:
        if part.name in ("image", "image[]"):
            images.append(part)
        elif part.name == "mask":
            mask = part
        else:
            text = part.text()
            number = part.name in ("n", "output_compression", "partial_images") and text.strip().lstrip("-").isdigit()
            fields[part.name] = int(text) if number else text
    return fields, images, mask


def _describe(part: multipart.Part) -> dict[str, Any]:
    return {"filename": part.filename, "content_type": part.content_type or "text/plain", "bytes": len(part.data),
            "sha256": hashlib.sha256(part.data).hexdigest()}


def _check_edit_files(images: list[multipart.Part], mask: multipart.Part | None) -> None:
    if not images:
        raise Invalid("Missing required parameter: 'image'.", "image")
    if len(images) > 16:
        raise Invalid("At most 16 images may be given.", "image")
    for part in images:
        if len(part.data) > 50 * 1024 * 1024:
            raise Invalid("Each image must be smaller than 50 MB.", "image")
        if _image_kind(part.data) is None:
            raise Invalid("Invalid image file: each image must be png, jpeg or webp.", "image")
    if mask is not None and _image_kind(mask.data) != "png":
        raise Invalid("Invalid mask: the mask must be a PNG image.", "mask")


def routes(sim: Simulator) -> list[Route]:
    async def answer(request: Request, fields: dict[str, Any], record: Any) -> Response:
        directives, prompt = parse_directives(fields["prompt"])
        delay = directives.duration if directives.duration is not None else min(sim.knobs.duration / 3, MAX_DELAY)
        width, height = pixels(fields["size"])
        task = sim.new_task(id=f"req_{uuid.uuid4().hex}", dialect=NAME, request=record, n=fields["n"],
                            width=width, height=height, fmt=fields["fmt"], prompt=prompt, duration=delay,
                            background=fields["background"], directives=directives, model=fields["model"])
        headers = {"x-request-id": task.id}
        # Answer no earlier than done_at by the simulator's clock, so /_sim shows the task as done
        # (with its images) once the answer is out, even when a timer fires a little early.
        await hold_until(request, task.done_at, sim.now)
        if task.outcome != "succeeded":
            response = error(400, "Your request was rejected by the safety system.", code="moderation_blocked")
            response.headers.update(headers)
            return response
        data = [{"b64_json": base64.b64encode((await sim.images.get(task, i)).data).decode("ascii")}
                for i in range(task.n)]
        text_tokens = len(fields["prompt"]) // 4 + 1
        image_tokens = _OUTPUT_TOKENS[fields["quality"]] * task.n
        return json_response({
            "created": int(task.created), "background": "transparent" if task.background == "transparent"
            else "opaque", "output_format": task.fmt, "quality": fields["quality"], "size": fields["size"],
            "data": data,
            "usage": {"input_tokens": text_tokens,
                      "input_tokens_details": {"text_tokens": text_tokens, "image_tokens": 0},
                      "output_tokens": image_tokens,
                      "output_tokens_details": {"text_tokens": 0, "image_tokens": image_tokens},
                      "total_tokens": text_tokens + image_tokens},
        }, headers=headers)

    async def generations(request: Request) -> Response:
        async def handle() -> Response:
            raw = as_object(await read_json(request))
            return await answer(request, _validate(raw), raw)

        return await sim.serve(request, dialect=NAME, op="submit", error=error, handler=handle)

    async def edits(request: Request) -> Response:
        async def handle() -> Response:
            raw = await read_body(request)
            try:
                parts = multipart.parse(multipart.boundary_of(request.headers.get("content-type", "")), raw)
                fields, images, mask = _form_fields(parts)
            except ApiError as exc:
                raise Invalid(exc.message) from None
            checked = _validate(fields)
            _check_edit_files(images, mask)
            record = {**fields, "image": [_describe(p) for p in images],
                      "mask": _describe(mask) if mask else None}
            return await answer(request, checked, record)

        return await sim.serve(request, dialect=NAME, op="submit", error=error, handler=handle)

    return [
        Route("/v1/images/generations", generations, methods=["POST"]),
        Route("/v1/images/edits", edits, methods=["POST"]),
    ]
