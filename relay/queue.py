"""The worker: claims due jobs under a lease, runs their handlers, retries with backoff, never loses a job.

A handler's `run(job)` returns None (done), `Again(after, payload)` (planned
re-run, e.g. the next poll; attempts reset), or raises:
  Retry(after)                    run again later, counting an attempt
  ProviderUnavailable/ArchiveError  transient: retry with backoff (or the provider's Retry-After)
  anything else                   a bug or junk input: logged, retried with backoff
When attempts run out, the handler's `give_up(job, reason)` settles the task
(fails it with the reason) and the job is kept as `dead` for inspection.

When the store itself fails (a full disk: claims, outcomes, heartbeats raise), the worker backs off as
a whole (`store_outage`: capped backoff, one log line per interval, reported by /readyz) and a job that met
the failure is put back without using up an attempt: our outage must not fail the tasks it holds up.

Jobs are leased, not locked: a worker killed mid-job leaves a row whose lease
runs out, and any worker (this process after restart, or another replica)
claims it again. Handlers must therefore be safe to run twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

from relay import metrics
from relay.clock import Clock
from relay.errors import ArchiveError, ProviderUnavailable
from relay.logs import log_context
from relay.models import Job
from relay.outage import Outage, backoff, describe, is_unavailable, retry_delay
from relay.store.base import Store

# backoff lives in relay.outage now (the store's loops use it too) and is still importable from here.
__all__ = ["Again", "GroupHandler", "Handler", "Outcome", "Retry", "Worker", "WorkerOptions", "backoff"]

log = logging.getLogger("relay.worker")
T = TypeVar("T")


def _job_context(job: Job) -> contextlib.AbstractContextManager[None]:
    """Every line logged about the job carries its id and kind, and its task's or delivery's id."""
    delivery_id = job.payload.get("delivery_id")
    return log_context(job_id=job.id, job_kind=job.kind, task_id=job.task_id,
                       delivery_id=str(delivery_id) if delivery_id is not None else None)


class Retry(Exception):
    """Raised by a handler: run this job again after `after` seconds (counts as an attempt)."""

    def __init__(self, after: float, reason: str = "retry") -> None:
        super().__init__(reason)
        self.after = after
        self.reason = reason


@dataclass(frozen=True)
class Again:
    """Returned by a handler: the job succeeded for now and must run again (e.g. the next poll)."""

    after: float
    payload: dict[str, Any] | None = None


class Handler(Protocol):
    async def run(self, job: Job) -> Again | None: ...

    async def give_up(self, job: Job, reason: str) -> None: ...


# What a job's run came to: done (None), run again (Again), or what it raised.
Outcome = Again | Exception | None


@runtime_checkable
class GroupHandler(Handler, Protocol):
    """A handler whose jobs of one group (the callbacks of one task), claimed together, run as one: what they
    share (the task, the provider's answer, their writes) is done once. Each job keeps its own outcome."""

    def group_of(self, job: Job) -> str | None:
        """The group the job runs in when claimed with others of it; None: it always runs alone."""

    async def run_group(self, jobs: list[Job]) -> list[Outcome]:
        """Run the jobs of one group; their outcomes in order (an exception as a value is that job's failure,
        one raised is every job's)."""


@dataclass(frozen=True)
class WorkerOptions:
    concurrency: int = 32
    lease_seconds: float = 60.0
    idle_poll_seconds: float = 1.0
    max_attempts: int = 12
    retry_base: float = 2.0
    retry_cap: float = 300.0
    claim_batch: int = 32
    max_job_seconds: float = 1800.0     # a job running longer than this is stopped and retried
    store_retry_base: float = 0.1       # a failing store is tried again after this, doubling …
    store_retry_cap: float = 5.0        # … up to this
    store_log_interval: float = 30.0    # while the store fails: at most one log line (one traceback) per this


class Worker:
    def __init__(self, store: Store, handlers: Mapping[str, Handler], clock: Clock,
                 options: WorkerOptions | None = None) -> None:
        self.store = store
        self.handlers = dict(handlers)
        # The kinds whose jobs claimed together run by group (GroupHandler), and their handlers.
        self._grouping: dict[str, GroupHandler] = {kind: handler for kind, handler in handlers.items()
                                                   if isinstance(handler, GroupHandler)}
        self.clock = clock
        self.options = options or WorkerOptions()
        self._wakeup = asyncio.Event()
        self._stopped = asyncio.Event()
        self._stopping = False
        self._looped = asyncio.Event()      # set while run_forever is not running (stop() waits for it)
        self._looped.set()
        o = self.options
        self.store_outage = Outage("database", log, base=o.store_retry_base, cap=o.store_retry_cap,
                                   log_interval=o.store_log_interval)
        self._running: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(self.options.concurrency)
        self._active = 0
        # The running jobs whose leases the keeper extends: (job id, lease token) → (the job, when its lease is
        # next extended, on the loop's clock). One keeper task for all of them (see _keep_leases).
        self._held: dict[tuple[str, str | None], tuple[Job, float]] = {}
        self._keeper: asyncio.Task[None] | None = None
        self._extending: dict[tuple[str, str | None], asyncio.Task[None]] = {}    # extensions on their way
        store.on_enqueue(self.wake)

    def wake(self) -> None:
        """Called on local enqueue: look for work now instead of at the next idle poll."""
        self._wakeup.set()

    # ---- running --------------------------------------------------------------------------------
    async def run_forever(self) -> None:
        """Claim and run jobs until stop(); survives any error of the store (backs off, logs once per interval)."""
        self._looped.clear()
        try:
            while not self._stopping:
                await self._pause(self.store_outage.remaining())
                if self._stopping:
                    break
                # Cleared before the claim, never after: a wake-up arriving while the claim or the look for
                # the next due job is in flight must survive, or its job would wait a whole idle poll.
                self._wakeup.clear()
                try:
                    claimed = await self._claim_and_start()
                except Exception as exc:
                    self.store_outage.failed(exc, "claiming jobs")
                    continue
                self.store_outage.succeeded()
                if claimed == 0 and not self._stopping:
                    await self._idle()
        finally:
            self._looped.set()

    async def _pause(self, seconds: float) -> None:
        """Wait out a failing store. Only stop() cuts it short: an enqueue must not, or a store that fails
        for claims alone (a bad row) while other writes succeed would be retried on every callback."""
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), seconds)

    async def _idle(self) -> None:
        timeout = self.options.idle_poll_seconds
        try:
            due = await self.store.next_run_at(self.clock.now(), list(self.handlers))
        except Exception as exc:
            self.store_outage.failed(exc, "looking for the next due job")
            return
        if due is not None:
            timeout = max(0.0, min(timeout, due - self.clock.now()))
        if timeout > 0:
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except TimeoutError:
                pass

    async def _claim_and_start(self) -> int:
        if self._free_slots() == 0:
            # Wait for a slot rather than claiming work we cannot start (its lease would tick away).
            # With no free slot the semaphore is at zero, so this really suspends until a job ends.
            await self._slots.acquire()
            self._slots.release()
            return 1
        jobs = await self.store.claim(self.clock.now(), limit=min(self._free_slots(), self.options.claim_batch),
                                      lease_seconds=self.options.lease_seconds, kinds=list(self.handlers))
        if self._stopping:
            # stop() came while the claim was on its way and waits only for the jobs it saw: these are handed
            # back (due now, for whoever runs next) rather than started behind its back.
            now = self.clock.now()
            await asyncio.gather(*(self.store.retry_job(job, now, None) for job in jobs))   # one group commit
            return len(jobs)
        for unit in self._units(jobs):
            for _ in unit:      # a slot per job, a group's too: the claims are bounded by the jobs running
                await self._slots.acquire()
            self._active += len(unit)
            task = asyncio.create_task(self._execute_in_slot(unit), name=f"job:{unit[0].kind}:{unit[0].id}")
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        return len(jobs)

    def _units(self, jobs: list[Job]) -> list[list[Job]]:
        """The claimed jobs as runs: alone, or with the others of their group (GroupHandler), in claim order."""
        units: list[list[Job]] = []
        groups: dict[tuple[str, str], list[Job]] = {}
        for job in jobs:
            handler = self._grouping.get(job.kind)
            group = handler.group_of(job) if handler is not None else None
            if group is None:
                units.append([job])
            elif (job.kind, group) in groups:
                groups[(job.kind, group)].append(job)
            else:
                units.append(groups.setdefault((job.kind, group), [job]))
        return units

    def _free_slots(self) -> int:
        # Counted with the semaphore (released in the job's own finally), not from `_running`, whose
        # done-callbacks run a loop iteration later: counting those made the claim loop spin forever.
        return self.options.concurrency - self._active

    async def _execute_in_slot(self, unit: list[Job]) -> None:
        try:
            await self._execute_unit(unit)
        except Exception as exc:
            # The store failed while recording the outcome: the lease brings the job back later.
            self.store_outage.failed(exc, f"recording the outcome of job {unit[0].id} ({unit[0].kind}); "
                                          "its lease will bring it back")
        finally:
            self._active -= len(unit)
            for _ in unit:
                self._slots.release()

    async def stop(self, grace: float = 10.0) -> None:
        """Stop claiming; wait up to `grace` for running jobs (the rest are recovered by their lease), then for
        run_forever to end: a claim still on its way hands its jobs back first (see _claim_and_start), rather
        than being cancelled with the loop and leaving them leased until their lease runs out."""
        self._stopping = True
        self._stopped.set()
        self._wakeup.set()
        ends = asyncio.get_running_loop().time() + grace
        if self._running:
            _, pending = await asyncio.wait(set(self._running), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._looped.wait(), max(0.0, ends - asyncio.get_running_loop().time()))
        if not self._held:      # every job has ended: no lease left to keep (one started since keeps the keeper)
            ending = [task for task in (self._keeper, *self._extending.values()) if task is not None]
            for task in ending:
                task.cancel()
            await asyncio.gather(*ending, return_exceptions=True)

    async def drain(self, *, max_rounds: int = 10_000) -> int:
        """Run due jobs until none is due now (tests). Returns how many jobs ran."""
        ran = 0
        for _ in range(max_rounds):
            jobs = await self.store.claim(self.clock.now(), limit=self.options.claim_batch,
                                          lease_seconds=self.options.lease_seconds, kinds=list(self.handlers))
            if not jobs:
                return ran
            await asyncio.gather(*(self._execute_unit(unit) for unit in self._units(jobs)))
            ran += len(jobs)
        return ran

    # ---- one job, or a group of them ---------------------------------------------------------------
    async def execute(self, job: Job) -> None:
        """Run one claimed job and record its outcome. Never raises (except cancellation).

        Every line logged meanwhile carries the job's id and kind, and its task's or delivery's id.
        """
        with _job_context(job):
            await self._execute(job)

    async def _execute_unit(self, unit: list[Job]) -> None:
        if len(unit) == 1:
            await self.execute(unit[0])
            return
        handler = self._grouping[unit[0].kind]
        with log_context(job_kind=unit[0].kind, task_id=unit[0].task_id):
            try:
                outcomes = await self._holding(unit, handler.run_group(unit))
            except asyncio.CancelledError:
                raise   # shutdown: the leases bring the jobs back
            except Exception as exc:
                outcomes = [exc] * len(unit)
        if len(outcomes) != len(unit):      # a bug in the handler: no job's outcome is known
            outcomes = [RuntimeError(f"run_group gave {len(outcomes)} outcomes for {len(unit)} jobs")] * len(unit)
        done = [job for job, outcome in zip(unit, outcomes, strict=True) if outcome is None]
        recorded = await asyncio.gather(
            *([self._finish(done)] if done else []),      # one write for the group's ends
            *(self._record_in_context(job, handler, outcome)
              for job, outcome in zip(unit, outcomes, strict=True) if outcome is not None),
            return_exceptions=True)     # one failing write must not keep the other outcomes from being recorded
        failures = [failure for failure in recorded if isinstance(failure, BaseException)]
        for failure in failures[1:]:        # the first is raised, for _execute_in_slot to report
            self.store_outage.failed(failure, f"recording the outcomes of a group of {unit[0].kind} jobs; "
                                              "their leases will bring them back")
        if failures:
            raise failures[0]

    async def _finish(self, jobs: list[Job]) -> None:
        await self.store.finish_jobs(jobs)
        self.store_outage.succeeded()

    async def _record_in_context(self, job: Job, handler: Handler, outcome: Outcome) -> None:
        with _job_context(job):
            await self._record(job, handler, outcome)

    async def _execute(self, job: Job) -> None:
        handler = self.handlers.get(job.kind)
        if handler is None:
            await self.store.bury_job(job, f"no handler for job kind {job.kind!r}", self.clock.now())
            return
        outcome: Outcome
        try:
            outcome = await self._holding([job], handler.run(job))
        except asyncio.CancelledError:
            raise   # shutdown: the lease brings the job back
        except Exception as exc:
            outcome = exc
        await self._record(job, handler, outcome)

    async def _record(self, job: Job, handler: Handler, outcome: Outcome) -> None:
        """Record what the job's run came to: done, run again, or retried (or given up) after its failure."""
        if isinstance(outcome, Retry):
            await self._retry(job, handler, outcome.after, outcome.reason)
        elif isinstance(outcome, ProviderUnavailable):
            after = retry_delay(job.attempts, outcome.retry_after, self.options.retry_base, self.options.retry_cap)
            await self._retry(job, handler, after, f"{outcome.code}: {outcome}")
        elif isinstance(outcome, ArchiveError):
            await self._retry(job, handler, None, f"{outcome.code}: {outcome}")
        elif isinstance(outcome, TimeoutError):
            await self._retry(job, handler, None, f"job ran longer than {self.options.max_job_seconds:.0f}s")
        elif isinstance(outcome, Exception):
            if is_unavailable(outcome):
                await self._wait_out_store(job, outcome)
                return
            log.error("job %s (%s) failed unexpectedly", job.id, job.kind, exc_info=outcome)
            await self._retry(job, handler, None, f"internal error: {type(outcome).__name__}: {outcome}")
        elif isinstance(outcome, Again):
            await self.store.retry_job(job, self.clock.now() + outcome.after, None,
                                       payload=outcome.payload, reset_attempts=True)
        else:
            await self.store.finish_job(job)
        self.store_outage.succeeded()

    async def _holding(self, jobs: list[Job], run: Awaitable[T]) -> T:
        """Await the jobs' run while the keeper extends their leases, bounded by max_job_seconds."""
        loop = asyncio.get_running_loop()
        renew_at = loop.time() + self.options.lease_seconds / 3
        for job in jobs:
            self._held[(job.id, job.lease_token)] = (job, renew_at)
        if self._keeper is None or self._keeper.done() or self._keeper.cancelling():
            self._keeper = loop.create_task(self._keep_leases(), name="worker-leases")
        try:
            async with asyncio.timeout(self.options.max_job_seconds):
                return await run
        finally:
            for job in jobs:
                self._held.pop((job.id, job.lease_token), None)
            if not self._held and self._keeper is not None:
                # The last running job has ended: the keeper goes now rather than after its next look (a loop
                # closed meanwhile, tests driving drain(), would find it pending); the next job starts another.
                self._keeper.cancel()

    async def _keep_leases(self) -> None:
        """The heartbeat of every running job: each lease is extended a third of a lease after it was taken or
        last extended (at most a twelfth later), so a long job (a slow download) is not claimed twice. If this
        process dies, the heartbeats stop and the leases run out: that is how crashed work comes back.

        One task for all running jobs, not one per job: a task per job (started, and cancelled when the job
        ends) cost about 30 µs of the loop's time per job, for heartbeats that almost never beat. It ends when no
        job runs (cancelled by the last job's end) and is started again by the next one. Each extension goes on
        its own and the keeper waits for none: one hanging on a dead connection holds up that job's next
        extension only, as a heartbeat of its own would, never the others'."""
        loop = asyncio.get_running_loop()
        interval = self.options.lease_seconds / 3
        while self._held:
            await asyncio.sleep(interval / 4)
            try:
                now = loop.time()
                for held, (job, renew_at) in list(self._held.items()):
                    if renew_at <= now and held not in self._extending:
                        self._held[held] = (job, now + interval)
                        extension = loop.create_task(self._extend_lease(job))
                        self._extending[held] = extension
                        extension.add_done_callback(functools.partial(self._extended, held))
            except Exception:      # noqa: BLE001 - a bug here must not end the heartbeats of every running job
                log.exception("keeping the leases of running jobs failed; trying again")

    def _extended(self, held: tuple[str, str | None], _: asyncio.Task[None]) -> None:
        self._extending.pop(held, None)

    async def _extend_lease(self, job: Job) -> None:
        try:
            # Bounded: one stuck on a dead connection is given up in time for the next try (on another one).
            async with asyncio.timeout(self.options.lease_seconds / 3):
                extended = await self.store.extend_lease(job, self.clock.now() + self.options.lease_seconds)
        except Exception as exc:      # TimeoutError included
            # Not slowed down by the backoff: a heartbeat later than the lease would lose the job.
            self.store_outage.failed(exc, f"extending the lease of job {job.id}")
            return
        self.store_outage.succeeded()
        if not extended and self._held.pop((job.id, job.lease_token), None) is not None:   # not one that ended
            log.warning("job %s lost its lease while running", job.id)

    async def _wait_out_store(self, job: Job, exc: Exception) -> None:
        """The store failed under a running job: logged as the store's outage (not once per job) and put
        back for when the store may work again, without using up an attempt (a full disk must not fail tasks)."""
        delay = self.store_outage.failed(exc, f"running job {job.id} ({job.kind})")
        await self.store.retry_job(job, self.clock.now() + delay, f"store_unavailable: {describe(exc)}"[:1000],
                                   reset_attempts=True)

    async def _retry(self, job: Job, handler: Handler, after: float | None, reason: str) -> None:
        limit = min(job.max_attempts, self.options.max_attempts)
        if job.attempts >= limit:
            metrics.labeled(metrics.JOB_FAILURES, job.kind, "dead").inc()
            log.warning("job %s (%s) gave up after %d attempts: %s", job.id, job.kind, job.attempts, reason,
                        extra={"outcome": "dead", "attempts": job.attempts})
            try:
                await handler.give_up(job, reason)
            except Exception as exc:
                if is_unavailable(exc):
                    self.store_outage.failed(exc, f"giving up job {job.id}; it stays queued")
                else:
                    log.exception("give_up of job %s failed; it stays queued", job.id)
                await self.store.retry_job(job, self.clock.now() + self.options.retry_cap, reason)
                return
            await self.store.bury_job(job, reason, self.clock.now())
            return
        if after is None:
            after = backoff(job.attempts, self.options.retry_base, self.options.retry_cap)
        metrics.labeled(metrics.JOB_FAILURES, job.kind, "retry").inc()
        log.info("job %s (%s) retries in %.1fs: %s", job.id, job.kind, after, reason,
                 extra={"outcome": "retry", "attempts": job.attempts})
        await self.store.retry_job(job, self.clock.now() + after, reason[:1000])
