"""The worker: retries with backoff, give-up settles and keeps the job, planned re-runs, wake-ups."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest

from relay import ids
from relay.clock import ManualClock, SystemClock
from relay.errors import ArchiveError, RateLimited
from relay.models import Job
from relay.queue import Again, Retry, Worker, WorkerOptions, backoff
from relay.store.base import Store
from tests.harness import wait_for


class Scripted:
    """A handler that plays a script of outcomes, one per run, and records what happened."""

    def __init__(self, *script: object) -> None:
        self.script = list(script)
        self.runs: list[Job] = []
        self.gave_up: list[str] = []

    async def run(self, job: Job) -> Again | None:
        self.runs.append(job)
        step = self.script.pop(0) if self.script else None
        if isinstance(step, BaseException):
            raise step
        return step  # type: ignore[return-value]

    async def give_up(self, job: Job, reason: str) -> None:
        self.gave_up.append(reason)


def make_job(clock: ManualClock, kind: str = "k", max_attempts: int = 10) -> Job:
    return Job(id=ids.new_id("job", clock.now()), kind=kind, run_at=clock.now(), max_attempts=max_attempts)


OPTS = WorkerOptions(retry_base=1.0, retry_cap=10.0, lease_seconds=30.0, max_attempts=5)


async def test_done_job_is_removed(store: Store, clock: ManualClock) -> None:
    """A handler returning None finishes the job: it is gone from the table."""
    handler = Scripted(None)
    worker = Worker(store, {"k": handler}, clock, OPTS)
    await store.enqueue([make_job(clock)])
    assert await worker.drain() == 1
    assert await store.job_counts() == {}


async def test_retry_waits_then_runs_again(store: Store, clock: ManualClock) -> None:
    """Retry(after) puts the job back, not due until `after` has passed."""
    handler = Scripted(Retry(5.0), None)
    worker = Worker(store, {"k": handler}, clock, OPTS)
    await store.enqueue([make_job(clock)])
    await worker.drain()
    assert len(handler.runs) == 1
    clock.advance(4.9)
    await worker.drain()
    assert len(handler.runs) == 1
    clock.advance(0.2)
    await worker.drain()
    assert len(handler.runs) == 2 and await store.job_counts() == {}


async def test_rate_limited_honours_retry_after(store: Store, clock: ManualClock) -> None:
    """A provider 429 with Retry-After reschedules the job exactly that far out."""
    handler = Scripted(RateLimited(retry_after=42.0), None)
    worker = Worker(store, {"k": handler}, clock, OPTS)
    await store.enqueue([make_job(clock)])
    await worker.drain()
    assert await store.next_run_at(clock.now()) == clock.now() + 42.0


async def test_a_retry_after_of_zero_still_waits_the_backoff(store: Store, clock: ManualClock) -> None:
    """`Retry-After: 0` on every answer (a callback's confirmation, say) must not run the job again at once
    until its attempts are gone: the backoff (1 s ± 20 % here) is the least it waits."""
    handler = Scripted(RateLimited(retry_after=0.0), None)
    worker = Worker(store, {"k": handler}, clock, OPTS)
    await store.enqueue([make_job(clock)])
    await worker.drain()
    due = await store.next_run_at(clock.now())
    assert due is not None and clock.now() + 0.8 <= due <= clock.now() + 1.2


async def test_an_idle_worker_waits_for_its_own_kinds(store: Store, clock: ManualClock) -> None:
    """The worker asks when a job of the kinds it has handlers for is next due: a due job of another kind does
    not make it look again at once."""
    asked: list[list[str] | None] = []
    looked = store.next_run_at

    async def spy(now: float, kinds: list[str] | None = None) -> float | None:
        asked.append(kinds)
        return await looked(now, kinds)
    store.next_run_at = spy             # type: ignore[method-assign]
    worker = Worker(store, {"k": Scripted(None)}, clock, WorkerOptions(idle_poll_seconds=0.05))
    await store.enqueue([Job(id=ids.new_id("job"), kind="other", run_at=clock.now() - 1)])
    await worker._idle()
    assert asked == [["k"]]


async def test_unexpected_exception_never_crashes_and_is_retried(store: Store, clock: ManualClock) -> None:
    """A bug in a handler (KeyError) is logged and retried with backoff, not lost."""
    handler = Scripted(KeyError("boom"), None)
    worker = Worker(store, {"k": handler}, clock, OPTS)
    await store.enqueue([make_job(clock)])
    await worker.drain()
    clock.advance(60)
    await worker.drain()
    assert len(handler.runs) == 2 and await store.job_counts() == {}


async def test_exhausted_job_gives_up_and_stays_dead(store: Store, clock: ManualClock) -> None:
    """After max attempts the handler's give_up runs once and the job is kept as dead."""
    handler = Scripted(*[ArchiveError("flaky")] * 10)
    worker = Worker(store, {"k": handler}, clock, OPTS)
    await store.enqueue([make_job(clock, max_attempts=3)])
    for _ in range(10):
        await worker.drain()
        clock.advance(100)
    assert len(handler.runs) == 3
    assert len(handler.gave_up) == 1 and "flaky" in handler.gave_up[0]
    assert await store.job_counts() == {"k:dead": 1}


async def test_again_reschedules_and_resets_attempts(store: Store, clock: ManualClock) -> None:
    """Again(after, payload) is a planned re-run: new payload, attempts back to zero."""
    handler = Scripted(Again(3.0, {"polls": 1}), None)
    worker = Worker(store, {"k": handler}, clock, OPTS)
    await store.enqueue([make_job(clock)])
    await worker.drain()
    clock.advance(3)
    await worker.drain()
    assert handler.runs[1].payload == {"polls": 1} and handler.runs[1].attempts == 1


async def test_unknown_kind_is_buried_not_dropped(store: Store, clock: ManualClock) -> None:
    """A job no handler knows is kept as dead for inspection."""
    worker = Worker(store, {"other": Scripted(), "k": Scripted()}, clock, OPTS)
    worker.handlers.pop("k")
    await store.enqueue([make_job(clock, kind="k")])
    await store.claim(clock.now(), limit=10, lease_seconds=30)
    # claimed by a worker that then died: after the lease, a worker without the handler buries it
    clock.advance(31)
    [job] = await store.claim(clock.now(), limit=10, lease_seconds=30)
    await worker.execute(job)
    assert await store.job_counts() == {"k:dead": 1}


async def test_job_of_a_killed_worker_is_recovered_after_its_lease(store: Store, clock: ManualClock) -> None:
    """A job claimed by a worker that died (never finished) runs again once its lease runs out."""
    await store.enqueue([make_job(clock)])
    await store.claim(clock.now(), limit=10, lease_seconds=30)      # the dead worker's claim
    handler = Scripted(None)
    worker = Worker(store, {"k": handler}, clock, OPTS)
    await worker.drain()
    assert handler.runs == []
    clock.advance(30.1)
    await worker.drain()
    assert len(handler.runs) == 1 and handler.runs[0].attempts == 2 and await store.job_counts() == {}


class Signal:
    """A handler that only says it ran."""

    def __init__(self) -> None:
        self.done = asyncio.Event()

    async def run(self, job: Job) -> None:
        self.done.set()

    async def give_up(self, job: Job, reason: str) -> None: ...


@contextlib.asynccontextmanager
async def running_worker(store: Store, handler: Signal) -> AsyncIterator[SystemClock]:
    """A worker with a 30 s idle poll running for the block: only a wake-up makes it look for work sooner."""
    clock = SystemClock()
    worker = Worker(store, {"k": handler}, clock, WorkerOptions(idle_poll_seconds=30.0))
    runner = asyncio.create_task(worker.run_forever())
    try:
        yield clock
    finally:
        await worker.stop()
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_run_forever_wakes_on_enqueue(store: Store) -> None:
    """A running worker starts a newly enqueued job at once, not after its idle poll."""
    handler = Signal()
    async with running_worker(store, handler) as clock:
        await asyncio.sleep(0)
        await store.enqueue([Job(id=ids.new_id("job"), kind="k", run_at=clock.now())])
        await asyncio.wait_for(handler.done.wait(), timeout=5)


async def test_a_wake_up_during_the_idle_look_is_not_lost(store: Store) -> None:
    """An enqueue that commits while the worker is between its empty claim and its idle wait (here: inside
    the look for the next due job, which read before the commit) still starts the job at once."""
    looked = store.next_run_at
    raced = False

    async def stale_look(now: float, kinds: list[str] | None = None) -> float | None:
        nonlocal raced
        due = await looked(now, kinds)  # read before the enqueue commits ...
        if not raced:
            raced = True
            now = SystemClock().now()
            await store.enqueue([Job(id=ids.new_id("job"), kind="k", run_at=now)])  # ... which wakes
        return due

    store.next_run_at = stale_look      # type: ignore[method-assign]
    handler = Signal()
    async with running_worker(store, handler):
        await asyncio.wait_for(handler.done.wait(), timeout=5)


def test_backoff_grows_to_cap_with_jitter() -> None:
    """Backoff doubles per attempt, stays within ±20 %, and never passes the cap (+jitter)."""
    for attempt, expected in [(1, 2.0), (2, 4.0), (3, 8.0), (10, 60.0)]:
        value = backoff(attempt, 2.0, 60.0)
        assert expected * 0.8 <= value <= expected * 1.2


# The leases of the tests below that claim while the worker holds jobs, in real time: long enough that a pause
# of a loaded machine (a second or so) cannot let one run out between two of the keeper's extensions (a third of
# a lease apart), which the test's next claim would take as a lease not kept; short enough to keep them quick.
REAL_LEASE = 2.0


async def test_a_long_job_keeps_its_lease_by_heartbeat(store: Store) -> None:
    """A job running longer than its lease extends it, so no other worker claims it meanwhile."""
    clock = SystemClock()
    release = asyncio.Event()

    class Slow:
        async def run(self, job: Job) -> None:
            await release.wait()

        async def give_up(self, job: Job, reason: str) -> None: ...

    worker = Worker(store, {"k": Slow()}, clock, WorkerOptions(lease_seconds=REAL_LEASE))
    await store.enqueue([Job(id=ids.new_id("job"), kind="k", run_at=clock.now())])
    [job] = await store.claim(clock.now(), limit=1, lease_seconds=REAL_LEASE)
    running = asyncio.create_task(worker.execute(job))
    deadline = clock.now() + 1.5 * REAL_LEASE
    while clock.now() < deadline:          # more than a lease's worth of time: nobody else may claim it
        assert await store.claim(clock.now(), limit=1, lease_seconds=REAL_LEASE) == []
        await asyncio.sleep(0.05)
    release.set()
    await asyncio.wait_for(running, 5)
    assert await store.job_counts() == {}


class Leases:
    """A store whose extend_lease calls are counted, and may be held or refused (the rest goes to `store`)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.extended: list[str] = []
        self.refuse: set[str] = set()      # job ids whose leases are lost
        self.gate: asyncio.Event | None = None
        self.gated: set[str] | None = None     # job ids whose extensions wait at the gate (None: every job's)
        self.returned: list[tuple[str, bool]] = []      # extensions that came back: (job id, extended)

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    async def extend_lease(self, job: Job, until: float) -> bool:
        self.extended.append(job.id)
        if self.gate is not None and (self.gated is None or job.id in self.gated):
            await self.gate.wait()
        extended = False if job.id in self.refuse else await self._store.extend_lease(job, until)
        self.returned.append((job.id, extended))
        return extended


class Held:
    """A handler whose runs wait until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = 0

    async def run(self, job: Job) -> None:
        self.started += 1
        await self.release.wait()

    async def give_up(self, job: Job, reason: str) -> None: ...


def keepers() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "worker-leases" and not t.done()]


async def wait_until(predicate: Callable[[], bool], what: str = "the condition") -> None:
    await wait_for(predicate, 5, what)


async def test_one_keeper_holds_the_leases_of_every_running_job(store: Store) -> None:
    """Jobs started at different times all keep their leases, through one keeper task that ends with the jobs."""
    clock = SystemClock()
    handler = Held()
    leases = Leases(store)
    lease = REAL_LEASE
    worker = Worker(leases, {"k": handler}, clock, WorkerOptions(lease_seconds=lease))  # type: ignore[arg-type]
    await store.enqueue([Job(id=ids.new_id("job"), kind="k", run_at=clock.now()) for _ in range(2)])
    [first] = await store.claim(clock.now(), limit=1, lease_seconds=lease)
    running = [asyncio.create_task(worker.execute(first))]
    await asyncio.sleep(lease / 2)        # the second starts halfway through the first's lease
    [second] = await store.claim(clock.now(), limit=1, lease_seconds=lease)
    running.append(asyncio.create_task(worker.execute(second)))
    deadline = clock.now() + 1.5 * lease
    while clock.now() < deadline:          # leases' worth of time: nobody else may claim either
        assert await store.claim(clock.now(), limit=1, lease_seconds=lease) == []
        await asyncio.sleep(0.05)
    assert len(keepers()) == 1
    assert {first.id, second.id} <= set(leases.extended)
    handler.release.set()
    await asyncio.wait_for(asyncio.gather(*running), 5)
    assert await store.job_counts() == {}
    await wait_until(lambda: not keepers())          # nothing left to keep: the keeper ends


async def test_a_hanging_extension_holds_up_no_other_lease(store: Store) -> None:
    """One job's extension hangs (a dead connection): the other job's lease is still extended on time, and the
    hanging one is given up after a third of a lease and tried again."""
    clock = SystemClock()
    handler = Held()
    leases = Leases(store)
    leases.gate = asyncio.Event()
    worker = Worker(leases, {"k": handler}, clock, WorkerOptions(lease_seconds=0.6))  # type: ignore[arg-type]
    await store.enqueue([Job(id=ids.new_id("job"), kind="k", run_at=clock.now()) for _ in range(2)])
    hanging, kept = await store.claim(clock.now(), limit=2, lease_seconds=0.6)
    leases.gated = {hanging.id}
    running = [asyncio.create_task(worker.execute(job)) for job in (hanging, kept)]
    await wait_until(lambda: leases.extended.count(kept.id) >= 4, "four extensions of the other lease")
    await wait_until(lambda: leases.extended.count(hanging.id) >= 2, "the hanging extension given up and tried again")
    assert (hanging.id, True) not in leases.returned
    leases.gate.set()
    await wait_until(lambda: (hanging.id, True) in leases.returned, "an extension of the hanging job's lease")
    handler.release.set()
    await asyncio.wait_for(asyncio.gather(*running), 5)


async def test_a_lost_lease_is_warned_once_and_no_longer_extended(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    """A job whose lease is found lost is warned about once and left alone; the others go on being kept."""
    clock = SystemClock()
    handler = Held()
    leases = Leases(store)
    worker = Worker(leases, {"k": handler}, clock, WorkerOptions(lease_seconds=0.3))  # type: ignore[arg-type]
    await store.enqueue([Job(id=ids.new_id("job"), kind="k", run_at=clock.now()) for _ in range(2)])
    lost, kept = await store.claim(clock.now(), limit=2, lease_seconds=0.3)
    leases.refuse.add(lost.id)
    running = [asyncio.create_task(worker.execute(job)) for job in (lost, kept)]
    await wait_until(lambda: leases.extended.count(kept.id) >= 4, "four extensions of the kept lease")
    assert leases.extended.count(lost.id) == 1
    assert [r.getMessage() for r in caplog.records if "lost its lease" in r.getMessage()] == \
        [f"job {lost.id} lost its lease while running"]
    handler.release.set()
    await asyncio.wait_for(asyncio.gather(*running), 5)


async def test_a_job_ending_while_its_lease_is_extended_is_not_warned(store: Store,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """The job finished (its row gone) while an extension was on its way: that is no lost lease."""
    clock = SystemClock()
    handler = Held()
    leases = Leases(store)
    leases.gate = asyncio.Event()
    # A longer lease: the held extension is given up only after a third of it (2 s, far more than the job's end
    # takes even on a loaded machine; given up first, it would never come back to be seen finding the job gone).
    worker = Worker(leases, {"k": handler}, clock, WorkerOptions(lease_seconds=6))  # type: ignore[arg-type]
    await store.enqueue([Job(id=ids.new_id("job"), kind="k", run_at=clock.now())])
    [job] = await store.claim(clock.now(), limit=1, lease_seconds=6)
    running = asyncio.create_task(worker.execute(job))
    await wait_until(lambda: leases.extended == [job.id])     # held at the gate
    handler.release.set()
    await asyncio.wait_for(running, 5)
    assert await store.job_counts() == {}
    leases.gate.set()
    await wait_until(lambda: leases.returned == [(job.id, False)], "the extension to find the job gone")
    await wait_until(lambda: not worker._extending, "the extension to end")
    assert not [r for r in caplog.records if "lost its lease" in r.getMessage()]


async def test_stop_ends_the_keeper(store: Store) -> None:
    clock = SystemClock()
    handler = Held()
    worker = Worker(store, {"k": handler}, clock, WorkerOptions(lease_seconds=60))
    await store.enqueue([Job(id=ids.new_id("job"), kind="k", run_at=clock.now())])
    runner = asyncio.create_task(worker.run_forever())
    await wait_until(lambda: handler.started == 1 and bool(keepers()))
    handler.release.set()
    await worker.stop(grace=5)
    await asyncio.wait_for(runner, 5)
    assert not keepers()       # not left sleeping out its interval (20 s here)


async def test_stop_ends_the_keeper_once_the_jobs_past_the_grace_are_stopped(store: Store) -> None:
    clock = SystemClock()
    handler = Held()       # never released: the job outlasts the grace and is stopped (its lease brings it back)
    worker = Worker(store, {"k": handler}, clock, WorkerOptions(lease_seconds=60))
    await store.enqueue([Job(id=ids.new_id("job"), kind="k", run_at=clock.now())])
    runner = asyncio.create_task(worker.run_forever())
    await wait_until(lambda: handler.started == 1 and bool(keepers()))
    await worker.stop(grace=0.1)
    await asyncio.wait_for(runner, 5)
    assert not keepers()
    assert await store.job_counts() == {"k:queued": 1}


async def test_jobs_claimed_while_the_worker_stops_are_handed_back_not_started(store: Store) -> None:
    """stop() waits for the jobs it sees, then for the loop: a claim still on its way must not start jobs behind
    its back (they would run on while the store closes) and is not cancelled with the loop either (its jobs would
    stay leased until the lease runs out): they are back in the queue, due now, when stop() returns."""
    clock = SystemClock()
    handler = Held()
    gate = asyncio.Event()
    claims: list[int] = []

    class SlowClaims(Leases):
        async def claim(self, *args: object, **kwargs: object) -> list[Job]:
            claims.append(1)
            await gate.wait()
            return await self._store.claim(*args, **kwargs)  # type: ignore[arg-type]

    worker = Worker(SlowClaims(store), {"k": handler}, clock, WorkerOptions(lease_seconds=60))  # type: ignore[arg-type]
    await store.enqueue([Job(id=ids.new_id("job"), kind="k", run_at=clock.now())])
    runner = asyncio.create_task(worker.run_forever())
    await wait_until(lambda: bool(claims), "the claim to be on its way")
    stopping = asyncio.create_task(worker.stop(grace=5))    # nothing runs yet: it waits for the loop
    await asyncio.sleep(0)
    gate.set()
    await asyncio.wait_for(stopping, 5)
    assert runner.done()                # the loop has ended: cancelling it now (as the app does) cuts nothing
    assert handler.started == 0
    [job] = await store.claim(clock.now(), limit=10, lease_seconds=60)     # back in the queue, due now
    assert job.kind == "k"


class Grouped:
    """A GroupHandler: jobs whose payload names a group run together, playing `outcomes` (per job id, a value
    or an exception returned as that job's outcome); `fail` makes the run of that group raise."""

    def __init__(self, outcomes: dict[str, object] | None = None, fail: set[str] | None = None) -> None:
        self.outcomes = outcomes or {}
        self.fail = fail or set()
        self.groups: list[list[str]] = []
        self.alone: list[str] = []
        self.release: asyncio.Event | None = None      # when set: runs wait for it

    def group_of(self, job: Job) -> str | None:
        return job.payload.get("group")

    async def run(self, job: Job) -> Again | None:
        self.alone.append(job.id)
        return None

    async def run_group(self, jobs: list[Job]) -> list[object]:
        self.groups.append([job.id for job in jobs])
        if self.release is not None:
            await self.release.wait()
        if jobs[0].payload["group"] in self.fail:
            raise RuntimeError("the group's run failed")
        return [self.outcomes.get(job.id) for job in jobs]

    async def give_up(self, job: Job, reason: str) -> None: ...


def grouped_job(clock: ManualClock | SystemClock, group: str | None) -> Job:
    return Job(id=ids.new_id("job", clock.now()), kind="k", run_at=clock.now(),
               payload={} if group is None else {"group": group})


async def test_jobs_of_one_group_claimed_together_run_as_one_and_keep_their_own_outcomes(store: Store,
                                                                                          clock: ManualClock) -> None:
    """Jobs claimed together that a GroupHandler puts in one group run in one call; a job without a group runs
    alone. Each job's outcome is recorded as a run of its own would record it: done, run again, retried."""
    a = [grouped_job(clock, "a") for _ in range(3)]
    b = [grouped_job(clock, "b") for _ in range(2)]
    lone = grouped_job(clock, None)
    handler = Grouped(outcomes={a[1].id: Again(5.0), a[2].id: Retry(3.0, "not yet")}, fail={"b"})
    worker = Worker(store, {"k": handler}, clock, OPTS)
    await store.enqueue([a[0], b[0], lone, a[1], b[1], a[2]])
    assert await worker.drain() == 6
    assert sorted(handler.groups) == sorted([[j.id for j in a], [j.id for j in b]])
    assert handler.alone == [lone.id]
    rows = {r["id"]: r for r in await store._read_all("SELECT * FROM jobs", ())}  # type: ignore[attr-defined]
    assert set(rows) == {a[1].id, a[2].id, b[0].id, b[1].id}         # a[0] and the lone job are done
    assert rows[a[1].id]["attempts"] == 0 and rows[a[1].id]["run_at"] == pytest.approx(clock.now() + 5)
    assert rows[a[2].id]["attempts"] == 1 and rows[a[2].id]["last_error"] == "not yet"
    assert rows[a[2].id]["run_at"] == pytest.approx(clock.now() + 3)
    for job in b:       # the group's run raised: every one of its jobs is retried
        assert rows[job.id]["attempts"] == 1 and "the group's run failed" in rows[job.id]["last_error"]
        assert rows[job.id]["state"] == "queued" and rows[job.id]["lease_token"] is None


async def test_a_running_group_keeps_the_lease_of_every_job_in_it(store: Store) -> None:
    """A group runs longer than its jobs' lease: the keeper extends every one of their leases, and each job
    holds one of the worker's slots."""
    clock = SystemClock()
    handler = Grouped()
    handler.release = asyncio.Event()
    leases = Leases(store)
    lease = REAL_LEASE
    worker = Worker(leases, {"k": handler}, clock,  # type: ignore[arg-type]
                    WorkerOptions(lease_seconds=lease, concurrency=4))
    jobs = [grouped_job(clock, "a") for _ in range(3)]
    await store.enqueue(jobs)
    running = asyncio.create_task(worker.run_forever())
    try:
        await wait_until(lambda: len(handler.groups) == 1, "the group's run")
        assert worker._free_slots() == 1
        deadline = clock.now() + 1.5 * lease
        while clock.now() < deadline:          # more than a lease's worth of time: nobody else may claim them
            assert await store.claim(clock.now(), limit=3, lease_seconds=lease) == []
            await asyncio.sleep(0.05)
        assert {job.id for job in jobs} <= set(leases.extended)
        handler.release.set()
        await wait_for(lambda: _no_jobs(store), 5, "the group's jobs to be done")
        # Their rows go before the run gives its slots back (the end's commit can be seen first): wait for that.
        await wait_until(lambda: worker._free_slots() == 4, "the group's slots to be given back")
    finally:
        await worker.stop()
        await asyncio.wait_for(running, 5)


async def _no_jobs(store: Store) -> bool:
    return await store.job_counts() == {}


class FailingFinishes:
    """A store whose finish_jobs fails (the rest goes to `store`)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    async def finish_jobs(self, jobs: list[Job]) -> None:
        raise RuntimeError("the write of the group's ends failed")


async def test_a_failing_end_of_a_group_keeps_the_other_outcomes(store: Store, clock: ManualClock) -> None:
    """The write ending a group's done jobs fails: the other jobs' outcomes are still recorded (a retry keeps its
    delay and its error), and the done jobs stay leased, for their lease to bring back."""
    a = [grouped_job(clock, "a") for _ in range(2)]
    handler = Grouped(outcomes={a[1].id: Retry(3.0, "not yet")})
    worker = Worker(FailingFinishes(store), {"k": handler}, clock, OPTS)  # type: ignore[arg-type]
    await store.enqueue(a)
    jobs = await store.claim(clock.now(), limit=5, lease_seconds=30)
    with pytest.raises(RuntimeError, match="group's ends"):
        await worker._execute_unit(jobs)
    rows = {r["id"]: r for r in await store._read_all("SELECT * FROM jobs", ())}  # type: ignore[attr-defined]
    assert rows[a[1].id]["last_error"] == "not yet" and rows[a[1].id]["lease_token"] is None
    assert rows[a[0].id]["lease_token"] is not None
