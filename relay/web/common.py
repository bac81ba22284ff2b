"""Shared web helpers: JSON responses, API-key auth, bounded body reading, query parsing."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from relay import ids, jsontext
from relay.errors import InvalidRequest, PayloadTooLarge, Unauthorized, UnsupportedMediaType
from relay.runtime import Runtime
from relay.validation import parse_json_object


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(jsontext.http_body(data), status_code=status, media_type="application/json", headers=headers)


def runtime_of(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def require_api_key(request: Request) -> str:
    """Check `Authorization: Bearer <key>` in constant time; returns a scope id (hash of the key)."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("missing API key: send Authorization: Bearer <key>")
    matched = False
    for key in runtime_of(request).api_keys:
        matched |= hmac.compare_digest(token.encode(), key.encode())
    if not matched:
        raise Unauthorized("invalid API key")
    return hashlib.sha256(token.encode()).hexdigest()[:32]


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than `limit` bytes without reading them all."""
    declared = request.headers.get("content-length")
    size = small_int(declared)
    if size is not None and size > limit:
        raise PayloadTooLarge(f"the body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json_body(request: Request, limit: int) -> dict[str, Any]:
    """A /v1 request body: JSON by Content-Type (415 otherwise), at most `limit` bytes, a bounded JSON object.

    A missing Content-Type is taken as JSON; a form post or text/plain is refused rather than guessed at.
    """
    declared = request.headers.get("content-type")
    if declared is not None:
        media_type = declared.split(";", 1)[0].strip().lower()
        if media_type != "application/json" and not media_type.endswith("+json"):
            raise UnsupportedMediaType(f"the body must be JSON (Content-Type: application/json), not {media_type!r}",
                                       field="Content-Type")
    return parse_json_object(await read_body(request, limit))


def query_cursor(request: Request, name: str, prefix: str) -> str | None:
    """A paging cursor: an id relay gave out (`prefix`_…), or 422; never silently the start of the list."""
    value = request.query_params.get(name)
    if value is None or value == "":
        return None
    if not ids.is_id(value, prefix):
        raise InvalidRequest(f"{name} must be a {prefix}_… id from a previous page", field=name)
    return value


def query_limit(request: Request, default: int = 50, maximum: int = 200) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    value = small_int(raw)
    if value is None or not 1 <= value <= maximum:
        raise InvalidRequest(f"limit must be an integer from 1 to {maximum}", field="limit")
    return value


def small_int(text: str | None, max_digits: int = 18) -> int | None:
    """A non-negative integer written in ASCII digits, or None.

    `str.isdigit()` alone is true for "²" (which int() refuses) and for thousands of digits
    (which int() refuses past 4300): either would be a 500 instead of a 4xx.
    """
    if text is None or not text.isascii() or not text.isdigit() or len(text) > max_digits:
        return None
    return int(text)


def idempotency_key(request: Request) -> str | None:
    """The `Idempotency-Key` header (1 to 255 characters), or None; every create that takes it reads it here."""
    key = request.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= 255:
        raise InvalidRequest("Idempotency-Key must be 1 to 255 characters", field="Idempotency-Key")
    return key

