"""Rows to models and back: the one place column names meet dataclass fields (every backend shares it).

Rows are anything indexable by column name (sqlite3.Row, asyncpg.Record). Times are unix seconds,
JSON columns hold text, booleans are 0/1 integers: the same on every backend.
"""

from __future__ import annotations

from typing import Any

from relay import jsontext
from relay.deliveries.models import Attempt, Delivery, Subscription
from relay.models import ImageRecord, Job, Task, TaskStatus


def dumps(value: Any) -> str | None:
    """A JSON column's text (relay.jsontext); None stays NULL."""
    return None if value is None else jsontext.dumps(value)


def loads(value: str | None) -> Any:
    return None if value is None else jsontext.loads(value)


def task_from_row(row: Any) -> Task:
    return Task(
        id=row["id"], provider=row["provider"], request=loads(row["request"]),
        status=TaskStatus(row["status"]), provider_task_id=row["provider_task_id"], progress=row["progress"],
        error=loads(row["error"]), metadata=loads(row["metadata"]), webhook_url=row["webhook_url"],
        webhook_events=loads(row["webhook_events"]), sequence=row["sequence"], created_at=row["created_at"],
        updated_at=row["updated_at"], completed_at=row["completed_at"], deadline_at=row["deadline_at"],
        submit_started_at=row["submit_started_at"], candidates=loads(row["candidates"]), route=row["route"],
        attempts=loads(row["attempts"]) or [], usage=loads(row["usage"]), cost=loads(row["cost"]))


def task_row(task: Task) -> tuple[Any, ...]:
    """The values of INSERT_TASK, in its column order."""
    return (task.id, task.provider, task.provider_task_id, task.status.value, task.progress, dumps(task.request),
            dumps(task.error), dumps(task.metadata), task.webhook_url, dumps(task.webhook_events), task.sequence,
            task.created_at, task.updated_at, task.completed_at, task.deadline_at, task.submit_started_at)


def image_from_row(row: Any, prefix: str = "") -> ImageRecord:
    """`prefix`: the image's columns are named so in the row (queries.with_images: image_)."""
    return ImageRecord(
        id=row[prefix + "id"], task_id=row[prefix + "task_id"], index=row[prefix + "idx"],
        source_url=row[prefix + "source_url"], source_expires_at=row[prefix + "source_expires_at"],
        status=row[prefix + "status"], sha256=row[prefix + "sha256"], content_type=row[prefix + "content_type"],
        width=row[prefix + "width"], height=row[prefix + "height"], bytes=row[prefix + "bytes"],
        path=row[prefix + "path"], archived_at=row[prefix + "archived_at"], error=row[prefix + "error"])


def job_from_row(row: Any) -> Job:
    return Job(id=row["id"], kind=row["kind"], task_id=row["task_id"], payload=loads(row["payload"]) or {},
               run_at=row["run_at"], dedupe_key=row["dedupe_key"], attempts=row["attempts"],
               max_attempts=row["max_attempts"], lease_token=row["lease_token"], last_error=row["last_error"])


def job_row(job: Job) -> tuple[Any, ...]:
    """The values of INSERT_JOB, in its column order."""
    return (job.id, job.kind, job.task_id, dumps(job.payload), float(job.run_at), job.dedupe_key, job.attempts,
            job.max_attempts, float(job.run_at))


SUBSCRIPTION_COLUMNS = ("id", "url", "events", "description", "enabled", "disabled_reason", "signing", "keyring",
                        "public_key", "previous_public_key", "previous_expires_at", "failing_since", "created_at",
                        "updated_at")


def subscription_from_row(row: Any) -> Subscription:
    return Subscription(
        id=row["id"], url=row["url"], events=jsontext.loads(row["events"]), description=row["description"],
        enabled=bool(row["enabled"]), disabled_reason=row["disabled_reason"], signing=row["signing"],
        keyring=row["keyring"], public_key=row["public_key"], previous_public_key=row["previous_public_key"],
        previous_expires_at=row["previous_expires_at"], failing_since=row["failing_since"],
        created_at=row["created_at"], updated_at=row["updated_at"])


def subscription_row(sub: Subscription) -> tuple[Any, ...]:
    """The values of INSERT_SUBSCRIPTION, in SUBSCRIPTION_COLUMNS order."""
    return (sub.id, sub.url, jsontext.dumps(sub.events), sub.description, int(sub.enabled), sub.disabled_reason,
            sub.signing, sub.keyring, sub.public_key, sub.previous_public_key, sub.previous_expires_at,
            sub.failing_since, sub.created_at, sub.updated_at)


def delivery_from_row(row: Any) -> Delivery:
    return Delivery(
        id=row["id"], event_id=row["event_id"], event_type=row["event_type"], task_id=row["task_id"],
        subscription_id=row["subscription_id"], url=row["url"], status=row["status"], attempts=row["attempts"],
        round_attempts=row["round_attempts"], round_origin=row["round_origin"], next_attempt_at=row["next_attempt_at"],
        last_attempt_at=row["last_attempt_at"], last_status_code=row["last_status_code"],
        last_error=row["last_error"], created_at=row["created_at"], updated_at=row["updated_at"],
        completed_at=row["completed_at"])


def attempt_from_row(row: Any) -> Attempt:
    return Attempt(id=row["id"], delivery_id=row["delivery_id"], number=row["number"], at=row["at"], url=row["url"],
                   origin=row["origin"], status_code=row["status_code"], latency_ms=row["latency_ms"],
                   response=row["response"], error=row["error"], subscription_id=row["subscription_id"])


def attempt_row(attempt: Attempt) -> tuple[Any, ...]:
    """The values of INSERT_ATTEMPT, in its column order."""
    return (attempt.delivery_id, attempt.number, attempt.at, attempt.url, attempt.origin, attempt.status_code,
            attempt.latency_ms, attempt.response, attempt.error, attempt.subscription_id)
