"""Round trip over the whole API: anything relay accepts with a 2xx reads back, lists, pages past and is delivered.

A Hypothesis state machine drives one relay (in process, a fresh one per example, with
its worker drained by hand) through the HTTP API with hostile but often valid input:
task bodies with metadata nested and widened near and past the limits, strings at and
past 32,000 characters, astral characters, escaped pairs and lone surrogates, hostile
URLs in webhook_url / images / mask and in subscriptions (many of which, if accepted,
lead to a local sink), every provider and option, odd Content-Types and Idempotency-Keys;
subscriptions created, changed, rotated, replayed with edge RFC 3339 times, deleted;
tasks read, listed and canceled; the event log paged with `after`; odd cursors.

Each input carries a verdict (tests.fuzzing: VALID must be accepted, INVALID must be a
4xx naming a field that was sent, EITHER is relay's call). Whatever the answer: never a
5xx, every error in API.md's shape, every JSON answer strict JSON. Whatever was accepted:
it reads back as sent, shows up exactly once when its list is paged with any page size,
its events can be paged with `after` and reach every subscriber that was listening
(signed so that the `standardwebhooks` library verifies them), and the worker logs no
unexpected error on the way. The run is bounded (RELAY_FUZZ_EXAMPLES scales it).

Beside the machine, `test_every_hostile_sample_once` puts every sample of tests.fuzzing
into every field that takes it, once and in order, and reports every failure it meets:
the machine finds combinations, this one leaves no listed edge to chance.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import math
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import httpx
import pytest
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    precondition,
    rule,
    run_state_machine_as_test,
)
from standardwebhooks.webhooks import WebhookVerificationError

from relay.deliveries.models import matches
from relay.models import RATIO_TO_PIXELS
from relay.states import EVENT_TYPES
from relay.web.app import create_app
from tests.fuzzing import (
    CROCKFORD,
    EITHER,
    FUZZ,
    HOSTILE_SAMPLES,
    INVALID,
    LONE_SURROGATES,
    LOOPBACK_HOSTS,
    RFC3339_EDGES,
    VALID,
    InLoop,
    Tagged,
    clip,
    error_shape_problem,
    nested_json,
    rfc3339_times,
    scaled,
    sink_urls,
    ssrf_resolver,
    strict_json,
    url_samples,
    urls,
)
from tests.harness import API_KEY
from tests.sink import Received, Sink

BASE = "http://relay.test"
AUTH = {"authorization": f"Bearer {API_KEY}"}
EXAMPLES = scaled(80)
STEPS = 30
SETTLE_SECONDS = 30.0            # the longest a drain waits for tasks to end and deliveries to arrive
QUIET_SECONDS = 4.0              # … or for the worker to run anything at all (retries here wait at most 0.2 s)
TERMINAL = ("succeeded", "failed", "canceled")
ORDER = {"pending": 0, "queued": 1, "running": 2, "archiving": 3, "succeeded": 4, "failed": 4, "canceled": 4}
STATUSES = tuple(ORDER)
# Limits of every JSON body (the brief of issue 8), with a margin either side where counting may differ.
DEPTH_OK, DEPTH_BAD = 30, 35
ITEMS_OK, ITEMS_BAD = 1000, 1050
MAX_STRING = 32_000
MAX_METADATA_BYTES = 16 * 1024
JSON_TYPES = ("application/json", "application/json; charset=utf-8", "Application/JSON")
NOT_JSON_TYPES = ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x")
ODD_TYPES = ("application/vnd.api+json", "", "application/json;", "*/*", "application/jsonx")
ID = re.compile(r"\b([a-z]{3})_[0-9A-Z]{26}\b")
FAR_FUTURE = "7" + "Z" * 25          # the largest ULID: later than every id relay makes
FAR_PAST = "0" * 26


# ---- bodies -----------------------------------------------------------------------------------------------
def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def _refuse(name: str) -> Any:
    raise ValueError(name)


@contextlib.contextmanager
def deep_recursion() -> Iterator[None]:
    """Room for the test's own JSON work on values thousands of levels deep, whatever the recursion limit is."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


def parse_strictly(body: bytes) -> Any:
    """The body as JSON (strict, as relay reads it), or None where it is not.

    Nesting is no reason for None: a body relay cannot take apart because of its depth must still be refused
    naming the field (issue 8), so the test parses it however deep it is.
    """
    try:
        with deep_recursion():
            return json.loads(body, parse_float=_finite, parse_constant=_refuse)
    except (ValueError, RecursionError):
        return None


def encode(value: Any, ascii_only: bool) -> bytes:
    """JSON text of `value`; lone surrogates go out as \\ud800 escapes (ASCII) or as CESU bytes (not UTF-8)."""
    return json.dumps(value, ensure_ascii=ascii_only, separators=(",", ":")).encode("utf-8", "surrogatepass")


@dataclass
class Body:
    """A request body as raw JSON members, with the verdict of what went into it."""

    members: list[tuple[str, bytes]] = field(default_factory=list)
    verdict: int = VALID
    why: list[str] = field(default_factory=list)

    def add(self, key: str, raw: bytes, verdict: int = VALID, why: str = "") -> None:
        self.members.append((key, raw))
        self.verdict = max(self.verdict, verdict)
        if verdict != VALID:
            self.why.append(f"{key}: {why or ('invalid' if verdict == INVALID else 'either')}")

    @property
    def raw(self) -> bytes:
        return b"{" + b",".join(json.dumps(k).encode() + b":" + v for k, v in self.members) + b"}"

    @property
    def keys(self) -> set[str]:
        return {k for k, _ in self.members}


def judge_limits(data: Any) -> tuple[int, str]:
    """The verdict of the limits every body is held to: depth, item count, string length, valid Unicode."""
    worst, why = VALID, ""
    depth_max, items = 0, 0
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        texts: list[str] = []
        if isinstance(value, str):
            texts = [value]
        elif isinstance(value, dict):
            depth_max, items = max(depth_max, depth), items + len(value)
            texts = list(value)
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            depth_max, items = max(depth_max, depth), items + len(value)
            stack.extend((v, depth + 1) for v in value)
        for text in texts:
            if len(text) > MAX_STRING:
                return INVALID, f"a string of {len(text)} characters"
            if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
                return INVALID, "a lone surrogate"
            if "\x00" in text:
                return INVALID, "a NUL character"          # relay.validation.NUL: no stored text holds one
    if depth_max >= DEPTH_BAD:
        return INVALID, f"depth {depth_max}"
    if items >= ITEMS_BAD:
        return INVALID, f"{items} items"
    if depth_max > DEPTH_OK:
        worst, why = EITHER, f"depth {depth_max}"
    if items > ITEMS_OK:
        worst, why = EITHER, f"{items} items"
    return worst, why


def text_verdict(text: str, *, required: bool, limit: int) -> int:
    if any(0xD800 <= ord(c) <= 0xDFFF for c in text) or "\x00" in text or len(text) > limit:
        return INVALID
    if required and not text.strip():
        return INVALID
    return VALID


BENIGN_TEXT = st.one_of(st.just("a lighthouse at dusk"),
                        st.text(st.characters(exclude_characters="\x00"), min_size=1, max_size=30).filter(str.strip))
TASK_FOCUS = ["none", "none", "prompt", "options", "references", "webhook", "metadata", "metadata", "headers",
              "provider", "unknown field", "everything"]
SUB_FOCUS = ["none", "url", "url", "events", "description", "enabled", "signing", "everything"]
PROMPTS = st.one_of(st.just("a lighthouse at dusk"), st.sampled_from(HOSTILE_SAMPLES), st.sampled_from(LONE_SURROGATES),
                    st.text(min_size=1, max_size=30),
                    st.sampled_from([clip("😀" * MAX_STRING), clip("é" * MAX_STRING), "  "]))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
                    st.sampled_from([1e308, 5e-324, -0.0, 2 ** 64, "😀", "\x00", "\u2028", ""]))
PLAIN_JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=15)


class RawJson(bytes):
    """JSON text that shows itself briefly in Hypothesis' reports."""

    def __repr__(self) -> str:
        return f"<{len(self)} bytes: {bytes.__repr__(self[:40])}…>" if len(self) > 100 else bytes.__repr__(self)


@st.composite
def metadata(draw: st.DrawFn) -> tuple[bytes, str]:
    """Raw JSON of a metadata value (and what it is): plain, deep, wide, long, with odd numbers or surrogates."""
    kind = draw(st.sampled_from(["plain", "plain", "deep", "wide", "long", "odd", "surrogate", "not an object"]))
    ascii_only = draw(st.booleans())
    if kind == "deep":
        depth = draw(st.sampled_from([1, 10, 20, 28, 29, 30, 31, 32, 33, 34, 40, 100, 970, 3000]))
        shape = draw(st.sampled_from(["object", "list", "mixed"]))
        raw = nested_json(depth, shape)
        return RawJson(raw if shape == "object" else b'{"l":' + raw + b"}"), f"{shape} nested {depth}"
    if kind == "wide":
        count = draw(st.sampled_from([10, 500, 990, 1000, 1020, 1024, 1025, 1100, 5000]))
        return RawJson(encode({f"k{i}": i for i in range(count)}, True)), f"{count} keys"
    if kind == "long":
        size = draw(st.sampled_from([1000, 16_000, 16_377, 16_400, MAX_STRING + 1]))
        char = draw(st.sampled_from(["a", "é", "😀"]))
        return RawJson(encode({"s": char * size}, ascii_only)), f"{size} × {char!r}"
    if kind == "odd":
        raw = draw(st.sampled_from([b'{"n":1e400}', b'{"n":NaN}', b'{"n":-Infinity}', b'{"n":' + b"9" * 4301 + b"}",
                                    b'{"n":1E-400}', b'{"n":-0}', b'{"n":1.0e+2}', b'{"s":"\\ud83d\\ude00"}',
                                    b'{"a":1,"a":2}', b'{"":{"":""}}', b'{"\\u0000":"\\u0000"}']))
        return RawJson(raw), f"odd {raw[:20]!r}"
    if kind == "surrogate":
        bad = draw(st.sampled_from(LONE_SURROGATES))
        return encode(draw(st.sampled_from([{"s": bad}, {bad: 1}, {"l": ["ok", bad]}])), ascii_only), "surrogate"
    if kind == "not an object":
        return draw(st.sampled_from([b"[]", b"1", b'"s"', b"null"])), "not an object"
    value = draw(st.dictionaries(st.text(max_size=12), PLAIN_JSON, max_size=6))
    return RawJson(encode(value, ascii_only)), "plain"


# ---- the model --------------------------------------------------------------------------------------------
@dataclass
class TaskModel:
    id: str
    provider: str
    prompt: str
    metadata: Any
    webhook_url: str | None
    webhook_events: list[str] | None
    sink_prefix: str | None          # where the task's own webhook lands on the sink, if it leads there
    status: str = "pending"


@dataclass
class SubModel:
    id: str
    url: str
    events: list[str]
    enabled: bool
    description: Any
    secrets: list[str]
    sink_prefix: str | None
    deleted: bool = False


@dataclass
class Target:
    """Where one event must go: a subscription or a task's own webhook_url."""

    sub_id: str | None
    url: str
    sink_prefix: str | None
    secrets: list[str]


@dataclass
class EventModel:
    id: str
    type: str
    task_id: str
    targets: list[Target]


@dataclass
class World:
    """What outlives one example: the sink, where data goes, provider capabilities."""

    sink: Sink
    tmp: Path
    caps: dict[str, dict[str, Any]]
    counter: itertools.count[int] = field(default_factory=itertools.count)
    by_id: dict[str, list[Received]] = field(default_factory=dict)
    indexed: int = 0

    def arrivals(self, webhook_id: str) -> list[Received]:
        """What the sink got with this webhook-id (indexed as it comes in: the sink's list only grows)."""
        fresh = self.sink.received[self.indexed:]
        self.indexed += len(fresh)
        for received in fresh:
            self.by_id.setdefault(received.headers.get("webhook-id", ""), []).append(received)
        return self.by_id.get(webhook_id, [])


class ErrorLog(logging.Handler):
    """Every ERROR relay logs (an unexpected job failure, an unhandled request) during one example."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = ID.sub(lambda m: f"{m.group(1)}_…", record.getMessage())      # so that repeats read as one
        self.records.append(f"{record.name}: {message}"[:500])


def field_problem(response: httpx.Response, sent: set[str], parsed: Any) -> str | None:
    """A 422 names the field at fault, and that field is one the request had (a body key or a header)."""
    if response.status_code != 422:
        return None
    error = response.json()["error"]
    name = error.get("field")
    if name is None:
        return None if not isinstance(parsed, dict) else f"no field named: {error['message'][:200]}"
    top = name.replace("[", ".").split(".")[0]
    if top not in sent | {"Idempotency-Key", "Content-Type"}:
        return f"field {name!r} was not in the request {sorted(sent)}"
    return None


F = TypeVar("F", bound=Callable[..., None])


def checked(rule_function: F) -> F:
    """Marks the machine broken while a rule runs, so that teardown skips its checks after a failed step."""

    @functools.wraps(rule_function)
    def run(self: RoundTrip, *args: Any, **kwargs: Any) -> None:
        self.broken = True
        rule_function(self, *args, **kwargs)
        self.broken = False
    return run  # type: ignore[return-value]


class RoundTrip(RuleBasedStateMachine):
    world: ClassVar[World]
    broken = False

    def __init__(self) -> None:
        super().__init__()
        world = self.world
        self.n = next(world.counter)
        self.tag = f"rt{self.n}"
        self.env = InLoop(world.tmp / self.tag, resolver=ssrf_resolver, RELAY_DELIVERIES_TIMEOUT="2").__enter__()
        # A server error as the 500 a client gets (not an exception raised into the test), to be reported as such.
        transport = httpx.ASGITransport(app=create_app(self.env.h.runtime, run_worker=False),
                                        raise_app_exceptions=False)
        self.api = httpx.AsyncClient(transport=transport, base_url=BASE, headers=AUTH)
        self.errors = ErrorLog()
        logging.getLogger("relay").addHandler(self.errors)
        self.tasks: dict[str, TaskModel] = {}
        self.subs: dict[str, SubModel] = {}
        self.events: dict[str, EventModel] = {}
        self.verified: set[str] = set()          # events already checked against every target
        self.last_event: str | None = None
        self.idempotency: dict[str, tuple[str, str]] = {}       # key → (canonical body, task id)
        self.hooks = itertools.count()
        self.task_secret = self.call("GET", "/v1/webhook-secret").json()["secret"]
        # The subscriber that hears everything, from the start.
        main = self.call("POST", "/v1/subscriptions", json={"url": world.sink.url(f"/{self.tag}-main-")})
        assert main.status_code == 201, main.text
        self._remember_sub(main.json(), f"/{self.tag}-main-")

    # ---- plumbing ---------------------------------------------------------------------------------
    def call(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One request; never a 5xx, strict JSON, errors in API.md's shape."""
        response = self.env.run(self.api.request(method, url, **kwargs))
        label = f"{method} {url[:120]}"
        assert response.status_code < 500, f"{label}: {response.status_code} {response.text[:500]}"
        if response.headers.get("content-type", "").startswith("application/json"):
            strict_json(response)
        if response.status_code >= 400:
            problem = error_shape_problem(response)
            assert problem is None, f"{label} answered {response.status_code} {response.text[:300]}: {problem}"
        return response

    def _remember_sub(self, shown: dict[str, Any], sink_prefix: str | None) -> None:
        self.subs[shown["id"]] = SubModel(id=shown["id"], url=shown["url"], events=shown["events"],
                                          enabled=shown["enabled"], description=shown["description"],
                                          secrets=[shown["secret"]], sink_prefix=sink_prefix)

    def live_subs(self) -> list[str]:
        return [s for s, sub in self.subs.items() if not sub.deleted]   # creation order: the same every run

    def sync_events(self) -> None:
        """Page the log on from the last event seen; each new event must go where the model says."""
        while True:
            query = {"limit": "200", **({"after": self.last_event} if self.last_event else {})}
            response = self.call("GET", "/v1/events", params=query)
            assert response.status_code == 200, response.text
            data = response.json()["data"]
            if not data:
                return
            for event in data:
                assert event["id"] not in self.events, f"event {event['id']} listed twice"
                task = self.tasks.get(event["data"]["id"])
                assert task is not None, f"an event of a task relay never accepted: {event['data']['id']}"
                assert event["data"]["metadata"] == task.metadata, event["id"]
                targets = [Target(sub.id, sub.url, sub.sink_prefix, sub.secrets) for sub in self.subs.values()
                           if not sub.deleted and sub.enabled and matches(sub.events, event["type"])]
                if task.webhook_url and matches(task.webhook_events, event["type"]):
                    targets.append(Target(None, task.webhook_url, task.sink_prefix, [self.task_secret]))
                self.events[event["id"]] = EventModel(event["id"], event["type"], task.id, targets)
            self.last_event = data[-1]["id"]

    def check_task(self, task_id: str) -> dict[str, Any]:
        """GET the task: 200, as it was sent, its status never moving back."""
        response = self.call("GET", f"/v1/tasks/{task_id}")
        assert response.status_code == 200, response.text
        shown = response.json()
        self.same_task(shown)
        return shown

    def same_task(self, shown: dict[str, Any]) -> None:
        model = self.tasks[shown["id"]]
        assert shown["provider"] == model.provider
        assert shown["request"]["prompt"] == model.prompt
        assert shown["metadata"] == model.metadata, (shown["metadata"], model.metadata)
        assert shown.get("webhook_url") == model.webhook_url
        assert ORDER[shown["status"]] >= ORDER[model.status], f"{shown['id']} went {model.status} → {shown['status']}"
        model.status = shown["status"]

    # ---- tasks ------------------------------------------------------------------------------------
    @rule(data=st.data(), focus=st.sampled_from(TASK_FOCUS))
    @checked
    def create_task(self, data: st.DataObject, focus: str) -> None:
        """A task body hostile in one respect (`focus`), or in every one, or in none (then it must be accepted)."""

        def hostile(aspect: str) -> bool:
            return focus in (aspect, "everything")

        caps = self.world.caps
        body = Body()
        ascii_only = data.draw(st.booleans(), label="ascii")
        provider = data.draw(st.sampled_from(sorted(caps)), label="provider")
        cap = caps[provider]
        if hostile("provider"):
            body.add("provider", encode(data.draw(st.sampled_from(["", "nope", 1, None, "OPENAI"])), True), INVALID)
        else:
            body.add("provider", encode(provider, True))
        prompt = data.draw(PROMPTS if hostile("prompt") else BENIGN_TEXT, label="prompt")
        body.add("prompt", encode(prompt, ascii_only), text_verdict(prompt, required=True, limit=MAX_STRING))
        self._options(data, body, cap, hostile=hostile("options"))
        if hostile("references"):
            self._references(data, body, cap)
        hook_prefix = self._webhook(data, body, hostile=hostile("webhook"))
        if hostile("metadata"):
            raw, what = data.draw(metadata(), label="metadata")
            body.add("metadata", raw, VALID, what)
        elif data.draw(st.booleans(), label="metadata?"):
            body.add("metadata", encode(data.draw(st.dictionaries(st.text(max_size=12), PLAIN_JSON, max_size=6)),
                                        ascii_only))
        if hostile("unknown field"):
            body.add("promt", b'"typo"', INVALID)
        types = JSON_TYPES + NOT_JSON_TYPES + ODD_TYPES if hostile("headers") else JSON_TYPES
        content_type = data.draw(st.one_of(st.none(), st.sampled_from(types)), label="content-type")
        keys = st.one_of(st.sampled_from(["k1", "k2", "k3"]), st.sampled_from(["", "k" * 256, "é", " k1", "k" * 255]))
        key = data.draw(keys if hostile("headers") else st.one_of(st.none(), st.sampled_from(["k1", "k2"])),
                        label="idempotency-key")
        self.post_task(body, content_type=content_type, key=key, hook_prefix=hook_prefix)

    def post_task(self, body: Body, *, content_type: str | None = None, key: str | None = None,
                  hook_prefix: str | None = None) -> str | None:
        """POST a task body and hold the answer to its verdict; an accepted task joins the model (its id)."""
        raw = body.raw
        parsed = parse_strictly(raw)
        with deep_recursion():
            canonical = json.dumps(parsed, sort_keys=True, separators=(",", ":"))
        if parsed is None or not isinstance(parsed, dict):
            body.verdict = INVALID
        else:
            limits, why = judge_limits(parsed)
            if limits > body.verdict:
                body.verdict, body.why = limits, [*body.why, why]
            meta = parsed.get("metadata")
            if meta is not None and not isinstance(meta, dict):
                body.verdict = INVALID
            elif meta is not None and limits != INVALID:
                sizes = [len(encode(meta, a)) for a in (True, False)]
                if min(sizes) > MAX_METADATA_BYTES:
                    body.verdict = INVALID
                elif max(sizes) > MAX_METADATA_BYTES:
                    body.verdict = max(body.verdict, EITHER)
        headers: list[tuple[bytes, bytes]] = []
        if content_type is not None:
            headers.append((b"content-type", content_type.encode()))
        if key is not None:
            headers.append((b"idempotency-key", key.encode("latin-1")))
        response = self.call("POST", "/v1/tasks", content=raw, headers=headers)
        status = response.status_code
        context = f"POST /v1/tasks {raw[:120]!r} ({content_type=}, {key=}, {body.why}) → {status} {response.text[:300]}"
        key_ok = key is None or 1 <= len(key.encode("latin-1")) <= 255
        if not key_ok and status == 422:        # the header is checked before the body, or after it: either
            assert response.json()["error"].get("field") == "Idempotency-Key", context
            return None
        if content_type in NOT_JSON_TYPES:
            assert status == 415 and response.json()["error"]["code"] == "unsupported_media_type", context
            return None
        assert status != 415 or content_type in ODD_TYPES, context
        if status == 415:
            return None
        assert key_ok, f"a bad Idempotency-Key was not refused: {context}"
        problem = field_problem(response, body.keys, parsed)
        assert problem is None, f"{problem} — {context}"
        earlier = self.idempotency.get(key) if key is not None else None
        if status == 202 and earlier is None and isinstance(parsed, dict):
            # Into the model even if it should have been refused: what follows still holds it to the round trip.
            shown = response.json()
            self.tasks[shown["id"]] = TaskModel(
                id=shown["id"], provider=parsed["provider"], prompt=parsed["prompt"], metadata=parsed.get("metadata"),
                webhook_url=parsed.get("webhook_url"), webhook_events=parsed.get("webhook_events"),
                sink_prefix=hook_prefix)
            if key is not None:
                self.idempotency[key] = (canonical, shown["id"])
        if body.verdict == INVALID:
            assert 400 <= status < 500, f"refused input was accepted: {context}"
            return None
        if body.verdict == VALID and earlier is None:
            assert status == 202, f"valid input was refused: {context}"
        if status == 422:
            return None
        if earlier is not None:
            if earlier[0] == canonical:
                assert status == 200 and response.json()["id"] == earlier[1], context
            else:
                assert status == 409, context
            return None
        assert status == 202, context
        shown = response.json()
        self.same_task(shown)
        self.check_task(shown["id"])
        return str(shown["id"])

    def _options(self, data: st.DataObject, body: Body, cap: dict[str, Any], *, hostile: bool) -> None:
        """Generation options the provider supports, and (hostile) ones it does not or that are no option."""
        choices = {"size": (cap["sizes"], ["1024x1024", "1024x1536", "1536x1024", "1:1", "2:3", "3:2", "auto"]),
                   "quality": (cap["qualities"], ["low", "medium", "high", "auto"]),
                   "background": (cap["backgrounds"] or [], ["auto", "transparent", "opaque"]),
                   "output_format": (cap["output_formats"] or [], ["png", "jpeg", "webp"]),
                   "moderation": (cap["moderation"] or [], ["auto", "low"])}
        for name, (supported, every) in choices.items():
            pick = data.draw(st.integers(0, 5), label=name)
            if pick == 0 and supported:
                body.add(name, encode(data.draw(st.sampled_from(supported), label=name), True))
            elif pick == 1 and hostile:
                value = data.draw(st.sampled_from(every), label=name)
                # Not supported: a 422 unsupported; "auto" (the default) may pass where there is no choice.
                known = RATIO_TO_PIXELS.get(value, value) in supported or value == "auto"
                body.add(name, encode(value, True), EITHER if known else INVALID)
        pick = data.draw(st.integers(0, 6), label="n")
        if pick == 0:
            body.add("n", b"1")
        elif pick == 1:
            n = data.draw(st.integers(1, min(2, cap["max_n"])), label="n")
            body.add("n", str(n).encode())
        elif pick == 2 and hostile:
            raw = data.draw(st.sampled_from([b"0", b"11", b"2.0", b"true", b'"2"', b"-1", b"1e0"]), label="n")
            body.add("n", raw, INVALID if raw in (b"0", b"11", b"true", b'"2"', b"-1") else EITHER)
        if hostile and data.draw(st.integers(0, 3), label="compression?") == 0:
            body.add("output_compression", data.draw(st.sampled_from([b"0", b"100", b"50", b"101", b"-1"])), EITHER)

    def _references(self, data: st.DataObject, body: Body, cap: dict[str, Any]) -> None:
        """Reference images and a mask: hostile URLs, as many as the provider takes or more."""
        count = data.draw(st.integers(1, 3), label="image count")
        tagged = [data.draw(urls(), label="image") for _ in range(count)]
        verdict = max(v for _, v in tagged)
        if cap["input_images"] is None or count > cap["max_input_images"]:
            verdict = INVALID
        body.add("images", encode([u for u, _ in tagged], data.draw(st.booleans())), verdict, "images")
        if data.draw(st.booleans(), label="mask?"):
            mask, mask_verdict = data.draw(urls(), label="mask")
            body.add("mask", encode(mask, True), mask_verdict if cap["mask"] else INVALID, "mask")

    def _webhook(self, data: st.DataObject, body: Body, *, hostile: bool) -> str | None:
        """A task's own webhook_url: hostile, or leading to the sink; its events filter. The sink prefix, if any."""
        pick = data.draw(st.integers(0, 3), label="webhook?")
        prefix = None
        if not hostile:
            if pick < 2:
                tag = f"{self.tag}-hook{next(self.hooks)}-"   # the dash: no tag is the start of another
                body.add("webhook_url", encode(self.world.sink.url(f"/{tag}"), True))
                prefix = f"/{tag}"
                if pick == 0:
                    events = data.draw(st.lists(st.sampled_from([*EVENT_TYPES, "task.*", "*"]), min_size=1, max_size=3))
                    body.add("webhook_events", encode(events, True))
            return prefix
        if pick == 0:
            url, verdict = data.draw(urls(), label="webhook_url")
            body.add("webhook_url", encode(url, True), verdict, "webhook_url")
        elif pick == 1:
            tag = f"{self.tag}-hook{next(self.hooks)}-"   # the dash: no tag is the start of another
            url, verdict = data.draw(sink_urls(self.world.sink.port, tag), label="webhook_url")
            body.add("webhook_url", encode(url, data.draw(st.booleans())), verdict, "webhook_url")
            prefix = f"/{tag}"
        if data.draw(st.integers(0, 3), label="webhook_events?") == 0:
            events = data.draw(st.lists(st.sampled_from([*EVENT_TYPES, "task.*", "*"]), min_size=1, max_size=3))
            verdict = VALID if pick in (0, 1) else INVALID
            if data.draw(st.integers(0, 5), label="odd event?") == 0:
                events, verdict = [*events, data.draw(st.sampled_from(["task.nope", "", "TASK.QUEUED"]))], INVALID
            body.add("webhook_events", encode(events, True), verdict, "webhook_events")
        return prefix

    @precondition(lambda self: self.tasks)
    @rule(data=st.data())
    @checked
    def read_task(self, data: st.DataObject) -> None:
        self.check_task(data.draw(st.sampled_from(list(self.tasks)), label="task"))

    @precondition(lambda self: self.tasks)
    @rule(data=st.data())
    @checked
    def cancel_task(self, data: st.DataObject) -> None:
        task_id = data.draw(st.sampled_from(list(self.tasks)), label="task")
        before = self.check_task(task_id)["status"]
        response = self.call("POST", f"/v1/tasks/{task_id}/cancel")
        if before in TERMINAL:
            assert response.status_code == 409, response.text
        else:
            assert response.status_code == 200 and response.json()["status"] == "canceled", response.text
            self.same_task(response.json())
        self.sync_events()

    @rule(limit=st.sampled_from([1, 2, 3, 7, 50, 200]), status=st.sampled_from([None, *STATUSES]),
          provider=st.one_of(st.none(), st.sampled_from(["openai", "evolink", "nope", "é", "' OR 1=1 --"])))
    @checked
    def list_tasks(self, limit: int, status: str | None, provider: str | None) -> None:
        """Page the whole list: every accepted task that fits the filter exactly once, newest first."""
        query = {k: v for k, v in {"status": status, "provider": provider}.items() if v is not None}
        seen = self.page("/v1/tasks", "cursor", {**query, "limit": str(limit)})
        ids = [t["id"] for t in seen]
        assert ids == sorted(ids, reverse=True), "not newest first"
        for shown in seen:
            assert shown["id"] in self.tasks, f"listed a task relay never accepted: {shown['id']}"
            self.same_task(shown)
        expected = {t.id for t in self.tasks.values()
                    if (provider is None or t.provider == provider) and (status is None or t.status == status)}
        assert expected <= set(ids), f"missing from the list: {sorted(expected - set(ids))}"
        self.odd_cursors("/v1/tasks", "cursor", "tsk")

    def page(self, url: str, cursor: str, query: dict[str, str]) -> list[dict[str, Any]]:
        """Every item of a paged list, following next_cursor; each page a 200; no item twice."""
        items: list[dict[str, Any]] = []
        params = dict(query)
        for _ in range(10_000):
            response = self.call("GET", url, params=params)
            assert response.status_code == 200, f"GET {url} {params}: {response.text[:300]}"
            page = response.json()
            items += page["data"]
            if not page["data"] or page["next_cursor"] is None:
                break
            params[cursor] = page["next_cursor"]
        ids = [item["id"] for item in items]
        assert len(ids) == len(set(ids)), f"GET {url} {query}: items listed twice"
        return items

    def odd_cursors(self, url: str, name: str, prefix: str) -> None:
        """A cursor relay did not give out is a 422 naming it; a well-formed unknown one never restarts the list."""
        for odd in ("garbage", f"{prefix}_", f"xyz_{FAR_PAST}", f"{prefix}_01jd{'a' * 22}", "%00", "\x00",
                    "' OR 1=1 --", f"{prefix}_{FAR_PAST}0", f"{prefix.upper()}_{FAR_PAST}", f" {prefix}_{FAR_PAST}"):
            response = self.call("GET", url, params={name: odd})
            assert response.status_code == 422 and response.json()["error"].get("field") == name, \
                f"GET {url}?{name}={odd!r}: {response.status_code} {response.text[:200]}"
        first = self.call("GET", url, params={name: ""})
        assert first.status_code == 200, f"GET {url}?{name}= (empty: the first page): {first.text[:200]}"
        newest_first = url != "/v1/events"
        for well_formed in (FAR_FUTURE, FAR_PAST):
            cursor = f"{prefix}_{well_formed}"
            response = self.call("GET", url, params={name: cursor, "limit": "200"})
            if response.status_code == 422:
                assert response.json()["error"].get("field") == name, response.text
                continue
            assert response.status_code == 200, response.text
            ids = [item["id"] for item in response.json()["data"]]
            # Past the cursor means older for a newest-first list, later for the event log.
            wrong = [i for i in ids if (i >= cursor if newest_first else i <= cursor)]
            assert not wrong, f"GET {url}?{name}={cursor} answered items on the wrong side of it: {wrong[:3]}"

    # ---- the event log ----------------------------------------------------------------------------
    @rule(limit=st.sampled_from([1, 2, 5, 200]))
    @checked
    def page_events(self, limit: int) -> None:
        """Page the whole log with `after`: each event once, in order, of an accepted task, as the model has it."""
        self.sync_events()
        events = self.page("/v1/events", "after", {"limit": str(limit)})
        assert [e["id"] for e in events] == list(self.events), "the log paged differently than it grew"
        for event in events:
            assert event["type"] in EVENT_TYPES and event["data"]["id"] == self.events[event["id"]].task_id
        if events:
            last = self.call("GET", "/v1/events", params={"after": events[-1]["id"]})
            assert last.status_code == 200 and last.json() == {"data": [], "next_cursor": None}, last.text
        for task_id in list(self.tasks)[:3]:
            own = self.page("/v1/events", "after", {"task_id": task_id, "limit": str(limit)})
            assert [e["id"] for e in own] == [e.id for e in self.events.values() if e.task_id == task_id]
        self.odd_cursors("/v1/events", "after", "evt")

    # ---- subscriptions ----------------------------------------------------------------------------
    def _subscription_body(self, data: st.DataObject, *, create: bool) -> tuple[Body, str | None]:
        """A subscription body hostile in one respect, in all or in none; and where its deliveries land."""
        focus = data.draw(st.sampled_from(SUB_FOCUS), label="focus")

        def hostile(aspect: str) -> bool:
            return focus in (aspect, "everything")

        body = Body()
        prefix = None
        if create or data.draw(st.booleans(), label="url?"):
            tag = f"{self.tag}-sub{next(self.hooks)}-"
            if not hostile("url"):
                url, verdict, prefix = self.world.sink.url(f"/{tag}"), VALID, f"/{tag}"
            elif data.draw(st.booleans(), label="to the sink?"):
                url, verdict = data.draw(sink_urls(self.world.sink.port, tag), label="url")
                prefix = f"/{tag}"
            else:
                url, verdict = data.draw(urls(), label="url")
            body.add("url", encode(url, data.draw(st.booleans())), verdict, "url")
        if data.draw(st.booleans(), label="events?"):
            events = data.draw(st.lists(st.sampled_from([*EVENT_TYPES, "task.*", "*"]), min_size=1, max_size=4))
            verdict = VALID
            if hostile("events"):
                events, verdict = data.draw(st.sampled_from([[], ["nope"], ["*"] * 33, [1], "*"])), INVALID
            body.add("events", encode(events, True), verdict)
        if data.draw(st.booleans(), label="description?"):
            texts = st.one_of(st.sampled_from(HOSTILE_SAMPLES), st.sampled_from(LONE_SURROGATES), st.just("é" * 1024))
            text = data.draw(texts if hostile("description") else BENIGN_TEXT, label="description")
            body.add("description", encode(text, data.draw(st.booleans())),
                     text_verdict(text, required=False, limit=1024), "description")
        if hostile("enabled") or data.draw(st.integers(0, 3), label="enabled?") == 0:
            values = [True, False, "yes", None, 1] if hostile("enabled") else [True, False]
            enabled = data.draw(st.sampled_from(values), label="enabled")
            body.add("enabled", encode(enabled, True), VALID if isinstance(enabled, bool) else INVALID)
        if hostile("signing") or (create and data.draw(st.integers(0, 3), label="signing?") == 0):
            values = ["hmac", "ed25519", "rsa", ""] if hostile("signing") else ["hmac", "ed25519"]
            signing = data.draw(st.sampled_from(values), label="signing")
            body.add("signing", encode(signing, True), VALID if create and signing in ("hmac", "ed25519") else INVALID)
        return body, prefix

    @rule(data=st.data())
    @checked
    def create_subscription(self, data: st.DataObject) -> None:
        body, prefix = self._subscription_body(data, create=True)
        self.post_subscription(body, prefix)

    def post_subscription(self, body: Body, prefix: str | None) -> str | None:
        """POST a subscription and hold the answer to its verdict; an accepted one joins the model (its id)."""
        self.sync_events()           # what is in the log now was written before this subscriber existed
        response = self.call("POST", "/v1/subscriptions", content=body.raw,
                             headers={"content-type": "application/json"})
        if response.status_code == 201:
            # Into the model even if it should have been refused: what follows still holds it to the round trip.
            self._remember_sub(response.json(), prefix)
        parsed = self._judge(body, response, "POST /v1/subscriptions", ok=201)
        if response.status_code != 201:
            return None
        shown = response.json()
        assert shown["url"] == parsed["url"] and shown["description"] == parsed.get("description"), shown
        self.check_sub(shown["id"])
        return str(shown["id"])

    def _judge(self, body: Body, response: httpx.Response, label: str, *, ok: int) -> Any:
        parsed = parse_strictly(body.raw)
        if isinstance(parsed, dict):
            limits, why = judge_limits(parsed)
            body.verdict, body.why = max(body.verdict, limits), [*body.why, why]
        context = f"{label} {body.raw[:120]!r} ({body.why}) → {response.status_code} {response.text[:300]}"
        problem = field_problem(response, body.keys, parsed)
        assert problem is None, f"{problem} — {context}"
        if body.verdict == INVALID:
            assert 400 <= response.status_code < 500, f"refused input was accepted: {context}"
        elif body.verdict == VALID:
            assert response.status_code == ok, f"valid input was refused: {context}"
        return parsed

    def check_sub(self, sub_id: str) -> None:
        model = self.subs[sub_id]
        response = self.call("GET", f"/v1/subscriptions/{sub_id}")
        if model.deleted:
            assert response.status_code == 404, response.text
            return
        assert response.status_code == 200, response.text
        shown = response.json()
        assert "secret" not in shown
        assert (shown["url"], shown["events"], shown["enabled"], shown["description"]) == \
            (model.url, model.events, model.enabled, model.description), (shown, model)

    @precondition(lambda self: self.live_subs())
    @rule(data=st.data())
    @checked
    def update_subscription(self, data: st.DataObject) -> None:
        sub_id = data.draw(st.sampled_from(self.live_subs()), label="subscription")
        body, prefix = self._subscription_body(data, create=False)
        response = self.call("PATCH", f"/v1/subscriptions/{sub_id}", content=body.raw,
                             headers={"content-type": "application/json"})
        parsed = self._judge(body, response, f"PATCH /v1/subscriptions/{sub_id}", ok=200)
        if response.status_code != 200:
            return
        model = self.subs[sub_id]
        self.settle_targets_of(sub_id)
        if "url" in parsed:
            model.url, model.sink_prefix = parsed["url"], prefix
        if "events" in parsed:
            model.events = list(dict.fromkeys(parsed["events"]))
        if "description" in parsed:
            model.description = parsed["description"]
        if "enabled" in parsed:
            model.enabled = parsed["enabled"]
        self.check_sub(sub_id)

    def settle_targets_of(self, sub_id: str) -> None:
        """Deliveries to a subscription not made yet may go to its old or its new URL, or (deleted) nowhere."""
        for event in self.events.values():
            if event.id in self.verified:
                continue
            event.targets = [t for t in event.targets if t.sub_id != sub_id or self.arrived(event, t)]

    @precondition(lambda self: self.live_subs())
    @rule(data=st.data())
    @checked
    def rotate_secret(self, data: st.DataObject) -> None:
        sub_id = data.draw(st.sampled_from(self.live_subs()), label="subscription")
        response = self.call("POST", f"/v1/subscriptions/{sub_id}/rotate-secret")
        assert response.status_code == 200, response.text
        secret = response.json()["secret"]
        assert secret not in self.subs[sub_id].secrets
        self.subs[sub_id].secrets.append(secret)       # the same list the model's targets hold

    @precondition(lambda self: len(self.live_subs()) > 1)
    @rule(data=st.data())
    @checked
    def delete_subscription(self, data: st.DataObject) -> None:
        sub_id = data.draw(st.sampled_from(self.live_subs()[1:]), label="subscription")
        response = self.call("DELETE", f"/v1/subscriptions/{sub_id}")
        assert response.status_code == 200, response.text
        self.settle_targets_of(sub_id)
        self.subs[sub_id].deleted = True
        self.check_sub(sub_id)

    @rule(data=st.data())
    @checked
    def replay(self, data: st.DataObject) -> None:
        """Replay since (and until) an RFC 3339 edge: 202, or a 4xx naming since/until/status; never a 5xx."""
        sub_id = data.draw(st.sampled_from(list(self.subs)), label="subscription")
        since = data.draw(rfc3339_times(), label="since")
        until = data.draw(st.one_of(st.none(), rfc3339_times()), label="until")
        body = replay_body(since, until)
        if data.draw(st.booleans(), label="status?"):
            status = data.draw(st.sampled_from(["failed", "canceled", "succeeded", "all", "FAILED", ""]))
            body.add("status", encode(status, True), VALID if status.islower() else INVALID)
        self.post_replay(sub_id, body)

    def post_replay(self, sub_id: str, body: Body) -> None:
        response = self.call("POST", f"/v1/subscriptions/{sub_id}/replay", content=body.raw)
        if self.subs[sub_id].deleted and response.status_code == 404:
            return
        self._judge(body, response, f"POST /v1/subscriptions/{sub_id}/replay",
                    ok=404 if self.subs[sub_id].deleted else 202)

    # ---- the worker -------------------------------------------------------------------------------
    def arrived(self, event: EventModel, target: Target) -> bool:
        """`event` reached `target` on the sink, 2xx, with its webhook-id (the target must lead to the sink)."""
        if target.sink_prefix is None:
            return False
        return any(200 <= r.status < 300 and r.path.startswith(target.sink_prefix)
                   for r in self.world.arrivals(event.id))

    def undelivered(self) -> list[str]:
        return [f"{e.type} {e.id} of {e.task_id} → {t.url}" for e in self.events.values() for t in e.targets
                if e.id not in self.verified and t.sink_prefix is not None and not self.arrived(e, t)]

    @rule()
    @checked
    def drain(self) -> None:
        """Run the worker until every accepted task has ended and every event reached the sink's subscribers."""
        store, worker = self.env.h.runtime.store, self.env.h.runtime.worker
        running = sorted(t.id for t in self.tasks.values() if t.status not in TERMINAL)
        deadline = time.monotonic() + SETTLE_SECONDS
        moved, before = time.monotonic(), None
        while True:
            ran = self.env.run(worker.drain())
            tasks = [self.env.run(store.get_task(task_id)) for task_id in running]
            waiting = [f"{t.id} {t.status.value}" for t in tasks if t is not None and t.status.value not in TERMINAL]
            if not waiting:
                self.sync_events()
                waiting = self.undelivered()
                if not waiting:
                    break
            now = time.monotonic()
            if ran or waiting != before:
                moved, before = now, waiting
            if now - moved > QUIET_SECONDS or now > deadline:
                self.verified.update(self.events)       # reported once, here, not again by later drains
                raise AssertionError(f"nothing moved for {now - moved:.1f}s ({now - deadline + SETTLE_SECONDS:.1f}s "
                                     f"in all), still waiting for: {waiting[:10]}")
            self.env.run(asyncio.sleep(0.02))     # simulator callbacks and timers run meanwhile
        for task_id in running:
            self.check_task(task_id)
        self.check_deliveries()

    def check_deliveries(self) -> None:
        """Every event reached every sink target, signed by a secret of the target, with the task as sent; every
        other target was at least tried."""
        self.env.run(self.env.h.runtime.worker.drain())
        by_event: dict[str, list[dict[str, Any]]] = {}
        problems = []
        for event in self.events.values():
            if event.id in self.verified:
                continue
            self.verified.add(event.id)
            task = self.tasks[event.task_id]
            for target in event.targets:
                if target.sink_prefix is not None:
                    got = [r for r in self.world.arrivals(event.id) if r.path.startswith(target.sink_prefix)]
                    if not got:
                        problems.append(f"{event.type} {event.id} never reached {target.url}")
                    for received in got:
                        self.check_received(received, event, task, target)
                    continue
                if event.id not in by_event:
                    by_event[event.id] = self.page("/v1/deliveries", "cursor", {"event_id": event.id, "limit": "200"})
                mine = [d for d in by_event[event.id] if d["subscription_id"] == target.sub_id]
                if not any(d["attempts"] >= 1 for d in mine):
                    problems.append(f"{event.type} {event.id} was never tried at {target.url}: "
                                    f"{[(d['status'], d['attempts'], d['last_error']) for d in mine]}")
        assert not problems, "; ".join(problems)
        for delivery_id in sorted({d["id"] for ds in by_event.values() for d in ds})[:10]:
            response = self.call("GET", f"/v1/deliveries/{delivery_id}")
            assert response.status_code == 200, response.text

    def check_received(self, received: Received, event: EventModel, task: TaskModel, target: Target) -> None:
        assert any(self.verifies(received, secret) for secret in target.secrets), \
            f"no secret of {target.sub_id or 'the task webhook'} ({target.url}) verifies {event.id} on " \
            f"{received.path}: {received.headers}"
        payload = json.loads(received.body.decode("utf-8"), parse_constant=_refuse)
        assert payload["type"] == event.type and payload["data"]["id"] == task.id, payload
        assert payload["data"]["metadata"] == task.metadata

    @staticmethod
    def verifies(received: Received, secret: str) -> bool:
        try:
            received.verify(secret)
        except WebhookVerificationError:
            return False
        return True

    # ---- the end ----------------------------------------------------------------------------------
    def teardown(self) -> None:
        try:
            if self.broken:
                return          # a step failed: that failure is the report
            self.drain()
            self.list_tasks(limit=3, status=None, provider=None)
            self.page_events(limit=7)
            for sub_id in sorted(self.subs):
                self.check_sub(sub_id)
                self.page("/v1/deliveries", "cursor", {"subscription_id": sub_id, "limit": "5"})
            self.page("/v1/subscriptions", "cursor", {"limit": "2"})
            self.odd_cursors("/v1/subscriptions", "cursor", "sub")
            self.odd_cursors("/v1/deliveries", "cursor", "dlv")
            assert not self.errors.records, f"relay logged errors: {self.errors.records[:5]}"
        finally:
            logging.getLogger("relay").removeHandler(self.errors)
            self.env.run(self.api.aclose())
            self.env.__exit__(None, None, None)


def instant(text: str) -> datetime:
    return datetime.fromisoformat(text)


def replay_body(since: Tagged, until: Tagged | None) -> Body:
    """A replay window; `until` not after `since` is refused."""
    body = Body()
    body.add("since", encode(since[0], True), since[1], "since")
    if until is not None:
        body.add("until", encode(until[0], True), until[1], "until")
        if since[1] == until[1] == VALID and instant(until[0]) <= instant(since[0]):
            body.verdict = INVALID
    return body


@pytest.fixture(autouse=True)
def default_recursion_limit() -> Iterator[None]:
    """Relay as it runs in production, with the interpreter's default recursion limit, whatever an earlier test
    set (mypy's API, run by tests/test_types.py, raises it to 16384 and leaves it so)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    sink = Sink()
    with sink.serving_in_thread():
        tmp = tmp_path_factory.mktemp("roundtrip")
        with InLoop(tmp / "caps") as env:
            providers = env.run(env.h.api.get("/v1/providers")).json()["data"]
        yield World(sink=sink, tmp=tmp, caps={p["name"]: p["capabilities"] for p in providers})


def test_what_relay_accepts_reads_back_lists_pages_and_is_delivered(world: World) -> None:
    """The round-trip invariant over the whole API, with hostile input: see the module docstring."""
    RoundTrip.world = world
    # No shrinking: each step of a failing example is cheap to read, but replaying examples with drains is slow.
    run_state_machine_as_test(RoundTrip, settings=settings(
        FUZZ, max_examples=EXAMPLES, stateful_step_count=STEPS, phases=[Phase.explicit, Phase.generate]))


def test_the_edges_are_where_the_tests_think() -> None:
    """The verdicts the round trip relies on: a few fixed points of the strategies in tests.fuzzing."""
    assert ("9999-12-31T23:59:59-23:59", INVALID) in RFC3339_EDGES
    assert judge_limits({"a": json.loads(nested_json(40))})[0] == INVALID
    assert judge_limits({"a": json.loads(nested_json(10))})[0] == VALID
    assert judge_limits({"s": "a" * (MAX_STRING + 1)})[0] == INVALID
    assert judge_limits({"s": "\ud800"})[0] == INVALID
    assert CROCKFORD.startswith("0123") and len(FAR_FUTURE) == len(FAR_PAST) == 26


def test_every_hostile_sample_once(world: World) -> None:
    """Each sample of tests.fuzzing in each field that takes it, once: every URL as a subscription's url, a
    webhook_url, an image and a mask (hosts that lead to the sink with the sink's port too); every RFC 3339 edge
    as since and as until; metadata at and around every limit. Each verdict held; whatever is accepted reads back,
    has an event delivered (or at least tried) to it, and is listed. Every failure is reported, not the first."""
    RoundTrip.world = world
    machine = RoundTrip()
    failures: list[str] = []

    def attempt(what: str, check: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return check(*args, **kwargs)
        except AssertionError as exc:
            failures.append(f"{what}: {str(exc).splitlines()[0][:400]}")
            return None

    port = world.sink.port
    try:
        main = machine.live_subs()[0]
        cases: list[tuple[str, int, str | None]] = [(url, verdict, None) for url, verdict in url_samples()]
        for index, (host, verdict) in enumerate(LOOPBACK_HOSTS):
            for variant, (userinfo, tail) in enumerate((("", ""), ("user:pass@", "/%zz"), ("", "/ü/😀?q=%zz&&="))):
                tag = f"{machine.tag}-edge{index}-{variant}"
                cases.append((f"http://{userinfo}{host}:{port}/{tag}{{}}-{tail}", verdict, f"/{tag}"))
        for url, verdict, tag in cases:
            # One subscription, one task with it as webhook_url, one with it as an image and as a mask: then one
            # event of each task, to every listener; then the subscription goes (its deliveries were checked).
            sub = Body()
            sub.add("url", encode(url.replace("{}", "s"), True), verdict, "url")
            attempt("url", machine.post_subscription, sub, tag and f"{tag}s-")
            body = task_body("evolink")
            body.add("webhook_url", encode(url.replace("{}", "t"), True), verdict, "webhook_url")
            attempt("webhook_url", machine.post_task, body, hook_prefix=tag and f"{tag}t-")
            for name, extra in (("images", {}), ("mask", {"images": ["https://example.com/ref.png"]})):
                body = task_body("openai", **extra)
                value = url.replace("{}", "")
                body.add(name, encode([value] if name == "images" else value, True), verdict, name)
                attempt(name, machine.post_task, body)
            for task_id in [t for t, task in machine.tasks.items() if task.status == "pending"]:
                assert machine.call("POST", f"/v1/tasks/{task_id}/cancel").status_code == 200
                machine.tasks[task_id].status = "canceled"
            machine.sync_events()
            attempt(f"delivery to {url!r}", machine.drain)
            for sub_id in machine.live_subs()[1:]:
                assert machine.call("DELETE", f"/v1/subscriptions/{sub_id}").status_code == 200
                machine.subs[sub_id].deleted = True
        for edge in RFC3339_EDGES:
            attempt("since", machine.post_replay, main, replay_body(edge, None))
            attempt("until", machine.post_replay, main, replay_body(("0001-01-01T00:00:00Z", VALID), edge))
        for raw in metadata_samples():
            body = task_body("openai")
            body.add("metadata", raw)
            if attempt("metadata", machine.post_task, body) is not None:
                machine.call("POST", f"/v1/tasks/{list(machine.tasks)[-1]}/cancel")
        machine.sync_events()
        attempt("the last drain", machine.drain)
        attempt("the task list", machine.list_tasks, limit=7, status=None, provider=None)
        attempt("the event log", machine.page_events, limit=50)
        failures += [f"relay logged: {record}" for record in dict.fromkeys(machine.errors.records)]
        assert not failures, f"{len(failures)} failures:\n" + "\n".join(dict.fromkeys(failures))
    finally:
        machine.broken = True       # (the rules called above clear it) its checks were made here
        machine.teardown()


def task_body(provider: str, **fields: Any) -> Body:
    body = Body()
    body.add("provider", encode(provider, True))
    body.add("prompt", encode("a lighthouse at dusk", True))
    for name, value in fields.items():
        body.add(name, encode(value, True))
    return body


def metadata_samples() -> list[bytes]:
    """Metadata at and around every limit: depth in three shapes, width, string length, odd numbers."""
    out = []
    for depth in (1, 20, 29, 30, 31, 32, 33, 34, 40, 100, 970, 3000):
        out += [nested_json(depth), b'{"l":' + nested_json(depth, "list") + b"}",
                b'{"m":' + nested_json(depth // 2, "mixed") + b"}"]
    out += [encode({f"k{i}": i for i in range(count)}, True) for count in (1000, 1020, 1021, 1022, 1024, 1025, 1100)]
    out += [encode({"s": char * size}, ascii_only) for size in (16_000, 16_377, 16_400, MAX_STRING + 1)
            for char in ("a", "😀") for ascii_only in (True, False)]
    out += [b'{"n":1e400}', b'{"n":NaN}', b'{"n":' + b"9" * 4301 + b"}", b'{"s":"\\ud83d\\ude00"}',
            b'{"s":"\\ud800"}', b'{"\\udfff":1}', b'{"a":1,"a":2}', b'{"\\u0000":"\\u0000"}', b"[]"]
    return out
