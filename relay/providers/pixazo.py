"""The Pixazo dialect: an Azure-APIM-style gateway in front of fal.ai (PROVIDERS.md "pixazo").

Owns the subscription-key headers, fal's field names (`image_size`, `num_images`), a
submit that answers either a queue ticket or (for some accounts) the final images, and
the poll, which is a POST of `{"request_id"}` to the documented `-request-result`
endpoint. The ticket's `response_url` points at an internal worker host and is never called.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

from relay.errors import ProviderProtocolError, ProviderRejected, SubmitOutcomeUnknown
from relay.models import GenerationRequest, ProviderImage, ProviderStatus, TaskUpdate
from relay.providers.base import (
    Capabilities,
    Inputs,
    Provider,
    accepted_status,
    as_dict,
    as_float,
    as_list,
    drop_none,
    error_parts,
    failure_code,
    image_from_url,
    looks_like_policy,
    make_update,
    map_status,
    reading_submit_answer,
    task_id,
)

SUBMIT_PATH = "/gpt-image-1-5-api-923/v1/gpt-image-1-5-api-request"
RESULT_PATH = "/gpt-image-1-5-api-923/v1/gpt-image-1-5-api-request-result"

STATUSES = {
    "in_queue": ProviderStatus.QUEUED,
    "in_progress": ProviderStatus.RUNNING,
    "completed": ProviderStatus.SUCCEEDED,
    "failed": ProviderStatus.FAILED,
}


class PixazoProvider(Provider):
    """Pixazo: `Ocp-Apim-Subscription-Key`, fal-style body, images at `images[].url`."""

    kind: ClassVar[str] = "pixazo"
    caps: ClassVar[Capabilities] = Capabilities(
        sizes=("1024x1024", "1024x1536", "1536x1024"),
        qualities=("low", "medium", "high"),             # fal's set; the docs' "standard" looks like a typo
        backgrounds=("auto", "transparent", "opaque"),
        formats=("png", "jpeg", "webp"),
        compression=False,
        moderation=None,
        max_n=4,
        input_images=None,     # editing lives on a separate endpoint whose body is undocumented
        max_input_images=0,
        mask=False,
        callbacks=False,
        default_expiry=24 * 3600.0,                      # undocumented: assume a day
    )
    # The model is chosen by the URL path; there is no model field to send.
    default_model: ClassVar[str | None] = None

    def _headers(self) -> dict[str, str]:
        return {"Ocp-Apim-Subscription-Key": self.api_key, "Cache-Control": "no-cache"}

    async def submit(self, req: GenerationRequest, *, callback_url: str | None = None,
                     idempotency_key: str = "", inputs: Inputs | None = None) -> TaskUpdate:
        """POST the request; the answer is a ticket to poll or, on some accounts, the final images."""
        body = drop_none({
            "prompt": req.prompt, "image_size": req.size, "background": req.background,
            "quality": req.quality, "num_images": req.n, "output_format": req.output_format,
        })
        with reading_submit_answer(self.name):
            raw = await self.request_json("POST", self.base_url + SUBMIT_PATH, submit=True,
                                          headers=self._headers(), json_body=body)
            data = as_dict(raw, "pixazo submit")
            ticket = task_id(data.get("request_id"))
            if data.get("status") is None and "images" not in data and data.get("error") is not None:
                # An error body with HTTP 200: the request was refused, nothing was queued.
                _, message = error_parts(data["error"])
                message = message or "pixazo refused the request"
                raise ProviderRejected(f"pixazo rejected the request: {message}",
                                       code="content_policy_violation" if looks_like_policy(message)
                                       else "provider_rejected")
            if ticket is None and not _final(data):
                raise SubmitOutcomeUnknown("pixazo accepted the submit without a request_id")
            update = self._parse(data, at_submit=ticket is not None)
            if ticket is None and update.status in (ProviderStatus.QUEUED, ProviderStatus.RUNNING):
                # Images but a status saying "not done" and no id: there is nothing to poll. A protocol
                # error here, which reading_submit_answer reports as SubmitOutcomeUnknown (not resent).
                raise ProviderProtocolError("pixazo answered the submit as unfinished without a request_id")
            return update

    async def fetch(self, provider_task_id: str) -> TaskUpdate:
        """POST `{"request_id"}` to the result endpoint (not the ticket's `response_url`)."""
        raw = await self.request_json("POST", self.base_url + RESULT_PATH, headers=self._headers(),
                                      json_body={"request_id": provider_task_id})
        update = self._parse(as_dict(raw, "pixazo result"))
        return update if update.provider_task_id else replace(update, provider_task_id=provider_task_id)

    def _parse(self, data: dict[str, Any], *, at_submit: bool = False) -> TaskUpdate:
        raw_status = data.get("status")
        if raw_status is None and _final(data):
            # fal's raw output, `{"images": [...]}`, carries no status.
            status = ProviderStatus.SUCCEEDED
        elif raw_status is None and data.get("error") is not None:
            status = ProviderStatus.FAILED
        elif at_submit and not _final(data):
            status = accepted_status(STATUSES, raw_status)
        else:
            status = map_status(STATUSES, raw_status, "pixazo")
        code, message = error_parts(data.get("error"))
        failed = status is ProviderStatus.FAILED
        minutes = as_float(data.get("estimated_wait_minutes"))
        waiting = status in (ProviderStatus.QUEUED, ProviderStatus.RUNNING)
        return make_update(
            status, provider_task_id=task_id(data.get("request_id")),
            images=_images(data.get("images")) if status is ProviderStatus.SUCCEEDED else (),
            error_code=failure_code(code, message) if failed else None,
            error_message=message if failed else None,
            estimated_seconds=minutes * 60 if waiting and minutes is not None else None,
            raw=data,
        )


def _final(data: dict[str, Any]) -> bool:
    return isinstance(data.get("images"), list) and bool(data["images"])


def _images(items: Any) -> tuple[ProviderImage, ...]:
    found: list[ProviderImage] = []
    for item in as_list(items):
        if isinstance(item, dict):
            image = image_from_url(item.get("url"), content_type=item.get("content_type"),
                                   width=item.get("width"), height=item.get("height"))
        else:
            image = image_from_url(item)
        if image is not None:
            found.append(image)
    return tuple(found)
