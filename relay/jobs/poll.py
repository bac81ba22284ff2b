"""The poll job: ask the provider where a task stands, apply it, and plan the next poll.

One poll job per task (dedupe key `poll:{task id}`) re-runs itself with
backoff until the task is terminal or archiving. Past the task's deadline it
fails the task as `timeout`. Also the safety net for callback providers.
"""

from __future__ import annotations

from collections.abc import Callable

from relay.errors import ProviderRejected
from relay.jobs.context import JobContext
from relay.models import Job, ProviderStatus, Task, TaskStatus
from relay.queue import Again
from relay.states import Transition, on_failure, on_update


def _fail_while_watching(code: str, message: str) -> Callable[[Task], Transition | None]:
    """A failure found by polling, decided inside the write transaction on the task as it is then:
    if a callback (or another poll) has meanwhile learned the provider finished, the task is being
    archived and polling has nothing left to fail."""
    def decide(task: Task) -> Transition | None:
        if task.status == TaskStatus.ARCHIVING:
            return None
        return on_failure(task, code, message)
    return decide


class PollHandler:
    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx

    async def run(self, job: Job) -> Again | None:
        ctx = self.ctx
        task = await ctx.store.get_task(job.task_id or "", images=False)     # watching needs no images
        if task is None or task.status.terminal or task.status == TaskStatus.ARCHIVING:
            return None
        if not task.provider_task_id:
            return None     # not submitted yet: the submit job schedules the first poll
        now = ctx.clock.now()
        if task.deadline_at is not None and now >= task.deadline_at:
            await ctx.store.apply(task.id, _fail_while_watching(
                "timeout", "the provider did not finish the task before the deadline"), now)
            return None
        provider = ctx.provider(task.provider)
        await ctx.throttle(task.provider)
        try:
            update = await provider.fetch(task.provider_task_id)
        except ProviderRejected as exc:
            await ctx.store.apply(task.id, _fail_while_watching(exc.code, exc.message), ctx.clock.now())
            return None
        await ctx.store.apply(task.id, lambda t: on_update(t, update), ctx.clock.now(),
                              default_expiry=provider.caps.default_expiry, seen=task)
        if update.status in (ProviderStatus.SUCCEEDED, ProviderStatus.FAILED, ProviderStatus.CANCELED):
            return None
        polls = int(job.payload.get("polls", 0)) + 1
        delay = ctx.next_poll_delay(polls)
        if update.estimated_seconds and polls == 1:
            delay = max(delay, min(update.estimated_seconds, ctx.settings.polling.max_delay))
        if task.deadline_at is not None:
            delay = min(delay, max(0.0, task.deadline_at - ctx.clock.now()))
        return Again(after=delay, payload={"polls": polls})

    async def give_up(self, job: Job, reason: str) -> None:
        await self.ctx.store.apply(job.task_id or "", _fail_while_watching(
            "provider_unavailable", f"the provider could not be polled: {reason}"), self.ctx.clock.now())
