"""Schemathesis against relay's own /openapi.json, in process: no 5xx, errors in API.md's shape, documented answers.

Each operation of the served document gets a bounded number of generated requests,
valid ones (positive mode) and invalid ones (negative mode: wrong types, missing
required fields, out-of-range values, missing auth), and with path ids of objects
that exist (a finished task with an archived image, a pending task, a subscription,
a delivery), so the checks reach past the 404s. Requests go through httpx's ASGI
transport on the harness's loop, with the tests' API key. A second copy of the schema
swaps hostile values (tests.fuzzing: URLs, RFC 3339 edges, cursors, deep metadata, odd
text) into the string fields of what it generates; bodies sent as anything but JSON
must be a documented 415. The stateful run over the document's links is
tests/test_fuzz_stateful.py; the round trip through the worker, tests/test_roundtrip.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from relay.states import on_failure
from relay.web.app import create_app
from tests.fuzzing import (
    FUZZ,
    JSON,
    InLoop,
    as_bytes,
    error_shape_problem,
    register_hostile_hooks,
    scaled,
    send_case,
    strict_json,
)
from tests.harness import API_KEY

BASE = "http://relay.test"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
EXAMPLES = scaled(12)    # per operation and mode: 21 operations × (2 modes + known ids) stay well under 60 s
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Not error-shaped by design: /readyz's 503 is a health report.
NOT_ERRORS = {("GET /readyz", 503)}


class Fuzzed:
    """The open harness, the loaded schema, and ids of objects that exist."""

    def __init__(self, env: InLoop, schema: Any, known: dict[str, str], client: httpx.AsyncClient,
                 hostile: Any) -> None:
        self.env = env
        self.client = client        # no default Authorization: each case says what it sends
        self.schema = schema
        self.hostile = hostile      # the same document, with hostile values swapped into generated cases
        self.known = known
        self.seen: dict[str, set[int]] = {}
        task_id = known["pending_task_id"]
        token = env.h.runtime.ctx.callback_url("evolink", task_id).rsplit("/", 1)[1]
        self.callback = {"provider": "evolink", "task_id": task_id, "token": token}

    def operations(self, schema: Any = None) -> list[Any]:
        ops = [result.ok() for result in (schema or self.schema).get_all_operations()]
        # Destructive calls last, so the others still find the known objects alive.
        return sorted(ops, key=lambda op: op.method.upper() == "DELETE" or op.path.endswith("/cancel"))

    async def send(self, case: Any, *, auth: bool = True) -> httpx.Response:
        return await send_case(self.client, case, AUTH if auth else None)

    def check(self, case: Any, mode: GenerationMode) -> None:
        """Send one case and hold its answer to the document and to API.md."""
        response = self.env.run(self.send(case))
        label = f"{case.method.upper()} {case.path}"
        self.seen.setdefault(label, set()).add(response.status_code)
        checks = CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])
        case.validate_response(response, checks=checks, headers=AUTH)
        assert_answer(label, response)


def assert_answer(label: str, response: httpx.Response) -> None:
    """Never a 5xx; JSON answers are strict JSON; every error is in API.md's shape."""
    assert response.status_code < 500, f"{label}: {response.status_code} {response.text[:300]}"
    if response.headers.get("content-type", "").startswith("application/json"):
        strict_json(response)
    if response.status_code >= 300 and (label, response.status_code) not in NOT_ERRORS:
        problem = error_shape_problem(response)
        assert problem is None, f"{label} answered {response.status_code} {response.text[:300]}: {problem}"


async def _seed(env: InLoop) -> dict[str, str]:
    """A finished task with an archived image, a pending task, a subscription and a delivery to it."""
    h = env.h
    # Port 9 on loopback: the delivery attempts made while the seed task runs are refused at once, locally.
    sub = (await h.api.post("/v1/subscriptions", json={"url": "http://127.0.0.1:9/hook"})).json()
    done = await h.create(provider="gmicloud", prompt="a lighthouse at dusk")
    deadline = time.monotonic() + 20
    while (task := await h.task(done["id"]))["status"] != "succeeded":
        assert time.monotonic() < deadline, f"seed task stuck in {task['status']}"
        await h.runtime.worker.drain()
        await asyncio.sleep(0.02)
    pending = await h.create(provider="evolink", prompt="p")
    deliveries = (await h.api.get("/v1/deliveries")).json()["data"]
    assert deliveries, "the seed task made no delivery"
    return {"task_id": done["id"], "image_id": task["images"][0]["id"], "subscription_id": sub["id"],
            "pending_task_id": pending["id"], "delivery_id": deliveries[0]["id"]}


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    with InLoop(tmp_path_factory.mktemp("fuzz-api")) as env:
        known = env.run(_seed(env))
        document = env.run(env.h.api.get("/openapi.json")).json()
        # Unknown query parameters and headers are ignored, as most HTTP APIs do: not "negative" data here.
        config = schemathesis.Config.from_dict({"generation": {"allow-extra-parameters": False}})
        schema = schemathesis.openapi.from_dict(document, config=config)
        hostile = schemathesis.openapi.from_dict(document, config=schemathesis.Config.from_dict(
            {"generation": {"allow-extra-parameters": False, "with-security-parameters": False}}))
        register_hostile_hooks(hostile)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(env.h.runtime, run_worker=False)),
                                   base_url=BASE)
        try:
            yield Fuzzed(env, schema, known, client, hostile)
        finally:
            env.run(client.aclose())


def _run_all(fuzzed: Fuzzed, mode: GenerationMode, *, known_ids: bool = False, schema: Any = None) -> None:
    failures: list[str] = []
    for op in fuzzed.operations(schema):
        names = {p.name for p in op.path_parameters}
        fixed = None
        if known_ids:
            if not names:
                continue
            if op.path.startswith("/callbacks/"):
                fixed = fuzzed.callback
            else:
                key = "pending_task_id" if op.path.endswith("/cancel") else next(iter(names))
                if key not in fuzzed.known:
                    continue
                fixed = {name: fuzzed.known[key] for name in names}

        @settings(FUZZ, max_examples=EXAMPLES)
        @given(case=op.as_strategy(generation_mode=mode, path_parameters=fixed))
        def one(case: Any) -> None:
            fuzzed.check(case, mode)

        try:
            one()
        except Unsatisfiable:
            # Nothing in this operation can be made invalid (no parameters, no body, optional auth).
            assert mode is GenerationMode.NEGATIVE, op.label
        except Exception as exc:      # collect, so that one operation's failure does not hide the others'
            failures.append(f"--- {op.method.upper()} {op.path} ({mode.value}):\n{exc}"[:3000])
    assert not failures, "\n".join(failures)


def test_valid_requests_get_documented_answers(fuzzed: Fuzzed) -> None:
    """Schema-valid requests to every operation: never 5xx, answers match the document, errors in API.md shape."""
    _run_all(fuzzed, GenerationMode.POSITIVE)
    assert len(fuzzed.seen) == len(fuzzed.operations())


def test_valid_requests_on_existing_objects(fuzzed: Fuzzed) -> None:
    """The same with path ids of objects that exist, so answers are 2xx/409 bodies, not only 404s."""
    _run_all(fuzzed, GenerationMode.POSITIVE, known_ids=True)
    ok = {label for label, statuses in fuzzed.seen.items() if any(200 <= s < 300 for s in statuses)}
    assert {"GET /v1/tasks/{task_id}", "GET /v1/images/{image_id}", "POST /v1/tasks/{task_id}/cancel",
            "GET /v1/subscriptions/{subscription_id}", "GET /v1/deliveries/{delivery_id}",
            "POST /callbacks/{provider}/{task_id}/{token}"} <= ok, fuzzed.seen


def test_hostile_values_in_every_field_get_documented_answers(fuzzed: Fuzzed) -> None:
    """Every operation with hostile values swapped into its string fields (URLs with brackets, bad IDNA, empty
    labels, odd ports; RFC 3339 edges; odd cursors; metadata deep, wide and long; long and odd text): never a
    5xx, answers match the document, errors in API.md's shape. Known ids too, so bodies reach validation."""
    _run_all(fuzzed, GenerationMode.POSITIVE, schema=fuzzed.hostile)
    _run_all(fuzzed, GenerationMode.POSITIVE, known_ids=True, schema=fuzzed.hostile)


def test_invalid_requests_are_4xx_in_error_shape(fuzzed: Fuzzed) -> None:
    """Schema-violating requests (wrong types, missing fields, no auth): a documented 4xx in API.md's shape."""
    _run_all(fuzzed, GenerationMode.NEGATIVE)


def test_unauthenticated_requests_are_401(fuzzed: Fuzzed) -> None:
    """Every /v1 operation without a key (and no valid image link): 401 unauthorized in the error shape."""
    failures = []
    for op in fuzzed.operations():
        if not op.path.startswith("/v1/"):
            continue            # health, metrics, openapi and callbacks have their own rules

        @settings(FUZZ, max_examples=scaled(3))
        @given(case=op.as_strategy(generation_mode=GenerationMode.POSITIVE))
        def one(case: Any) -> None:
            case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
            response = fuzzed.env.run(fuzzed.send(case, auth=False))
            assert response.status_code == 401 and error_shape_problem(response) is None, response.text

        try:
            one()
        except Exception as exc:
            failures.append(f"--- {op.method.upper()} {op.path}:\n{exc}"[:2000])
    assert not failures, "\n".join(failures)


# Text that has tripped parsers elsewhere: non-ASCII digits (isdigit() but not int()), numbers past
# int()'s 4300-digit limit, NUL, astral characters, signs, blanks, huge values. Each is sent once in every
# query parameter; Hypothesis adds arbitrary text on top.
SPECIALS = ("", " ", "0", "-1", "1e3", "0x10", "²", "١٢", "½", "9" * 5000, "\x00", "null", "[]", "𝟙", "1 ",
            " 1", "+1", "1_000", "NaN", "inf", "999999999999999999999999", "é" * 300)
NASTY = st.one_of(st.sampled_from(SPECIALS), st.text(max_size=40), st.from_regex(r"\A[0-9]{1,30}\Z"))
# Bodies Python's parser treats oddly: nesting deeper than its stack (RecursionError, not ValueError), lone
# surrogate escapes (parsed, but no UTF-8 text can hold them), NaN/Infinity/1e999 (parsed, but not JSON to any
# other client, so they must not be echoed back), a BOM, trailing junk, a bare scalar.
TASK = b'{"provider":"openai","prompt":"p","metadata":'
ODD_BODIES = [
    b"[" * 5000, b'{"a":' * 3000, TASK + b"[" * 2000 + b"]" * 2000 + b"}",
    b'{"n":NaN}', TASK + b'{"a":NaN}}', TASK + b'{"a":-Infinity,"b":1e999}}',
    b"\xef\xbb\xbf{}", b"{}x", b"1", b"", b"\x00",
    b'{"provider":"openai","prompt":"\\ud800"}', TASK + b'{"\\udfff":1}}',
    b'{"url":"http://127.0.0.1:9/h","description":"\\ud800"}', b'{"since":"2000-01-01T00:00:00Z\\udc00"}',
    b'{"id":"x","status":"completed","results":["https://x/\\ud800.png"]}',
]


def test_any_query_text_is_answered_in_shape(fuzzed: Fuzzed) -> None:
    """Every query parameter of every operation set to arbitrary text: never 5xx, documented answers."""
    failures = []
    for op in fuzzed.operations():
        names = sorted(p.name for p in op.query)
        if not names or op.method.upper() != "GET":
            continue
        path = {p.name: fuzzed.known.get(p.name, "x") for p in op.path_parameters}

        def send(query: dict[str, str]) -> None:
            case = op.Case(query=query, path_parameters=path)
            response = fuzzed.env.run(fuzzed.send(case))
            assert_answer(f"GET {op.path} {query!r}"[:300], response)
            case.validate_response(response, checks=CHECKS, headers=AUTH)

        @settings(FUZZ, max_examples=scaled(25))
        @given(query=st.dictionaries(st.sampled_from(names), NASTY, max_size=len(names)))
        def one(query: dict[str, str]) -> None:
            send(query)

        try:
            for name in names:
                for value in SPECIALS:
                    send({name: value})
            one()
        except Exception as exc:
            failures.append(f"--- {op.method.upper()} {op.path}:\n{exc}"[:3000])
    assert not failures, "\n".join(failures)


def test_any_body_is_answered_in_shape(fuzzed: Fuzzed) -> None:
    """Arbitrary bytes and arbitrary JSON as the body of every operation that takes one: 4xx in shape, never 5xx."""
    failures = []
    for op in fuzzed.operations():
        if op.method.upper() not in ("POST", "PATCH") or op.path.endswith("/cancel"):
            continue
        path = {p.name: fuzzed.known.get(p.name, "x") for p in op.path_parameters}
        url = op.path.format(**path)

        def send(body: bytes) -> None:
            response = fuzzed.env.run(fuzzed.client.request(op.method.upper(), url, content=body, headers={
                **AUTH, "content-type": "application/json"}))
            assert_answer(f"{op.method.upper()} {op.path} {body[:100]!r}", response)
            assert str(response.status_code) in op.definition.raw["responses"], (body[:100], response.status_code)

        @settings(FUZZ, max_examples=scaled(20))
        @given(body=st.one_of(st.binary(max_size=200), JSON.map(as_bytes)))
        def one(body: bytes) -> None:
            send(body)

        try:
            for body in ODD_BODIES:
                send(body)
            one()
        except Exception as exc:
            failures.append(f"--- {op.method.upper()} {op.path}:\n{exc}"[:3000])
    # Nothing accepted above may poison later reads (a stored lone surrogate once made every list a 500).
    for url in ("/v1/tasks?limit=200", "/v1/events?limit=200", "/v1/subscriptions?limit=200"):
        response = fuzzed.env.run(fuzzed.client.get(url, headers=AUTH))
        if response.status_code != 200:
            failures.append(f"--- GET {url} afterwards: {response.status_code} {response.text[:300]}")
    assert not failures, "\n".join(failures)


def test_oversized_bodies_are_413_where_documented(fuzzed: Fuzzed) -> None:
    """A body over every limit (2 MiB) is refused with a documented status in the error shape, never read whole."""
    big = b'{"prompt":"' + b"x" * (2 * 1024 * 1024) + b'"}'
    wrong = []
    for op in fuzzed.operations():
        if op.method.upper() not in ("POST", "PATCH") or "requestBody" not in op.definition.raw:
            continue
        label = f"{op.method.upper()} {op.path}"
        path = fuzzed.callback if op.path.startswith("/callbacks/") else {
            p.name: fuzzed.known.get(p.name, "x") for p in op.path_parameters}
        response = fuzzed.env.run(fuzzed.client.request(op.method.upper(), op.path.format(**path), content=big,
                                                        headers={**AUTH, "content-type": "application/json"}))
        documented = str(response.status_code) in op.definition.raw["responses"]
        if response.status_code != 413 or error_shape_problem(response) or not documented:
            wrong.append(f"{label}: {response.status_code} {response.text[:200]}")
    assert not wrong, wrong


NOT_JSON = ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/xml")


def test_non_json_bodies_are_415_where_documented(fuzzed: Fuzzed) -> None:
    """A /v1 body sent as anything but JSON is a documented 415 unsupported_media_type naming Content-Type, checked
    before the body is read; with no Content-Type at all the body is taken as JSON (never a 415)."""
    wrong = []
    for op in fuzzed.operations():
        if not op.path.startswith("/v1/") or "requestBody" not in op.definition.raw:
            continue
        label = f"{op.method.upper()} {op.path}"
        url = op.path.format(**{p.name: fuzzed.known.get(p.name, "x") for p in op.path_parameters})
        for media_type in NOT_JSON:
            response = fuzzed.env.run(fuzzed.client.request(op.method.upper(), url, content=b"{}",
                                                            headers={**AUTH, "content-type": media_type}))
            documented = "415" in op.definition.raw["responses"]
            if (response.status_code != 415 or error_shape_problem(response) or not documented
                    or response.json()["error"].get("field") != "Content-Type"):
                wrong.append(f"{label} ({media_type}): {response.status_code} {response.text[:200]}")
        response = fuzzed.env.run(fuzzed.client.request(op.method.upper(), url, content=b"{}", headers=AUTH))
        if response.status_code == 415 or str(response.status_code) not in op.definition.raw["responses"]:
            wrong.append(f"{label} (no Content-Type): {response.status_code} {response.text[:200]}")
    assert not wrong, wrong


# Hypothesis' text() leaves lone surrogates out (even from its alphabet); json.loads('"\\ud800"') does not.
TEXT_WITH_SURROGATES = st.lists(st.one_of(st.characters(), st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"])),
                                min_size=1, max_size=20).map("".join)


def test_provider_text_without_a_utf8_form_is_served_escaped(fuzzed: Fuzzed) -> None:
    """A failure message a provider sent as '\\ud800' (stored as is) is served as strict JSON, never a 500."""
    env, h = fuzzed.env, fuzzed.env.h

    @settings(FUZZ, max_examples=scaled(15))
    @given(code=TEXT_WITH_SURROGATES, message=TEXT_WITH_SURROGATES)
    def one(code: str, message: str) -> None:
        task = env.run(h.create(provider="openai", prompt="p"))
        env.run(h.runtime.store.apply(task["id"], lambda t: on_failure(t, code, message), h.runtime.ctx.clock.now()))
        for url in (f"/v1/tasks/{task['id']}", "/v1/tasks?limit=5", f"/v1/events?task_id={task['id']}"):
            response = env.run(fuzzed.client.get(url, headers=AUTH))
            assert_answer(f"GET {url}", response)
            assert response.status_code == 200, response.text
        shown = strict_json(env.run(fuzzed.client.get(f"/v1/tasks/{task['id']}", headers=AUTH)))
        # As JSON carries it: an escaped pair ("\ud800\udc00") reads back as the one character it encodes.
        assert shown["error"] == json.loads(json.dumps({"code": code, "message": message}))

    one()
