"""The provider interface, capability data, request validation, and the one place HTTP errors are mapped.

Every dialect module subclasses `Provider`. Adapters are stateless apart from
their injected `httpx.AsyncClient`; they never touch the store. Every body a
provider sends is parsed defensively: a missing field, a null, a string where
a list was documented, or junk becomes a `ProviderProtocolError` (retry) or a
sensible `TaskUpdate`, never an unhandled exception.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import email.utils
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx

from relay import metrics
from relay.errors import (
    ArchiveError,
    BlockedAddress,
    ProviderProtocolError,
    ProviderRejected,
    ProviderUnavailable,
    RateLimited,
    ReferenceUnavailable,
    SourceGone,
    SubmitOutcomeUnknown,
    Unsupported,
)
from relay.logs import context_field
from relay.models import GenerationRequest, TaskUpdate
from relay.providers.parsing import (  # re-exported: adapters import their helpers from here
    accepted_status,
    as_dict,
    as_float,
    as_int,
    as_list,
    as_str,
    clamp_progress,
    drop_none,
    error_parts,
    failure_code,
    image_from_url,
    looks_like_policy,
    make_update,
    map_status,
    nested,
    parse_json,
    task_id,
)
from relay.stats import ProviderStatsRecorder

__all__ = [
    "Capabilities", "InputFetcher", "Inputs", "Provider", "accepted_status", "as_dict", "as_float", "as_int", "as_list", "as_str",
    "check_supported", "clamp_progress", "drop_none", "error_message", "error_parts", "failure_code",
    "image_from_url", "looks_like_policy", "make_update", "map_status", "map_transport_errors", "nested",
    "parse_json", "parse_retry_after", "raise_for_status", "reading_submit_answer", "task_id",
]

# Gateway/proxy timeouts (504, Cloudflare's 524): the request may have reached the provider.
GATEWAY_TIMEOUTS = frozenset({504, 524})

# Downloads a reference image URL (through the SSRF guard, with a size cap) → (bytes, content type).
InputFetcher = Callable[[str], Awaitable[tuple[bytes, str]]]
# Reference images fetched before a submit: URL → (bytes, content type).
Inputs = Mapping[str, tuple[bytes, str]]


@dataclass(frozen=True)
class Capabilities:
    """What a provider can do, in relay's canonical vocabulary. Used to validate requests (422 unsupported)."""

    sizes: tuple[str, ...] = ("1024x1024", "1024x1536", "1536x1024")   # canonical; "auto" only if listed
    qualities: tuple[str, ...] = ("low", "medium", "high", "auto")
    backgrounds: tuple[str, ...] | None = ("auto", "transparent", "opaque")   # None: field not supported
    formats: tuple[str, ...] | None = ("png", "jpeg", "webp")
    compression: bool = True
    moderation: tuple[str, ...] | None = None
    max_n: int = 1
    input_images: str | None = "url"        # "url" | "base64" | None (no reference images)
    max_input_images: int = 1
    mask: bool = False
    callbacks: bool = False
    cancel: bool = False
    default_expiry: float = 24 * 3600.0     # source links die this long after completion unless told otherwise
    idempotent_submit: bool = False          # the provider dedupes submits by our Idempotency-Key
    max_prompt_chars: int = 32000
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for the API and the docs."""
        return {
            "sizes": list(self.sizes), "qualities": list(self.qualities),
            "backgrounds": list(self.backgrounds) if self.backgrounds else None,
            "output_formats": list(self.formats) if self.formats else None,
            "output_compression": self.compression, "moderation": list(self.moderation) if self.moderation else None,
            "max_n": self.max_n, "input_images": self.input_images, "max_input_images": self.max_input_images,
            "mask": self.mask, "callbacks": self.callbacks, "cancel": self.cancel,
        }


def check_supported(caps: Capabilities, req: GenerationRequest, provider_name: str) -> None:
    """Raise `Unsupported` naming the first field the provider cannot honour and what it accepts."""

    def refuse(fld: str, accepts: str) -> Unsupported:
        return Unsupported(f"provider {provider_name!r} does not support this {fld}; it accepts {accepts}", field=fld)

    if req.size is not None and req.size not in caps.sizes:
        raise refuse("size", ", ".join(caps.sizes))
    if req.quality is not None and req.quality not in caps.qualities:
        raise refuse("quality", ", ".join(caps.qualities))
    if req.n > caps.max_n:
        raise refuse("n", f"1..{caps.max_n}")
    if req.background is not None and req.background != "auto":
        if caps.backgrounds is None or req.background not in caps.backgrounds:
            raise refuse("background", ", ".join(caps.backgrounds or ("auto",)))
    if req.output_format is not None:
        if caps.formats is None:
            if req.output_format != "png":
                raise refuse("output_format", "png only (the field is not supported)")
        elif req.output_format not in caps.formats:
            raise refuse("output_format", ", ".join(caps.formats))
    if req.output_compression is not None and not caps.compression:
        raise refuse("output_compression", "no output_compression")
    if req.moderation is not None and req.moderation != "auto":
        if caps.moderation is None or req.moderation not in caps.moderation:
            raise refuse("moderation", ", ".join(caps.moderation or ("auto",)))
    if req.images:
        if caps.input_images is None:
            raise refuse("images", "no reference images")
        if len(req.images) > caps.max_input_images:
            raise refuse("images", f"at most {caps.max_input_images} reference images")
    if req.mask is not None:
        if not caps.mask:
            raise refuse("mask", "no mask")
        if not req.images:
            raise Unsupported("a mask needs at least one reference image in images", field="mask")
    if len(req.prompt) > caps.max_prompt_chars:
        raise refuse("prompt", f"at most {caps.max_prompt_chars} characters")


class Provider(abc.ABC):
    """One provider dialect. Subclasses set `kind` and `caps` and implement submit/fetch/parse_callback."""

    kind: ClassVar[str]
    caps: ClassVar[Capabilities]
    default_model: ClassVar[str | None] = None
    # Read timeout for one request. Synchronous dialects (GMI, OpenAI) hold the submit open
    # while the image renders, so they raise it: a too-short timeout turns every submit into
    # SubmitOutcomeUnknown.
    default_timeout: ClassVar[float] = 60.0
    # Delay to use when the provider documents one for a status but sends no Retry-After.
    retry_after_defaults: ClassVar[Mapping[int, float]] = {}
    # Where this process's request counts go for the dashboard (set by the runtime; relay.stats).
    stats: ProviderStatsRecorder | None = None

    def __init__(self, http: httpx.AsyncClient, *, base_url: str, api_key: str, name: str | None = None,
                 model: str | None = None, fetch_input: InputFetcher | None = None,
                 timeout: float | None = None, submit_http: httpx.AsyncClient | None = None) -> None:
        """`submit_http`: the client for submits (`send(submit=True)`), default `http`. The runtime gives
        providers without `caps.idempotent_submit` one that never reuses a connection: a submit sent on a
        pooled connection the provider closed meanwhile fails after sending, cannot be resent, and so
        fails the task as submit_outcome_unknown."""
        self.http = http
        self.submit_http = http if submit_http is None else submit_http
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.name = name or self.kind
        self.model = model
        self.fetch_input = fetch_input
        self.timeout = self.default_timeout if timeout is None else timeout

    @property
    def model_name(self) -> str | None:
        """The model id to send: the configured override, else the dialect's default."""
        return self.model or self.default_model

    @abc.abstractmethod
    async def submit(self, req: GenerationRequest, *, callback_url: str | None, idempotency_key: str,
                     inputs: Inputs | None = None) -> TaskUpdate:
        """Start a task (`inputs`: the reference images from `fetch_inputs`). Returns at least QUEUED with `provider_task_id`, or a final update.

        Raises ProviderRejected (fail), ProviderUnavailable/RateLimited (nothing was accepted: safe to
        retry), SubmitOutcomeUnknown (sent, no answer: must not be resent blindly).
        """

    @abc.abstractmethod
    async def fetch(self, provider_task_id: str) -> TaskUpdate:
        """Ask the provider for the task's current state (the poll). Safe to repeat."""

    def parse_callback(self, body: bytes) -> TaskUpdate:
        """Parse a callback body (pure). Raises ProviderProtocolError on junk."""
        raise ProviderProtocolError(f"provider kind {self.kind!r} does not send callbacks")

    async def cancel(self, provider_task_id: str) -> None:
        """Best-effort cancel at the provider; providers without one do nothing."""
        return None

    async def cancel_quietly(self, provider_task_id: str, timeout: float = 10.0) -> None:
        """`cancel`, where the provider can, within `timeout`, its failure ignored: the task is canceled in relay
        whatever the provider answers (its own deadline ends it there)."""
        if not self.caps.cancel:
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout):
                await self.cancel(provider_task_id)

    # ---- helpers shared by the dialects -------------------------------------------------------

    async def send(self, method: str, url: str, *, json_body: Any = None,
                   headers: dict[str, str] | None = None, submit: bool = False,
                   **kwargs: Any) -> httpx.Response:
        """Send one request; transport failures and HTTP error statuses are mapped to the error tree.

        `submit=True` marks a request whose repetition could create a second (billed) task: a
        timeout or dropped connection after the request was sent becomes SubmitOutcomeUnknown.
        """
        client = self.submit_http if submit else self.http
        started = time.perf_counter()
        try:
            async with map_transport_errors(submit=submit):
                response = await client.request(method, url, json=json_body, headers=headers,
                                                timeout=self.timeout, **kwargs)
        except (ProviderUnavailable, SubmitOutcomeUnknown) as exc:     # no answer came
            self._observe(method, url, submit, None, started, exc.code)
            raise
        self._observe(method, url, submit, response.status_code, started, None)
        if submit and response.status_code in GATEWAY_TIMEOUTS:
            # A gateway gave up waiting for the provider, which may still have taken the task.
            raise SubmitOutcomeUnknown(f"submit answered {response.status_code} by a gateway; "
                                       "the provider may have accepted it")
        raise_for_status(response, default_retry_after=self.retry_after_defaults)
        return response

    def _observe(self, method: str, url: str, submit: bool, status_code: int | None, started: float,
                 error: str | None) -> None:
        """Count one request (Prometheus, the shared stats) and log its outcome in one line."""
        seconds = time.perf_counter() - started
        kind = metrics.request_kind(submit=submit, job_kind=context_field("job_kind"))
        if self.stats is not None:
            self.stats.record(self.name, status_code, seconds)
        # The path only: no query, no host credentials (the redacting filter would catch them anyway).
        metrics.provider_request(self.name, kind, status_code, seconds, what=f"{method} {httpx.URL(url).path}",
                                 error=error)

    async def request_json(self, method: str, url: str, *, json_body: Any = None,
                           headers: dict[str, str] | None = None, submit: bool = False,
                           **kwargs: Any) -> Any:
        """Like `send`, returning the parsed JSON body (junk is a ProviderProtocolError)."""
        response = await self.send(method, url, json_body=json_body, headers=headers, submit=submit, **kwargs)
        return parse_json(response.content, status=response.status_code)

    async def fetch_inputs(self, req: GenerationRequest) -> Inputs:
        """Download the reference images (images, mask) this dialect uploads itself; {} for URL dialects.

        Called by the submit job *before* the submit is reserved, so that a dead or slow image host can
        never be mistaken for a submit whose outcome is unknown. Raises ReferenceUnavailable naming the URL:
        `permanent` for a refused address, a 4xx or an oversized image; else worth retrying later.
        """
        if self.caps.input_images != "base64":
            return {}
        inputs: dict[str, tuple[bytes, str]] = {}
        for url in dict.fromkeys((*req.images, *((req.mask,) if req.mask is not None else ()))):
            try:
                inputs[url] = await self.fetch_bytes(url)
            except BlockedAddress as exc:
                raise ReferenceUnavailable(url, str(exc), permanent=True) from None
            except ArchiveError as exc:
                raise ReferenceUnavailable(url, exc.message, permanent=isinstance(exc, SourceGone)) from None
        return inputs

    async def input_bytes(self, inputs: Inputs | None, url: str) -> tuple[bytes, str]:
        """A reference image as fetched by `fetch_inputs` (downloaded now only when called without them)."""
        if inputs is not None and url in inputs:
            return inputs[url]
        return await self.fetch_bytes(url)

    async def fetch_bytes(self, url: str) -> tuple[bytes, str]:
        """Download a reference image through the injected fetcher (SSRF guard and size cap live there)."""
        if self.fetch_input is None:
            # A wiring mistake, not the user's: the adapter was built without a fetcher.
            raise ProviderRejected(f"provider {self.name!r} needs reference images downloaded, "
                                   "but no input fetcher is configured", code="input_fetch_unavailable")
        return await self.fetch_input(url)


@contextlib.contextmanager
def reading_submit_answer(provider_name: str) -> Iterator[None]:
    """Turn an unreadable 2xx answer to a submit into SubmitOutcomeUnknown.

    The provider said yes in some form we cannot parse: it may have created (and billed) the
    task, so retrying the submit blindly could make a second one.
    """
    try:
        yield
    except ProviderProtocolError as exc:
        raise SubmitOutcomeUnknown(f"{provider_name} answered the submit with a body relay cannot use: "
                                   f"{exc.message}") from exc


@contextlib.asynccontextmanager
async def map_transport_errors(*, submit: bool) -> AsyncIterator[None]:
    """Map httpx transport errors to ProviderUnavailable, or SubmitOutcomeUnknown when a submit may have landed."""
    try:
        yield
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
        # The request never reached the provider: always safe to retry.
        raise ProviderUnavailable(f"could not connect to provider: {type(exc).__name__}") from exc
    except (httpx.ReadTimeout, httpx.WriteTimeout, httpx.RemoteProtocolError, httpx.ReadError,
            httpx.WriteError) as exc:
        if submit:
            raise SubmitOutcomeUnknown(
                f"submit sent but no answer ({type(exc).__name__}); the provider may have accepted it") from exc
        raise ProviderUnavailable(f"provider did not answer: {type(exc).__name__}") from exc
    except httpx.HTTPError as exc:
        raise ProviderUnavailable(f"provider request failed: {type(exc).__name__}") from exc


MAX_RETRY_AFTER = 24 * 3600.0


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Retry-After as seconds (delta-seconds or HTTP date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        # nan/inf or a delay of days is a broken header, not advice to follow.
        return max(0.0, seconds) if math.isfinite(seconds) and seconds < MAX_RETRY_AFTER else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    delay = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, delay) if delay < MAX_RETRY_AFTER else None


def error_message(body: Any, default: str) -> str:
    """Best-effort human message from the many error body shapes providers use."""
    if isinstance(body, dict):
        err = body.get("error", body.get("message", body.get("msg")))
        if isinstance(err, dict):
            msg = err.get("message") or err.get("msg") or err.get("code")
            if msg:
                return str(msg)[:500]
        elif err:
            return str(err)[:500]
    return default


def raise_for_status(response: httpx.Response, *, default_retry_after: Mapping[int, float] | None = None) -> None:
    """Map an HTTP status to the error tree: 429 → RateLimited, 5xx/408 → ProviderUnavailable, 4xx → ProviderRejected.

    `default_retry_after` gives a per-status delay for providers that document one in prose
    (EvoLink: 429 → 60 s, 503 → 30 s) but send no Retry-After header.
    """
    status = response.status_code
    if status < 400:
        return
    try:
        # parse_json, not json.loads: junk nested too deep is a RecursionError there, and a lone
        # surrogate in the message would reach the stored task error.
        body: Any = parse_json(response.content) if response.content else None
    except ProviderProtocolError:
        body = None
    message = error_message(body, f"HTTP {status}")
    retry_after = _retry_after(response.headers)
    if retry_after is None and default_retry_after:
        retry_after = default_retry_after.get(status)
    if status == 429:
        raise RateLimited(f"provider rate limit: {message}", retry_after=retry_after)
    if status >= 500 or status == 408:
        raise ProviderUnavailable(f"provider error {status}: {message}", retry_after=retry_after, status=status)
    err = body.get("error") if isinstance(body, dict) else None
    provider_code = err.get("code") if isinstance(err, dict) else None
    # Only a policy refusal gets its own code: it is the one 4xx a user can act on by rewording.
    policy = failure_code(provider_code, message) == "content_policy_violation" or looks_like_policy(message)
    code = "content_policy_violation" if policy else "provider_rejected"
    raise ProviderRejected(f"provider rejected the request ({status}): {message}", code=code, status=status)


def _retry_after(headers: httpx.Headers) -> float | None:
    # OpenAI sends the finer `retry-after-ms` next to `retry-after`; prefer it when readable.
    millis = as_float(headers.get("retry-after-ms"))
    if millis is not None and 0 <= millis < MAX_RETRY_AFTER * 1000:
        return millis / 1000.0
    return parse_retry_after(headers.get("retry-after"))
