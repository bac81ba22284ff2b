"""Defensive readers for provider bodies, and the rules every dialect's TaskUpdate obeys.

Pure functions, no I/O. A provider body may miss fields, carry nulls, hold a string
where a list was documented, or be junk altogether: these helpers turn each of those
into a usable value, None, or a `ProviderProtocolError` (retried), never a KeyError,
TypeError or AttributeError.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any

from relay.errors import ProviderProtocolError
from relay.models import ProviderImage, ProviderStatus, TaskUpdate
from relay.validation import storable_text

# Provider business codes that all mean "the content was refused"; relay reports one name for them.
POLICY_CODES = frozenset({"content_policy_violation", "moderation_blocked", "content_filter", "safety_violation"})


def parse_json(content: bytes, *, status: int | None = None) -> Any:
    """Parse a provider body; junk is a ProviderProtocolError (retried, never a crash).

    Nesting deeper than the parser's stack (RecursionError) is junk too. Lone surrogates
    (`"\\ud800"`, which json.loads accepts) and NUL characters (`"\\u0000"`) are replaced by U+FFFD in every
    string and key: a surrogate has no UTF-8 form, so SQLite could not store a task id, URL or message holding
    one, and PostgreSQL's text cannot hold a NUL (relay.validation.NUL).
    """
    try:
        return storable(json.loads(content))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProviderProtocolError(f"provider sent a body that is not JSON: {content[:100]!r}",
                                    status=status) from exc


def storable(value: Any) -> Any:
    """`value` (parsed JSON) with every lone surrogate and NUL in a string or key replaced by U+FFFD.

    json.loads joins an escaped pair into one character, so any surrogate left is a lone one.
    Containers are fixed in place, iteratively (no recursion, whatever the nesting).
    """
    if isinstance(value, str):
        return storable_text(value)
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            for index, element in enumerate(item):
                if isinstance(element, str):
                    item[index] = storable_text(element)
                elif isinstance(element, (list, dict)):
                    stack.append(element)
        elif isinstance(item, dict):
            if any(isinstance(key, str) and storable_text(key) is not key for key in item):
                pairs = list(item.items())
                item.clear()
                for key, element in pairs:
                    item[storable_text(key)] = element     # a clash of cleaned keys keeps the last, as JSON does
            for key, element in item.items():
                if isinstance(element, str):
                    item[key] = storable_text(element)
                elif isinstance(element, (list, dict)):
                    stack.append(element)
    return value


def as_dict(value: Any, what: str) -> dict[str, Any]:
    """Insist on a JSON object; anything else is a protocol error."""
    if not isinstance(value, dict):
        raise ProviderProtocolError(f"expected a JSON object for {what}, got {type(value).__name__}")
    return value


def nested(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    """The object under `key`, or an empty one when it is missing, null or not an object."""
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def as_str(value: Any) -> str | None:
    """A non-empty string, or None (numbers are turned into strings; everything else dropped)."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def as_int(value: Any) -> int | None:
    """An integer from a number or numeric string; None for anything else (bools included)."""
    number = as_float(value)
    if number is None or number != number or number in (float("inf"), float("-inf")):
        return None
    return int(number)


def as_float(value: Any) -> float | None:
    """A float from a number or numeric string; None for anything else (bools included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def clamp_progress(value: Any) -> int | None:
    """Progress as 0..100, or None when absent or unreadable."""
    number = as_int(value)
    if number is None:
        return None
    return max(0, min(100, number))


def as_list(value: Any) -> list[Any]:
    """A JSON array as a list; a lone value becomes a one-element list, null/missing an empty one."""
    if value is None:
        return []
    if isinstance(value, list):
        return value
    return [value]


def task_id(value: Any) -> str | None:
    """A provider task id: a non-empty string (numbers accepted), at most 512 characters."""
    text = as_str(value)
    if text is None or len(text) > 512:
        return None
    return text.strip() or None


def looks_like_policy(message: str) -> bool:
    """Whether a free-text error message reads like a content-policy refusal."""
    text = message.lower()
    return any(word in text for word in ("policy", "safety", "moderation", "blocked"))


def failure_code(code: Any, message: str | None, *, default: str = "provider_failed") -> str:
    """A stable error code for a failed task: the provider's string code, policy refusals unified.

    Numeric codes (HTTP-like) say nothing a task reader can act on, so they fall back to `default`
    unless the message shows a content-policy refusal.
    """
    text = as_str(code)
    if text and text.lower() in POLICY_CODES:
        return "content_policy_violation"
    if text and not text.lstrip("-").isdigit():
        return text[:64]
    if message and looks_like_policy(message):
        return "content_policy_violation"
    return default


def error_parts(value: Any) -> tuple[Any, str | None]:
    """(code, message) from an error that is a string, an object {code, message, type}, or junk."""
    if isinstance(value, dict):
        message = as_str(value.get("message")) or as_str(value.get("msg")) or as_str(value.get("detail"))
        code = value.get("code")
        if code is None or (as_str(code) or "").isdigit():
            code = value.get("type") if isinstance(value.get("type"), str) else code
        return code, message
    if isinstance(value, str):
        return None, value or None
    return None, None


def map_status(table: Mapping[str, ProviderStatus], value: Any, provider: str) -> ProviderStatus:
    """Map a provider status string (case-insensitively) to the common vocabulary.

    An unknown or missing status is a ProviderProtocolError: retried, so a provider that adds a
    state does not fail tasks, it only delays them until someone teaches the adapter.
    """
    status = table.get(value.strip().lower()) if isinstance(value, str) else None
    if status is None:
        raise ProviderProtocolError(f"{provider} sent an unknown task status: {value!r}"[:300])
    return status


def accepted_status(table: Mapping[str, ProviderStatus], value: Any) -> ProviderStatus:
    """The status in a submit answer that carries a task id: unknown or missing means QUEUED.

    Once the provider has handed us an id the task exists; refusing the answer would make the
    submit look failed and invite a duplicate. Polling will report the real state.
    """
    status = table.get(value.strip().lower()) if isinstance(value, str) else None
    return status or ProviderStatus.QUEUED


def image_from_url(url: Any, *, content_type: str | None = None, width: Any = None, height: Any = None,
                   expires_at: Any = None) -> ProviderImage | None:
    """A ProviderImage for an http(s) URL; a `data:` URI (fal's sync mode) becomes inline base64.

    Returns None for anything unusable (not a string, another scheme, broken base64), so one bad
    entry does not hide the good ones.
    """
    if not isinstance(url, str):
        return None
    text = url.strip()
    fields: dict[str, Any] = {
        "content_type": content_type if isinstance(content_type, str) and content_type else None,
        "width": _positive(width), "height": _positive(height), "expires_at": _positive_float(expires_at),
    }
    if text[:5].lower() == "data:":
        header, _, payload = text.partition(",")
        if ";base64" not in header.lower() or not payload:
            return None
        try:
            base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            return None
        fields["content_type"] = header[5:].split(";", 1)[0] or fields["content_type"]
        return ProviderImage(b64=payload, **fields)
    if not text.lower().startswith(("https://", "http://")):
        return None
    return ProviderImage(url=text, **fields)


def _positive(value: Any) -> int | None:
    number = as_int(value)
    return number if number is not None and number > 0 else None


def _positive_float(value: Any) -> float | None:
    number = as_float(value)
    return number if number is not None and 0 < number < float("inf") else None


def make_update(status: ProviderStatus, *, provider_task_id: str | None = None, progress: int | None = None,
                images: tuple[ProviderImage, ...] = (), error_code: str | None = None,
                error_message: str | None = None, estimated_seconds: float | None = None,
                raw: Any = None) -> TaskUpdate:
    """Build a TaskUpdate, enforcing the rules every dialect shares.

    A success without a single usable image becomes FAILED/no_images: the provider says done
    but gave nothing to archive, and waiting longer will not change that. A failure always
    carries a code and a message.
    """
    if status is ProviderStatus.SUCCEEDED and not images:
        status = ProviderStatus.FAILED
        error_code, error_message = "no_images", "provider reported success but returned no usable image"
    if status is ProviderStatus.FAILED:
        error_code = error_code or "provider_failed"
        error_message = error_message or "provider reported the task as failed"
    if status is not ProviderStatus.SUCCEEDED:
        images = ()
    if estimated_seconds is not None and not 0 <= estimated_seconds < float("inf"):
        estimated_seconds = None
    return TaskUpdate(status=status, provider_task_id=provider_task_id, progress=progress, images=images,
                      error_code=error_code, error_message=error_message[:1000] if error_message else None,
                      estimated_seconds=estimated_seconds, raw=raw)


def drop_none(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The fields that were given; None means "not given: let the provider use its default"."""
    return {key: value for key, value in fields.items() if value is not None}
