"""The task state machine: pure functions, no I/O.

Given a task and a signal (a provider update, an archive completion, a failure
or a cancel), decide the next state and the events it emits. This is where
idempotency lives: a repeated or stale signal yields None, and the caller
writes nothing. States only move forward (pending < queued < running <
archiving < terminal); terminal states never change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from relay.costs import reported_usage
from relay.models import (
    Archive,
    ProviderImage,
    ProviderStatus,
    Task,
    TaskStatus,
    TaskUpdate,
)

# A progress report emits task.progress only when it moves at least this many points (throttling).
PROGRESS_STEP = 10

_PROVIDER_TO_TASK = {
    ProviderStatus.QUEUED: TaskStatus.QUEUED,
    ProviderStatus.RUNNING: TaskStatus.RUNNING,
    ProviderStatus.SUCCEEDED: TaskStatus.ARCHIVING,
    ProviderStatus.FAILED: TaskStatus.FAILED,
    ProviderStatus.CANCELED: TaskStatus.CANCELED,
}

EVENT_FOR_STATUS = {
    TaskStatus.QUEUED: "task.queued",
    TaskStatus.RUNNING: "task.running",
    TaskStatus.ARCHIVING: "task.generated",
    TaskStatus.SUCCEEDED: "task.succeeded",
    TaskStatus.FAILED: "task.failed",
    TaskStatus.CANCELED: "task.canceled",
}

EVENT_TYPES = ("task.queued", "task.running", "task.progress", "task.generated",
               "task.succeeded", "task.failed", "task.canceled")
# Archives (POST /v1/archives) emit only their outcome; every event type a subscription may name:
ARCHIVE_EVENT_TYPES = ("archive.succeeded", "archive.failed")
ALL_EVENT_TYPES = (*EVENT_TYPES, *ARCHIVE_EVENT_TYPES)
EVENT_WILDCARDS = ("task.*", "archive.*", "*")


@dataclass(frozen=True)
class Transition:
    """A decided change: the caller applies it, bumps `sequence`, and writes `event` in one transaction."""

    status: TaskStatus
    event: str
    progress: int | None = None
    provider_task_id: str | None = None
    error: dict[str, str] | None = None
    images: tuple[ProviderImage, ...] = field(default=())   # set when entering ARCHIVING
    estimated_seconds: float | None = None
    usage: dict[str, Any] | None = None   # the provider's usage/billing report riding on the update

    @property
    def status_changed(self) -> bool:
        return self.event != "task.progress"


def on_update(task: Task, update: TaskUpdate) -> Transition | None:
    """Apply a provider's update. None when it is stale, repeated, or the task is already terminal."""
    if task.status.terminal:
        return None
    target = _PROVIDER_TO_TASK[update.status]
    provider_task_id = task.provider_task_id or update.provider_task_id
    usage = reported_usage(update.raw)
    if target == TaskStatus.ARCHIVING and not update.images and target.rank > task.status.rank:
        # "Done" with nothing to save is a failure, not a success with zero images. Only as the task's move there:
        # a repeated or late "done" without its images (a task already archiving) is stale like any other.
        return Transition(TaskStatus.FAILED, "task.failed", provider_task_id=provider_task_id,
                          error={"code": "no_images", "message": "the provider reported success but returned no images"},
                          usage=usage)
    if target.rank > task.status.rank:
        error = None
        if target == TaskStatus.FAILED:
            error = {"code": update.error_code or "provider_failed",
                     "message": update.error_message or "the provider reported the task as failed"}
        progress = 100 if target == TaskStatus.ARCHIVING else _max_progress(task.progress, update.progress)
        return Transition(target, EVENT_FOR_STATUS[target], progress=progress,
                          provider_task_id=provider_task_id, error=error,
                          images=update.images if target == TaskStatus.ARCHIVING else (),
                          estimated_seconds=update.estimated_seconds, usage=usage)
    if target == task.status and target in (TaskStatus.QUEUED, TaskStatus.RUNNING):
        progress = update.progress
        if progress is not None and progress - (task.progress or 0) >= PROGRESS_STEP:
            return Transition(task.status, "task.progress", progress=progress, provider_task_id=provider_task_id,
                              estimated_seconds=update.estimated_seconds)
    return None


def on_submitted(task: Task, update: TaskUpdate) -> Transition | None:
    """The provider accepted the submit: the same rules as any update, the provider id riding along.

    On a pending task every accepted answer moves it (queued or further), so the id is recorded
    with that transition. A late answer for a task that already moved on (a callback overtook
    the submit answer) is stale like any other: None, no event. Such a task got its provider id
    from the update that moved it (every update that moves a task names it), so nothing is lost.
    """
    return on_update(task, update)


def on_archived(task: Task | Archive, all_images_archived: bool) -> Transition | None:
    """An image was saved; the task succeeds when every image is."""
    if task.status != TaskStatus.ARCHIVING or not all_images_archived:
        return None
    return Transition(TaskStatus.SUCCEEDED, "task.succeeded", progress=100)


def on_failure(task: Task | Archive, code: str, message: str) -> Transition | None:
    """relay itself fails the task (timeout, dead link, submit outcome unknown, …)."""
    if task.status.terminal:
        return None
    return Transition(TaskStatus.FAILED, "task.failed", error={"code": code, "message": message})


def on_cancel(task: Task) -> Transition | None:
    """The client canceled. None when already terminal (the API answers 409)."""
    if task.status.terminal:
        return None
    return Transition(TaskStatus.CANCELED, "task.canceled",
                      error=None)


def _max_progress(current: int | None, reported: int | None) -> int | None:
    if reported is None:
        return current
    if current is None:
        return reported
    return max(current, reported)
