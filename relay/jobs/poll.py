"""The poll job: ask the provider where a task stands, apply it, and plan the next poll.

One poll job per task (dedupe key `poll:{task id}`) re-runs itself with
backoff until the task is terminal or archiving. Also the safety net for callback providers.

A poll the provider does not answer (429, 5xx, a timeout, junk) is asked again with backoff or its Retry-After
until the task's deadline, not for the worker's few attempts: chaos found a task the provider had finished
failed as provider_unavailable after ten one-shot faults in a row (429s asking for 0.5 s each among them), long
before its deadline. Past the deadline the task fails as `timeout`, or as `provider_unavailable` with the last
error when the provider had stopped answering (no answer for a whole max_delay of polling).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from relay import metrics
from relay.errors import ProviderRejected, ProviderUnavailable
from relay.jobs.context import JobContext
from relay.models import Job, ProviderStatus, Task, TaskStatus
from relay.queue import Again
from relay.states import Transition, on_failure, on_update

log = logging.getLogger("relay.jobs.poll")


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
        # At the deadline the provider is asked once more: a task it finished since the last poll (up to
        # polling.max_delay ago) is archived, not failed as a timeout.
        past_deadline = task.deadline_at is not None and now >= task.deadline_at
        provider = ctx.provider(task.provider)
        await ctx.throttle(task.provider)
        try:
            update = await provider.fetch(task.provider_task_id)
        except ProviderRejected as exc:
            await ctx.store.apply(task.id, _fail_while_watching(exc.code, exc.message), ctx.clock.now())
            return None
        except ProviderUnavailable as exc:
            metrics.labeled(metrics.PROVIDER_UNANSWERED, task.provider, "poll", exc.code).inc()
            if past_deadline:
                failed = {"last_error": f"{exc.code}: {exc}"[:500],
                          "failing_since": float(job.payload.get("failing_since", now))}
                await ctx.store.apply(task.id, _fail_while_watching(
                    *self._past_deadline(replace(job, payload={**job.payload, **failed}), now)), now)
                return None
            if task.deadline_at is None:    # a row from before deadlines: the worker's attempts bound it
                raise
            return self._again_later(job, task, exc)
        await ctx.store.apply(task.id, lambda t: on_update(t, update), ctx.clock.now(),
                              default_expiry=provider.caps.default_expiry, seen=task)
        if update.status in (ProviderStatus.SUCCEEDED, ProviderStatus.FAILED, ProviderStatus.CANCELED):
            return None
        if past_deadline:
            await ctx.store.apply(task.id, _fail_while_watching(*self._past_deadline(job, now)), now)
            return None
        polls = int(job.payload.get("polls", 0)) + 1
        delay = ctx.next_poll_delay(polls)
        if update.estimated_seconds and polls == 1:
            delay = max(delay, min(update.estimated_seconds, ctx.settings.polling.max_delay))
        return Again(after=ctx.before_deadline(task, delay), payload={"polls": polls})

    def _again_later(self, job: Job, task: Task, exc: ProviderUnavailable) -> Again:
        """Poll again after the provider's Retry-After or backoff by the failures in a row (a planned re-run: the
        worker's attempts are left for errors of relay's own), never past the task's deadline."""
        now = self.ctx.clock.now()
        failures = int(job.payload.get("failures", 0)) + 1
        delay = self.ctx.before_deadline(task, self.ctx.unavailable_delay(failures, exc))
        log.info("task %s: poll of %s not answered (%s: %s); again in %.1fs", task.id, task.provider, exc.code,
                 exc, delay)
        return Again(delay, payload={**job.payload, "failures": failures, "last_error": f"{exc.code}: {exc}"[:500],
                                     "failing_since": float(job.payload.get("failing_since", now))})

    def _past_deadline(self, job: Job, now: float) -> tuple[str, str]:
        """Why the task fails at its deadline: the provider never finished it (timeout), or stopped answering
        (provider_unavailable, with the last error: no answer for at least a whole max_delay of polling; a
        single failed poll just before the deadline does not make a slow task an unavailable provider)."""
        last_error = job.payload.get("last_error")
        failing_since = job.payload.get("failing_since")
        if last_error and failing_since is not None and now - float(failing_since) >= (
                self.ctx.settings.polling.max_delay):
            return "provider_unavailable", f"the provider could not be polled before the task's deadline: {last_error}"
        message = "the provider did not finish the task before the deadline"
        return "timeout", f"{message}; the last poll failed: {last_error}" if last_error else message

    async def give_up(self, job: Job, reason: str) -> None:
        await self.ctx.store.apply(job.task_id or "", _fail_while_watching(
            "provider_unavailable", f"the provider could not be polled: {reason}"), self.ctx.clock.now())
