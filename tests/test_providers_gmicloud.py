"""The GMI Cloud dialect: request mapping, final-at-POST answers, polling, status and failure shapes."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from relay.errors import ProviderProtocolError, ProviderRejected, SubmitOutcomeUnknown
from relay.models import GenerationRequest, ProviderStatus
from relay.providers.gmicloud import GmiCloudProvider

Answer = httpx.Response | Callable[[httpx.Request], httpx.Response]
BASE = "https://console.gmicloud.test"
REQUESTS = BASE + "/api/v1/ie/requestqueue/apikey/requests"


class FakeGmi:
    """A scripted GMI: answers in order (the last repeats) and records requests."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return answer(request) if callable(answer) else answer


class InputFetcher:
    """Serves fixed bytes per URL and records what was fetched."""

    def __init__(self) -> None:
        self.fetched: list[str] = []

    async def __call__(self, url: str) -> tuple[bytes, str]:
        self.fetched.append(url)
        return f"bytes of {url}".encode(), "image/png"


def make(*answers: Answer, **kwargs: Any) -> tuple[GmiCloudProvider, FakeGmi, InputFetcher]:
    fake, fetcher = FakeGmi(*answers), InputFetcher()
    http = httpx.AsyncClient(transport=httpx.MockTransport(fake))
    return GmiCloudProvider(http, base_url=BASE, api_key="gmi-key", fetch_input=fetcher, **kwargs), fake, fetcher


QUEUED = {"request_id": "req-1", "model": "gpt-image-1.5", "status": "queued",
          "created_at": 1750442925, "updated_at": 1750442925, "queued_at": 1750442925}
SUCCESS = {**QUEUED, "status": "success",
           "outcome": {"media_urls": [{"id": "m1", "url": "https://storage.googleapis.com/b/1.png"},
                                      {"id": "m2", "url": "https://storage.googleapis.com/b/2.png"}]}}


async def test_submit_maps_request_into_payload_envelope() -> None:
    """Submit posts {model, payload} with pixel size, numeric n, and no fields left unset."""
    provider, fake, _ = make(httpx.Response(200, json=QUEUED))
    req = GenerationRequest(prompt="fox", size="1536x1024", quality="high", n=3, output_format="webp",
                            output_compression=80, background="opaque")
    update = await provider.submit(req, callback_url=None, idempotency_key="k")
    sent = fake.requests[0]
    assert (sent.method, str(sent.url)) == ("POST", REQUESTS)
    assert sent.headers["authorization"] == "Bearer gmi-key"
    assert json.loads(sent.content) == {"model": "gpt-image-1.5", "payload": {
        "prompt": "fox", "size": "1536x1024", "quality": "high", "n": 3, "output_format": "webp",
        "output_compression": 80, "background": "opaque"}}
    assert (update.status, update.provider_task_id) == (ProviderStatus.QUEUED, "req-1")
    assert update.raw == QUEUED


async def test_submit_drops_unset_fields_and_uses_model_override() -> None:
    """A minimal request sends only prompt and n; `model` overrides the default."""
    provider, fake, _ = make(httpx.Response(200, json=QUEUED), model="gpt-image-1.5-beta")
    await provider.submit(GenerationRequest(prompt="fox"), callback_url=None, idempotency_key="k")
    assert json.loads(fake.requests[0].content) == {"model": "gpt-image-1.5-beta", "payload": {"prompt": "fox", "n": 1}}


async def test_submit_downloads_and_base64_encodes_image_and_mask() -> None:
    """GMI takes no URLs: the reference image and mask are fetched and sent as base64 strings."""
    provider, fake, fetcher = make(httpx.Response(200, json=QUEUED))
    req = GenerationRequest(prompt="edit", images=("https://in.test/a.png",), mask="https://in.test/m.png")
    await provider.submit(req, callback_url=None, idempotency_key="k")
    payload = json.loads(fake.requests[0].content)["payload"]
    assert fetcher.fetched == ["https://in.test/a.png", "https://in.test/m.png"]
    assert base64.b64decode(payload["image"]) == b"bytes of https://in.test/a.png"
    assert base64.b64decode(payload["mask"]) == b"bytes of https://in.test/m.png"


async def test_submit_without_fetcher_refuses() -> None:
    """A base64 dialect built without an input fetcher refuses reference images clearly."""
    http = httpx.AsyncClient(transport=httpx.MockTransport(FakeGmi(httpx.Response(200, json=QUEUED))))
    provider = GmiCloudProvider(http, base_url=BASE, api_key="k")
    with pytest.raises(ProviderRejected, match="input fetcher"):
        await provider.submit(GenerationRequest(prompt="p", images=("https://in.test/a.png",)),
                              callback_url=None, idempotency_key="k")


async def test_submit_answer_already_final() -> None:
    """The 'synchronous' POST answer may carry outcome.media_urls: that is a final update."""
    provider, _, _ = make(httpx.Response(200, json=SUCCESS))
    update = await provider.submit(GenerationRequest(prompt="p", n=2), callback_url=None, idempotency_key="k")
    assert update.status is ProviderStatus.SUCCEEDED
    assert [image.url for image in update.images] == ["https://storage.googleapis.com/b/1.png",
                                                      "https://storage.googleapis.com/b/2.png"]


async def test_submit_outcome_without_status_is_final() -> None:
    """An answer with media URLs but no status field is still a success."""
    body = {"request_id": "req-9", "outcome": {"media_urls": ["https://storage.googleapis.com/b/9.png"]}}
    provider, _, _ = make(httpx.Response(200, json=body))
    update = await provider.submit(GenerationRequest(prompt="p"), callback_url=None, idempotency_key="k")
    assert update.status is ProviderStatus.SUCCEEDED
    assert [image.url for image in update.images] == ["https://storage.googleapis.com/b/9.png"]


async def test_submit_with_unknown_status_but_an_id_is_queued() -> None:
    """Once GMI gave an id the task exists: an unfamiliar status at submit means queued."""
    provider, _, _ = make(httpx.Response(200, json={**QUEUED, "status": "warming"}))
    update = await provider.submit(GenerationRequest(prompt="p"), callback_url=None, idempotency_key="k")
    assert (update.status, update.provider_task_id) == (ProviderStatus.QUEUED, "req-1")


async def test_submit_without_request_id_is_outcome_unknown() -> None:
    """A queued answer with no id cannot be polled; the submit's outcome is unknown."""
    provider, _, _ = make(httpx.Response(200, json={"status": "queued"}))
    with pytest.raises(SubmitOutcomeUnknown):
        await provider.submit(GenerationRequest(prompt="p"), callback_url=None, idempotency_key="k")


async def test_fetch_gets_the_request_record() -> None:
    """Polling is GET …/requests/{request_id} with the bearer key; the id is URL-quoted."""
    provider, fake, _ = make(httpx.Response(200, json=SUCCESS))
    update = await provider.fetch("req-1")
    await provider.fetch("a/b")
    assert (fake.requests[0].method, str(fake.requests[0].url)) == ("GET", REQUESTS + "/req-1")
    assert fake.requests[1].url.raw_path.endswith(b"/requests/a%2Fb")
    assert update.status is ProviderStatus.SUCCEEDED and len(update.images) == 2


@pytest.mark.parametrize(("status", "expected"), [
    ("queued", ProviderStatus.QUEUED), ("dispatched", ProviderStatus.QUEUED),
    ("processing", ProviderStatus.RUNNING), ("failed", ProviderStatus.FAILED),
    ("cancelled", ProviderStatus.CANCELED), ("SUCCESS", ProviderStatus.SUCCEEDED),
])
async def test_status_mapping(status: str, expected: ProviderStatus) -> None:
    """GMI statuses map to the common vocabulary."""
    provider, _, _ = make(httpx.Response(200, json={**SUCCESS, "status": status}))
    assert (await provider.fetch("req-1")).status is expected


async def test_unknown_status_on_poll_is_protocol_error() -> None:
    """A status relay does not know is retried, not guessed."""
    provider, _, _ = make(httpx.Response(200, json={**QUEUED, "status": "exploded"}))
    with pytest.raises(ProviderProtocolError):
        await provider.fetch("req-1")


async def test_failure_reads_error_string() -> None:
    """A failed request carries GMI's `error` text; policy wording gets the policy code."""
    provider, _, _ = make(httpx.Response(200, json={**QUEUED, "status": "failed",
                                                    "error": "Request blocked by safety system"}))
    update = await provider.fetch("req-1")
    assert update.status is ProviderStatus.FAILED
    assert update.error_code == "content_policy_violation"
    assert update.error_message == "Request blocked by safety system"


async def test_failure_without_error_has_generic_code() -> None:
    """A failure with no details still carries a code and message."""
    provider, _, _ = make(httpx.Response(200, json={**QUEUED, "status": "failed", "error": None}))
    update = await provider.fetch("req-1")
    assert (update.error_code, bool(update.error_message)) == ("provider_failed", True)


@pytest.mark.parametrize("outcome", [None, {}, {"media_urls": []}, {"media_urls": [{"id": "x"}, 5, "ftp://x"]},
                                     {"media_urls": "nope"}, ["https://x/1.png"]])
async def test_success_without_usable_images_fails_with_no_images(outcome: object) -> None:
    """success with no readable media URL ends as FAILED/no_images."""
    provider, _, _ = make(httpx.Response(200, json={**QUEUED, "status": "success", "outcome": outcome}))
    update = await provider.fetch("req-1")
    assert (update.status, update.error_code) == (ProviderStatus.FAILED, "no_images")


async def test_policy_rejection_at_submit() -> None:
    """A 400 whose text reads like a policy refusal maps to ProviderRejected/content_policy_violation."""
    provider, _, _ = make(httpx.Response(400, json={"error": "prompt rejected: content policy"}))
    with pytest.raises(ProviderRejected) as info:
        await provider.submit(GenerationRequest(prompt="p"), callback_url=None, idempotency_key="k")
    assert info.value.code == "content_policy_violation"


def test_default_timeout_covers_synchronous_answers() -> None:
    """GMI holds the POST open while rendering, so its default timeout is long."""
    assert GmiCloudProvider.default_timeout >= 180
