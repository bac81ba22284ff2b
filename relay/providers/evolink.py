"""The EvoLink dialect (PROVIDERS.md "evolink").

Owns the one dialect with callbacks: the task object is the same in the submit answer,
the poll answer and the callback body, so one parser reads all three. Also owns EvoLink's
documented retry delays (429 → 60 s, 503 → 30 s) for when no Retry-After header comes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar
from urllib.parse import quote

from relay.errors import ProviderProtocolError, SubmitOutcomeUnknown
from relay.models import GenerationRequest, ProviderImage, ProviderStatus, TaskUpdate
from relay.providers.base import (
    Capabilities,
    Inputs,
    Provider,
    accepted_status,
    as_dict,
    as_float,
    as_list,
    clamp_progress,
    drop_none,
    error_parts,
    failure_code,
    image_from_url,
    make_update,
    map_status,
    nested,
    parse_json,
    reading_submit_answer,
    task_id,
)

STATUSES = {
    "pending": ProviderStatus.QUEUED,
    "processing": ProviderStatus.RUNNING,
    "completed": ProviderStatus.SUCCEEDED,
    "failed": ProviderStatus.FAILED,
    # Not in the documented enum, but callbacks fire "on cancelled": accept both spellings.
    "cancelled": ProviderStatus.CANCELED,
    "canceled": ProviderStatus.CANCELED,
}


class EvoLinkProvider(Provider):
    """EvoLink: Bearer auth, n = 1, URL reference inputs, optional `callback_url`, polled at /v1/tasks/{id}."""

    kind: ClassVar[str] = "evolink"
    caps: ClassVar[Capabilities] = Capabilities(
        sizes=("1024x1024", "1024x1536", "1536x1024"),   # ratios are accepted too; relay sends pixels
        qualities=("low", "medium", "high"),
        backgrounds=None,                                # no background / format / compression fields
        formats=None,
        compression=False,
        moderation=None,
        max_n=1,
        input_images="url",
        max_input_images=16,
        mask=False,
        callbacks=True,
        default_expiry=24 * 3600.0,                      # "links are valid for 24 hours"
    )
    default_model: ClassVar[str | None] = "gpt-image-1.5"
    retry_after_defaults: ClassVar[Mapping[int, float]] = {429: 60.0, 503: 30.0}   # EvoLink's error docs

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    async def submit(self, req: GenerationRequest, *, callback_url: str | None = None,
                     idempotency_key: str = "", inputs: Inputs | None = None) -> TaskUpdate:
        """POST the generation; `callback_url` is sent only when given (EvoLink requires HTTPS)."""
        body = drop_none({
            "model": self.model_name, "prompt": req.prompt, "size": req.size, "quality": req.quality,
            "n": req.n, "image_urls": list(req.images) or None, "callback_url": callback_url or None,
        })
        with reading_submit_answer(self.name):
            raw = await self.request_json("POST", self.base_url + "/v1/images/generations", submit=True,
                                          headers=self._headers(), json_body=body)
            data = as_dict(raw, "evolink task")
            if task_id(data.get("id")) is None:
                raise SubmitOutcomeUnknown("evolink accepted the submit without a task id")
            return self._parse(data, at_submit=True)

    async def fetch(self, provider_task_id: str) -> TaskUpdate:
        """GET the task object."""
        url = f"{self.base_url}/v1/tasks/{quote(provider_task_id, safe='')}"
        raw = await self.request_json("GET", url, headers=self._headers())
        update = self._parse(as_dict(raw, "evolink task"))
        return update if update.provider_task_id else replace(update, provider_task_id=provider_task_id)

    def parse_callback(self, body: bytes) -> TaskUpdate:
        """Read a callback: the same JSON as the poll answer. Unsigned, so the caller should confirm by polling."""
        update = self._parse(as_dict(parse_json(body), "evolink callback"))
        if update.provider_task_id is None:
            # Without the id the callback cannot be matched to a task.
            raise ProviderProtocolError("evolink callback has no task id")
        return update

    def _parse(self, data: dict[str, Any], *, at_submit: bool = False) -> TaskUpdate:
        if at_submit:
            status = accepted_status(STATUSES, data.get("status"))
        else:
            status = map_status(STATUSES, data.get("status"), "evolink")
        code, message = error_parts(data.get("error"))
        failed = status is ProviderStatus.FAILED
        info = nested(data, "task_info")
        waiting = status in (ProviderStatus.QUEUED, ProviderStatus.RUNNING)
        return make_update(
            status, provider_task_id=task_id(data.get("id")), progress=clamp_progress(data.get("progress")),
            images=_images(data) if status is ProviderStatus.SUCCEEDED else (),
            error_code=failure_code(code, message) if failed else None,
            error_message=message if failed else None,
            estimated_seconds=as_float(info.get("estimated_time")) if waiting else None,
            raw=data,
        )


def _images(data: dict[str, Any]) -> tuple[ProviderImage, ...]:
    found: list[ProviderImage] = []
    for item in as_list(data.get("results")):
        image = image_from_url(item.get("url") if isinstance(item, dict) else item)
        if image is not None:
            found.append(image)
    if not found:
        # EvoLink's own MCP client also reads `result_data[].image_url`.
        for item in as_list(data.get("result_data")):
            if isinstance(item, dict):
                image = image_from_url(item.get("image_url") or item.get("url"))
                if image is not None:
                    found.append(image)
    return tuple(found)
