"""The APIMart dialect, also spoken by white-labels such as gccai.heqingsong.uk (PROVIDERS.md "apimart").

Owns ratio-only sizes, the `{"code", "data"}` envelope (an HTTP 200 can still carry an
error code), URL reference inputs, the `Idempotency-Key` header, and the task record
whose image `url` is a string in one doc version and a list in another.
"""

from __future__ import annotations

from typing import Any, ClassVar
from urllib.parse import quote

from relay.errors import (
    ProviderProtocolError,
    ProviderRejected,
    ProviderUnavailable,
    RateLimited,
    SubmitOutcomeUnknown,
)
from relay.models import PIXELS_TO_RATIO, GenerationRequest, ProviderImage, ProviderStatus, TaskUpdate
from relay.providers.base import (
    Capabilities,
    Inputs,
    Provider,
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
    parse_json,
    parse_retry_after,
    reading_submit_answer,
    task_id,
)

WAITING = (ProviderStatus.QUEUED, ProviderStatus.RUNNING)

STATUSES = {
    "submitted": ProviderStatus.QUEUED,
    "pending": ProviderStatus.QUEUED,
    "processing": ProviderStatus.RUNNING,
    "completed": ProviderStatus.SUCCEEDED,
    "failed": ProviderStatus.FAILED,
    "cancelled": ProviderStatus.CANCELED,
    "canceled": ProviderStatus.CANCELED,
}


class ApiMartProvider(Provider):
    """APIMart: Bearer auth, `size` as 1:1/2:3/3:2, `image_urls` + `mask_url`, polled at /v1/tasks/{id}."""

    kind: ClassVar[str] = "apimart"
    caps: ClassVar[Capabilities] = Capabilities(
        sizes=("1024x1024", "1024x1536", "1536x1024"),   # sent as 1:1, 2:3, 3:2; no "auto"
        qualities=("low", "medium", "high", "auto"),
        backgrounds=("auto", "transparent", "opaque"),
        formats=("png", "jpeg"),                         # webp is not offered
        compression=True,
        moderation=("auto", "low"),
        max_n=4,
        input_images="url",
        max_input_images=15,
        mask=True,                                       # mask_url; needs image_urls (check_supported)
        callbacks=False,
        idempotent_submit=True,
        default_expiry=24 * 3600.0,                      # each image also carries its own expires_at
    )
    default_model: ClassVar[str | None] = "gpt-image-1.5-official"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    async def submit(self, req: GenerationRequest, *, callback_url: str | None = None,
                     idempotency_key: str = "", inputs: Inputs | None = None) -> TaskUpdate:
        """POST the generation; APIMart answers with a task id to poll."""
        body = drop_none({
            "model": self.model_name, "prompt": req.prompt,
            "size": PIXELS_TO_RATIO.get(req.size, req.size) if req.size else None,
            "n": req.n, "quality": req.quality, "background": req.background, "moderation": req.moderation,
            "output_format": req.output_format, "output_compression": req.output_compression,
            "image_urls": list(req.images) or None, "mask_url": req.mask,
        })
        headers = self._headers()
        if idempotency_key:
            # APIMart dedupes on this, so a retried submit cannot create a second billed task.
            headers["Idempotency-Key"] = idempotency_key
        with reading_submit_answer(self.name):
            response = await self.send("POST", self.base_url + "/v1/images/generations", submit=True,
                                       headers=headers, json_body=body)
            raw = parse_json(response.content, status=response.status_code)
            data = _unwrap(raw, response.headers.get("retry-after"))
            # Documented as a one-element array; a bare object is tolerated.
            first = next((item for item in as_list(data) if isinstance(item, dict)), None)
            if first is None:
                raise SubmitOutcomeUnknown("apimart answered the submit without a task record")
            ticket = task_id(first.get("task_id")) or task_id(first.get("id"))
            if ticket is None:
                raise SubmitOutcomeUnknown("apimart accepted the submit without a task_id")
            status = accepted_status(STATUSES, first.get("status"))
            return self._update(first, status, ticket, raw=raw)

    async def fetch(self, provider_task_id: str) -> TaskUpdate:
        """GET the task record from the `{"code", "data"}` envelope."""
        url = f"{self.base_url}/v1/tasks/{quote(provider_task_id, safe='')}"
        response = await self.send("GET", url, headers=self._headers())
        raw = parse_json(response.content, status=response.status_code)
        data = as_dict(_unwrap(raw, response.headers.get("retry-after")), "apimart task")
        status = map_status(STATUSES, data.get("status"), "apimart")
        ticket = task_id(data.get("id")) or provider_task_id
        return self._update(data, status, ticket, raw=raw)

    def _update(self, data: dict[str, Any], status: ProviderStatus, ticket: str, raw: Any) -> TaskUpdate:
        code, message = error_parts(data.get("error"))
        failed = status is ProviderStatus.FAILED
        return make_update(
            status, provider_task_id=ticket, progress=clamp_progress(data.get("progress")),
            images=_images(data.get("result")) if status is ProviderStatus.SUCCEEDED else (),
            error_code=failure_code(code, message) if failed else None,
            error_message=message if failed else None,
            estimated_seconds=as_float(data.get("estimated_time")) if status in WAITING else None,
            raw=raw,
        )


def _unwrap(raw: Any, retry_after_header: str | None) -> Any:
    """The envelope's `data`, after mapping a non-200 `code` the way an HTTP status would be mapped."""
    body = as_dict(raw, "apimart response")
    code = as_int(body.get("code"))
    err = body.get("error")
    if code is None and err is not None and body.get("data") is None:
        # An OpenAI-style error object at HTTP 200: use its numeric code when it has one.
        code = as_int(err.get("code")) if isinstance(err, dict) else None
        code = code if code is not None and code >= 400 else 400
    if code is not None and code != 200:
        _, message = error_parts(err)
        message = message or as_str(body.get("msg")) or as_str(body.get("message")) or f"code {code}"
        if code == 429:
            raise RateLimited(f"apimart rate limit: {message}", retry_after=parse_retry_after(retry_after_header))
        if code >= 500:
            raise ProviderUnavailable(f"apimart error {code}: {message}", status=code)
        policy = looks_like_policy(message)
        raise ProviderRejected(f"apimart rejected the request ({code}): {message}",
                               code="content_policy_violation" if policy else "provider_rejected", status=code)
    if body.get("data") is None:
        raise ProviderProtocolError("apimart response has no data")
    return body["data"]


def _images(result: Any) -> tuple[ProviderImage, ...]:
    found: list[ProviderImage] = []
    if not isinstance(result, dict):
        return ()
    for item in as_list(result.get("images")):
        if isinstance(item, dict):
            # `url` is a string in one doc version and a list of strings in another: accept both.
            for url in as_list(item.get("url")):
                image = image_from_url(url, expires_at=item.get("expires_at"))
                if image is not None:
                    found.append(image)
        else:
            image = image_from_url(item)
            if image is not None:
                found.append(image)
    return tuple(found)
