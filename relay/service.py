"""Task use cases behind the HTTP API: create (validated, idempotent), read, list, cancel."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from typing import Any

from relay import ids
from relay.errors import BlockedAddress, Conflict, InvalidRequest, NotFound
from relay.jobs.context import JobContext
from relay.models import Job, Task
from relay.netguard import NetGuard
from relay.providers.base import check_supported
from relay.states import on_cancel
from relay.validation import parse_task_input

log = logging.getLogger("relay.service")


class TaskService:
    def __init__(self, ctx: JobContext, guard: NetGuard) -> None:
        self.ctx = ctx
        self.guard = guard

    async def create(self, data: dict[str, Any], *, scope: str, idempotency_key: str | None) -> tuple[Task, bool]:
        """Validate and store a task with its submit job (one transaction). Returns (task, created)."""
        ctx = self.ctx
        parsed = parse_task_input(data, known_providers=list(ctx.providers))
        provider = ctx.providers[parsed.provider]
        check_supported(provider.caps, parsed.request, parsed.provider)
        # Refused now, with a reason, rather than as a failed task or a dead letter later; each connection is
        # checked again on the address it really opens (DNS may change in between).
        outbound: list[tuple[str, str | None]] = [("images", url) for url in parsed.request.images]
        outbound += [("mask", parsed.request.mask), ("webhook_url", parsed.webhook_url)]
        for field, url in outbound:
            if url is not None:
                await self._check_outbound(field, url)
        now = ctx.clock.now()
        task = Task(id=ids.new_id("tsk", now), provider=parsed.provider, request=parsed.request.to_dict(),
                    metadata=parsed.metadata, webhook_url=parsed.webhook_url, webhook_events=parsed.webhook_events,
                    created_at=now, updated_at=now, deadline_at=now + ctx.settings.polling.task_timeout)
        submit = Job(id=ids.new_id("job", now), kind="submit", task_id=task.id, run_at=now,
                     dedupe_key=f"submit:{task.id}")
        idempotency = None
        if idempotency_key is not None:
            # Same body = same JSON value: key order and whitespace do not matter.
            canonical = hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
            idempotency = (scope, idempotency_key, canonical)
        return await ctx.store.create_task(task, [submit], idempotency=idempotency)

    async def _check_outbound(self, field: str, url: str) -> None:
        try:
            await self.guard.check_url(url)
        except BlockedAddress as exc:
            raise InvalidRequest(f"{field} is refused: {exc}", field=field) from None

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
        if provider is not None and provider.caps.cancel and applied.task.provider_task_id:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(10):
                    await provider.cancel(applied.task.provider_task_id)
        return applied.task
