"""Task use cases behind the HTTP API: create (validated, idempotent), read, list, cancel."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from relay import ids, routing
from relay.errors import Conflict, NotFound
from relay.jobs.context import JobContext
from relay.models import Job, Task
from relay.netguard import NetGuard, check_given_url
from relay.providers.base import check_supported
from relay.states import on_cancel
from relay.validation import is_adoption, parse_task_input

log = logging.getLogger("relay.service")


def idempotency_of(scope: str, key: str | None, data: dict[str, Any]) -> tuple[str, str, str] | None:
    """(scope, Idempotency-Key, body hash) for the store, or None without a key. Same body = same JSON value:
    key order and whitespace do not matter. Every create taking the header uses it (tasks, adoptions, archives)."""
    if key is None:
        return None
    canonical = hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return scope, key, canonical


class TaskService:
    def __init__(self, ctx: JobContext, guard: NetGuard) -> None:
        self.ctx = ctx
        self.guard = guard

    async def create(self, data: dict[str, Any], *, scope: str, idempotency_key: str | None,
                     same_as: dict[str, Any] | None = None) -> tuple[Task, bool]:
        """Validate and store a task with its submit job (one transaction). Returns (task, created).

        `same_as`: what an Idempotency-Key compares instead of `data`, where `data` holds parts that differ
        between two sends of one request (the OpenAI edits endpoint's signed upload links)."""
        if is_adoption(data):     # provider + provider_task_id: track a task submitted elsewhere (relay.adopt)
            from relay.adopt import adopt
            return await adopt(self.ctx, self.guard, data, scope=scope, idempotency_key=idempotency_key)
        ctx = self.ctx
        # A list of providers or a route (relay.routing); a plain provider name takes the path of old.
        choice = routing.choose(data.get("provider"), ctx.settings)
        parsed = parse_task_input(data if choice is None else {**data, "provider": choice.names[0]},
                                  known_providers=list(ctx.providers))
        if choice is None:
            provider = ctx.providers[parsed.provider]
            check_supported(provider.caps, parsed.request, parsed.provider)
        chain = routing.plan(choice, parsed.request, ctx.providers, ctx.settings.prices) if choice else None
        # Refused now, with a reason, rather than as a failed task or a dead letter later; each connection is
        # checked again on the address it really opens (DNS may change in between).
        outbound: list[tuple[str, str | None]] = [("images", url) for url in parsed.request.images]
        outbound += [("mask", parsed.request.mask), ("webhook_url", parsed.webhook_url)]
        for field, url in outbound:
            if url is not None:
                await check_given_url(self.guard, field, url)
        now = ctx.clock.now()
        task = Task(id=ids.new_id("tsk", now), provider=chain[0] if chain else parsed.provider,
                    request=parsed.request.to_dict(),
                    metadata=parsed.metadata, webhook_url=parsed.webhook_url, webhook_events=parsed.webhook_events,
                    created_at=now, updated_at=now, deadline_at=now + ctx.settings.polling.task_timeout,
                    candidates=list(chain) if chain else None, route=choice.route if choice else None)
        submit = Job(id=ids.new_id("job", now), kind="submit", task_id=task.id, run_at=now,
                     dedupe_key=f"submit:{task.id}")
        idempotency = idempotency_of(scope, idempotency_key, data if same_as is None else same_as)
        return await ctx.store.create_task(task, [submit], idempotency=idempotency)

    async def get(self, task_id: str) -> Task:
        task = await self.ctx.store.get_task(task_id)
        if task is None:
            raise NotFound(f"no task {task_id!r}")
        return task

    async def cancel(self, task_id: str) -> Task:
        """Mark canceled (409 when already terminal), then ask the provider to cancel, best effort."""
        ctx = self.ctx
        task = await self.get(task_id)
        applied = await ctx.store.apply(task_id, on_cancel, ctx.clock.now())
        if applied is None:
            raise Conflict(f"task {task_id} is already {task.status.value}")
        provider = ctx.providers.get(task.provider)
        if provider is not None and applied.task.provider_task_id:
            await provider.cancel_quietly(applied.task.provider_task_id)
        return applied.task
