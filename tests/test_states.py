"""The task state machine: forward-only, idempotent, one event per transition."""

from __future__ import annotations

import pytest

from relay.models import ProviderImage, ProviderStatus, Task, TaskStatus, TaskUpdate
from relay.states import on_archived, on_cancel, on_failure, on_submitted, on_update


def task(status: TaskStatus = TaskStatus.PENDING, progress: int | None = None) -> Task:
    return Task(id="tsk_1", provider="evolink", request={"prompt": "x"}, status=status, progress=progress)


def upd(status: ProviderStatus, **kw: object) -> TaskUpdate:
    return TaskUpdate(status=status, **kw)  # type: ignore[arg-type]


IMG = (ProviderImage(url="https://cdn.example/a.png"),)


def test_each_provider_status_moves_forward_with_its_event() -> None:
    """queued, running, succeeded (→ archiving), failed and canceled each move a pending task with one event."""
    cases = {ProviderStatus.QUEUED: ("queued", "task.queued"), ProviderStatus.RUNNING: ("running", "task.running"),
             ProviderStatus.FAILED: ("failed", "task.failed"), ProviderStatus.CANCELED: ("canceled", "task.canceled")}
    for status, (state, event) in cases.items():
        t = on_update(task(), upd(status))
        assert t is not None and t.status.value == state and t.event == event
    t = on_update(task(), upd(ProviderStatus.SUCCEEDED, images=IMG))
    assert t is not None and t.status == TaskStatus.ARCHIVING and t.event == "task.generated" and t.images == IMG


def test_repeated_update_is_a_no_op() -> None:
    """The same status twice yields no second transition."""
    assert on_update(task(TaskStatus.RUNNING), upd(ProviderStatus.RUNNING)) is None
    assert on_update(task(TaskStatus.QUEUED), upd(ProviderStatus.QUEUED)) is None


@pytest.mark.parametrize("current", [TaskStatus.RUNNING, TaskStatus.ARCHIVING])
def test_stale_update_never_moves_back(current: TaskStatus) -> None:
    """A late 'queued' or 'running' after the task moved on changes nothing."""
    assert on_update(task(current), upd(ProviderStatus.QUEUED)) is None
    if current == TaskStatus.ARCHIVING:
        assert on_update(task(current), upd(ProviderStatus.RUNNING)) is None


@pytest.mark.parametrize("terminal", [TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELED])
def test_terminal_states_are_final(terminal: TaskStatus) -> None:
    """Nothing moves a terminal task: updates, failures, cancels, archive completions."""
    for status in ProviderStatus:
        assert on_update(task(terminal), upd(status, images=IMG)) is None
    assert on_failure(task(terminal), "x", "y") is None
    assert on_cancel(task(terminal)) is None
    assert on_archived(task(terminal), True) is None


def test_success_without_images_is_a_failure() -> None:
    """A provider 'done' with nothing to save fails the task with no_images."""
    t = on_update(task(TaskStatus.RUNNING), upd(ProviderStatus.SUCCEEDED))
    assert t is not None and t.status == TaskStatus.FAILED and t.error and t.error["code"] == "no_images"


def test_a_late_success_without_images_leaves_a_task_being_archived_alone() -> None:
    """A repeated or late 'done' that carries no images (a poll read before the callback that moved the task to
    archiving, a provider that fills its result links after its status) is stale: the images being archived are
    not failed by it."""
    assert on_update(task(TaskStatus.ARCHIVING), upd(ProviderStatus.SUCCEEDED)) is None


def test_progress_is_throttled_and_monotonic() -> None:
    """Small progress steps emit nothing; a big step emits task.progress; progress never decreases."""
    assert on_update(task(TaskStatus.RUNNING, 40), upd(ProviderStatus.RUNNING, progress=45)) is None
    t = on_update(task(TaskStatus.RUNNING, 40), upd(ProviderStatus.RUNNING, progress=60))
    assert t is not None and t.event == "task.progress" and t.progress == 60
    assert on_update(task(TaskStatus.RUNNING, 60), upd(ProviderStatus.RUNNING, progress=20)) is None


def test_archiving_completes_only_when_all_images_saved() -> None:
    """on_archived succeeds the task only when the last image is in."""
    assert on_archived(task(TaskStatus.ARCHIVING), False) is None
    t = on_archived(task(TaskStatus.ARCHIVING), True)
    assert t is not None and t.status == TaskStatus.SUCCEEDED and t.event == "task.succeeded"


def test_failure_carries_provider_error() -> None:
    """A provider failure keeps the provider's code and message."""
    t = on_update(task(TaskStatus.RUNNING), upd(ProviderStatus.FAILED, error_code="content_policy_violation",
                                                  error_message="blocked"))
    assert t is not None and t.error == {"code": "content_policy_violation", "message": "blocked"}


def test_submitted_records_provider_id() -> None:
    """The submit answer records the provider's task id."""
    t = on_submitted(task(), upd(ProviderStatus.QUEUED, provider_task_id="p-1"))
    assert t is not None and t.provider_task_id == "p-1" and t.status == TaskStatus.QUEUED
