"""The public JSON shape of tasks and images (API.md). Pure; used by the API, events and the CLI."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from relay.clock import rfc3339
from relay.models import ImageRecord, Task

# Builds the public URL of an archived image (a signed link); None → no url (not archived, or no signer).
ImageUrl = Callable[[str], str]


def image_object(image: ImageRecord, image_url: ImageUrl | None = None) -> dict[str, Any]:
    archived = image.status == "archived"
    return {
        "id": image.id,
        "index": image.index,
        "status": image.status,
        "url": image_url(image.id) if (archived and image_url) else None,
        "sha256": image.sha256,
        "content_type": image.content_type,
        "width": image.width,
        "height": image.height,
        "bytes": image.bytes,
        "source_url": image.source_url,
        "source_expires_at": rfc3339(image.source_expires_at),
        "archived_at": rfc3339(image.archived_at),
        "error": image.error,
    }


def task_object(task: Task, image_url: ImageUrl | None = None) -> dict[str, Any]:
    """The task object of API.md."""
    return {
        "id": task.id,
        "object": "task",
        "provider": task.provider,
        "provider_task_id": task.provider_task_id,
        "status": task.status.value,
        "progress": task.progress,
        "request": task.request,
        "images": [image_object(img, image_url) for img in sorted(task.images, key=lambda i: i.index)],
        "error": task.error,
        "metadata": task.metadata,
        "webhook_url": task.webhook_url,
        "webhook_events": task.webhook_events,
        "sequence": task.sequence,
        "created_at": rfc3339(task.created_at),
        "updated_at": rfc3339(task.updated_at),
        "completed_at": rfc3339(task.completed_at),
    }


def with_image_urls(obj: dict[str, Any], image_url: ImageUrl) -> dict[str, Any]:
    """A stored task snapshot with fresh signed image URLs (links carry an expiry, so they are made at read time)."""
    images = []
    for image in obj.get("images") or []:
        image = dict(image)
        if image.get("status") == "archived":
            image["url"] = image_url(image["id"])
        images.append(image)
    return {**obj, "images": images}
