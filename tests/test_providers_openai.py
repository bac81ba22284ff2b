"""The OpenAI Images dialect: JSON generations, multipart edits, inline base64 answers, no polling."""

from __future__ import annotations

import email.parser
import email.policy
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from relay.errors import ProviderRejected, RateLimited
from relay.models import GenerationRequest, ProviderStatus
from relay.providers.openai import OpenAIProvider

Answer = httpx.Response | Callable[[httpx.Request], httpx.Response]
BASE = "https://api.openai.test"


class FakeOpenAI:
    """A scripted OpenAI: answers in order (the last repeats) and records requests."""

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
        return f"bytes of {url}".encode(), "image/webp" if url.endswith(".webp") else "image/png"


def make(*answers: Answer) -> tuple[OpenAIProvider, FakeOpenAI, InputFetcher]:
    fake, fetcher = FakeOpenAI(*answers), InputFetcher()
    http = httpx.AsyncClient(transport=httpx.MockTransport(fake))
    return OpenAIProvider(http, base_url=BASE, api_key="sk-1", fetch_input=fetcher), fake, fetcher


ANSWER = {"created": 1766880000, "background": "opaque", "output_format": "png", "quality": "high",
          "size": "1024x1024", "data": [{"b64_json": "iVBORw0KGgo="}, {"b64_json": "iVBORw0KGgp="}],
          "usage": {"input_tokens": 50, "output_tokens": 4160, "total_tokens": 4210}}


def form_parts(request: httpx.Request) -> list[tuple[Any, Any, Any]]:
    """(name, filename, payload) for each part of a multipart request."""
    head = b"Content-Type: " + request.headers["content-type"].encode() + b"\r\n\r\n"
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + request.content)
    parts = []
    for part in message.iter_parts():  # type: ignore[attr-defined]
        payload = part.get_payload(decode=True)
        parts.append((part.get_param("name", header="content-disposition"), part.get_filename(), payload))
    return parts


async def test_generation_is_json_and_final() -> None:
    """Without reference images, submit POSTs JSON to /v1/images/generations and the answer is final."""
    provider, fake, _ = make(httpx.Response(200, json=ANSWER, headers={"x-request-id": "req_abc"}))
    req = GenerationRequest(prompt="fox", size="auto", quality="high", n=2, background="opaque",
                            output_format="png", moderation="low")
    update = await provider.submit(req, callback_url="https://ignored.test", idempotency_key="k")
    sent = fake.requests[0]
    assert (sent.method, str(sent.url)) == ("POST", BASE + "/v1/images/generations")
    assert sent.headers["authorization"] == "Bearer sk-1"
    assert json.loads(sent.content) == {"model": "gpt-image-1.5", "prompt": "fox", "n": 2, "size": "auto",
                                        "quality": "high", "background": "opaque", "output_format": "png",
                                        "moderation": "low"}
    assert (update.status, update.provider_task_id, update.progress) == (ProviderStatus.SUCCEEDED, "req_abc", 100)
    assert [(i.b64, i.content_type, i.url) for i in update.images] == [
        ("iVBORw0KGgo=", "image/png", None), ("iVBORw0KGgp=", "image/png", None)]


async def test_raw_record_leaves_out_the_base64() -> None:
    """The recorded raw body does not duplicate megabytes of base64."""
    provider, _, _ = make(httpx.Response(200, json=ANSWER))
    update = await provider.submit(GenerationRequest(prompt="p"), callback_url=None, idempotency_key="k")
    assert update.raw["data"][0] == {"b64_json": "<12 base64 chars>"}
    assert update.raw["usage"] == ANSWER["usage"]


async def test_content_type_follows_output_format() -> None:
    """JPEG/WebP answers are labelled with their type, from the answer or else the request."""
    provider, _, _ = make(httpx.Response(200, json={"data": [{"b64_json": "/9j/"}]}))
    update = await provider.submit(GenerationRequest(prompt="p", output_format="jpeg"), callback_url=None,
                                   idempotency_key="k")
    assert update.images[0].content_type == "image/jpeg"


async def test_edits_upload_fetched_images_as_multipart() -> None:
    """With reference images, submit downloads them and POSTs multipart to /v1/images/edits."""
    provider, fake, fetcher = make(httpx.Response(200, json=ANSWER))
    req = GenerationRequest(prompt="edit", n=3, size="1024x1536", quality="low", moderation="low",
                            images=("https://in.test/a.png", "https://in.test/b.webp"), mask="https://in.test/m.png")
    update = await provider.submit(req, callback_url=None, idempotency_key="k")
    sent = fake.requests[0]
    assert (sent.method, str(sent.url)) == ("POST", BASE + "/v1/images/edits")
    assert sent.headers["content-type"].startswith("multipart/form-data")
    assert fetcher.fetched == ["https://in.test/a.png", "https://in.test/b.webp", "https://in.test/m.png"]
    parts = form_parts(sent)
    fields = {name: payload.decode() for name, filename, payload in parts if filename is None}
    files = [(name, filename, payload) for name, filename, payload in parts if filename is not None]
    assert fields == {"model": "gpt-image-1.5", "prompt": "edit", "n": "3", "size": "1024x1536", "quality": "low"}
    assert files == [("image[]", "image0.png", b"bytes of https://in.test/a.png"),
                     ("image[]", "image1.webp", b"bytes of https://in.test/b.webp"),
                     ("mask", "mask.png", b"bytes of https://in.test/m.png")]
    assert update.status is ProviderStatus.SUCCEEDED


async def test_moderation_block_is_policy_rejection() -> None:
    """400 moderation_blocked is ProviderRejected with content_policy_violation."""
    body = {"error": {"message": "Your request was rejected by the safety system.",
                      "type": "image_generation_user_error", "param": None, "code": "moderation_blocked"}}
    provider, _, _ = make(httpx.Response(400, json=body))
    with pytest.raises(ProviderRejected) as info:
        await provider.submit(GenerationRequest(prompt="p"), callback_url=None, idempotency_key="k")
    assert (info.value.code, info.value.status) == ("content_policy_violation", 400)


async def test_rate_limit_prefers_retry_after_ms() -> None:
    """OpenAI's retry-after-ms is the finer hint and wins over retry-after."""
    provider, _, _ = make(httpx.Response(429, headers={"retry-after-ms": "250", "retry-after": "1"}))
    with pytest.raises(RateLimited) as info:
        await provider.submit(GenerationRequest(prompt="p"), callback_url=None, idempotency_key="k")
    assert info.value.retry_after == 0.25


@pytest.mark.parametrize("data", [None, [], [{}], [{"b64_json": ""}], [{"url": "ftp://x"}], "x", [5]])
async def test_answer_without_images_is_no_images(data: Any) -> None:
    """A 200 without usable images is a final FAILED/no_images."""
    provider, _, _ = make(httpx.Response(200, json={"created": 1, "data": data}))
    update = await provider.submit(GenerationRequest(prompt="p"), callback_url=None, idempotency_key="k")
    assert (update.status, update.error_code) == (ProviderStatus.FAILED, "no_images")


async def test_fetch_is_never_needed() -> None:
    """There is nothing to poll at OpenAI: a stray fetch is rejected without a request."""
    provider, fake, _ = make(httpx.Response(200, json=ANSWER))
    with pytest.raises(ProviderRejected):
        await provider.fetch("req_abc")
    assert fake.requests == []
