"""Hypothesis on every provider parser and on the state machine.

Adapters: arbitrary bytes, arbitrary JSON and near-valid bodies (the documented
shapes with fields removed, retyped or replaced) are answered, with random HTTP
statuses and Retry-After headers, to `submit` and `fetch` through httpx's
MockTransport, and given to `parse_callback`. The only exceptions allowed are
RelayError subclasses; every result is a well-formed TaskUpdate.

State machine: any sequence of provider updates (any order, repeats) and of
relay's own signals moves a task forward only, one transition per status reached.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

import httpx
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from relay.errors import ProviderProtocolError, RelayError, SubmitOutcomeUnknown
from relay.models import GenerationRequest, ProviderImage, ProviderStatus, Task, TaskStatus, TaskUpdate
from relay.providers import PROVIDER_KINDS, build_provider
from relay.providers.base import Provider
from relay.providers.parsing import parse_json
from relay.states import EVENT_FOR_STATUS, Transition, on_archived, on_cancel, on_failure, on_submitted, on_update
from tests.fuzzing import FUZZ, JSON, as_bytes, near

KINDS = sorted(PROVIDER_KINDS)
REQUESTS = [GenerationRequest(prompt="a red fox"),
            GenerationRequest(prompt="fox", size="1024x1536", quality="high", n=2, output_format="jpeg",
                              images=("https://in.test/a.png",), mask="https://in.test/m.png")]

# ---- bodies ---------------------------------------------------------------------------------------
TASK_ID = "task-unified-1757156493-imcg5zqt"
DOCUMENTED: dict[str, list[Any]] = {
    "gmicloud": [
        {"request_id": "req-1", "model": "gpt-image-1.5", "status": "queued", "created_at": 1757156493},
        {"request_id": "req-1", "status": "processing"},
        {"request_id": "req-1", "status": "success", "outcome": {"media_urls": [
            {"id": "m1", "url": "https://storage.test/b/1.png"}, {"id": "m2", "url": "https://storage.test/b/2.png"}]}},
        {"request_id": "req-1", "outcome": {"media_urls": ["https://storage.test/b/9.png"]}},
        {"request_id": "req-1", "status": "failed", "error": {"code": "content_filter", "message": "no"},
         "outcome": {"error": "blocked"}},
    ],
    "apimart": [
        {"code": 200, "data": [{"status": "submitted", "task_id": "task_01K"}]},
        {"code": 200, "data": {"id": "task_01K", "status": "processing", "progress": 40, "estimated_time": 60}},
        {"code": 200, "data": {"id": "task_01K", "status": "completed", "progress": 100, "result": {"images": [
            {"url": ["https://upload.test/a_0.png", "https://upload.test/a_1.png"], "expires_at": 1763174708}]}}},
        {"code": 200, "data": {"id": "task_01K", "status": "failed", "error": {
            "code": 400, "message": "blocked by safety", "type": "invalid_request_error"}}},
        {"code": 429, "msg": "quota exhausted", "data": None},
        {"error": {"message": "bad", "type": "invalid_request_error", "code": "500"}},
    ],
    "evolink": [
        {"created": 1757156493, "id": TASK_ID, "model": "gpt-image-1.5", "object": "image.generation.task",
         "progress": 0, "status": "pending", "task_info": {"can_cancel": True, "estimated_time": 100},
         "type": "image", "usage": {"billing_rule": "per_call", "credits_reserved": 2.5}},
        {"id": TASK_ID, "status": "processing", "progress": 55},
        {"id": TASK_ID, "progress": 100, "results": ["https://files.test/i.png"], "status": "completed"},
        {"id": TASK_ID, "status": "completed", "results": None, "result_data": [{"image_url": "https://f.test/r.png"}]},
        {"id": TASK_ID, "status": "failed", "progress": 0,
         "error": {"code": "content_policy_violation", "message": "Content policy violation."}},
    ],
    "pixazo": [
        {"status": "IN_QUEUE", "request_id": "a1b2c3d4", "response_url": "https://gw.test/result",
         "estimated_wait_minutes": 2},
        {"status": "IN_PROGRESS", "request_id": "a1b2c3d4"},
        {"status": "COMPLETED", "request_id": "a1b2c3d4", "images": [
            {"url": "https://storage.test/a1.png", "width": 1024, "height": 1024, "content_type": "image/png"}]},
        {"images": [{"url": "data:image/jpeg;base64,/9j/4AAQ", "content_type": "image/jpeg"}]},
        {"status": "FAILED", "request_id": "a1b2c3d4", "error": {"message": "blocked by safety checker"}},
        {"error": "Invalid request parameters"},
    ],
    "openai": [
        {"created": 1766880000, "background": "opaque", "output_format": "png", "quality": "high",
         "data": [{"b64_json": "iVBORw0KGgo="}, {"url": "https://oai.test/i.png"}],
         "usage": {"input_tokens": 50, "output_tokens": 4160}},
        {"error": {"message": "Your request was rejected by the safety system.", "type": "image_generation_user_error",
                   "code": "moderation_blocked"}},
    ],
}


def bodies(kind: str) -> st.SearchStrategy[bytes]:
    shapes = DOCUMENTED[kind] + [doc for other in KINDS if other != kind for doc in DOCUMENTED[other][:2]]
    own = st.sampled_from(DOCUMENTED[kind])
    return st.one_of(
        st.binary(max_size=300),
        JSON.map(as_bytes),
        st.sampled_from([b"", b"{", b"null", b"[]", b'"x"', b"\xff\xfe", b'{"a":1}{', b"NaN", b"1e999"]),
        st.sampled_from(shapes).flatmap(near).map(as_bytes),
        # Weighted towards this dialect's own shapes, so that many examples get past the first check.
        own.map(as_bytes), own.flatmap(near).map(as_bytes), own.flatmap(near).map(as_bytes),
        own.flatmap(near).map(as_bytes), own.flatmap(near).map(as_bytes),
    )


# 200 most of the time (the bodies are the point), any other status now and then.
STATUSES = st.one_of(st.just(200), st.just(200), st.just(200),
                     st.sampled_from([201, 202, 204, 400, 401, 402, 403, 404, 408, 409, 410, 413, 422, 429, 500, 502,
                                      503, 504, 524]), st.integers(200, 599))
HEADER_VALUES = st.one_of(
    st.sampled_from(["0", "5", "-1", "1e400", "nan", "inf", "86401", "Wed, 21 Oct 2015 07:28:00 GMT",
                     "Fri, 31 Dec 9999 23:59:59 GMT", "", " ", "²"]),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30))
HEADERS = st.dictionaries(st.sampled_from(["retry-after", "retry-after-ms", "x-request-id", "content-type"]),
                          HEADER_VALUES, max_size=3)


def provider_answering(kind: str, status: int, body: bytes, headers: dict[str, str]) -> Provider:
    def answer(request: httpx.Request) -> httpx.Response:
        # On the wire header values are bytes; latin-1 keeps "²" and friends as a server could send them.
        return httpx.Response(status, content=body, headers={k: v.encode("latin-1") for k, v in headers.items()})

    async def fetch_input(url: str) -> tuple[bytes, str]:
        return b"\x89PNG\r\n\x1a\n fake", "image/png"

    http = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    return build_provider(kind, http, base_url="https://p.test", api_key="k", fetch_input=fetch_input)


# ---- what a well-formed update is -------------------------------------------------------------------
def assert_well_formed(update: Any) -> None:
    assert isinstance(update, TaskUpdate), type(update)
    assert isinstance(update.status, ProviderStatus)
    pid = update.provider_task_id
    assert pid is None or (isinstance(pid, str) and pid.strip() and len(pid) <= 512), repr(pid)
    progress = update.progress
    assert progress is None or (type(progress) is int and 0 <= progress <= 100), repr(progress)
    assert isinstance(update.images, tuple)
    for image in update.images:
        assert isinstance(image, ProviderImage)
        assert (isinstance(image.url, str) and image.url.lower().startswith(("https://", "http://"))) or \
            (image.url is None and isinstance(image.b64, str) and image.b64), image
        for size in (image.width, image.height):
            assert size is None or (type(size) is int and size > 0), image
        assert image.expires_at is None or (isinstance(image.expires_at, float) and 0 < image.expires_at
                                            and math.isfinite(image.expires_at)), image
        assert image.content_type is None or (isinstance(image.content_type, str) and image.content_type), image
    if update.status is ProviderStatus.SUCCEEDED:
        assert update.images, "a success must carry at least one image"
    else:
        assert update.images == (), "only a success carries images"
    if update.status is ProviderStatus.FAILED:
        assert isinstance(update.error_code, str) and update.error_code
        assert isinstance(update.error_message, str) and update.error_message
    for text in (update.error_code, update.error_message):
        assert text is None or isinstance(text, str)
    assert update.error_message is None or len(update.error_message) <= 1000
    estimate = update.estimated_seconds
    assert estimate is None or (isinstance(estimate, float) and 0 <= estimate and math.isfinite(estimate)), estimate


# ---- the adapters ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@settings(FUZZ, max_examples=200)
@given(status=STATUSES, body=st.data(), headers=HEADERS, req=st.sampled_from(REQUESTS))
async def test_submit_survives_any_answer(kind: str, status: int, body: st.DataObject, headers: dict[str, str],
                                          req: GenerationRequest) -> None:
    """submit(): any status, headers and body end in a well-formed TaskUpdate or a RelayError, nothing else."""
    provider = provider_answering(kind, status, body.draw(bodies(kind)), headers)
    try:
        update = await provider.submit(req, callback_url="https://relay.test/callbacks/x/y/z", idempotency_key="k")
    except RelayError as exc:
        event(type(exc).__name__)
        return
    finally:
        await provider.http.aclose()
    event(f"update: {update.status.value}")
    assert_well_formed(update)
    if update.status in (ProviderStatus.QUEUED, ProviderStatus.RUNNING):
        # Accepted but unfinished: without an id relay could never poll it.
        assert update.provider_task_id, update


@pytest.mark.parametrize("kind", KINDS)
@settings(FUZZ, max_examples=200)
@given(status=STATUSES, body=st.data(), headers=HEADERS)
async def test_fetch_survives_any_answer(kind: str, status: int, body: st.DataObject,
                                         headers: dict[str, str]) -> None:
    """fetch(): any status, headers and body end in a well-formed TaskUpdate naming the task, or a RelayError."""
    provider = provider_answering(kind, status, body.draw(bodies(kind)), headers)
    try:
        update = await provider.fetch("ticket-1")
    except RelayError as exc:
        event(type(exc).__name__)
        return
    finally:
        await provider.http.aclose()
    event(f"update: {update.status.value}")
    assert_well_formed(update)
    assert update.provider_task_id, "a poll answer always names the task it is about"


@pytest.mark.parametrize("kind", KINDS)
@settings(FUZZ, max_examples=200)
@given(body=st.data())
def test_parse_callback_survives_any_body(kind: str, body: st.DataObject) -> None:
    """parse_callback(): any bytes end in a well-formed TaskUpdate with the provider's task id, or a RelayError."""
    provider = provider_answering(kind, 200, b"", {})
    try:
        update = provider.parse_callback(body.draw(bodies(kind)))
    except RelayError as exc:
        event(type(exc).__name__)
        return
    event(f"update: {update.status.value}")
    assert_well_formed(update)
    assert update.provider_task_id, "a callback without the task id cannot be matched"


@pytest.mark.parametrize("status", ["IN_QUEUE", "IN_PROGRESS"])
async def test_pixazo_unfinished_submit_without_request_id(status: str) -> None:
    """A pixazo submit answer not done, with images but no request_id, has nothing to poll: an error, not QUEUED.

    The provider may have taken (and billed) it, so the error is SubmitOutcomeUnknown (never resent blindly).
    """
    body = as_bytes({"status": status, "images": [{"url": "https://storage.test/a1.png"}]})
    provider = provider_answering("pixazo", 200, body, {})
    try:
        with pytest.raises(SubmitOutcomeUnknown, match="request_id"):
            await provider.submit(REQUESTS[0], callback_url=None, idempotency_key="k")
    finally:
        await provider.http.aclose()
    # Still accepted: the same answer with its id, and a final one without (fal's raw output).
    for good in ({"status": status, "request_id": "r-1", "images": [{"url": "https://storage.test/a1.png"}]},
                 {"images": [{"url": "https://storage.test/a1.png"}]}):
        provider = provider_answering("pixazo", 200, as_bytes(good), {})
        try:
            update = await provider.submit(REQUESTS[0], callback_url=None, idempotency_key="k")
        finally:
            await provider.http.aclose()
        assert update.provider_task_id or update.status is ProviderStatus.SUCCEEDED, update


NESTED = [b"[" * 5000, b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 5000 + b"1" + b"}" * 5000]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("status", [200, 400, 503])
@pytest.mark.parametrize("body", NESTED, ids=["open", "closed", "objects"])
async def test_deeply_nested_answer_is_a_relay_error(kind: str, status: int, body: bytes) -> None:
    """Deeply nested JSON (a few KiB) is a RelayError like any other junk, never a RecursionError.

    On any status: an error answer's body is read for its message too.
    """
    provider = provider_answering(kind, status, body, {})
    try:
        for call in (lambda: provider.submit(REQUESTS[0], callback_url=None, idempotency_key="k"),
                     lambda: provider.fetch("ticket-1")):
            try:
                await call()
            except RelayError:
                pass
    finally:
        await provider.http.aclose()
    with pytest.raises(ProviderProtocolError):
        parse_json(body)
    try:
        provider.parse_callback(body)
    except RelayError:
        pass


def _utf8_everywhere(value: Any) -> None:
    """Every string in `value` (and in its keys, to any depth) has a UTF-8 form."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            item.encode("utf-8")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


async def test_lone_surrogate_in_a_provider_answer_does_not_reach_the_update() -> None:
    """Every string of a TaskUpdate is valid Unicode (encodable as UTF-8), whatever escapes the provider sent.

    A lone surrogate becomes U+FFFD; the rest of the body still counts (the task moves on), and a
    well-formed escaped pair stays the one character it encodes.
    """
    body = (b'{"id": "task-\\ud800", "status": "failed", "error": {"code": "x\\udfff", '
            b'"message": "\\ud800 \\ud83d\\ude00 \\udc00\\ud800"}, "\\udbff": ["\\udfff", {"k": "\\ud800"}]}')
    provider = provider_answering("evolink", 200, body, {})
    try:
        update = await provider.fetch("ticket-1")
    finally:
        await provider.http.aclose()
    assert update.status is ProviderStatus.FAILED
    assert update.provider_task_id == "task-\ufffd" and update.error_code == "x\ufffd"
    assert update.error_message == "\ufffd \U0001f600 \ufffd\ufffd"
    for text in (update.provider_task_id, update.error_code, update.error_message):
        assert text is None or text.encode("utf-8")
    _utf8_everywhere(update.raw)
    assert parse_json(b'"\\ud800"') == "\ufffd" and parse_json(b'"\xed\xa0\x80"') == "\ufffd"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("status", [200, 400, 500])
async def test_lone_surrogates_never_reach_what_relay_stores(kind: str, status: int) -> None:
    """Any dialect, any status: an update's strings and an error's message have a UTF-8 form."""
    for doc in DOCUMENTED[kind]:
        plain = json.dumps(doc)
        for body in (plain.replace("https://", "https://\\ud800").replace('"status"', '"st\\udc00"'),
                     plain.replace('": "', '": "\\ud800')):
            provider = provider_answering(kind, status, body.encode(), {})
            try:
                for call in (lambda: provider.submit(REQUESTS[0], callback_url=None, idempotency_key="k"),
                             lambda: provider.fetch("ticket-1")):
                    try:
                        update = await call()
                    except RelayError as exc:
                        str(exc).encode("utf-8")
                        continue
                    assert_well_formed(update)
                    _utf8_everywhere([update.provider_task_id, update.error_code, update.error_message,
                                      [(i.url, i.b64, i.content_type) for i in update.images], update.raw])
            finally:
                await provider.http.aclose()


# ---- the state machine ------------------------------------------------------------------------------
IMAGES = st.lists(st.builds(ProviderImage, url=st.just("https://cdn.test/i.png")), max_size=2).map(tuple)
UPDATES = st.builds(TaskUpdate, status=st.sampled_from(ProviderStatus),
                    provider_task_id=st.one_of(st.none(), st.sampled_from(["p-1", "p-2"])),
                    progress=st.one_of(st.none(), st.integers(0, 100)), images=IMAGES,
                    error_code=st.one_of(st.none(), st.just("boom")), error_message=st.none(),
                    estimated_seconds=st.one_of(st.none(), st.floats(0, 1e6)))
SIGNALS = st.one_of(
    UPDATES.map(lambda u: ("update", u)),
    st.booleans().map(lambda b: ("archived", b)),
    st.just(("cancel", None)),
    st.just(("failure", None)),
)


def decide(task: Task, signal: tuple[str, Any]) -> Transition | None:
    kind, value = signal
    if kind == "submitted":
        return on_submitted(task, value)
    if kind == "update":
        return on_update(task, value)
    if kind == "archived":
        return on_archived(task, value)
    if kind == "cancel":
        return on_cancel(task)
    return on_failure(task, "timeout", "too slow")


def apply(task: Task, t: Transition) -> Task:
    """What the store does with a transition (relay.store.sqlite._write_transition), without the I/O."""
    return replace(task, status=t.status, sequence=task.sequence + 1,
                   progress=t.progress if t.progress is not None else task.progress,
                   provider_task_id=task.provider_task_id or t.provider_task_id,
                   error=t.error if t.error is not None else task.error)


@settings(FUZZ, max_examples=400)
@given(first=st.one_of(st.none(), UPDATES), signals=st.lists(SIGNALS, max_size=25), repeat=st.integers(1, 3))
def test_state_machine_only_moves_forward(first: TaskUpdate | None, signals: list[tuple[str, Any]],
                                          repeat: int) -> None:
    """Any order and repetition of signals: rank never drops, terminal is final, one transition per status reached."""
    task = Task(id="tsk_1", provider="evolink", request={"prompt": "p", "n": 1})
    script = ([("submitted", first)] if first is not None else []) + [s for s in signals for _ in range(repeat)]
    reached: list[TaskStatus] = []
    for signal in script:
        transition = decide(task, signal)
        if transition is None:
            continue
        assert not task.status.terminal, f"a terminal task moved: {task.status} → {transition}"
        assert transition.status.rank >= task.status.rank, f"backwards: {task.status} → {transition.status}"
        if transition.status_changed:
            assert transition.status.rank > task.status.rank, f"{transition.event} without moving from {task.status}"
            assert transition.event == EVENT_FOR_STATUS[transition.status]
            reached.append(transition.status)
        else:
            assert transition.status == task.status and transition.status in (TaskStatus.QUEUED, TaskStatus.RUNNING)
            assert transition.progress is not None and transition.progress > (task.progress or 0)
        if transition.status == TaskStatus.ARCHIVING:
            assert transition.images, "archiving needs something to archive"
        if transition.status == TaskStatus.FAILED:
            assert transition.error and transition.error["code"] and transition.error["message"]
        before = task
        task = apply(task, transition)
        assert (task.progress or 0) >= (before.progress or 0), "progress went down"
    assert len(reached) == len(set(reached)) <= 4     # queued, running, archiving, one terminal state
    assert reached == sorted(reached, key=lambda s: s.rank)
    if task.status.terminal:
        assert all(decide(task, signal) is None for signal in script), "a terminal task accepted a signal"


@settings(FUZZ, max_examples=400)
@given(first=st.one_of(st.none(), UPDATES), late=UPDATES,
       signals=st.lists(st.one_of(*[UPDATES.map(lambda u: ("update", u))] * 4, SIGNALS), max_size=12))
def test_an_update_stale_for_a_task_is_stale_for_every_later_version(
        first: TaskUpdate | None, late: TaskUpdate, signals: list[tuple[str, Any]]) -> None:
    """Store.apply(seen=…) opens no transaction when an update changes nothing on the task as it was read: sound
    only if every later version of the task, whatever moved it meanwhile, finds that update stale too. (Mostly
    updates among the signals: the other signals end the task, after which everything is stale.)"""
    task = Task(id="tsk_1", provider="evolink", request={"prompt": "p", "n": 1})
    versions = [task]
    for signal in ([("submitted", first)] if first is not None else []) + signals:
        transition = decide(task, signal)
        if transition is not None:
            task = apply(task, transition)
            versions.append(task)
    for place, earlier in enumerate(versions):
        if on_update(earlier, late) is None:
            moved = [later for later in versions[place:] if on_update(later, late) is not None]
            assert not moved, f"stale on {earlier.status}/{earlier.progress}, not on {moved[0].status}/{moved[0].progress}"


@pytest.mark.parametrize("status", [TaskStatus.QUEUED, TaskStatus.RUNNING])
def test_late_submit_answer_on_a_task_that_moved_on_emits_nothing(status: TaskStatus) -> None:
    """A stale submit answer (the task is already queued or running, no id yet) is a no-op: no event at all."""
    task = Task(id="tsk_1", provider="evolink", request={"prompt": "p", "n": 1}, status=status)
    assert on_submitted(task, TaskUpdate(status=ProviderStatus.QUEUED, provider_task_id="p-1")) is None
    # A submit answer that does move it forward still does, and carries the id.
    moved = on_submitted(task, TaskUpdate(status=ProviderStatus.FAILED, provider_task_id="p-1", error_code="x",
                                          error_message="y"))
    assert moved is not None and moved.status == TaskStatus.FAILED and moved.provider_task_id == "p-1"
