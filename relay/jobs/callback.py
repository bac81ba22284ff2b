"""The callback job: turn a recorded provider callback into at most one state change.

Callbacks are unsigned, so by default the reported state is confirmed with the
provider's status endpoint first: a body whose status the provider does not
confirm changes nothing (it is recorded as `ignored`), and what is applied is
the provider's own answer. With `callbacks.trust_body` the body is applied as
is. Duplicates and out-of-order callbacks are harmless: the state machine turns
a repeated or stale update into a no-op.
"""

from __future__ import annotations

import logging
from typing import Any

from relay import ids, metrics
from relay.errors import ProviderProtocolError, ProviderRejected
from relay.jobs.context import JobContext
from relay.models import Job, ProviderStatus, TaskStatus
from relay.states import on_update

log = logging.getLogger("relay.jobs.callback")


_RANK = {ProviderStatus.QUEUED: 0, ProviderStatus.RUNNING: 1}


def _progress_rank(status: ProviderStatus) -> int:
    """How far a provider status is along the task's life; every terminal status ranks last."""
    return _RANK.get(status, 2)


# The kind of the job that carries a callback's body. Not "callback", the kind of the jobs that only name an
# inbox row written at receipt (relay before one row per callback): a worker of that relay, still running
# during a rolling upgrade, claims "callback" jobs and would find no inbox row for these; it never claims
# a kind it has no handler for. This relay handles both kinds.
CALLBACK_JOB = "callback_body"
LEGACY_CALLBACK_JOB = "callback"


def callback_job(provider: str, task_id: str, body: str, now: float) -> Job:
    """The job that carries one received callback: its raw body, who sent it and when (relay.jobs.callback)."""
    inbox_id = ids.new_id("cbk", now)
    return Job(id=ids.new_id("job", now), kind=CALLBACK_JOB, task_id=task_id,
               payload={"inbox_id": inbox_id, "provider": provider, "received_at": now, "body": body}, run_at=now)



class CallbackHandler:
    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx

    async def _callback_of(self, job: Job) -> dict[str, Any] | None:
        """The callback the job carries (id, provider, task_id, body, received_at), None if settled already.

        A job queued by an earlier relay carries only the id of an inbox row written at receipt."""
        p = job.payload
        if "body" in p:
            if job.attempts > 1:
                # Run before (a crash between settling and finishing, a lease that ran out): settled already?
                settled = await self.ctx.store.get_callback(str(p["inbox_id"]))
                if settled is not None and settled["status"] != "received":
                    return None
            return {"id": str(p["inbox_id"]), "provider": str(p["provider"]), "task_id": job.task_id,
                    "body": str(p["body"]), "received_at": float(p["received_at"])}
        row = await self.ctx.store.get_callback(str(p.get("inbox_id")))
        return row if row is not None and row["status"] == "received" else None

    async def run(self, job: Job) -> None:
        ctx = self.ctx
        row = await self._callback_of(job)
        if row is None:
            return None
        inbox_id = row["id"]
        task = await ctx.store.get_task(row["task_id"])
        if task is None:
            await self._settle(row, "rejected", "unknown task")
            return None
        if row["provider"] != task.provider:
            # The task failed over (relay.routing) from a provider that refused it: nothing of it is ours now.
            await self._settle(row, "rejected", f"the task is at provider {task.provider!r} now")
            return None
        provider = ctx.provider(row["provider"])
        try:
            reported = provider.parse_callback(row["body"].encode())
        except ProviderProtocolError as exc:
            await self._settle(row, "rejected", f"unreadable body: {exc}")
            return None
        if reported.provider_task_id and task.provider_task_id and reported.provider_task_id != task.provider_task_id:
            await self._settle(row, "rejected", "the body names another provider task")
            return None
        if task.status.terminal or task.status == TaskStatus.ARCHIVING:
            await self._settle(row, "ignored", f"task already {task.status.value}", outcome="duplicate")
            return None
        update = reported
        if not ctx.settings.callbacks.trust_body:
            ticket = task.provider_task_id or reported.provider_task_id
            if not ticket:
                await self._settle(row, "rejected", "no provider task id to confirm")
                return None
            await ctx.throttle(task.provider)
            try:
                update = await provider.fetch(ticket)    # ProviderUnavailable → the worker retries
            except ProviderRejected as exc:
                await self._settle(row, "ignored", f"provider refused the confirmation: {exc}")
                return None
            if _progress_rank(update.status) < _progress_rank(reported.status):
                # The provider does not (yet) confirm what the body claims: a forged or premature body.
                # Nothing is applied; the safety-net poll still watches the task.
                await self._settle(row, "ignored", f"provider reports {update.status.value}, "
                                   f"callback said {reported.status.value}")
                return None
            # The provider is as far as the callback says or further (a late "processing" for a task
            # that already finished): its own answer is the truth and is applied now.
        applied = await ctx.store.apply(task.id, lambda t: on_update(t, update), ctx.clock.now(),
                                        default_expiry=provider.caps.default_expiry)
        note = f"applied {applied.transition.event}" if applied else "no change (repeated or stale)"
        await self._settle(row, "applied" if applied else "ignored", note,
                           outcome="applied" if applied else "duplicate")
        if applied is None and update.status in (ProviderStatus.SUCCEEDED, ProviderStatus.FAILED):
            log.debug("callback %s for %s changed nothing", inbox_id, task.id)
        return None

    async def _settle(self, row: dict[str, Any], status: str, note: str, *, outcome: str | None = None) -> None:
        """Record what processing made of the callback and count it (`outcome`: `status` unless more precise)."""
        await self.ctx.store.settle_callback(row, status, note, self.ctx.clock.now())
        metrics.CALLBACKS_PROCESSED.labels(row["provider"], outcome or status).inc()

    async def give_up(self, job: Job, reason: str) -> None:
        # The safety-net poll still watches the task; only this callback's confirmation is abandoned.
        row = await self._callback_of(job)
        if row is not None:
            await self.ctx.store.settle_callback(row, "rejected", f"could not be confirmed: {reason}",
                                                 self.ctx.clock.now())
