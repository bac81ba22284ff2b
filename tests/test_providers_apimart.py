"""The APIMart dialect: ratio sizes, Idempotency-Key, the code envelope, and both image URL shapes."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from relay.errors import (
    ProviderProtocolError,
    ProviderRejected,
    ProviderUnavailable,
    RateLimited,
    SubmitOutcomeUnknown,
)
from relay.models import GenerationRequest, ProviderStatus
from relay.providers.apimart import ApiMartProvider

Answer = httpx.Response | Callable[[httpx.Request], httpx.Response]
BASE = "https://api.apimart.test"


class FakeApiMart:
    """A scripted APIMart: answers in order (the last repeats) and records requests."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return answer(request) if callable(answer) else answer


def make(*answers: Answer, **kwargs: Any) -> tuple[ApiMartProvider, FakeApiMart]:
    fake = FakeApiMart(*answers)
    http = httpx.AsyncClient(transport=httpx.MockTransport(fake))
    return ApiMartProvider(http, base_url=BASE + "/", api_key="am-key", **kwargs), fake


SUBMITTED = {"code": 200, "data": [{"status": "submitted", "task_id": "task_01K"}]}


def task(**data: Any) -> httpx.Response:
    return httpx.Response(200, json={"code": 200, "data": {"id": "task_01K", **data}})


COMPLETED_LIST = {"status": "completed", "progress": 100, "created": 1763088289, "completed": 1763088308,
                  "estimated_time": 60, "actual_time": 19,
                  "result": {"images": [{"url": ["https://upload.apimart.ai/f/image/a_0.png",
                                                 "https://upload.apimart.ai/f/image/a_1.png"],
                                         "expires_at": 1763174708}]}}


@pytest.mark.parametrize(("size", "ratio"), [("1024x1024", "1:1"), ("1536x1024", "3:2"), ("1024x1536", "2:3")])
async def test_submit_sends_ratio_sizes(size: str, ratio: str) -> None:
    """APIMart takes sizes as ratios only."""
    provider, fake = make(httpx.Response(200, json=SUBMITTED))
    await provider.submit(GenerationRequest(prompt="p", size=size), callback_url=None, idempotency_key="k")
    assert json.loads(fake.requests[0].content)["size"] == ratio


async def test_submit_maps_every_field_and_sends_idempotency_key() -> None:
    """The body uses APIMart's names (image_urls, mask_url), n is a JSON number, the key goes in a header."""
    provider, fake = make(httpx.Response(200, json=SUBMITTED))
    req = GenerationRequest(prompt="fox", size="1024x1024", quality="low", n=4, background="transparent",
                            output_format="png", output_compression=90, moderation="low",
                            images=("https://in.test/a.png", "https://in.test/b.png"), mask="https://in.test/m.png")
    update = await provider.submit(req, callback_url="https://ignored.test/cb", idempotency_key="idem-1")
    sent = fake.requests[0]
    assert (sent.method, str(sent.url)) == ("POST", BASE + "/v1/images/generations")
    assert sent.headers["authorization"] == "Bearer am-key"
    assert sent.headers["idempotency-key"] == "idem-1"
    assert json.loads(sent.content) == {
        "model": "gpt-image-1.5-official", "prompt": "fox", "size": "1:1", "n": 4, "quality": "low",
        "background": "transparent", "moderation": "low", "output_format": "png", "output_compression": 90,
        "image_urls": ["https://in.test/a.png", "https://in.test/b.png"], "mask_url": "https://in.test/m.png"}
    assert (update.status, update.provider_task_id, update.raw) == (ProviderStatus.QUEUED, "task_01K", SUBMITTED)


async def test_submit_minimal_body() -> None:
    """Unset fields are left out so APIMart applies its defaults."""
    provider, fake = make(httpx.Response(200, json=SUBMITTED), model="gpt-image-1-official")
    await provider.submit(GenerationRequest(prompt="p"), callback_url=None, idempotency_key="")
    assert json.loads(fake.requests[0].content) == {"model": "gpt-image-1-official", "prompt": "p", "n": 1}
    assert "idempotency-key" not in fake.requests[0].headers


async def test_submit_tolerates_data_as_object() -> None:
    """A submit `data` that is an object instead of a one-element array still yields the task id."""
    provider, _ = make(httpx.Response(200, json={"code": 200, "data": {"task_id": "task_X", "status": "pending"}}))
    update = await provider.submit(GenerationRequest(prompt="p"), callback_url=None, idempotency_key="k")
    assert update.provider_task_id == "task_X"


@pytest.mark.parametrize("body", [{"code": 200, "data": []}, {"code": 200, "data": [{"status": "submitted"}]},
                                  {"code": 200, "data": ["task_01K"]}, {"code": 200}])
async def test_submit_without_task_id_is_not_retried_blindly(body: dict[str, Any]) -> None:
    """A 200 submit answer without a usable task id leaves the outcome unknown."""
    provider, _ = make(httpx.Response(200, json=body))
    with pytest.raises(SubmitOutcomeUnknown):
        await provider.submit(GenerationRequest(prompt="p"), callback_url=None, idempotency_key="k")


@pytest.mark.parametrize(("code", "error"), [(429, RateLimited), (500, ProviderUnavailable),
                                             (503, ProviderUnavailable), (400, ProviderRejected),
                                             (401, ProviderRejected), ("402", ProviderRejected)])
async def test_http_200_with_error_code_envelope(code: Any, error: type[Exception]) -> None:
    """An HTTP 200 whose body says code != 200 is mapped by that code, on submit and on poll."""
    body = {"code": code, "msg": "quota exhausted", "data": None}
    provider, _ = make(httpx.Response(200, json=body, headers={"Retry-After": "12"}))
    with pytest.raises(error) as info:
        await provider.submit(GenerationRequest(prompt="p"), callback_url=None, idempotency_key="k")
    assert "quota exhausted" in str(info.value)
    if isinstance(info.value, RateLimited):
        assert info.value.retry_after == 12
    with pytest.raises(error):
        await provider.fetch("task_01K")


async def test_envelope_policy_message_gets_policy_code() -> None:
    """A 400 envelope whose message reads like a policy refusal is content_policy_violation."""
    provider, _ = make(httpx.Response(200, json={"code": 400, "error": {"message": "blocked by moderation"}}))
    with pytest.raises(ProviderRejected) as info:
        await provider.submit(GenerationRequest(prompt="p"), callback_url=None, idempotency_key="k")
    assert info.value.code == "content_policy_violation"


async def test_openai_style_error_object_at_http_200_is_an_error() -> None:
    """An error object with no code and no data is a rejection, not a silent success."""
    provider, _ = make(httpx.Response(200, json={"error": {"message": "bad", "type": "invalid_request_error"}}))
    with pytest.raises(ProviderRejected):
        await provider.submit(GenerationRequest(prompt="p"), callback_url=None, idempotency_key="k")


async def test_fetch_completed_with_url_list() -> None:
    """The current docs' shape: images[].url is a list of strings, each sharing the entry's expires_at."""
    provider, fake = make(task(**COMPLETED_LIST))
    update = await provider.fetch("task_01K")
    assert (fake.requests[0].method, str(fake.requests[0].url)) == ("GET", BASE + "/v1/tasks/task_01K")
    assert update.status is ProviderStatus.SUCCEEDED and update.progress == 100
    assert [(i.url, i.expires_at) for i in update.images] == [
        ("https://upload.apimart.ai/f/image/a_0.png", 1763174708.0),
        ("https://upload.apimart.ai/f/image/a_1.png", 1763174708.0)]
    assert update.estimated_seconds is None


async def test_fetch_completed_with_url_string() -> None:
    """The older docs' shape: images[].url is a single string; expires_at may be missing."""
    provider, _ = make(task(status="completed", result={"images": [{"url": "https://x.test/g.png"},
                                                                   {"url": "https://x.test/h.png",
                                                                    "expires_at": "1763174708"}]}))
    update = await provider.fetch("task_01K")
    assert [(i.url, i.expires_at) for i in update.images] == [("https://x.test/g.png", None),
                                                              ("https://x.test/h.png", 1763174708.0)]


@pytest.mark.parametrize("result", [None, {}, {"images": []}, {"images": [{"url": []}]}, "x", [1]])
async def test_completed_without_images_is_no_images(result: Any) -> None:
    """completed with nothing usable ends as FAILED/no_images."""
    provider, _ = make(task(status="completed", result=result))
    update = await provider.fetch("task_01K")
    assert (update.status, update.error_code) == (ProviderStatus.FAILED, "no_images")


@pytest.mark.parametrize(("status", "expected"), [
    ("submitted", ProviderStatus.QUEUED), ("pending", ProviderStatus.QUEUED),
    ("processing", ProviderStatus.RUNNING), ("failed", ProviderStatus.FAILED),
    ("cancelled", ProviderStatus.CANCELED),
])
async def test_status_mapping(status: str, expected: ProviderStatus) -> None:
    """APIMart statuses map to the common vocabulary."""
    provider, _ = make(task(status=status, progress="40", estimated_time=30))
    update = await provider.fetch("task_01K")
    assert update.status is expected
    if expected in (ProviderStatus.QUEUED, ProviderStatus.RUNNING):
        assert (update.progress, update.estimated_seconds) == (40, 30.0)


async def test_unknown_status_is_protocol_error() -> None:
    """An unknown poll status is retried later."""
    provider, _ = make(task(status="thinking"))
    with pytest.raises(ProviderProtocolError):
        await provider.fetch("task_01K")


async def test_failed_task_reads_error_object() -> None:
    """data.error {code, message, type} becomes the update's error code and message."""
    provider, _ = make(task(status="failed", error={"code": 500, "message": "upstream died", "type": "server_error"}))
    update = await provider.fetch("task_01K")
    assert (update.status, update.error_code, update.error_message) == (
        ProviderStatus.FAILED, "server_error", "upstream died")


async def test_failed_task_policy_message() -> None:
    """A failure whose message reads like a safety block gets content_policy_violation."""
    provider, _ = make(task(status="failed", error={"code": 400, "message": "Your request was blocked by safety"}))
    update = await provider.fetch("task_01K")
    assert update.error_code == "content_policy_violation"


async def test_http_429_with_retry_after() -> None:
    """A real HTTP 429 carries Retry-After into RateLimited."""
    provider, _ = make(httpx.Response(429, headers={"Retry-After": "3"}, json={"error": {"message": "slow"}}))
    with pytest.raises(RateLimited) as info:
        await provider.fetch("task_01K")
    assert info.value.retry_after == 3
