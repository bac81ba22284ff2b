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
from dataclasses import dataclass
from typing import Any

from relay import ids, metrics
from relay.errors import ProviderProtocolError, ProviderRejected
from relay.jobs.confirmations import Asked, Confirmations
from relay.jobs.context import JobContext
from relay.models import Job, ProviderStatus, Task, TaskStatus, TaskUpdate
from relay.providers.base import Provider
from relay.queue import Outcome
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
# Waiting callbacks settled together with a shared answer: a page per transaction, at most this many pages
# per run (a run that stops there hands the rest to the next run sharing the answer).
GATHER_PAGE = 200
GATHER_PAGES = 50
LEGACY_CALLBACK_JOB = "callback"


def callback_job(provider: str, task_id: str, body: str, now: float) -> Job:
    """The job that carries one received callback: its raw body, who sent it and when (relay.jobs.callback)."""
    inbox_id = ids.new_id("cbk", now)
    return Job(id=ids.new_id("job", now), kind=CALLBACK_JOB, task_id=task_id,
               payload={"inbox_id": inbox_id, "provider": provider, "received_at": now, "body": body}, run_at=now)



@dataclass(frozen=True)
class Verdict:
    """What processing made of a callback: its inbox status, a note, and the outcome counted in metrics.

    `lasting`: a newer look at the task or the provider could not judge it otherwise. A verdict that is not
    lasting (the provider does not confirm the body yet; the task is at another provider) is reached only
    with a look taken after this callback arrived (for it, or for a group of callbacks it is in), never with
    one shared with others received elsewhere (see CallbackHandler)."""
    status: str          # applied | ignored | rejected
    note: str
    outcome: str
    lasting: bool = True


def _settled(status: str, note: str, outcome: str | None = None, *, lasting: bool = True) -> Verdict:
    return Verdict(status, note, outcome or status, lasting)


def judge(task: Task | None, provider: Provider | None, callback: dict[str, Any],
          confirmed: TaskUpdate | None, trust_body: bool) -> Verdict | TaskUpdate | None:
    """What a callback asks for, given the task and (when asked) the provider's own answer: a Verdict that
    settles it, the update to apply, or None when the provider's answer is needed first. Pure. `provider`:
    the task's provider (None only when the callback came from another one)."""
    if task is None:
        return _settled("rejected", "unknown task")
    if callback["provider"] != task.provider or provider is None:
        # The task failed over (relay.routing) from a provider that refused it: nothing of it is ours now.
        return _settled("rejected", f"the task is at provider {task.provider!r} now", lasting=False)
    try:
        reported = provider.parse_callback(callback["body"].encode())
    except ProviderProtocolError as exc:
        return _settled("rejected", f"unreadable body: {exc}")
    if reported.provider_task_id and task.provider_task_id and reported.provider_task_id != task.provider_task_id:
        return _settled("rejected", "the body names another provider task")
    if task.status.terminal or task.status == TaskStatus.ARCHIVING:
        return _settled("ignored", f"task already {task.status.value}", "duplicate")
    if trust_body:
        return reported
    if not confirmation_ticket(task, reported):
        return _settled("rejected", "no provider task id to confirm")
    if confirmed is None:
        return None
    if _progress_rank(confirmed.status) < _progress_rank(reported.status):
        # The provider does not (yet) confirm what the body claims: a forged or premature body.
        # Nothing is applied; the safety-net poll still watches the task.
        return _settled("ignored", f"provider reports {confirmed.status.value}, callback said {reported.status.value}",
                        lasting=False)
    # The provider is as far as the callback says or further (a late "processing" for a task that already
    # finished): its own answer is the truth and is applied.
    return confirmed


def stands(verdict: Verdict | TaskUpdate, asked: Asked) -> bool:
    """Whether a verdict reached with `asked`'s answer stands: with an answer shared with other callbacks, only
    a lasting one does (receipt times come from the replica that took the callback, and a clock running behind
    must not let an older answer overrule a newer callback); the callback's own answer decides otherwise."""
    return not (asked.shared and isinstance(verdict, Verdict) and not verdict.lasting)


def _repeat(note: str) -> Verdict:
    """A callback asking for an update already applied: it changes nothing."""
    return _settled("ignored", note, "duplicate")


def confirmation_ticket(task: Task, reported: TaskUpdate) -> str | None:
    """The provider task id a callback is confirmed with."""
    return task.provider_task_id or reported.provider_task_id


def carried_callback(task_id: str | None, payload: dict[str, Any]) -> dict[str, Any]:
    """The callback a callback_body job carries, as the fields of its inbox row."""
    return {"id": str(payload["inbox_id"]), "provider": str(payload["provider"]), "task_id": task_id,
            "body": str(payload["body"]), "received_at": float(payload["received_at"])}


class CallbackHandler:
    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        # Callbacks of one task share the provider's answer (relay.jobs.confirmations).
        self.confirmations = Confirmations(ctx.clock)

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
            return carried_callback(job.task_id, p)
        row = await self.ctx.store.get_callback(str(p.get("inbox_id")))
        return row if row is not None and row["status"] == "received" else None

    def group_of(self, job: Job) -> str | None:
        """Callbacks of one task claimed together run as one (relay.queue.GroupHandler): the task is read once,
        the provider asked once, and their inbox rows written together."""
        return job.task_id if job.kind == CALLBACK_JOB else None

    async def run(self, job: Job) -> None:
        [outcome] = await self.run_group([job])
        if isinstance(outcome, Exception):
            raise outcome

    async def run_group(self, jobs: list[Job]) -> list[Outcome]:
        """Process the callbacks of one task's jobs in turn (in the order they were received), as runs of their
        own would one after the other, except that the provider is asked at most once more for them all: a
        request sent during this run was sent after every one of them was received (they were claimed before
        it started), so its answer is each one's own, whatever the clocks of the replicas that took them say.

        A callback that fails is that job's failure (the worker retries it). After one failed, the callbacks
        that need the provider's answer fail with it rather than each waiting in turn on a provider or a store
        that fails; the others are still judged. Those judged are settled."""
        ctx = self.ctx
        outcomes: list[Outcome] = [None] * len(jobs)
        callbacks: list[tuple[int, dict[str, Any]]] = []     # the job's place in `jobs`, its callback
        for place in sorted(range(len(jobs)), key=lambda place: jobs[place].id):      # ids grow with receipt
            try:
                callback = await self._callback_of(jobs[place])
            except Exception as exc:    # noqa: BLE001 - this job's failure (a payload it cannot read); not the others'
                outcomes[place] = exc
                continue
            if callback is not None:
                callbacks.append((place, callback))
        if not callbacks:
            return outcomes
        looked_at = ctx.clock.now()
        task = await ctx.store.get_task(callbacks[0][1]["task_id"], images=False)  # judging needs no images
        trust_body = ctx.settings.callbacks.trust_body
        settled: list[tuple[int, dict[str, Any], Verdict]] = []      # judged, not written yet
        ours: dict[str, Asked] = {}     # ticket → the request this run sent for it (see above)
        failed: Exception | None = None
        gatherer: tuple[Provider | None, dict[str, Any], Asked] | None = None
        for place, callback in callbacks:
            try:
                judged = await self._judge(task, callback, trust_body, ours, asking=failed is None)
            except Exception as exc:    # noqa: BLE001 - the worker handles it, as it would a run of its own
                outcomes[place] = failed = exc
                continue
            if judged is None:      # needs the provider's answer, after one callback failed: fails with it
                outcomes[place] = failed
                continue
            provider, asked, verdict = judged
            settled.append((place, callback, verdict))
            if verdict.status == "applied":
                # Written at once: were the run stopped before its end (shutdown), the next run of this callback
                # would find the update applied already and record it as a repeat.
                await self._settle_in_turn(settled, outcomes)
                settled = []
            if gatherer is None and task is not None and asked is not None \
                    and (asked.shared or len(callbacks) > 1) and task.provider_task_id == asked.ticket:
                gatherer = (provider, callback, asked)
        await self._settle_in_turn(settled, outcomes)
        if gatherer is not None and gatherer[2].take_gathering():
            # A burst: other callbacks of the task shared this answer. Those still waiting for a worker are
            # settled with it now rather than one run each (a backlog after an outage drains in a few runs),
            # by one of the runs sharing it. Only an optimisation: what it leaves, their own runs settle.
            assert task is not None
            provider, callback, asked = gatherer
            try:
                # As an answer shared with them: they were received elsewhere, by other clocks.
                through = await self._settle_waiting(task, provider, callback, asked.as_shared(),
                                                     trust_body=trust_body, received_by=min(looked_at, asked.sent_at))
            except Exception:      # noqa: BLE001 - this callback is settled; the waiting ones have their runs
                log.warning("settling the waiting callbacks of %s with %s failed; each gets its own run", task.id,
                            callback["id"], exc_info=True)
                through = False
            if not through:
                asked.release_gathering()     # the next run sharing the answer goes on where this one stopped
        return outcomes

    async def _settle_in_turn(self, settled: list[tuple[int, dict[str, Any], Verdict]],
                              outcomes: list[Outcome]) -> None:
        """Write the judged callbacks' inbox rows; if that fails, it is their jobs' failure, not the others'."""
        try:
            await self._settle([(callback, verdict) for _, callback, verdict in settled])
        except Exception as exc:    # noqa: BLE001 - the worker handles it for these jobs
            for place, _, _ in settled:
                outcomes[place] = exc

    async def _judge(self, task: Task | None, callback: dict[str, Any], trust_body: bool, ours: dict[str, Asked],
                     *, asking: bool = True) -> tuple[Provider | None, Asked | None, Verdict] | None:
        """What processing makes of one callback (the update it asks for applied): the task's provider (None when
        the callback is not from it), the provider's answer it was judged with (None: not asked), the verdict.
        None when it needs the provider's answer and `asking` is False. `ours`: see run_group."""
        # The provider is needed only for a task still at the callback's provider (raises if it is not
        # configured any more: the job is retried, as any job whose provider went away).
        provider = self.ctx.provider(callback["provider"]) \
            if task is not None and task.provider == callback["provider"] else None
        verdict = judge(task, provider, callback, None, trust_body)
        asked: Asked | None = None
        if verdict is None:
            if not asking:
                return None
            assert task is not None and provider is not None   # judge settles a callback without them
            asked, verdict = await self._confirm(task, provider, callback, trust_body, ours)
        if isinstance(verdict, TaskUpdate):
            assert task is not None and provider is not None
            verdict = await self._apply(task, provider, verdict, asked)
        return provider, asked, verdict

    async def _confirm(self, task: Task, provider: Provider, callback: dict[str, Any], trust_body: bool,
                       ours: dict[str, Asked]) -> tuple[Asked | None, Verdict | TaskUpdate]:
        """Judge the callback with the provider's answer: the one its run sent already (`ours`); else one shared
        with the task's other callbacks when it was asked for since this one arrived; asked afresh when a shared
        answer was a refusal or gives a verdict that is not lasting (receipt times come from the replica that
        took the callback, and a clock running behind must not let an older answer overrule a newer callback).
        A request sent here goes into `ours`. ProviderUnavailable → the worker retries the job."""
        reported = provider.parse_callback(callback["body"].encode())    # judge has read it already
        ticket = confirmation_ticket(task, reported)
        assert ticket is not None

        async def fetch() -> TaskUpdate:
            await self.ctx.throttle(task.provider)
            return await provider.fetch(ticket)

        fresh = False
        while True:
            asked = ours.get(ticket) or self.confirmations.ask(task.id, ticket, callback["received_at"], fetch,
                                                               fresh=fresh)
            if not asked.shared:
                ours[ticket] = asked
            try:
                update = await asked.answer()
            except ProviderRejected as exc:
                if asked.shared:
                    fresh = True
                    continue
                return None, _settled("ignored", f"provider refused the confirmation: {exc}")
            verdict = judge(task, provider, callback, update, trust_body)
            assert verdict is not None      # with the provider's answer, judge always decides
            if not stands(verdict, asked):
                fresh = True
                continue
            return asked, verdict

    async def _apply(self, task: Task, provider: Provider, update: TaskUpdate, asked: Asked | None) -> Verdict:
        """Apply the update a callback asks for; not again when another callback sharing the answer has."""
        if asked is not None and asked.applied:
            return _repeat("no change (repeated or stale)")
        applied = await self.ctx.store.apply(task.id, lambda t: on_update(t, update), self.ctx.clock.now(),
                                             default_expiry=provider.caps.default_expiry, seen=task)
        if asked is not None:
            asked.mark_applied()
        if applied is None:
            return _repeat("no change (repeated or stale)")
        return _settled("applied", f"applied {applied.transition.event}")

    async def _settle_waiting(self, task: Task, provider: Provider | None, callback: dict[str, Any], asked: Asked,
                              *, received_by: float, trust_body: bool) -> bool:
        """Settle the task's callbacks received by `received_by` that no worker holds yet, with this task and
        this answer, where the verdict is what a run of their own would reach: one that stands with a shared
        answer, or the update this run's answer applied (which changes nothing more). Any other is left to its
        own run. A page per transaction, in id order; False when it stopped at GATHER_PAGES pages."""
        update = await asked.answer()
        judged: dict[tuple[str, str], Verdict | TaskUpdate | None] = {}  # repeats of a body are judged once
        repeated = _repeat(f"no change (confirmed together with {callback['id']})")
        after = ""
        for _ in range(GATHER_PAGES):
            waiting = await self.ctx.store.waiting_callbacks(task.id, CALLBACK_JOB, received_by, after, GATHER_PAGE)
            settled: dict[str, tuple[str, str, str]] = {}      # job id → its provider, status, note
            outcomes: dict[tuple[str, str, str], str] = {}     # (provider, status, note) → the outcome counted
            for job_id, sender, body in waiting:
                key = (sender, body)
                if key not in judged:
                    judged[key] = judge(task, provider, {"provider": sender, "body": body}, update, trust_body)
                verdict = judged[key]
                if isinstance(verdict, TaskUpdate) and verdict is update and asked.applied:
                    verdict = repeated
                if isinstance(verdict, Verdict) and stands(verdict, asked):
                    settled[job_id] = (sender, verdict.status, verdict.note)
                    outcomes[settled[job_id]] = verdict.outcome
            done = await self.ctx.store.settle_waiting_callbacks(settled, self.ctx.clock.now())
            for (sender, status, note), count in done.items():
                metrics.labeled(metrics.CALLBACKS_PROCESSED, sender, outcomes[(sender, status, note)]).inc(count)
            if len(waiting) < GATHER_PAGE:
                return True
            after = waiting[-1][0]
        return False

    async def _settle(self, settled: list[tuple[dict[str, Any], Verdict]]) -> None:
        """Record what processing made of the callbacks (one write each, committed together) and count them."""
        if not settled:
            return
        await self.ctx.store.settle_callbacks([(callback, verdict.status, verdict.note)
                                               for callback, verdict in settled], self.ctx.clock.now())
        for callback, verdict in settled:
            metrics.labeled(metrics.CALLBACKS_PROCESSED, callback["provider"], verdict.outcome).inc()

    async def give_up(self, job: Job, reason: str) -> None:
        # The safety-net poll still watches the task; only this callback's confirmation is abandoned.
        row = await self._callback_of(job)
        if row is not None:     # settled and counted as any other callback
            await self._settle([(row, _settled("rejected", f"could not be confirmed: {reason}"))])
