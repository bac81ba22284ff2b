"""The Pixazo dialect: subscription-key headers, fal field names, final-at-submit, POST polling."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from relay.errors import ProviderProtocolError, ProviderRejected, RateLimited, SubmitOutcomeUnknown
from relay.models import GenerationRequest, ProviderStatus
from relay.providers.pixazo import PixazoProvider

Answer = httpx.Response | Callable[[httpx.Request], httpx.Response]
BASE = "https://gateway.pixazo.test"
SUBMIT = BASE + "/gpt-image-1-5-api-923/v1/gpt-image-1-5-api-request"
RESULT = BASE + "/gpt-image-1-5-api-923/v1/gpt-image-1-5-api-request-result"


class FakePixazo:
    """A scripted Pixazo gateway: answers in order (the last repeats) and records requests."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return answer(request) if callable(answer) else answer


def make(*answers: Answer) -> tuple[PixazoProvider, FakePixazo]:
    fake = FakePixazo(*answers)
    http = httpx.AsyncClient(transport=httpx.MockTransport(fake))
    return PixazoProvider(http, base_url=BASE, api_key="px-key"), fake


TICKET = {"status": "IN_QUEUE", "request_id": "a1b2c3d4",
          "response_url": "https://gateway-falai-automate.appypie.workers.dev/gpt-image-1-5-api-request-result"}
COMPLETED = {"status": "COMPLETED", "request_id": "a1b2c3d4",
             "images": [{"url": "https://storage.pixazo.test/images/a1.png", "width": 1024, "height": 1024,
                         "content_type": "image/png", "size_bytes": 2048576}],
             "metadata": {"prompt": "p", "image_size": "1024x1024", "processing_time_ms": 4320}}


async def test_submit_maps_fields_and_headers() -> None:
    """Submit uses fal names (image_size, num_images) and the APIM subscription-key headers."""
    provider, fake = make(httpx.Response(200, json=TICKET))
    req = GenerationRequest(prompt="fox", size="1536x1024", quality="high", n=2, background="transparent",
                            output_format="webp")
    update = await provider.submit(req, callback_url=None, idempotency_key="k")
    sent = fake.requests[0]
    assert (sent.method, str(sent.url)) == ("POST", SUBMIT)
    assert sent.headers["ocp-apim-subscription-key"] == "px-key"
    assert sent.headers["cache-control"] == "no-cache"
    assert "authorization" not in sent.headers
    assert json.loads(sent.content) == {"prompt": "fox", "image_size": "1536x1024", "background": "transparent",
                                        "quality": "high", "num_images": 2, "output_format": "webp"}
    assert (update.status, update.provider_task_id) == (ProviderStatus.QUEUED, "a1b2c3d4")


async def test_submit_minimal_body() -> None:
    """Unset fields are left out; there is no model field (the URL picks the model)."""
    provider, fake = make(httpx.Response(200, json=TICKET))
    await provider.submit(GenerationRequest(prompt="p"), callback_url=None, idempotency_key="k")
    assert json.loads(fake.requests[0].content) == {"prompt": "p", "num_images": 1}


@pytest.mark.parametrize("body", [COMPLETED, {"images": COMPLETED["images"]}])
async def test_submit_answer_already_final(body: dict[str, Any]) -> None:
    """Some accounts get the final images straight from the submit: accepted as a final update."""
    provider, fake = make(httpx.Response(200, json=body))
    update = await provider.submit(GenerationRequest(prompt="p"), callback_url=None, idempotency_key="k")
    assert update.status is ProviderStatus.SUCCEEDED
    image = update.images[0]
    assert (image.url, image.width, image.height, image.content_type) == (
        "https://storage.pixazo.test/images/a1.png", 1024, 1024, "image/png")
    assert len(fake.requests) == 1


async def test_submit_error_body_at_200_is_rejected() -> None:
    """A 200 carrying only an error means nothing was queued."""
    provider, _ = make(httpx.Response(200, json={"error": "Invalid request parameters"}))
    with pytest.raises(ProviderRejected):
        await provider.submit(GenerationRequest(prompt="p"), callback_url=None, idempotency_key="k")


async def test_submit_ticket_without_request_id_is_outcome_unknown() -> None:
    """A queue ticket without request_id cannot be polled."""
    provider, _ = make(httpx.Response(200, json={"status": "IN_QUEUE", "response_url": "https://x"}))
    with pytest.raises(SubmitOutcomeUnknown):
        await provider.submit(GenerationRequest(prompt="p"), callback_url=None, idempotency_key="k")


async def test_poll_is_a_post_to_the_result_endpoint_never_response_url() -> None:
    """fetch POSTs {"request_id"} to …-request-result with the same headers."""
    provider, fake = make(httpx.Response(200, json=TICKET), httpx.Response(200, json=COMPLETED))
    ticket = await provider.submit(GenerationRequest(prompt="p"), callback_url=None, idempotency_key="k")
    assert ticket.provider_task_id is not None
    update = await provider.fetch(ticket.provider_task_id)
    poll = fake.requests[1]
    assert (poll.method, str(poll.url)) == ("POST", RESULT)
    assert json.loads(poll.content) == {"request_id": "a1b2c3d4"}
    assert poll.headers["ocp-apim-subscription-key"] == "px-key"
    assert all("workers.dev" not in str(r.url) for r in fake.requests)
    assert update.status is ProviderStatus.SUCCEEDED


async def test_in_queue_estimate_in_minutes_becomes_seconds() -> None:
    """estimated_wait_minutes is reported as estimated_seconds."""
    provider, _ = make(httpx.Response(200, json={"status": "IN_QUEUE", "request_id": "a", "queue_position": 2,
                                                 "estimated_wait_minutes": 1.5}))
    update = await provider.fetch("a")
    assert (update.status, update.estimated_seconds) == (ProviderStatus.QUEUED, 90.0)


@pytest.mark.parametrize(("status", "expected"), [
    ("IN_QUEUE", ProviderStatus.QUEUED), ("IN_PROGRESS", ProviderStatus.RUNNING),
    ("COMPLETED", ProviderStatus.SUCCEEDED), ("FAILED", ProviderStatus.FAILED),
])
async def test_status_mapping(status: str, expected: ProviderStatus) -> None:
    """Pixazo (fal) statuses map to the common vocabulary."""
    provider, _ = make(httpx.Response(200, json={**COMPLETED, "status": status}))
    assert (await provider.fetch("a1b2c3d4")).status is expected


async def test_unknown_status_is_protocol_error() -> None:
    """An unknown poll status is retried later."""
    provider, _ = make(httpx.Response(200, json={"status": "SLEEPING", "request_id": "a"}))
    with pytest.raises(ProviderProtocolError):
        await provider.fetch("a")


@pytest.mark.parametrize(("error", "code", "message"), [
    ("Generation failed upstream", "provider_failed", "Generation failed upstream"),
    ({"code": "content_policy_violation", "message": "nope"}, "content_policy_violation", "nope"),
    ({"message": "blocked by safety checker"}, "content_policy_violation", "blocked by safety checker"),
    (None, "provider_failed", "provider reported the task as failed"),
])
async def test_failed_error_string_or_object(error: Any, code: str, message: str) -> None:
    """FAILED carries `error` as a string or an object; both become code and message."""
    provider, _ = make(httpx.Response(200, json={"status": "FAILED", "request_id": "a", "error": error}))
    update = await provider.fetch("a")
    assert (update.status, update.error_code, update.error_message) == (ProviderStatus.FAILED, code, message)


async def test_data_uri_images_become_inline() -> None:
    """fal's sync mode returns data URIs; relay carries them as inline base64."""
    body = {**COMPLETED, "images": [{"url": "data:image/jpeg;base64,/9j/4AAQ", "content_type": "image/jpeg"}]}
    provider, _ = make(httpx.Response(200, json=body))
    image = (await provider.fetch("a")).images[0]
    assert (image.url, image.b64, image.content_type) == (None, "/9j/4AAQ", "image/jpeg")


@pytest.mark.parametrize("images", [[], [{"url": None}], [{"width": 5}], "x", [7]])
async def test_completed_without_images_is_no_images(images: Any) -> None:
    """COMPLETED with nothing usable ends as FAILED/no_images."""
    provider, _ = make(httpx.Response(200, json={**COMPLETED, "images": images}))
    update = await provider.fetch("a")
    assert (update.status, update.error_code) == (ProviderStatus.FAILED, "no_images")


async def test_rate_limit_body() -> None:
    """429 {"error": "Rate limit exceeded…"} is RateLimited (no Retry-After documented)."""
    provider, _ = make(httpx.Response(429, json={"error": "Rate limit exceeded, please retry later"}))
    with pytest.raises(RateLimited) as info:
        await provider.fetch("a")
    assert info.value.retry_after is None
