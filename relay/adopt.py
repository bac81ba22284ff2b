"""Adopting a provider task submitted elsewhere: `POST /v1/tasks` with `provider` + `provider_task_id`.

relay never submits it: the task is created already naming the provider's task, with a poll job due now,
and from there it is any task: polled with its dialect's rules (callback providers too, since nobody gave
them relay's callback URL), its images archived, the usual events. Adopting the same provider task twice,
or one relay submitted itself, answers with that task (relay.store.archives.ArchiveCases.adopt_task).
"""

from __future__ import annotations

from typing import Any

from relay import ids
from relay.jobs.context import JobContext
from relay.models import Task
from relay.netguard import NetGuard, check_given_url
from relay.validation import parse_adopt_input

ADOPTED_REQUEST = {"adopted": True}     # the task's `request`: relay never saw the generation request


async def adopt(ctx: JobContext, guard: NetGuard, data: dict[str, Any], *, scope: str,
                idempotency_key: str | None) -> tuple[Task, bool]:
    """Validate and store the adopted task with its first poll (one transaction). Returns (task, created)."""
    from relay.service import idempotency_of

    parsed = parse_adopt_input(data, known_providers=list(ctx.providers))
    if parsed.webhook_url is not None:
        await check_given_url(guard, "webhook_url", parsed.webhook_url)
    now = ctx.clock.now()
    task = Task(id=ids.new_id("tsk", now), provider=parsed.provider, request=dict(ADOPTED_REQUEST),
                provider_task_id=parsed.provider_task_id, metadata=parsed.metadata, webhook_url=parsed.webhook_url,
                webhook_events=parsed.webhook_events, created_at=now, updated_at=now,
                deadline_at=now + ctx.settings.polling.task_timeout)
    return await ctx.store.adopt_task(task, [ctx.poll_job(task.id, 0.0)],
                                      idempotency=idempotency_of(scope, idempotency_key, data))
