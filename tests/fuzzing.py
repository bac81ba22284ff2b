"""Shared pieces of the fuzz tests: provider-like bodies, API.md's error shape, one harness across examples.

Hypothesis runs a sync function once per example, so the async harness is opened
once on a private event loop and every example runs its coroutine on that loop
(`InLoop.run`). No example touches the network: the simulator is in process and
the SSRF guard's resolver is replaced by one that answers 127.0.0.1 (allow-listed)
for every name, so registering a subscriber URL never asks real DNS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from relay.providers import PROVIDER_KINDS
from tests.harness import Harness, harness

T = TypeVar("T")

# API.md: the codes an error may carry, and which codes each status may carry (405 has no code of
# its own in API.md; relay answers it as invalid_request, like the 400 of a non-JSON callback).
ERROR_CODES = frozenset({"invalid_request", "unauthorized", "not_found", "conflict", "payload_too_large",
                         "rate_limited", "unsupported", "internal"})
CODES_FOR_STATUS = {400: {"invalid_request"}, 401: {"unauthorized"}, 404: {"not_found"},
                    405: {"invalid_request"}, 409: {"conflict"}, 413: {"payload_too_large"},
                    422: {"invalid_request", "unsupported"}, 429: {"rate_limited"}, 500: {"internal"}}

# Bounded and reproducible: the same examples on every run and machine; no example database on disk.
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.data_too_large])


# ---- provider-like bodies -------------------------------------------------------------------------------
# Every status word any dialect uses, so mutated bodies often carry a status some parser knows.
STATUS_WORDS = sorted({word for kind in PROVIDER_KINDS for word in getattr(__import__(
    f"relay.providers.{kind}", fromlist=["STATUSES"]), "STATUSES", {})} | {"IN_QUEUE", "COMPLETED", "success"})
URLS = ["https://cdn.test/i.png", "http://cdn.test/i.png", "ftp://cdn.test/i.png", "https://", "", " https://x/y ",
        "data:image/png;base64,iVBORw0KGgo=", "data:image/png;base64,!!!", "data:;base64,", "data:text/plain,hi",
        "javascript:alert(1)", "//cdn.test/i.png"]
ODD_NUMBERS = [0, -1, 1, 100, 101, 1e308, -1e308, 2**63, -(2**63), 0.5, 99.9, float("nan"), float("inf"),
               float("-inf"), "50", "1e400", "-5", "NaN", "Infinity", "9" * 400, "²"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30),
                    st.sampled_from(STATUS_WORDS), st.sampled_from(URLS), st.sampled_from(ODD_NUMBERS))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=12), inner, max_size=5), max_leaves=20)
TYPED: list[tuple[type, st.SearchStrategy[Any]]] = [
    (type(None), st.none()), (bool, st.booleans()), (int, st.integers()), (float, st.floats()),
    (str, st.text(max_size=20)), (list, st.lists(SCALARS, max_size=3)),
    (dict, st.dictionaries(st.text(max_size=8), SCALARS, max_size=3))]


def retyped(value: Any) -> st.SearchStrategy[Any]:
    """A value of another JSON type than `value` (a list where an object was, a string where a number was, …)."""
    return st.one_of([strategy for kind, strategy in TYPED if type(value) is not kind])


@st.composite
def near(draw: st.DrawFn, value: Any, depth: int = 0) -> Any:
    """`value` with some of its parts dropped, retyped, replaced or recursed into; extra keys sometimes."""
    action = draw(st.sampled_from(["keep", "recurse", "recurse", "recurse", "recurse", "retype", "replace"]))
    if action == "keep" or depth > 6:
        return value
    if action == "retype":
        return draw(retyped(value))
    if action == "replace":
        return draw(JSON)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            fate = draw(st.sampled_from(["keep", "keep", "keep", "keep", "keep", "drop", "mutate", "mutate", "null"]))
            if fate == "keep":
                out[key] = item
            elif fate == "mutate":
                out[key] = draw(near(item, depth + 1))
            elif fate == "null":
                out[key] = None
        if draw(st.booleans()):
            out[draw(st.sampled_from([*value, "status", "id", "error", "data", "images", "url"]))] = draw(JSON)
        return out
    if isinstance(value, list):
        items = [draw(near(item, depth + 1)) for item in value if draw(st.integers(0, 4))]
        return items + draw(st.lists(JSON, max_size=2)) if draw(st.booleans()) else items
    if isinstance(value, str):
        spellings = st.sampled_from(STATUS_WORDS).flatmap(
            lambda s: st.sampled_from([s, s.upper(), s.title(), f" {s} "]))
        return draw(st.one_of(spellings, st.sampled_from(URLS), st.text(max_size=20)))
    return draw(st.one_of(st.sampled_from(ODD_NUMBERS), SCALARS))


def as_bytes(value: Any) -> bytes:
    # allow_nan: json.loads reads NaN/Infinity, and so does every provider parser; they must cope.
    return json.dumps(value, allow_nan=True).encode()


# ---- the network and API.md's error shape -----------------------------------------------------------------
async def loopback_resolver(host: str, port: int) -> list[str]:
    """Every name resolves to loopback (allow-listed in tests): no DNS query, no outside traffic."""
    return ["127.0.0.1"]


def _refuse(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_json(response: httpx.Response) -> Any:
    """The body as JSON any client can read: UTF-8, no NaN/Infinity (Python's parser accepts those)."""
    return json.loads(response.content.decode("utf-8"), parse_constant=_refuse)


def error_shape_problem(response: httpx.Response) -> str | None:
    """None when `response` carries API.md's error shape with a code fit for its status; else what is wrong."""
    if not response.headers.get("content-type", "").startswith("application/json"):
        return f"content-type {response.headers.get('content-type')!r} is not JSON"
    try:
        body = strict_json(response)
    except ValueError:
        return "the body is not strict JSON"
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict):
        return f"not {{'error': {{...}}}}: {body!r}"[:300]
    error = body["error"]
    if not set(error) <= {"code", "message", "field"}:
        return f"unexpected keys {sorted(set(error) - {'code', 'message', 'field'})}"
    if error.get("code") not in ERROR_CODES:
        return f"unknown code {error.get('code')!r}"
    if response.status_code in CODES_FOR_STATUS and error["code"] not in CODES_FOR_STATUS[response.status_code]:
        return f"code {error['code']!r} does not belong to status {response.status_code}"
    if not isinstance(error.get("message"), str) or not error["message"]:
        return "message is missing or empty"
    if "field" in error and not isinstance(error["field"], str):
        return f"field is not a string: {error['field']!r}"
    if "Traceback" in error["message"]:
        return "the message carries a stack trace"
    return None


class InLoop:
    """An event loop and a relay harness (no background worker) that outlive single Hypothesis examples."""

    def __init__(self, data_dir: Path, **env: Any) -> None:
        self.data_dir = data_dir
        self.env = env
        self.loop = asyncio.new_event_loop()
        self.stack = contextlib.AsyncExitStack()
        self.h: Harness

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def __enter__(self) -> InLoop:
        try:
            self.h = self.run(self.stack.enter_async_context(harness(self.data_dir, run_worker=False, **self.env)))
        except BaseException:
            self.loop.close()
            raise
        self.h.runtime.guard.resolver = loopback_resolver
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.run(self.stack.aclose())
            self.run(self.loop.shutdown_asyncgens())
            self.run(self.loop.shutdown_default_executor())
        finally:
            self.loop.close()
