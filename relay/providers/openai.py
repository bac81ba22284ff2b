"""The OpenAI Images API dialect (PROVIDERS.md "openai"): synchronous, images inline as base64.

Owns mapping a request to `/v1/images/generations` (JSON) or, with reference images, to
`/v1/images/edits` (multipart, one `image[]` part per downloaded input, plus `mask`), and
reading `data[].b64_json`. Every submit answer is final; there is nothing to poll.
"""

from __future__ import annotations

from typing import Any, ClassVar

from relay.errors import ProviderRejected
from relay.models import GenerationRequest, ProviderImage, ProviderStatus, TaskUpdate
from relay.providers.base import (
    Capabilities,
    Inputs,
    Provider,
    as_dict,
    as_list,
    as_str,
    drop_none,
    make_update,
    parse_json,
    reading_submit_answer,
    task_id,
)

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "jpg": "image/jpeg", "webp": "image/webp"}


class OpenAIProvider(Provider):
    """OpenAI: Bearer auth, answers with the images themselves."""

    kind: ClassVar[str] = "openai"
    caps: ClassVar[Capabilities] = Capabilities(
        sizes=("auto", "1024x1024", "1024x1536", "1536x1024"),
        qualities=("low", "medium", "high", "auto"),
        backgrounds=("auto", "transparent", "opaque"),
        formats=("png", "jpeg", "webp"),
        compression=True,
        moderation=("auto", "low"),
        max_n=10,
        input_images="base64",     # downloaded by relay and uploaded as multipart files
        max_input_images=16,
        mask=True,                 # PNG whose transparent pixels mark the area to edit
        callbacks=False,
        # The bytes arrive inline, so no source link can die: a year stands in for "never".
        default_expiry=365 * 24 * 3600.0,
    )
    default_model: ClassVar[str | None] = "gpt-image-1.5"
    # The answer comes only when the images are rendered; high quality can take minutes.
    default_timeout: ClassVar[float] = 300.0

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    async def submit(self, req: GenerationRequest, *, callback_url: str | None = None,
                     idempotency_key: str = "", inputs: Inputs | None = None) -> TaskUpdate:
        """Generate (or edit, when reference images are given) and return the final update."""
        fields = drop_none({
            "model": self.model_name, "prompt": req.prompt, "n": req.n, "size": req.size,
            "quality": req.quality, "background": req.background, "output_format": req.output_format,
            "output_compression": req.output_compression,
        })
        if req.images:
            files: list[tuple[str, tuple[str, bytes, str]]] = []
            for index, url in enumerate(req.images):
                data, content_type = await self.input_bytes(inputs, url)
                files.append(("image[]", (f"image{index}{_suffix(content_type)}", data, content_type)))
            if req.mask is not None:
                data, content_type = await self.input_bytes(inputs, req.mask)
                files.append(("mask", ("mask.png", data, content_type or "image/png")))
            # Multipart has no numbers: every field travels as text. `moderation` is not an
            # edits parameter, so it is left out rather than risk a 400.
            form = {key: str(value) for key, value in fields.items()}
            response = await self.send("POST", self.base_url + "/v1/images/edits", submit=True,
                                       headers=self._headers(), data=form, files=files)
        else:
            if req.moderation is not None:
                fields["moderation"] = req.moderation
            response = await self.send("POST", self.base_url + "/v1/images/generations", submit=True,
                                       headers=self._headers(), json_body=fields)
        with reading_submit_answer(self.name):
            body = as_dict(parse_json(response.content, status=response.status_code), "openai images response")
            fmt = as_str(body.get("output_format")) or req.output_format or "png"
            images = _images(body.get("data"), CONTENT_TYPES.get(fmt.lower(), "image/png"))
            ticket = task_id(response.headers.get("x-request-id"))   # OpenAI's request id, for the record
            return make_update(ProviderStatus.SUCCEEDED, provider_task_id=ticket, progress=100, images=images,
                               raw=_without_b64(body))

    async def fetch(self, provider_task_id: str) -> TaskUpdate:
        """Never needed: OpenAI answers at submit. Raises ProviderRejected so a stray poll fails loudly."""
        raise ProviderRejected("openai answers at submit; there is no task to poll", code="not_pollable")


def _images(items: Any, content_type: str) -> tuple[ProviderImage, ...]:
    found = []
    for item in as_list(items):
        if not isinstance(item, dict):
            continue
        b64 = item.get("b64_json")
        if isinstance(b64, str) and b64:
            found.append(ProviderImage(b64=b64, content_type=content_type))
        elif isinstance(item.get("url"), str) and item["url"].startswith(("https://", "http://")):
            # Only dall-e models answer with URLs, but a proxy in front may too.
            found.append(ProviderImage(url=item["url"], content_type=content_type))
    return tuple(found)


def _without_b64(body: dict[str, Any]) -> dict[str, Any]:
    # `raw` is stored with the task; megabytes of base64 belong in the image store, not there.
    data = [
        {**item, "b64_json": f"<{len(item['b64_json'])} base64 chars>"}
        if isinstance(item, dict) and isinstance(item.get("b64_json"), str) else item
        for item in as_list(body.get("data"))
    ]
    return {**body, "data": data} if "data" in body else body


def _suffix(content_type: str) -> str:
    for ext, ctype in CONTENT_TYPES.items():
        if ctype == (content_type or "").split(";")[0].strip().lower():
            return "." + ext
    return ""
