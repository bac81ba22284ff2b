"""The submit job: send a task to its provider exactly once, or fail it with a clear reason.

Double billing is the failure to avoid. Before sending, the task is marked
`submit_started_at` (committed). If a submit job finds that mark already set
with no provider id, an earlier attempt may have reached the provider (a
crash or a timeout after sending): it is not resent, unless the provider
dedupes submits by our Idempotency-Key (the task id), and the task fails as
`submit_outcome_unknown`. A submit the provider certainly did not accept
(connection refused, 429, 5xx) clears the mark and is retried.

A task with several providers (relay.routing) moves to the next one only when the current one certainly
did not accept it: refused (not for content policy), 5xx, no connection, 429 beyond the configured
patience, or its circuit open (relay.circuit). The move is one store transaction that also clears the
mark; an outcome unknown never moves on. The last provider is retried as a single provider always was.

Reference images that the dialect uploads itself (GMI, OpenAI) are downloaded
before the mark: an unreachable image host is retried with backoff and then
fails the task as `reference_unavailable` naming the URL, never as a submit
whose outcome is unknown.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

from relay import metrics, routing
from relay.clock import rfc3339
from relay.errors import (
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
    RateLimited,
    ReferenceUnavailable,
    SubmitOutcomeUnknown,
)
from relay.jobs.context import JobContext
from relay.models import GenerationRequest, Job, ProviderStatus, Task, TaskUpdate
from relay.outage import backoff, describe, is_unavailable
from relay.providers.base import Provider
from relay.queue import Again
from relay.states import Transition, on_failure, on_submitted

log = logging.getLogger("relay.jobs.submit")

IN_FLIGHT_RECHECK_SECONDS = 1.0     # the first look again at a provider that had no room, doubling …
IN_FLIGHT_RECHECK_MAX = 8.0         # … up to this
UNKNOWN_MESSAGE = ("the submit request reached the provider but no answer came back (timeout or crash); "
                   "it was not resent, to avoid a second charge")


class SubmitHandler:
    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx

    async def run(self, job: Job) -> Again | None:
        ctx = self.ctx
        task = await ctx.store.get_task(job.task_id or "", images=False)     # a task not submitted has none
        if task is None or task.status.terminal or task.provider_task_id:
            return None
        provider = ctx.provider(task.provider)
        if task.submit_started_at is not None and not provider.caps.idempotent_submit:
            return await self._outcome_unknown(task, provider, task.submit_started_at)
        limit = ctx.settings.providers[task.provider].max_in_flight
        # A submit that may already have been accepted (sent and unanswered, or a crash mid-send: the mark is
        # still set) pins the task to its provider: moving on, or skipping it for its circuit, could have two
        # providers make (and bill) it. Only a resend to the same provider with the same key, or the
        # outcome-unknown failure, is safe from here.
        uncertain = task.submit_started_at is not None
        if not uncertain and task.deadline_at is not None and ctx.clock.now() >= task.deadline_at:
            # Never sent and past its deadline: not sent now (it would be billed, and failed at its first poll).
            # One that waited behind an outage ends with the provider's last reason. (An unanswered send to a
            # provider that dedupes is sent again with the same key: that costs nothing if the first was accepted,
            # and tells its task, whose images may be made already.)
            last_error = job.payload.get("last_error")
            if last_error:      # the provider did not accept it, time after time (_again_later)
                await self._fail(task.id, "provider_unavailable",
                                 f"could not submit to the provider before the task's deadline: {last_error}")
            elif job.payload.get("full"):
                await self._fail(task.id, "timeout", self._deadline_passed(task, "its provider had no room for it "
                                                                                 "(max_in_flight)"))
            else:
                await self._fail(task.id, "timeout", "the task's deadline passed before it could be sent to the "
                                 "provider; it was not sent")
            return None
        following = None if uncertain else routing.next_provider(task)
        cooldown = ctx.settings.failover.breaker_cooldown
        if job.payload.get("full"):
            # A backlog's look again: a provider whose circuit opened meanwhile is left for the next (a read; the
            # probe of a cooled-down circuit is taken only by a submit about to be sent, below), then room.
            if following is not None and await ctx.store.circuit_shut(task.provider, ctx.clock.now()):
                return await self._fail_over(task, following, "skipped",
                                             f"{task.provider}'s circuit is open after repeated failures", mark=None)
            # A look before anything costs: a backlog's re-checks download no reference image and spend none of the
            # provider's rate (every waiting task once a second did, starving the polls of running ones). A first
            # run goes straight on: its reservation counts anyway.
            if not await ctx.store.provider_has_room(task.id, task.provider, limit):
                return await self._wait_for_room(job, task)
        request = GenerationRequest.from_dict(task.request)
        try:
            # Before the mark, like the throttle: a dead image host has then certainly sent nothing anywhere.
            # A transient failure (ReferenceUnavailable, an ArchiveError) goes to the worker's backoff.
            inputs = await provider.fetch_inputs(request)
        except ReferenceUnavailable as exc:
            if not exc.permanent:
                raise
            await self._fail(task.id, exc.code, exc.message)
            return None
        if following is not None and not await ctx.store.circuit_admit(task.provider, ctx.clock.now(), cooldown):
            return await self._fail_over(task, following, "skipped",
                                         f"{task.provider}'s circuit is open after repeated failures", mark=None)
        await ctx.throttle(task.provider)     # before the mark: a crash while waiting sent nothing
        marked_at = ctx.clock.now()           # this run's mark: what it may clear or fail over from
        reservation = await ctx.store.reserve_submit(task.id, task.provider, limit, marked_at,
                                                     seen=task.submit_started_at)
        if reservation == "full":
            return await self._wait_for_room(job, task)
        if reservation == "taken":
            # The task is no longer as this run read it: another run of this job (one of the two stalled past its
            # lease) marked or made the submit, or the provider's task arrived, or the task ended. Sending now
            # could bill twice. Look again once the other run's send has had its whole timeout to be answered and
            # recorded: read sooner, its mark would look like a crash mid-send and fail the task as outcome
            # unknown while that send may still succeed. A run that lost its lease has its outcome refused.
            log.warning("task %s changed while its submit was prepared (a lease that ran out?); not sent", task.id)
            return Again(ctx.settings.providers[task.provider].timeout)
        callback_url = (ctx.callback_url(task.provider, task.id)
                        if provider.caps.callbacks and ctx.callbacks_enabled else None)
        try:
            update = await provider.submit(request, callback_url=callback_url, idempotency_key=task.id,
                                           inputs=inputs)
        except SubmitOutcomeUnknown as exc:
            await self._circuit_failed(task.provider, exc)
            if provider.caps.idempotent_submit:     # resending with the same key is safe
                unanswered = ProviderUnavailable(str(exc))
                return await self._again_later(job, task, unanswered, self._delay(job, task, unanswered))
            started = task.submit_started_at if task.submit_started_at is not None else ctx.clock.now()
            return await self._outcome_unknown(task, provider, started)
        except ProviderRejected as exc:
            await self._circuit_failed(task.provider, exc)
            if following is not None and (outcome := self._moves_on(job, exc)) is not None:
                return await self._fail_over(task, following, outcome, exc.message, mark=marked_at)
            await self._fail(task.id, exc.code, exc.message)
            return None
        except ProviderUnavailable as exc:
            metrics.labeled(metrics.PROVIDER_UNANSWERED, task.provider, "submit", exc.code).inc()
            await self._circuit_failed(task.provider, exc)
            if not uncertain:       # this send certainly was not accepted; an earlier unanswered one may have been
                await ctx.store.clear_submit_started(task.id, marked_at)
            delay = self._delay(job, task, exc)      # once: the failover's patience counts the wait it plans
            if following is not None and (outcome := self._moves_on(job, exc, delay)) is not None:
                return await self._fail_over(task, following, outcome, f"{exc.code}: {exc.message}", mark=None)
            return await self._again_later(job, task, exc, delay)
        jobs = []
        if update.status not in (ProviderStatus.SUCCEEDED, ProviderStatus.FAILED, ProviderStatus.CANCELED):
            if provider.caps.callbacks and callback_url:
                # The callback should come; the poll is the safety net if it never does.
                delay = ctx.safety_net_delay(update.estimated_seconds)
            else:
                delay = ctx.first_poll_delay(task.provider, update.estimated_seconds)
            jobs.append(ctx.poll_job(task.id, delay))
        await self._record_accepted(task, update, provider, jobs)
        try:
            await ctx.store.circuit_succeeded(task.provider, ctx.clock.now())
        except Exception as exc:        # the task is recorded; the circuit learns from the next submit
            log.warning("task %s: the provider's success could not be counted (%s)", task.id, exc)
        return None

    async def _record_accepted(self, task: Task, update: TaskUpdate, provider: Provider, jobs: list[Job]) -> None:
        """Record what the provider answered to an accepted submit (its task id, or an OpenAI answer's images).

        The answer exists only in this run's memory: a run again after a failure here would find the mark with no
        provider task and fail the task as submit_outcome_unknown (or resend it). So a store that cannot be used
        now (relay.outage.is_unavailable: locked, full, a lost connection) is waited out here, with backoff, for
        up to half the job's lease (a store down longer cannot extend the lease either, and another run would
        take the job over); any other error goes to the worker as before."""
        ctx = self.ctx
        deadline = time.monotonic() + ctx.settings.worker.lease_seconds / 2
        for attempt in itertools.count(1):
            try:
                applied = await ctx.store.apply(task.id, lambda t: on_submitted(t, update), ctx.clock.now(),
                                                default_expiry=provider.caps.default_expiry, jobs=jobs)
                if applied is None and jobs:
                    # Nothing changed (the task moved on meanwhile): still make sure it is watched.
                    await ctx.store.enqueue(jobs)
                if applied is None and update.provider_task_id and await ctx.store.note_canceled_provider_task(
                        task.id, update.provider_task_id):
                    # Canceled while the submit was on its way: the provider's task would run (and bill) unseen.
                    await provider.cancel_quietly(update.provider_task_id)
                return
            except Exception as exc:
                if not is_unavailable(exc) or time.monotonic() >= deadline:
                    raise
                wait = backoff(attempt, 0.1, 5.0)
                log.warning("task %s: the provider accepted it (%s) but the store failed to record it (%s); "
                            "trying again in %.1fs", task.id, update.provider_task_id, describe(exc), wait)
                await asyncio.sleep(wait)

    async def _wait_for_room(self, job: Job, task: Task) -> Again | None:
        """The provider already holds all the work we allow it: keep the backlog here instead of a wall of 429s
        there, and look again after IN_FLIGHT_RECHECK_SECONDS, doubling with each look up to
        IN_FLIGHT_RECHECK_MAX (a long backlog looks less often), never past the task's deadline; there the task
        ends (it would look again at once, for as long as the provider stays full)."""
        if task.deadline_at is not None and self.ctx.clock.now() >= task.deadline_at:
            await self._fail(task.id, "timeout", self._deadline_passed(task, "its provider had no room for it "
                                                                             "(max_in_flight)"))
            return None
        looks = int(job.payload.get("full", 0)) + 1
        delay = self.ctx.before_deadline(task, backoff(looks, IN_FLIGHT_RECHECK_SECONDS, IN_FLIGHT_RECHECK_MAX))
        return Again(delay, payload={**job.payload, "full": looks})

    @staticmethod
    def _deadline_passed(task: Task, waiting: str) -> str:
        if task.submit_started_at is not None:
            return (f"the task's deadline passed while {waiting}; an earlier send went unanswered, and was not "
                    "sent again")
        return f"the task's deadline passed while {waiting}; it was not sent"

    async def _again_later(self, job: Job, task: Task, exc: ProviderUnavailable, delay: float) -> Again | None:
        """The provider is unavailable (429, 5xx, no connection, junk): submit again after `delay` (_delay: backoff
        or its Retry-After), until the task's deadline; then fail it with the last reason.

        A planned re-run, not a worker attempt: a provider down for twenty minutes must not fail tasks
        whose deadline is thirty away, and relay restarts (each claim counts an attempt) must not either
        (tests/chaos: an apimart submit gave up after 3 junk answers and 7 kills).
        """
        ctx = self.ctx
        failures = int(job.payload.get("failures", 0)) + 1
        if task.deadline_at is not None and ctx.clock.now() >= task.deadline_at:
            await self._fail(task.id, "provider_unavailable",
                             f"could not submit to the provider before the task's deadline: {exc}")
            return None
        log.info("task %s: submit to %s not accepted (%s: %s); again in %.1fs", task.id, task.provider, exc.code,
                 exc, delay)
        payload = {**job.payload, "failures": failures, "last_error": f"{exc.code}: {exc}"[:500]}
        if isinstance(exc, RateLimited):     # how long this provider has held the task back (the patience)
            payload["rate_limited_for"] = float(job.payload.get("rate_limited_for", 0.0)) + delay
        return Again(delay, payload=payload)

    def _delay(self, job: Job, task: Task, exc: ProviderUnavailable) -> float:
        """The backoff by the submit failures so far, or the provider's Retry-After when longer (up to an hour);
        never past the task's deadline, where the task fails with the last reason."""
        return self.ctx.before_deadline(task, self.ctx.unavailable_delay(int(job.payload.get("failures", 0)) + 1, exc))

    def _moves_on(self, job: Job, exc: ProviderError, delay: float = 0.0) -> str | None:
        """relay.routing's verdict on this error, with the time the provider's 429s have held the task back so far
        (`delay`: the wait planned after this one)."""
        waited = 0.0
        if isinstance(exc, RateLimited):
            waited = float(job.payload.get("rate_limited_for", 0.0)) + delay
        return routing.moves_on(exc, waited_for_rate_limit=waited,
                                patience=self.ctx.settings.failover.rate_limit_patience)

    async def _fail_over(self, task: Task, following: str, outcome: str, reason: str, *, mark: float | None) -> Again:
        """Move the task (nobody accepted it) to its next provider, recording why; its submit runs again at once,
        with a fresh count of failures. Only while its submit mark is `mark` (this run's own, or None: none made
        or it was cleared). Run again too when the move lost a race: the re-read decides."""
        ctx = self.ctx
        now = ctx.clock.now()
        attempt = {"provider": task.provider, "outcome": outcome, "reason": reason[:500], "at": rfc3339(now)}
        moved = await ctx.store.fail_over(task.id, task.provider, following, attempt, now, mark)
        if moved:
            log.info("task %s: %s did not accept it (%s: %s); failing over to %s", task.id, task.provider, outcome,
                     reason, following)
        return Again(0.0, payload={})

    async def _circuit_failed(self, provider: str, exc: ProviderError) -> None:
        """Count the failed submit against the provider's circuit, when it says the provider is in trouble."""
        if not routing.counts_against_circuit(exc):
            return
        f = self.ctx.settings.failover
        circuit = await self.ctx.store.circuit_failed(provider, f"{exc.code}: {exc.message}", self.ctx.clock.now(),
                                                      threshold=f.breaker_threshold, cooldown=f.breaker_cooldown)
        if circuit.state == "open" and circuit.failures == f.breaker_threshold:
            log.warning("provider %s: circuit open after %d failed submits in a row (last: %s)", provider,
                        circuit.failures, circuit.last_error)

    async def _outcome_unknown(self, task: Task, provider: Provider, sent_at: float) -> Again | None:
        """The submit may have reached the provider, and resending could bill twice.

        With callbacks, the request carried this task's own callback URL: if the provider did create
        the task, its callback will say so (naming the provider task, confirmed with the provider as
        any callback). So wait as long as the safety net would before failing the task as unknown.
        """
        ctx = self.ctx
        if provider.caps.callbacks and ctx.callbacks_enabled:
            remaining = ctx.safety_net_delay(None) - (ctx.clock.now() - sent_at)
            if remaining > 0:
                return Again(remaining)
        await self._fail(task.id, "submit_outcome_unknown", UNKNOWN_MESSAGE)
        return None

    async def _fail(self, task_id: str, code: str, message: str) -> None:
        """Fail the task for its submit, unless the provider's task is known by now.

        Decided inside the write transaction, not on the row read earlier: meanwhile a callback (or
        the answer of an earlier attempt) may have recorded the provider's task, e.g. the submit was
        sent, relay was killed before the answer, and the provider's callback came in first after the
        restart. Failing it then as `submit_outcome_unknown` would drop a task the provider made, and
        a task being archived (found by tests/chaos).
        """
        def decide(task: Task) -> Transition | None:
            if task.provider_task_id:
                return None
            return on_failure(task, code, message)

        await self.ctx.store.apply(task_id, decide, self.ctx.clock.now())

    async def give_up(self, job: Job, reason: str) -> None:
        task = await self.ctx.store.get_task(job.task_id or "")
        if task is not None and task.provider_task_id is None:
            # The worker's reason starts with the error's code (see relay.queue): a reference image that
            # stayed unreachable through every retry is the user's to fix, not the provider's.
            prefix = ReferenceUnavailable.CODE + ": "
            if reason.startswith(prefix):
                await self._fail(task.id, ReferenceUnavailable.CODE, reason[len(prefix):])
            else:
                await self._fail(task.id, "provider_unavailable", f"could not submit to the provider: {reason}")
