"""OpenAI's Images API on relay: `POST /openai/v1/images/generations` (JSON) and `/openai/v1/images/edits`
(multipart/form-data), as the official SDKs send them for gpt-image models.

Each request becomes a relay task (TaskService.create: the same validation, routing and idempotency as
`POST /v1/tasks`, with `model` as the provider or route name), then waits until the task ends, up to
`[openai_compat] wait_seconds`, and answers in OpenAI's response shape with relay's stable signed image
links (and/or the archived bytes as base64). Errors on this surface are in OpenAI's shape
(`{"error": {"message", "type", "param", "code"}}`), since OpenAI's clients parse that.

Uploaded edit images are verified, kept in the image store (content-addressed; recorded in `uploads` and never
swept by retention, see relay.retention) and handed to the task as
signed links to `GET /openai/v1/inputs/{sha256}.{ext}`: providers that take URLs fetch them from relay,
the others get them through relay's guarded input fetcher, like any reference image URL.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from relay import jsontext
from relay.errors import ApiError, ArchiveError, InvalidImage, NotFound, PayloadTooLarge, Unauthorized
from relay.images.store import ImageStore, StoredImage, image_key
from relay.images.verify import ainspect_image, sniff_image
from relay.models import Task, TaskStatus
from relay.multipart import Part
from relay.runtime import Runtime
from relay.validation import MAX_INPUT_IMAGES, check_json_limits
from relay.web.common import (idempotency_key, json_response, read_json_body, require_api_key, runtime_of,
                              small_int)
from relay.web.multipart import read_form
from relay.web.stored import stored_file
from relay.web.tasks import image_url_maker
from relay.web.waiting import waiter_of

# Fields of OpenAI's request that are a relay task's own, under the same names and rules.
TASK_FIELDS = ("prompt", "n", "size", "quality", "background", "output_format", "output_compression", "moderation")
# OpenAI options relay has no way to honour: refused when given a value (never silently dropped).
REFUSED = ("style", "input_fidelity", "complexity", "frame_count", "frame_duration_ms", "svg", "markup")
OTHER_FIELDS = ("model", "response_format", "user", "safety_identifier", "stream", "partial_images")
KNOWN_FIELDS = frozenset((*TASK_FIELDS, *REFUSED, *OTHER_FIELDS))
INTEGER_FIELDS = ("n", "output_compression", "partial_images")
UPLOAD_TYPES = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
CONTENT_TYPES = {v: k for k, v in UPLOAD_TYPES.items()}
FORMAT_OF = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}
POLICY_CODES = ("content_policy_violation", "moderation_blocked")
INPUT_CODES = ("reference_unavailable", "invalid_image", "unsupported")


class OpenAIError(Exception):
    """An answer in OpenAI's error shape. `task_id` names the relay task, when there is one."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, task_id: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.task_id = task_id
        self.headers = dict(headers or {})

    def response(self) -> Response:
        error: dict[str, Any] = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        headers = dict(self.headers)
        if self.task_id is not None:
            error["task_id"] = self.task_id
            headers.update(task_headers(self.task_id))
        if self.status == 409 or self.status >= 500:
            # The SDKs retry these on their own: a retry would be a new, billed task (the task named goes on).
            headers.setdefault("x-should-retry", "false")
        return json_response({"error": error}, status=self.status, headers=headers)


def task_headers(task_id: str) -> dict[str, str]:
    # x-request-id: the SDKs expose it (`response._request_id`); there, it is the relay task to look up.
    return {"x-request-id": task_id, "x-relay-task-id": task_id}


def from_api_error(exc: ApiError) -> OpenAIError:
    """relay's error (API.md codes) in OpenAI's shape: invalid values are 400s, as OpenAI answers them."""
    if isinstance(exc, Unauthorized):
        return OpenAIError(401, exc.message, param=None, code="invalid_api_key", headers=exc.headers)
    status = 400 if exc.status == 422 else exc.status
    code = {"invalid_request": "invalid_value", "unsupported": "unsupported_value"}.get(exc.code, exc.code)
    param = {"provider": "model", "images": "image"}.get(exc.field or "", exc.field)
    type_ = "server_error" if status >= 500 else "rate_limit_error" if status == 429 else "invalid_request_error"
    return OpenAIError(status, exc.message, type=type_, param=param, code=code, headers=exc.headers)


Handler = Callable[[Request], Awaitable[Response]]
log = logging.getLogger("relay.openai")


def openai_errors(handler: Handler) -> Handler:
    """Answer relay's own errors in OpenAI's shape on this surface; anything unexpected as OpenAI's 500 too, which
    carries x-should-retry: false (relay's own 500 did not: the SDK sent the request twice more, two more tasks)."""
    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except OpenAIError as exc:
            return exc.response()
        except ApiError as exc:
            return from_api_error(exc).response()
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            return OpenAIError(500, "internal error", type="server_error", code="internal_error").response()
    return wrapped


# ---- the requests ---------------------------------------------------------------------------------------------
def task_body(data: dict[str, Any], runtime: Runtime) -> tuple[dict[str, Any], str | None]:
    """The POST /v1/tasks body for an OpenAI request, and its response_format (None: url and b64_json)."""
    unknown = sorted(set(data) - KNOWN_FIELDS)
    if unknown:
        raise OpenAIError(400, f"Unknown parameter: {unknown[0]!r}.", param=unknown[0], code="unknown_parameter")
    for name in REFUSED:
        if data.get(name) is not None:
            raise OpenAIError(400, f"{name} is not supported by relay (gpt-image-1.5 through its providers)",
                              param=name, code="unsupported_parameter")
    if data.get("stream") not in (None, False, "false"):
        raise OpenAIError(400, "streaming is not supported by relay: leave stream unset", param="stream",
                          code="unsupported_parameter")
    if data.get("partial_images") not in (None, 0):
        raise OpenAIError(400, "partial_images is not supported by relay", param="partial_images",
                          code="unsupported_parameter")
    response_format = data.get("response_format")
    if response_format not in (None, "url", "b64_json"):
        raise OpenAIError(400, "response_format must be url or b64_json", param="response_format",
                          code="invalid_value")
    body: dict[str, Any] = {name: data[name] for name in TASK_FIELDS if data.get(name) is not None}
    body["provider"] = provider_of(data.get("model"), runtime)
    user = data.get("safety_identifier") or data.get("user")
    if user is not None and (not isinstance(user, str) or len(user) > 256):
        raise OpenAIError(400, "user must be a string of at most 256 characters", param="user", code="invalid_value")
    if user:
        body["metadata"] = {"openai_user": user}
    return body, response_format


def provider_of(model: Any, runtime: Runtime) -> str | list[str]:
    """`model`: a provider name, a route name, or provider names joined by commas (failover order)."""
    providers, routes = list(runtime.ctx.providers), list(runtime.settings.routes)
    known = f"configured providers: {', '.join(providers)}" + (f"; routes: {', '.join(routes)}" if routes else "")
    if not isinstance(model, str) or not model.strip():
        raise OpenAIError(400, f"model is required: a relay provider or route name ({known})", param="model",
                          code="missing_required_parameter")
    names = [name.strip() for name in model.split(",")]
    for name in names:
        if name not in providers and not (len(names) == 1 and name in routes):
            raise OpenAIError(404, f"The model {name!r} does not exist on this relay; model is a provider or route "
                                   f"name ({known})", param="model", code="model_not_found")
    return names[0] if len(names) == 1 else names


WAITING_ROOM_FULL = "too many image requests are waiting on this relay; retry shortly"


def waiting_room(handler: Handler) -> Handler:
    """Each request waits for its task (run_task holds a place in the process's waiting room meanwhile): while the
    room is full, a 429 before the body is read (the SDK retries it later on its own). The place itself is taken
    only once the body is in, so a client sending its body slowly holds none."""
    @functools.wraps(handler)
    async def admitted(request: Request) -> Response:
        if waiter_of(request).full:
            raise _room_full()
        return await handler(request)
    return admitted


def _room_full() -> OpenAIError:
    return OpenAIError(429, WAITING_ROOM_FULL, type="rate_limit_error", code="rate_limit_exceeded",
                       headers={"retry-after": "2"})


@openai_errors
@waiting_room
async def generations(request: Request) -> Response:
    runtime = runtime_of(request)
    scope = require_api_key(request)
    data = await read_json_body(request, runtime.settings.server.max_body_bytes)
    body, response_format = task_body(data, runtime)
    return await run_task(request, body, response_format, scope)


@openai_errors
@waiting_room
async def edits(request: Request) -> Response:
    scope = require_api_key(request)
    body, response_format, unsigned = await edit_request(request)
    # The uploads (up to input_max_bytes) are stored and let go of: not held through the wait.
    return await run_task(request, body, response_format, scope, same_as=unsigned)


async def edit_request(request: Request) -> tuple[dict[str, Any], str | None, dict[str, Any]]:
    """An edits form as the POST /v1/tasks body (its uploads stored, as signed links), its response_format, and
    the body as an Idempotency-Key compares it."""
    runtime = runtime_of(request)
    settings = runtime.settings
    # The uploads together may be as large as one reference image relay would fetch, plus the form fields.
    parts = await read_form(request, settings.archive.input_max_bytes + settings.server.max_body_bytes)
    fields: dict[str, Any] = {}
    images: list[Part] = []
    mask: Part | None = None
    for part in parts:
        name = part.name
        if name in ("image", "image[]"):
            images.append(part)
        elif name == "mask":
            mask = part
        elif name in fields:
            raise OpenAIError(400, f"{name} is given twice", param=name, code="invalid_value")
        else:
            text = part.text()
            fields[name] = small_int(text) if name in INTEGER_FIELDS and small_int(text) is not None else text
    check_json_limits(fields)    # what a JSON body meets at parsing (string lengths, NULs), for the form's fields
    body, response_format = task_body(fields, runtime)
    if not images:
        raise OpenAIError(400, "image is required: one or more image files", param="image",
                          code="missing_required_parameter")
    if len(images) > MAX_INPUT_IMAGES:
        raise OpenAIError(400, f"at most {MAX_INPUT_IMAGES} images", param="image", code="invalid_value")
    body["images"] = [await store_upload(runtime, part, "image") for part in images]
    if mask is not None:
        body["mask"] = await store_upload(runtime, mask, "mask")
    # An Idempotency-Key compares the uploads, not their signed links, whose expiry moves at each UTC midnight:
    # the same upload retried across one would otherwise make another body, a 409.
    unsigned = {**body, "images": [_unsigned(url) for url in body["images"]],
                **({"mask": _unsigned(body["mask"])} if "mask" in body else {})}
    return body, response_format, unsigned


def _unsigned(url: str) -> str:
    return url.partition("?")[0]


async def run_task(request: Request, body: dict[str, Any], response_format: str | None, scope: str,
                   same_as: dict[str, Any] | None = None) -> Response:
    """Make the task (with a place in the waiting room: else a 429, and no task), wait for it, answer its images.
    Once the task exists, a failure to answer names it (task_id) and is never one the SDK retries on its own."""
    runtime = runtime_of(request)
    waiter = waiter_of(request)
    with waiter.admitted() as room:
        if not room:
            raise _room_full()
        task, _ = await runtime.tasks.create(body, scope=scope, idempotency_key=idempotency_key(request),
                                             same_as=same_as)
        try:
            task = await waiter.wait(request, task.id, runtime.settings.openai_compat.wait_seconds)
            if task.status == TaskStatus.SUCCEEDED:
                return await images_response(request, task, response_format)
        except (OpenAIError, ApiError):
            raise
        except ArchiveError as exc:
            raise OpenAIError(503, f"relay task {task.id} succeeded, but its images cannot be read now "
                                   f"({exc.message}); GET /v1/tasks/{task.id} has them", type="server_error",
                              code="image_store_unavailable", task_id=task.id) from exc
        except Exception as exc:
            log.exception("answering relay task %s", task.id)
            raise OpenAIError(500, f"internal error answering relay task {task.id}; GET /v1/tasks/{task.id} "
                                   "has its outcome", type="server_error", code="internal_error",
                              task_id=task.id) from exc
    raise task_error(task, runtime.settings.openai_compat.wait_seconds)


def task_error(task: Task, waited: float) -> OpenAIError:
    """Why there are no images (yet): the task's failure, a cancel, or the wait running out."""
    poll = f"GET /v1/tasks/{task.id}"
    if task.status == TaskStatus.FAILED:
        error = task.error or {}
        code, message = error.get("code") or "failed", error.get("message") or "the task failed"
        text = f"{message} (relay task {task.id}, provider {task.provider})"
        if code in POLICY_CODES:
            return OpenAIError(400, text, param="prompt", code="content_policy_violation", task_id=task.id)
        if code in INPUT_CODES:
            return OpenAIError(400, text, param="image", code=code, task_id=task.id)
        return OpenAIError(502, text, type="server_error", code=code, task_id=task.id)
    if task.status == TaskStatus.CANCELED:
        return OpenAIError(409, f"relay task {task.id} was canceled", code="canceled", task_id=task.id)
    return OpenAIError(504, f"relay task {task.id} is still {task.status.value} after {waited:g} s; it goes on: "
                            f"poll {poll} for its images", type="server_error", code="timeout", task_id=task.id)


async def images_response(request: Request, task: Task, response_format: str | None) -> Response:
    """OpenAI's ImagesResponse: each image as relay's signed link and/or its archived bytes in base64.

    Without response_format both are given: code written for gpt-image reads b64_json (OpenAI's default for
    it), code written for URLs reads url. The body is streamed: each image's base64 is made from its file a
    piece at a time (ten images of several MB each, held whole, raw and encoded, at every request waiting at
    once, was gigabytes). Every image is found in the store before the answer starts, so a missing one or a
    store that cannot be asked is still an error answer; the first is opened then too, the others when their
    turn comes (a bucket's stream opened early could time out while a slow client reads the ones before it). A
    read that fails later (a disk error, a bucket's stream cut) ends the answer short, like any cut connection.
    (A client gone before the answer starts leaves the first image's stream to the garbage collector.)"""
    make_url = image_url_maker(request)
    store = runtime_of(request).ctx.image_store
    images = sorted(task.images, key=lambda image: image.index)
    inline = response_format in (None, "b64_json")
    if inline:
        if any(image.path is None for image in images):
            raise _image_missing()
        # Every one answered before any error is raised (none left asking the store after the answer went).
        sizes = await asyncio.gather(*(store.stat(image.path) for image in images if image.path is not None),
                                     return_exceptions=True)
        for size in sizes:
            if isinstance(size, BaseException):
                raise size
        if any(size is None for size in sizes):
            raise _image_missing()
    items = [({"url": make_url(image.id)} if response_format in (None, "url") else {}, image.path if inline else None)
             for image in images]
    rest = _response_fields(task, images)
    # The first image opened before the answer starts: with one image (the default n) a store that fails it is
    # still an error answer.
    first = await open_image(store, items[0][1]) if items and items[0][1] is not None else None

    async def pieces() -> AsyncIterator[bytes]:
        opened = first
        try:
            yield b'{"created":' + str(int(task.created_at)).encode() + b',"data":['
            for n, (item, path) in enumerate(items):
                head = jsontext.http_body(item)[:-1]        # the object without its closing brace
                yield (b"," if n else b"") + head
                if path is not None:
                    yield (b"," if item else b"") + b'"b64_json":"'
                    body, opened = opened or await open_image(store, path), None
                    async for encoded in _base64_pieces(body):
                        yield encoded
                    yield b'"'
                yield b"}"
            yield b"]" + (b"," + jsontext.http_body(rest)[1:] if rest else b"}")
        finally:
            if opened is not None:      # never read (the client went before it)
                await opened.aclose()
    return StreamingResponse(pieces(), media_type="application/json", headers=task_headers(task.id))


def _response_fields(task: Task, images: list[Any]) -> dict[str, Any]:
    """What an ImagesResponse says beside its data: background, output_format, quality, size, usage."""
    request_ = task.request
    out: dict[str, Any] = {}
    if request_.get("background") in ("transparent", "opaque"):
        out["background"] = request_["background"]
    fmt = FORMAT_OF.get(images[0].content_type or "") if images else None
    if fmt is not None:
        out["output_format"] = fmt
    if request_.get("quality") in ("low", "medium", "high"):
        out["quality"] = request_["quality"]
    if request_.get("size") not in (None, "auto"):
        out["size"] = request_["size"]
    elif images and images[0].width and images[0].height:
        out["size"] = f"{images[0].width}x{images[0].height}"
    usage = task.usage or {}
    tokens_in, tokens_out = usage.get("input_tokens"), usage.get("output_tokens")
    if isinstance(tokens_in, int) and isinstance(tokens_out, int):
        total = usage.get("total_tokens")
        out["usage"] = {"input_tokens": tokens_in, "output_tokens": tokens_out,
                        "total_tokens": total if isinstance(total, int) else tokens_in + tokens_out}
    return out


async def open_image(store: ImageStore, path: str) -> StoredImage:
    body = await store.open(path)
    if body is None:
        raise _image_missing()
    return body


def _image_missing() -> OpenAIError:
    return OpenAIError(500, "an archived image is missing from the image store", type="server_error",
                       code="image_missing")


async def _base64_pieces(body: StoredImage) -> AsyncIterator[bytes]:
    """The image's bytes as base64, a chunk at a time (whole groups of three bytes; the rest waits)."""
    left = b""
    try:
        async for chunk in body.chunks:
            data = left + chunk
            cut = len(data) - len(data) % 3
            left = data[cut:]
            if cut:
                yield base64.b64encode(data[:cut])
        if left:
            yield base64.b64encode(left)
    finally:
        await body.aclose()


# ---- uploaded edit images -------------------------------------------------------------------------------------
async def store_upload(runtime: Runtime, part: Part, field: str) -> str:
    """Verify an uploaded image, keep it in the image store, and return its signed link for the task."""
    limit = runtime.settings.archive.input_max_bytes
    if len(part.data) > limit:
        raise PayloadTooLarge(f"{field} is larger than {limit} bytes", field=field)
    content_type = sniff_image(part.data[:16])
    if content_type not in UPLOAD_TYPES:
        raise OpenAIError(400, f"{field} must be a PNG, JPEG or WebP image file", param=field,
                          code="invalid_image_format")
    store = runtime.ctx.image_store
    fd, name = tempfile.mkstemp(dir=store.tmp_dir(), prefix="upload-")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(part.data)
        try:
            await ainspect_image(tmp, expected=content_type)
        except InvalidImage as exc:
            raise OpenAIError(400, f"{field} is not a valid image: {exc.message}", param=field,
                              code="invalid_image") from None
        sha256 = hashlib.sha256(part.data).hexdigest()
        ext = UPLOAD_TYPES[content_type]
        try:
            # Recorded before the file is put, so retention never takes a file an upload uses (relay.retention).
            await runtime.store.hold_upload(sha256, image_key(sha256, ext), runtime.ctx.clock.now())
            await store.put_file(tmp, sha256, ext)
        except ArchiveError as exc:
            raise OpenAIError(503, exc.message, type="server_error", code="image_store_unavailable") from None
    finally:
        tmp.unlink(missing_ok=True)
    return input_url(runtime, f"{sha256}.{ext}")


def input_url(runtime: Runtime, name: str) -> str:
    """A signed link to an uploaded input. Its expiry moves once a day (the same upload sent again the same day
    makes the same link); an Idempotency-Key compares the uploads without their signatures (edits' same_as)."""
    ctx = runtime.ctx
    day = 86400
    expires = (int(ctx.clock.now()) // day + 1) * day + int(runtime.settings.archive.link_ttl)
    query = ctx.signer.image_query(f"input:{name}", expires)
    return f"{runtime.settings.server.public_url}/openai/v1/inputs/{name}?{query}"


async def get_input(request: Request) -> Response:
    """An uploaded edit image, by its signed link (what providers fetch); relay's error shape."""
    runtime = runtime_of(request)
    name = request.path_params["name"]
    exp, sig = request.query_params.get("exp"), request.query_params.get("sig")
    well_formed = small_int(exp) is not None and sig is not None and sig.isascii()
    if not well_formed or not runtime.ctx.signer.verify_image(f"input:{name}", exp, sig, now=runtime.ctx.clock.now()):
        raise Unauthorized("the input link is invalid or has expired")
    sha256, _, ext = name.partition(".")
    try:
        key = image_key(sha256, ext)
    except ValueError:
        raise NotFound("no such input") from None
    if ext not in CONTENT_TYPES:
        raise NotFound("no such input")
    headers = {"ETag": f'"{sha256}"', "Cache-Control": "private, max-age=86400, immutable"}
    return await stored_file(request, runtime.ctx.image_store, key, media_type=CONTENT_TYPES[ext], headers=headers,
                             missing=NotFound("no such input"))


@openai_errors
async def unknown_endpoint(request: Request) -> Response:
    """Anything else under /openai/v1: OpenAI's shape, so that an SDK call relay does not serve says so."""
    require_api_key(request)
    path = request.url.path
    if path in ("/openai/v1/images/generations", "/openai/v1/images/edits"):
        raise OpenAIError(405, f"method {request.method} is not allowed here: use POST", code="method_not_allowed")
    raise OpenAIError(404, f"relay serves POST /openai/v1/images/generations and /openai/v1/images/edits, "
                           f"not {request.method} {path}", code="unknown_url")


routes = [
    Route("/openai/v1/images/generations", generations, methods=["POST"]),
    Route("/openai/v1/images/edits", edits, methods=["POST"]),
    Route("/openai/v1/inputs/{name}", get_input, methods=["GET", "HEAD"]),
    Route("/openai/v1/{rest:path}", unknown_endpoint,
          methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]),
]
