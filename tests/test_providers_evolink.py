"""The EvoLink dialect: callback_url, one task object for submit/poll/callback, documented retry delays."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from relay.errors import ProviderProtocolError, ProviderRejected, ProviderUnavailable, RateLimited
from relay.models import GenerationRequest, ProviderStatus
from relay.providers.evolink import EvoLinkProvider

Answer = httpx.Response | Callable[[httpx.Request], httpx.Response]
BASE = "https://api.evolink.test"


class FakeEvoLink:
    """A scripted EvoLink: answers in order (the last repeats) and records requests."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return answer(request) if callable(answer) else answer


def make(*answers: Answer) -> tuple[EvoLinkProvider, FakeEvoLink]:
    fake = FakeEvoLink(*answers)
    http = httpx.AsyncClient(transport=httpx.MockTransport(fake))
    return EvoLinkProvider(http, base_url=BASE, api_key="sk-evo-1"), fake


PENDING = {"created": 1757156493, "id": "task-unified-1757156493-imcg5zqt", "model": "gpt-image-1.5",
           "object": "image.generation.task", "progress": 0, "status": "pending",
           "task_info": {"can_cancel": True, "estimated_time": 100}, "type": "image",
           "usage": {"billing_rule": "per_call", "credits_reserved": 2.5, "user_group": "default"}}
COMPLETED = {"created": 1756817821, "id": "task-unified-1756817821-4x3rx6ny", "model": "gpt-image-1.5",
             "object": "image.generation.task", "progress": 100, "results": ["https://files.evolink.test/i.png"],
             "status": "completed", "task_info": {"can_cancel": False}, "type": "image"}
FAILED = {"id": "task-unified-1772618027-cmeisy8h", "object": "image.generation.task", "status": "failed",
          "progress": 0, "error": {"code": "content_policy_violation",
                                   "message": "Content policy violation.\nYour request was blocked..."}}


async def test_submit_body_with_callback_url() -> None:
    """Submit sends pixels, n as a number, image_urls as given, and callback_url when there is one."""
    provider, fake = make(httpx.Response(200, json=PENDING))
    req = GenerationRequest(prompt="fox", size="1024x1536", quality="medium", images=("https://in.test/a.png",),
                            background="auto", output_format="png")
    update = await provider.submit(req, callback_url="https://relay.test/cb/evolink/x", idempotency_key="k")
    sent = fake.requests[0]
    assert (sent.method, str(sent.url)) == ("POST", BASE + "/v1/images/generations")
    assert sent.headers["authorization"] == "Bearer sk-evo-1"
    assert "idempotency-key" not in sent.headers
    assert json.loads(sent.content) == {
        "model": "gpt-image-1.5", "prompt": "fox", "size": "1024x1536", "quality": "medium", "n": 1,
        "image_urls": ["https://in.test/a.png"], "callback_url": "https://relay.test/cb/evolink/x"}
    assert update.status is ProviderStatus.QUEUED
    assert (update.provider_task_id, update.estimated_seconds, update.progress) == (
        "task-unified-1757156493-imcg5zqt", 100.0, 0)


async def test_submit_without_callback_leaves_field_out() -> None:
    """No callback_url key at all when relay has none to give (fields it cannot send are dropped)."""
    provider, fake = make(httpx.Response(200, json=PENDING))
    await provider.submit(GenerationRequest(prompt="p"), callback_url=None, idempotency_key="k")
    assert json.loads(fake.requests[0].content) == {"model": "gpt-image-1.5", "prompt": "p", "n": 1}


async def test_fetch_completed() -> None:
    """Poll is GET /v1/tasks/{id}; images come from results[]."""
    provider, fake = make(httpx.Response(200, json=COMPLETED))
    update = await provider.fetch("task-unified-1756817821-4x3rx6ny")
    assert (fake.requests[0].method, str(fake.requests[0].url)) == (
        "GET", BASE + "/v1/tasks/task-unified-1756817821-4x3rx6ny")
    assert update.status is ProviderStatus.SUCCEEDED
    assert [i.url for i in update.images] == ["https://files.evolink.test/i.png"]
    assert update.images[0].expires_at is None      # caps.default_expiry (24 h) applies
    assert update.raw == COMPLETED


async def test_fetch_reads_result_data_when_results_missing() -> None:
    """EvoLink's own client also reads result_data[].image_url; so does relay."""
    body = {**COMPLETED, "results": None, "result_data": [{"image_url": "https://files.evolink.test/r.png"}]}
    provider, _ = make(httpx.Response(200, json=body))
    assert [i.url for i in (await provider.fetch("t")).images] == ["https://files.evolink.test/r.png"]


async def test_results_as_single_string_is_tolerated() -> None:
    """A string where a list was documented still yields the image."""
    provider, _ = make(httpx.Response(200, json={**COMPLETED, "results": "https://files.evolink.test/s.png"}))
    assert [i.url for i in (await provider.fetch("t")).images] == ["https://files.evolink.test/s.png"]


async def test_completed_without_results_is_no_images() -> None:
    """completed with no URL ends as FAILED/no_images."""
    provider, _ = make(httpx.Response(200, json={**COMPLETED, "results": []}))
    update = await provider.fetch("t")
    assert (update.status, update.error_code) == (ProviderStatus.FAILED, "no_images")


@pytest.mark.parametrize(("status", "expected"), [
    ("pending", ProviderStatus.QUEUED), ("processing", ProviderStatus.RUNNING),
    ("completed", ProviderStatus.SUCCEEDED), ("failed", ProviderStatus.FAILED),
    ("cancelled", ProviderStatus.CANCELED),
])
async def test_status_mapping(status: str, expected: ProviderStatus) -> None:
    """EvoLink statuses map to the common vocabulary."""
    provider, _ = make(httpx.Response(200, json={**COMPLETED, "status": status}))
    assert (await provider.fetch("t")).status is expected


async def test_failed_task_keeps_business_code() -> None:
    """error.code is a string business code; it becomes the update's error_code."""
    provider, _ = make(httpx.Response(200, json=FAILED))
    update = await provider.fetch("task-unified-1772618027-cmeisy8h")
    assert (update.status, update.error_code) == (ProviderStatus.FAILED, "content_policy_violation")
    assert update.error_message is not None and update.error_message.startswith("Content policy violation")


async def test_failed_task_other_code() -> None:
    """Non-policy business codes pass through unchanged."""
    provider, _ = make(httpx.Response(200, json={**FAILED, "error": {"code": "generation_timeout", "message": "t"}}))
    assert (await provider.fetch("t")).error_code == "generation_timeout"


async def test_parse_callback_reads_poll_shaped_body() -> None:
    """A callback body is the poll answer; parse_callback is pure and gives the same update."""
    provider, fake = make(httpx.Response(500))
    update = provider.parse_callback(json.dumps(COMPLETED).encode())
    assert (update.status, update.provider_task_id) == (ProviderStatus.SUCCEEDED, COMPLETED["id"])
    assert provider.parse_callback(json.dumps(FAILED).encode()).error_code == "content_policy_violation"
    assert fake.requests == []


@pytest.mark.parametrize("body", [b"", b"{", b"[]", b"null", json.dumps({**COMPLETED, "id": None}).encode(),
                                  json.dumps({**COMPLETED, "status": "weird"}).encode()])
def test_parse_callback_junk(body: bytes) -> None:
    """A callback without a readable status or id is a protocol error."""
    provider, _ = make(httpx.Response(500))
    with pytest.raises(ProviderProtocolError):
        provider.parse_callback(body)


@pytest.mark.parametrize(("status", "headers", "error", "retry_after"), [
    (429, {}, RateLimited, 60.0), (429, {"Retry-After": "5"}, RateLimited, 5.0),
    (503, {}, ProviderUnavailable, 30.0), (502, {}, ProviderUnavailable, None),
])
async def test_documented_retry_delays(status: int, headers: dict[str, str], error: type[Exception],
                                       retry_after: float | None) -> None:
    """Without Retry-After, 429 waits 60 s and 503 waits 30 s, as EvoLink documents."""
    body: Any = {"error": {"code": status, "message": "m", "type": "rate_limit_error"}}
    provider, _ = make(httpx.Response(status, json=body, headers=headers))
    with pytest.raises(error) as info:
        await provider.fetch("t")
    assert info.value.retry_after == retry_after  # type: ignore[attr-defined]


async def test_not_found_task_is_rejected() -> None:
    """404 "Task not found or expired" fails the task."""
    provider, _ = make(httpx.Response(404, json={"error": {"code": 404, "message": "Task not found or expired",
                                                           "type": "not_found_error"}}))
    with pytest.raises(ProviderRejected):
        await provider.fetch("t")
