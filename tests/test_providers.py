"""Provider adapters, across dialects: registry, capabilities, shared error mapping, junk bodies.

Dialect-specific mapping and parsing live in tests/test_providers_<kind>.py.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from relay.errors import (
    ProviderProtocolError,
    ProviderRejected,
    ProviderUnavailable,
    RateLimited,
    RelayError,
    SubmitOutcomeUnknown,
    Unsupported,
)
from relay.models import GenerationRequest, ProviderStatus, TaskUpdate
from relay.providers import PROVIDER_KINDS, build_provider, check_supported
from relay.providers.base import (
    Provider,
    failure_code,
    image_from_url,
    make_update,
    map_status,
    parse_retry_after,
    raise_for_status,
)

Answer = httpx.Response | Callable[[httpx.Request], httpx.Response]


class FakeProvider:
    """A scripted provider: answers in order (the last answer repeats) and records every request."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return answer(request) if callable(answer) else answer


async def fetch_input(url: str) -> tuple[bytes, str]:
    return b"\x89PNG fake", "image/png"


def make(kind: str, *answers: Answer) -> tuple[Provider, FakeProvider]:
    fake = FakeProvider(*answers)
    http = httpx.AsyncClient(transport=httpx.MockTransport(fake))
    return build_provider(kind, http, base_url="https://p.test", api_key="k", fetch_input=fetch_input), fake


REQ = GenerationRequest(prompt="a red fox")
KINDS = sorted(PROVIDER_KINDS)
POLLABLE = [kind for kind in KINDS if kind != "openai"]


def raise_(exc_type: type[httpx.TransportError]) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc_type("boom", request=request)
    return handler


# ---- registry and capabilities -------------------------------------------------------------------

def test_registry_names_every_dialect() -> None:
    """PROVIDER_KINDS maps each kind name to the class that declares it."""
    assert set(PROVIDER_KINDS) == {"gmicloud", "apimart", "evolink", "pixazo", "openai"}
    assert all(cls.kind == kind for kind, cls in PROVIDER_KINDS.items())


async def test_build_provider_passes_kwargs_and_refuses_unknown_kinds() -> None:
    """build_provider instantiates with Provider.__init__ kwargs; an unknown kind is a ValueError."""
    async with httpx.AsyncClient() as http:
        provider = build_provider("evolink", http, base_url="https://e.test/", api_key="k", name="evo", model="m")
        assert (provider.base_url, provider.name, provider.model_name) == ("https://e.test", "evo", "m")
        with pytest.raises(ValueError, match="unknown provider kind"):
            build_provider("nope", http, base_url="https://x.test", api_key="k")


@pytest.mark.parametrize(("kind", "model"), [("gmicloud", "gpt-image-1.5"), ("apimart", "gpt-image-1.5-official"),
                                             ("evolink", "gpt-image-1.5"), ("openai", "gpt-image-1.5"),
                                             ("pixazo", None)])
def test_default_models(kind: str, model: str | None) -> None:
    """Each dialect has its documented default model id (Pixazo picks the model by URL)."""
    assert PROVIDER_KINDS[kind].default_model == model


@pytest.mark.parametrize(("kind", "max_n"), [("gmicloud", 10), ("apimart", 4), ("evolink", 1), ("pixazo", 4),
                                             ("openai", 10)])
def test_caps_max_n(kind: str, max_n: int) -> None:
    """max_n follows PROVIDERS.md."""
    assert PROVIDER_KINDS[kind].caps.max_n == max_n


def test_caps_details() -> None:
    """The capability table matches PROVIDERS.md in the places where dialects differ."""
    caps = {kind: cls.caps for kind, cls in PROVIDER_KINDS.items()}
    assert [k for k in KINDS if caps[k].callbacks] == ["evolink"]
    assert [k for k in KINDS if caps[k].idempotent_submit] == ["apimart"]
    assert {k: caps[k].input_images for k in KINDS} == {
        "apimart": "url", "evolink": "url", "gmicloud": "base64", "openai": "base64", "pixazo": None}
    assert {k: caps[k].mask for k in KINDS} == {
        "apimart": True, "evolink": False, "gmicloud": True, "openai": True, "pixazo": False}
    assert caps["evolink"].backgrounds is None and caps["evolink"].formats is None
    assert caps["apimart"].formats == ("png", "jpeg")
    assert "auto" in caps["openai"].sizes and all("auto" not in caps[k].sizes for k in POLLABLE)
    assert caps["openai"].default_expiry > 30 * 24 * 3600
    assert all(caps[k].default_expiry == 24 * 3600 for k in POLLABLE)
    assert not any(caps[k].cancel for k in KINDS)


@pytest.mark.parametrize(("kind", "req", "fld"), [
    ("apimart", GenerationRequest(prompt="p", output_format="webp"), "output_format"),
    ("apimart", GenerationRequest(prompt="p", size="auto"), "size"),
    ("apimart", GenerationRequest(prompt="p", n=5), "n"),
    ("evolink", GenerationRequest(prompt="p", n=2), "n"),
    ("evolink", GenerationRequest(prompt="p", images=("https://i/a.png",), mask="https://i/m.png"), "mask"),
    ("evolink", GenerationRequest(prompt="p", background="transparent"), "background"),
    ("evolink", GenerationRequest(prompt="p", output_format="jpeg"), "output_format"),
    ("evolink", GenerationRequest(prompt="p", output_compression=50), "output_compression"),
    ("evolink", GenerationRequest(prompt="p", quality="auto"), "quality"),
    ("gmicloud", GenerationRequest(prompt="p", size="auto"), "size"),
    ("gmicloud", GenerationRequest(prompt="p", images=("https://i/a.png", "https://i/b.png")), "images"),
    ("gmicloud", GenerationRequest(prompt="p", moderation="low"), "moderation"),
    ("pixazo", GenerationRequest(prompt="p", images=("https://i/a.png",)), "images"),
    ("pixazo", GenerationRequest(prompt="p", n=5), "n"),
    ("openai", GenerationRequest(prompt="p", n=11), "n"),
])
def test_check_supported_refuses(kind: str, req: GenerationRequest, fld: str) -> None:
    """check_supported names the field a provider cannot honour."""
    with pytest.raises(Unsupported) as info:
        check_supported(PROVIDER_KINDS[kind].caps, req, kind)
    assert info.value.field == fld


@pytest.mark.parametrize(("kind", "req"), [
    ("apimart", GenerationRequest(prompt="p", size="1536x1024", n=4, moderation="low", output_format="jpeg",
                                  images=("https://i/a.png",) * 15, mask="https://i/m.png")),
    ("evolink", GenerationRequest(prompt="p", size="1024x1536", quality="high", background="auto",
                                  output_format="png", images=("https://i/a.png",) * 16)),
    ("gmicloud", GenerationRequest(prompt="p", n=10, output_format="webp", images=("https://i/a.png",),
                                   mask="https://i/m.png")),
    ("pixazo", GenerationRequest(prompt="p", n=4, output_format="webp", background="transparent")),
    ("openai", GenerationRequest(prompt="p", size="auto", n=10, moderation="low",
                                 images=("https://i/a.png",) * 16, mask="https://i/m.png")),
])
def test_check_supported_accepts(kind: str, req: GenerationRequest) -> None:
    """Requests within a provider's documented limits pass."""
    check_supported(PROVIDER_KINDS[kind].caps, req, kind)


# ---- shared helpers ------------------------------------------------------------------------------

def test_raise_for_status_mapping() -> None:
    """429 → RateLimited with Retry-After, 5xx → Unavailable, 4xx → Rejected, policy text → its own code."""
    with pytest.raises(RateLimited) as limited:
        raise_for_status(httpx.Response(429, headers={"Retry-After": "7"}))
    assert limited.value.retry_after == 7
    with pytest.raises(RateLimited) as ms:
        raise_for_status(httpx.Response(429, headers={"retry-after-ms": "1500", "retry-after": "9"}))
    assert ms.value.retry_after == 1.5
    with pytest.raises(ProviderUnavailable) as unavailable:
        raise_for_status(httpx.Response(500, content=b"<html>"))
    assert not isinstance(unavailable.value, RateLimited)
    with pytest.raises(ProviderRejected) as rejected:
        raise_for_status(httpx.Response(400, json={"error": {"message": "bad size"}}))
    assert rejected.value.code == "provider_rejected" and rejected.value.status == 400
    with pytest.raises(ProviderRejected) as policy:
        raise_for_status(httpx.Response(400, json={"error": {"code": "moderation_blocked", "message": "no"}}))
    assert policy.value.code == "content_policy_violation"
    with pytest.raises(RateLimited) as defaulted:
        raise_for_status(httpx.Response(429), default_retry_after={429: 60.0})
    assert defaulted.value.retry_after == 60.0


@pytest.mark.parametrize(("value", "expected"), [
    (None, None), ("", None), ("3", 3.0), ("-4", 0.0), ("nan", None), ("inf", None), ("soon", None),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
])
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    """Retry-After is read as seconds or an HTTP date; junk is ignored."""
    assert parse_retry_after(value) == expected


def test_map_status_rejects_unknown_values() -> None:
    """An unknown or non-string status is a protocol error, not a crash."""
    table = {"done": ProviderStatus.SUCCEEDED}
    assert map_status(table, "DONE", "x") is ProviderStatus.SUCCEEDED
    for value in ("later", 5, None, ["done"], {"s": 1}):
        with pytest.raises(ProviderProtocolError):
            map_status(table, value, "x")


def test_make_update_turns_empty_success_into_no_images() -> None:
    """A success with no image is reported as FAILED/no_images."""
    update = make_update(ProviderStatus.SUCCEEDED, provider_task_id="t")
    assert (update.status, update.error_code) == (ProviderStatus.FAILED, "no_images")


def test_image_from_url_accepts_http_and_data_uris_only() -> None:
    """http(s) URLs and base64 data URIs become images; other schemes and junk are skipped."""
    assert image_from_url("https://x/a.png", expires_at=5).url == "https://x/a.png"  # type: ignore[union-attr]
    inline = image_from_url("data:image/webp;base64,UklGRg==")
    assert inline is not None and (inline.b64, inline.content_type) == ("UklGRg==", "image/webp")
    for junk in ("file:///etc/passwd", "data:image/png;base64,***", "", None, 5, ["https://x"]):
        assert image_from_url(junk) is None


def test_failure_code_unifies_policy_refusals() -> None:
    """Policy codes and policy wording become content_policy_violation; numbers fall back."""
    assert failure_code("moderation_blocked", None) == "content_policy_violation"
    assert failure_code("generation_timeout", "x") == "generation_timeout"
    assert failure_code(500, "blocked by safety system") == "content_policy_violation"
    assert failure_code(500, "oops") == "provider_failed"


# ---- every dialect: transport errors and junk bodies ---------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
async def test_submit_read_timeout_is_outcome_unknown(kind: str) -> None:
    """A submit that was sent but got no answer must not be retried blindly."""
    provider, _ = make(kind, raise_(httpx.ReadTimeout))
    with pytest.raises(SubmitOutcomeUnknown):
        await provider.submit(REQ, callback_url=None, idempotency_key="k1")


@pytest.mark.parametrize("kind", KINDS)
async def test_submit_connect_error_is_unavailable(kind: str) -> None:
    """A submit that never reached the provider is safe to retry."""
    provider, _ = make(kind, raise_(httpx.ConnectError))
    with pytest.raises(ProviderUnavailable) as info:
        await provider.submit(REQ, callback_url=None, idempotency_key="k1")
    assert not isinstance(info.value, ProviderProtocolError)


@pytest.mark.parametrize("kind", KINDS)
async def test_submit_gateway_timeout_is_outcome_unknown(kind: str) -> None:
    """A 504 from a gateway means the submit may have landed."""
    provider, _ = make(kind, httpx.Response(504))
    with pytest.raises(SubmitOutcomeUnknown):
        await provider.submit(REQ, callback_url=None, idempotency_key="k1")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("status", "error"), [(429, RateLimited), (500, ProviderUnavailable),
                                               (400, ProviderRejected), (401, ProviderRejected)])
async def test_submit_http_errors(kind: str, status: int, error: type[Exception]) -> None:
    """HTTP error statuses map to the error tree for every dialect."""
    provider, _ = make(kind, httpx.Response(status, json={"error": "nope"}))
    with pytest.raises(error):
        await provider.submit(REQ, callback_url=None, idempotency_key="k1")


@pytest.mark.parametrize("kind", POLLABLE)
async def test_fetch_transport_errors_are_unavailable(kind: str) -> None:
    """A poll that times out is simply retried later."""
    provider, _ = make(kind, raise_(httpx.ReadTimeout))
    with pytest.raises(ProviderUnavailable):
        await provider.fetch("t1")


JUNK = [b"not json", b"\xff\xfe", b"[]", b"null", b'"text"', b"5", b"{}", b'{"status": 5}',
        b'{"status": null, "data": []}', b'{"code": "x", "data": {"status": ["a"]}}',
        b'{"status": "completed", "results": {"a": 1}, "outcome": [], "images": "x"}',
        b'{"data": [{"status": "submitted"}], "code": 200}', b'{"id": {"x": 1}, "status": "pending"}']


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("body", JUNK)
async def test_submit_junk_never_crashes(kind: str, body: bytes) -> None:
    """Whatever a submit answer holds, the adapter raises a relay error or returns an update."""
    provider, _ = make(kind, httpx.Response(200, content=body))
    try:
        update = await provider.submit(REQ, callback_url=None, idempotency_key="k1")
    except RelayError as exc:
        # A 2xx we cannot read may still have created a task: never "safe to resend".
        assert isinstance(exc, SubmitOutcomeUnknown | ProviderRejected | ProviderUnavailable)
        assert not isinstance(exc, ProviderProtocolError)
    else:
        assert isinstance(update, TaskUpdate)


@pytest.mark.parametrize("kind", POLLABLE)
@pytest.mark.parametrize("body", JUNK)
async def test_fetch_junk_never_crashes(kind: str, body: bytes) -> None:
    """Whatever a poll answer holds, the adapter raises a relay error or returns an update."""
    provider, _ = make(kind, httpx.Response(200, content=body))
    try:
        update = await provider.fetch("t1")
    except RelayError:
        pass
    else:
        assert isinstance(update, TaskUpdate) and update.provider_task_id


@pytest.mark.parametrize("kind", KINDS)
async def test_parse_callback_junk_is_protocol_error(kind: str) -> None:
    """parse_callback raises ProviderProtocolError for junk (and for dialects without callbacks)."""
    provider, _ = make(kind, httpx.Response(200))
    for body in JUNK:
        with pytest.raises(ProviderProtocolError):
            provider.parse_callback(body)
