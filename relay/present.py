"""The public JSON shape of tasks and images (API.md). Pure; used by the API, events and the CLI."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from relay.clock import rfc3339
from relay.models import Archive, ImageRecord, Task

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
        **routing_fields(task),
    }


def routing_fields(task: Task) -> dict[str, Any]:
    """Failover and cost (additive fields): the route, the providers in order, every provider tried with its
    outcome (the ones left behind, then the current one), what the provider reported and what it cost."""
    current: dict[str, Any] = {"provider": task.provider, "outcome": _outcome(task), "reason": None,
                               "at": rfc3339(task.submit_started_at or task.updated_at)}
    if task.provider_task_id is None and task.error is not None:
        current["reason"] = task.error.get("message")
    started = task.provider_task_id is not None or task.submit_started_at is not None or task.status.terminal
    attempts = [*task.attempts, *([current] if started else [])]
    return {
        "route": task.route,
        "providers": list(task.candidates or [task.provider]),
        "attempts": attempts,
        "providers_tried": list(dict.fromkeys(a["provider"] for a in attempts)),
        "usage": task.usage,
        "cost": task.cost,
    }


def _outcome(task: Task) -> str:
    """What the current provider made of the task: accepted, submitting (sent, no answer yet), failed, canceled."""
    if task.provider_task_id is not None:
        return "accepted"
    if task.status.terminal:
        return task.status.value
    return "submitting" if task.submit_started_at is not None else "pending"


def with_image_urls(obj: dict[str, Any], image_url: ImageUrl) -> dict[str, Any]:
    """A stored task snapshot with fresh signed image URLs (links carry an expiry, so they are made at read time)."""
    images = []
    for image in obj.get("images") or []:
        image = dict(image)
        if image.get("status") == "archived":
            image["url"] = image_url(image["id"])
        images.append(image)
    return {**obj, "images": images}


def archive_object(archive: Archive, image_url: ImageUrl | None = None) -> dict[str, Any]:
    """The archive object (POST /v1/archives): its link, when the link dies, and `images` as on tasks."""
    return {
        "id": archive.id,
        "object": "archive",
        "status": archive.status.value,
        "url": archive.source_url,
        "expires_at": rfc3339(archive.expires_at),
        "images": [image_object(img, image_url) for img in sorted(archive.images, key=lambda i: i.index)],
        "error": archive.error,
        "metadata": archive.metadata,
        "webhook_url": archive.webhook_url,
        "sequence": archive.sequence,
        "created_at": rfc3339(archive.created_at),
        "updated_at": rfc3339(archive.updated_at),
        "completed_at": rfc3339(archive.completed_at),
    }
