"""Request-body checks shared by the dialects; each failure is an `Invalid` the dialect words.

Every helper treats its input as hostile (any JSON type may arrive anywhere) and
raises `Invalid` rather than letting a TypeError become a 500.
"""

from __future__ import annotations

from typing import Any

PIXEL_SIZES = ("1024x1024", "1024x1536", "1536x1024")
RATIO_TO_PIXELS = {"1:1": "1024x1024", "2:3": "1024x1536", "3:2": "1536x1024"}


class Invalid(Exception):
    """A request the provider would refuse with 400; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def pixels(size: str) -> tuple[int, int]:
    """'1536x1024' or '3:2' → (1536, 1024)."""
    size = RATIO_TO_PIXELS.get(size, size)
    width, height = size.split("x")
    return int(width), int(height)


def as_object(value: Any, what: str = "body") -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Invalid(f"{what} must be a JSON object", what)
    return value


def string(body: dict[str, Any], key: str, *, required: bool = False, default: str | None = None,
           max_len: int | None = None, what: str | None = None) -> str | None:
    name = what or key
    value = body.get(key)
    if value is None:
        if required:
            raise Invalid(f"'{name}' is required", name)
        return default
    if not isinstance(value, str):
        raise Invalid(f"'{name}' must be a string", name)
    if required and not value.strip():
        raise Invalid(f"'{name}' must not be empty", name)
    if max_len is not None and len(value) > max_len:
        raise Invalid(f"'{name}' is longer than {max_len} characters", name)
    return value


def choice(body: dict[str, Any], key: str, allowed: tuple[str, ...], default: str,
           what: str | None = None) -> str:
    name = what or key
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, str) or value not in allowed:
        raise Invalid(f"'{name}' must be one of {', '.join(allowed)} (got {value!r})", name)
    return value


def integer(body: dict[str, Any], key: str, *, low: int, high: int, default: int,
            clamp: bool = False, what: str | None = None) -> int:
    """A JSON integer in [low, high]; quoted numbers and booleans are refused like the real APIs."""
    name = what or key
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"'{name}' must be an integer (got {value!r})", name)
    if clamp:
        return min(max(value, low), high)
    if not low <= value <= high:
        raise Invalid(f"'{name}' must be between {low} and {high} (got {value})", name)
    return value


def string_list(body: dict[str, Any], key: str, *, max_items: int, what: str | None = None) -> list[str]:
    name = what or key
    value = body.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise Invalid(f"'{name}' must be a list of URLs", name)
    if len(value) > max_items:
        raise Invalid(f"'{name}' takes at most {max_items} items (got {len(value)})", name)
    for url in value:
        if not url.startswith(("http://", "https://")):
            raise Invalid(f"'{name}' must hold http(s) URLs (got {url[:80]!r})", name)
    return value
