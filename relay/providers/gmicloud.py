"""The GMI Cloud dialect: the Inference Engine request queue (PROVIDERS.md "gmicloud").

Owns the `{model, payload}` envelope, base64 reference inputs (GMI takes no URLs), and
reading a request record that may already be final in the POST response ("synchronous"
per GMI's docs) or must be polled with `GET …/requests/{request_id}`.
"""

from __future__ import annotations

import base64
from dataclasses import replace
from typing import Any, ClassVar
from urllib.parse import quote

from relay.errors import SubmitOutcomeUnknown
from relay.models import GenerationRequest, ProviderImage, ProviderStatus, TaskUpdate
from relay.providers.base import (
    Capabilities,
    Inputs,
    Provider,
    accepted_status,
    as_dict,
    as_list,
    drop_none,
    error_parts,
    failure_code,
    image_from_url,
    make_update,
    map_status,
    nested,
    reading_submit_answer,
    task_id,
)

PATH = "/api/v1/ie/requestqueue/apikey/requests"

STATUSES = {
    "queued": ProviderStatus.QUEUED,
    "dispatched": ProviderStatus.QUEUED,
    "processing": ProviderStatus.RUNNING,
    "success": ProviderStatus.SUCCEEDED,
    # GMI's video reference lists "finished" among request states; without images it still ends
    # as FAILED/no_images, so accepting it cannot turn a failure into a success.
    "finished": ProviderStatus.SUCCEEDED,
    "failed": ProviderStatus.FAILED,
    "cancelled": ProviderStatus.CANCELED,
    "canceled": ProviderStatus.CANCELED,
}


class GmiCloudProvider(Provider):
    """GMI Cloud: Bearer auth, base64 `image`/`mask`, images at `outcome.media_urls[].url`."""

    kind: ClassVar[str] = "gmicloud"
    caps: ClassVar[Capabilities] = Capabilities(
        sizes=("1024x1024", "1024x1536", "1536x1024"),
        qualities=("low", "medium", "high", "auto"),
        backgrounds=("auto", "transparent", "opaque"),
        formats=("png", "jpeg", "webp"),
        compression=True,
        moderation=None,
        max_n=10,
        input_images="base64",
        max_input_images=1,          # `payload.image` is a single string
        mask=True,
        callbacks=False,
        default_expiry=24 * 3600.0,  # undocumented: assume a day
    )
    default_model: ClassVar[str | None] = "gpt-image-1.5"
    # GMI holds the POST open while the model renders (its own sample app waits 180 s).
    default_timeout: ClassVar[float] = 180.0

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    async def submit(self, req: GenerationRequest, *, callback_url: str | None = None,
                     idempotency_key: str = "", inputs: Inputs | None = None) -> TaskUpdate:
        """POST the request; the answer is either a queue record to poll or already final."""
        image = mask = None
        if req.images:
            image = _b64(await self.input_bytes(inputs, req.images[0]))
        if req.mask is not None:
            mask = _b64(await self.input_bytes(inputs, req.mask))
        payload = drop_none({
            "prompt": req.prompt, "size": req.size, "quality": req.quality, "n": req.n,
            "output_format": req.output_format, "output_compression": req.output_compression,
            "background": req.background, "image": image, "mask": mask,
        })
        with reading_submit_answer(self.name):
            body = await self.request_json("POST", self.base_url + PATH, submit=True, headers=self._headers(),
                                           json_body={"model": self.model_name, "payload": payload})
            update = self._parse(body, at_submit=True)
            if update.provider_task_id is None and update.status in (ProviderStatus.QUEUED, ProviderStatus.RUNNING):
                # Nothing to poll: retrying as unknown lets the confirm path decide rather than resubmitting.
                raise SubmitOutcomeUnknown("gmicloud accepted the request without a request_id")
            return update

    async def fetch(self, provider_task_id: str) -> TaskUpdate:
        """GET the request record."""
        url = f"{self.base_url}{PATH}/{quote(provider_task_id, safe='')}"
        body = await self.request_json("GET", url, headers=self._headers())
        update = self._parse(body)
        return update if update.provider_task_id else replace(update, provider_task_id=provider_task_id)

    def _parse(self, body: Any, *, at_submit: bool = False) -> TaskUpdate:
        data = as_dict(body, "gmicloud request")
        outcome = nested(data, "outcome")
        images = _images(outcome)
        raw_status = data.get("status")
        ticket = task_id(data.get("request_id"))
        if raw_status is None and images:
            # A synchronous answer may carry the outcome without a status.
            status = ProviderStatus.SUCCEEDED
        elif at_submit and ticket is not None:
            status = accepted_status(STATUSES, raw_status)
        else:
            status = map_status(STATUSES, raw_status, "gmicloud")
        code, message = error_parts(data.get("error"))
        if status is ProviderStatus.FAILED and message is None:
            code, message = error_parts(outcome.get("error"))
        return make_update(
            status, provider_task_id=ticket, images=images,
            error_code=failure_code(code, message) if status is ProviderStatus.FAILED else None,
            error_message=message if status is ProviderStatus.FAILED else None, raw=body,
        )


def _images(outcome: dict[str, Any]) -> tuple[ProviderImage, ...]:
    found = []
    for item in as_list(outcome.get("media_urls")):
        # Documented as {id, url}; a bare string is tolerated.
        image = image_from_url(item.get("url")) if isinstance(item, dict) else image_from_url(item)
        if image is not None:
            found.append(image)
    return tuple(found)


def _b64(fetched: tuple[bytes, str]) -> str:
    return base64.b64encode(fetched[0]).decode("ascii")
