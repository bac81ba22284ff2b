"""Store contract, concurrent cases: two store instances on ONE database (two replicas) racing each use case
whose correctness rests on a lock (relay.store.base says which row each one locks).

Runs on every backend of the `database` fixture: SQLite (two SQLiteStore on one file: SQLite's file lock
serializes their write transactions) and PostgreSQL (two PostgresStore on one database: row locks, the
provider's advisory lock, FOR UPDATE SKIP LOCKED). Each case is repeated over several rounds, every call of
a round started at once with asyncio.gather, and checks the outcome a missing lock would break:

- apply:            every decision made on the row as the previous one left it (no lost update): sequence,
                    progress and the events count one per decision; duplicated signals write one event each.
- reserve_submit:   never more than max_in_flight reservations for one provider, whoever reserves.
- opening:          replicas starting at once on an empty database all open (migrations run once).
- Idempotency-Key:  one task per key however many requests race; a different body is a Conflict; an
                    expired key is taken over once.
- claim:            every job leased exactly once while its lease holds.
- image completion: the last of two images finishing at once succeeds the task, exactly once.
- record_attempt:   a duplicate run of one attempt changes the delivery once; both attempts are kept.
- wake-ups:         (PostgreSQL) a job enqueued on one store wakes the other's worker at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest

from relay import ids
from relay.clock import ManualClock
from relay.deliveries.models import Attempt, Delivery, Subscription
from relay.errors import Conflict
from relay.models import Job, ProviderImage, ProviderStatus, Task, TaskStatus, TaskUpdate
from relay.states import PROGRESS_STEP, on_update
from relay.store.base import Applied, ArchiveResult, Decide, Store
from tests.harness import listed_events

T = TypeVar("T")
OpenStore = Callable[[], Awaitable[Store]]

RACE_TIMEOUT = 60.0        # seconds one round of racing calls may take, at most
ARCHIVED = ArchiveResult(sha256="a" * 64, content_type="image/png", width=1, height=1, bytes=10, path="aa/a.png")


async def race(*calls: Coroutine[Any, Any, T]) -> list[T | BaseException]:
    """Start every call at once; their results (or exceptions) in order. Bounded by RACE_TIMEOUT."""
    async with asyncio.timeout(RACE_TIMEOUT):
        return await asyncio.gather(*calls, return_exceptions=True)


def no_errors(results: list[T | BaseException]) -> list[T]:
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise AssertionError(f"{len(errors)} of {len(results)} racing calls raised; first: {errors[0]!r}") \
            from errors[0]
    return results  # type: ignore[return-value]


async def replicas(open_store: OpenStore) -> tuple[Store, Store]:
    """Two stores on the test's database (opening at once is a case of its own, below)."""
    return await open_store(), await open_store()


def new_task(clock: ManualClock, provider: str = "gmicloud") -> Task:
    now = clock.now()
    return Task(id=ids.new_id("tsk", now), provider=provider, request={"prompt": "p", "n": 1}, created_at=now,
                updated_at=now)


def moved_by(update: TaskUpdate) -> Decide:
    """The decision a provider update makes (relay.states.on_update)."""
    return lambda task: on_update(task, update)


def submit_job(task: Task) -> Job:
    return Job(id=ids.new_id("job", task.created_at), kind="submit", task_id=task.id, run_at=task.created_at,
               dedupe_key=f"submit:{task.id}")


async def events_of(store: Store, task_id: str, count: int) -> list[Any]:
    """The task's events, once at least `count` are listed (tests.harness.listed_events)."""
    return await listed_events(store, count, task_id=task_id)


# ---- opening -------------------------------------------------------------------------------------------
OPEN_ROUNDS = {"sqlite": 30, "postgresql": 10}     # a fresh PostgreSQL database costs ~0.1 s
OPENING_AT_ONCE = 4


async def test_stores_opening_at_once_on_a_fresh_database_all_open_and_migrate_it_once(
        databases: Callable[[], Awaitable[str]], new_store: Callable[[str], Store]) -> None:
    """Four replicas starting at the same instant on an empty database, round after round: every one opens
    (the migrations run once, under the backend's lock; SQLite: its switch to WAL and the migration wait
    for each other) and all of them see one schema: a task written by one is read by every other."""
    clock = ManualClock()
    first = await databases()
    for round_ in range(OPEN_ROUNDS["postgresql" if first.startswith("postgres") else "sqlite"]):
        location = first if round_ == 0 else await databases()
        stores = [new_store(location) for _ in range(OPENING_AT_ONCE)]
        results = await race(*(s.open() for s in stores))
        try:
            no_errors(results)
            task = new_task(clock)
            await stores[0].create_task(task, [])
            for store in stores:
                assert (await store.get_task(task.id)) is not None
        finally:
            for store, result in zip(stores, results):
                if isinstance(result, BaseException):
                    await _close_leaked_connections(result)
                else:
                    await store.close()


async def _close_leaked_connections(error: BaseException) -> None:
    """Close the aiosqlite connections a failed SQLiteStore.open() left open in its frames: their threads
    would otherwise keep the test process from exiting (a hang instead of a failure)."""
    import aiosqlite

    tb = error.__traceback__
    while tb is not None:
        for value in list(tb.tb_frame.f_locals.values()):
            if isinstance(value, aiosqlite.Connection):
                await value.close()
        tb = tb.tb_next


# ---- apply ---------------------------------------------------------------------------------------------
APPLY_ROUNDS = 5
APPLY_DECISIONS = 50


async def test_apply_from_two_stores_makes_every_decision_on_the_latest_row(open_store: OpenStore,
                                                                             clock: ManualClock) -> None:
    """50 decisions race on one task from two stores, each moving progress one step up from what it reads
    (a counter). All 50 are applied, one after another: sequence bumps 50 times, progress ends 50 steps
    up, and there is one event per decision with sequences 3…52 and progress 10…500 in order. Without the
    task's row lock two decisions read the same row: a lost update (progress short, a sequence twice)."""
    a, b = await replicas(open_store)

    def one_step_up(task: Task) -> Any:
        return on_update(task, TaskUpdate(status=ProviderStatus.RUNNING,
                                          progress=(task.progress or 0) + PROGRESS_STEP))

    for _ in range(APPLY_ROUNDS):
        task = new_task(clock)
        await a.create_task(task, [])
        running = TaskUpdate(status=ProviderStatus.RUNNING, provider_task_id="p-1", progress=0)
        assert await a.apply(task.id, moved_by(running), clock.now()) is not None

        results = no_errors(await race(*((a, b)[i % 2].apply(task.id, one_step_up, clock.now())
                                         for i in range(APPLY_DECISIONS))))
        assert all(r is not None for r in results), "a decision that always moves was found stale"
        applied = [r for r in results if r is not None]
        assert sorted(r.task.sequence for r in applied) == list(range(3, 3 + APPLY_DECISIONS))

        loaded = await b.get_task(task.id)
        assert loaded is not None and loaded.status == TaskStatus.RUNNING
        assert loaded.sequence == 2 + APPLY_DECISIONS
        assert loaded.progress == APPLY_DECISIONS * PROGRESS_STEP
        events = await events_of(a, task.id, 1 + APPLY_DECISIONS)
        progress = [e for e in events if e.type == "task.progress"]
        assert [e.sequence for e in progress] == list(range(3, 3 + APPLY_DECISIONS))
        assert [e.data["progress"] for e in progress] == [PROGRESS_STEP * (k + 1) for k in range(APPLY_DECISIONS)]
        assert len({e.id for e in events}) == len(events) == 1 + APPLY_DECISIONS


async def test_duplicated_signals_from_two_stores_change_the_task_once_per_transition(
        open_store: OpenStore, clock: ManualClock) -> None:
    """Provider callbacks duplicated and reordered, processed on two replicas at once (each signal five
    times from each store): one event per transition, no sequence twice, the images written once with
    one archive job each."""
    a, b = await replicas(open_store)
    signals = [
        TaskUpdate(status=ProviderStatus.QUEUED, provider_task_id="p-1"),
        TaskUpdate(status=ProviderStatus.RUNNING, provider_task_id="p-1", progress=40),
        TaskUpdate(status=ProviderStatus.SUCCEEDED, provider_task_id="p-1",
                   images=(ProviderImage(url="https://x/1.png"), ProviderImage(url="https://x/2.png"))),
    ]
    for _ in range(APPLY_ROUNDS):
        task = new_task(clock)
        await a.create_task(task, [])
        calls = []
        for copy in range(5):
            for signal in signals:
                for store in (a, b):
                    calls.append(store.apply(task.id, moved_by(signal), clock.now()))
        results = no_errors(await race(*calls))
        applied = [r for r in results if r is not None]

        events = await events_of(b, task.id, len(applied))
        assert len(applied) == len(events)
        types = [e.type for e in events]
        assert len(types) == len(set(types)) and types[-1] == "task.generated", types
        assert [e.sequence for e in events] == list(range(2, 2 + len(events)))
        loaded = await a.get_task(task.id)
        assert loaded is not None and loaded.status == TaskStatus.ARCHIVING
        assert loaded.sequence == 1 + len(events) and len(loaded.images) == 2
    counts = await b.job_counts()
    assert counts == {"archive:queued": 2 * APPLY_ROUNDS}, counts


# ---- reserve_submit ------------------------------------------------------------------------------------
RESERVE_ROUNDS = 5
RESERVE_TASKS = 20
MAX_IN_FLIGHT = 3


async def test_reserve_submit_from_two_stores_never_passes_the_cap(open_store: OpenStore,
                                                                   clock: ManualClock) -> None:
    """20 tasks of one provider account with max_in_flight = 3, reserved from two stores at once: exactly 3
    reservations succeed and exactly those 3 tasks are marked. When one of them leaves flight (it failed),
    the other 17 racing again get exactly one more. Without the provider's lock every count reads 0."""
    a, b = await replicas(open_store)
    for round_ in range(RESERVE_ROUNDS):
        provider = f"account-{round_}"
        tasks = [new_task(clock, provider) for _ in range(RESERVE_TASKS)]
        no_errors(await race(*((a, b)[i % 2].create_task(t, []) for i, t in enumerate(tasks))))

        first = await _reserve_all((a, b), tasks, provider, clock.now())
        assert len(first) == MAX_IN_FLIGHT, f"{len(first)} reservations with a cap of {MAX_IN_FLIGHT}"
        loaded = [await b.get_task(t.id) for t in tasks]
        marked = {t.id for t in loaded if t is not None and t.submit_started_at is not None}
        assert marked == {t.id for t in first}

        gone = first[0]
        failed = await a.apply(gone.id, moved_by(TaskUpdate(status=ProviderStatus.FAILED)), clock.now())
        assert failed is not None and failed.task.status == TaskStatus.FAILED
        second = await _reserve_all((a, b), [t for t in tasks if t.id not in marked], provider, clock.now())
        assert len(second) == 1, f"{len(second)} reservations for the one free place"


async def _reserve_all(stores: tuple[Store, Store], candidates: list[Task], provider: str, now: float) -> list[Task]:
    """Reserve every candidate at once, alternating stores; the ones that got a place."""
    won = no_errors(await race(*(stores[i % 2].reserve_submit(t.id, provider, MAX_IN_FLIGHT, now)
                                 for i, t in enumerate(candidates))))
    return [t for t, answer in zip(candidates, won) if answer == "reserved"]


# ---- Idempotency-Key -----------------------------------------------------------------------------------
IDEMPOTENCY_ROUNDS = 20
SAME_KEY_REQUESTS = 6          # per round, half from each store


async def test_one_idempotency_key_from_two_stores_at_once_makes_one_task(open_store: OpenStore,
                                                                          clock: ManualClock) -> None:
    """The same key and body sent to two replicas at the same instant (six requests, three each, each with its
    own task id): one task is created with its job, every other request gets that task back (created=False),
    no other task or job exists. Select-then-insert would make two tasks or fail on the key."""
    a, b = await replicas(open_store)
    for round_ in range(IDEMPOTENCY_ROUNDS):
        key = ("scope-1", f"order-{round_}", "body-hash-1")
        tasks = [new_task(clock) for _ in range(SAME_KEY_REQUESTS)]
        results = no_errors(await race(*((a, b)[i % 2].create_task(t, [submit_job(t)], idempotency=key)
                                         for i, t in enumerate(tasks))))
        created = [task for task, fresh in results if fresh]
        assert len(created) == 1, f"{len(created)} tasks created for one Idempotency-Key"
        assert {task.id for task, _ in results} == {created[0].id}
        for t in tasks:
            assert ((await b.get_task(t.id)) is not None) == (t.id == created[0].id)
    assert await a.job_counts() == {"submit:queued": IDEMPOTENCY_ROUNDS}
    listed, _ = await b.list_tasks(status=None, provider=None, limit=1000, cursor=None)
    assert len(listed) == IDEMPOTENCY_ROUNDS


async def test_one_idempotency_key_with_two_bodies_at_once_is_one_task_and_one_conflict(
        open_store: OpenStore, clock: ManualClock) -> None:
    """The same key with two different bodies, one to each replica at the same instant: one task, and the
    other request is refused with Conflict (never a second task)."""
    a, b = await replicas(open_store)
    for round_ in range(IDEMPOTENCY_ROUNDS):
        first, second = new_task(clock), new_task(clock)
        results = await race(a.create_task(first, [submit_job(first)], idempotency=("s", f"k{round_}", "hash-a")),
                             b.create_task(second, [submit_job(second)], idempotency=("s", f"k{round_}", "hash-b")))
        conflicts = [r for r in results if isinstance(r, Conflict)]
        made = [r for r in results if isinstance(r, tuple)]
        assert len(conflicts) == 1 and len(made) == 1, results
        task, fresh = made[0]
        assert fresh
        other = second if task.id == first.id else first
        assert await a.get_task(task.id) is not None and await b.get_task(other.id) is None
    assert await b.job_counts() == {"submit:queued": IDEMPOTENCY_ROUNDS}


async def test_tasks_created_at_once_on_one_store_each_get_their_own_outcome(open_store: OpenStore,
                                                                             clock: ManualClock) -> None:
    """Requests racing on one store (SQLite: they share its transactions): plain tasks are all created, one key sent
    with two bodies makes one task and one Conflict, and the Conflict undoes nothing of the others."""
    store = await open_store()
    transactions = 0
    transact = store.transact

    async def counted(body: Any) -> Any:
        nonlocal transactions
        transactions += 1
        return await transact(body)
    store.transact = counted  # type: ignore[method-assign]
    for round_ in range(IDEMPOTENCY_ROUNDS):
        plain = [new_task(clock) for _ in range(4)]
        first, second = new_task(clock), new_task(clock)
        results = await race(*(store.create_task(t, [submit_job(t)]) for t in plain[:2]),
                             store.create_task(first, [submit_job(first)], idempotency=("s", f"k{round_}", "hash-a")),
                             store.create_task(second, [submit_job(second)], idempotency=("s", f"k{round_}", "hash-b")),
                             *(store.create_task(t, [submit_job(t)]) for t in plain[2:]))
        assert no_errors(results[:2] + results[4:]) == [(t, True) for t in plain]
        conflicts = [r for r in results[2:4] if isinstance(r, Conflict)]
        made = [r for r in results[2:4] if isinstance(r, tuple)]
        assert len(conflicts) == 1 and len(made) == 1, results[2:4]
        assert made[0][1]
        for t in plain:
            assert await store.get_task(t.id) is not None
        assert [await store.get_task(t.id) is not None for t in (first, second)].count(True) == 1
    assert await store.job_counts() == {"submit:queued": IDEMPOTENCY_ROUNDS * 5}
    # Where transactions are shared (SQLite), each round's six were one, the Conflict included: it is refused
    # after the transaction, not by rolling back everyone's and running each again alone (seven).
    assert transactions == (IDEMPOTENCY_ROUNDS if store.SHARES_TRANSACTIONS else IDEMPOTENCY_ROUNDS * 6)


async def test_an_expired_idempotency_key_reused_at_once_from_two_stores_makes_one_new_task(
        open_store: OpenStore, clock: ManualClock) -> None:
    """A key older than 24 h is forgotten: reused by six requests at once on two replicas, it makes exactly one
    new task (the key's row is taken over once, under its lock) and the others get that new task back."""
    a, b = await replicas(open_store)
    keys = [("scope-1", f"old-{round_}", "body-hash-1") for round_ in range(IDEMPOTENCY_ROUNDS)]
    originals = {}
    for key in keys:
        original, fresh = await a.create_task(new_task(clock), [], idempotency=key)
        assert fresh
        originals[key] = original.id
    clock.advance(24 * 3600 + 1)
    for key in keys:
        tasks = [new_task(clock) for _ in range(SAME_KEY_REQUESTS)]
        results = no_errors(await race(*((a, b)[i % 2].create_task(t, [], idempotency=key)
                                         for i, t in enumerate(tasks))))
        created = [task for task, fresh in results if fresh]
        assert len(created) == 1, f"{len(created)} new tasks for one expired Idempotency-Key"
        assert {task.id for task, _ in results} == {created[0].id} and created[0].id != originals[key]
    listed, _ = await b.list_tasks(status=None, provider=None, limit=1000, cursor=None)
    assert len(listed) == 2 * IDEMPOTENCY_ROUNDS


# ---- claims --------------------------------------------------------------------------------------------
CLAIM_ROUNDS = 3
CLAIM_JOBS = 500
CLAIM_BATCH = 32
CLAIMERS_PER_STORE = 2
LEASE = 600.0                  # longer than the test: no lease runs out while it runs


async def test_claims_from_two_stores_lease_every_job_exactly_once(open_store: OpenStore,
                                                                   clock: ManualClock) -> None:
    """500 due jobs, claimed in batches of 32 by two claimers on each of two stores at once until none is
    left: every job is leased exactly once (one attempt each), and each holder's lease is the one recorded
    (finishing every claimed job with its lease empties the queue). A claim that does not lock what it
    picks hands the same job to two claimers."""
    a, b = await replicas(open_store)
    for _ in range(CLAIM_ROUNDS):
        now = clock.now()
        jobs = [Job(id=ids.new_id("job", now), kind="poll", run_at=now - (i % 50), dedupe_key=None)
                for i in range(CLAIM_JOBS)]
        assert await a.enqueue(jobs) == CLAIM_JOBS
        claimed: list[Job] = []
        no_errors(await race(*(_claim_until_empty(s, now, claimed) for s in (a, b) for _ in range(CLAIMERS_PER_STORE))))
        seen = [j.id for j in claimed]
        twice = {i for i in seen if seen.count(i) > 1}
        assert not twice, f"{len(twice)} jobs leased twice while their lease held"
        assert set(seen) == {j.id for j in jobs}, f"{CLAIM_JOBS - len(set(seen))} due jobs never claimed"
        assert all(j.attempts == 1 for j in claimed)
        assert await a.claim(now, limit=CLAIM_BATCH, lease_seconds=LEASE) == []
        assert await b.claim(now, limit=CLAIM_BATCH, lease_seconds=LEASE) == []

        no_errors(await race(*((a, b)[i % 2].finish_job(j) for i, j in enumerate(claimed))))
        assert await b.job_counts() == {}, "a holder's lease was not the one recorded"
        clock.advance(1)


async def _claim_until_empty(store: Store, now: float, claimed: list[Job]) -> None:
    """Claim batches until a claim finds nothing, adding what it got to `claimed`."""
    while True:
        got = await store.claim(now, limit=CLAIM_BATCH, lease_seconds=LEASE)
        if not got:
            return
        assert len(got) <= CLAIM_BATCH
        claimed.extend(got)


# ---- image completion ----------------------------------------------------------------------------------
IMAGE_ROUNDS = 20


async def _archiving_task(store: Store, clock: ManualClock) -> Applied:
    task = new_task(clock)
    await store.create_task(task, [])
    done = TaskUpdate(status=ProviderStatus.SUCCEEDED, provider_task_id="p-1",
                      images=(ProviderImage(url="https://x/1.png"), ProviderImage(url="https://x/2.png")))
    applied = await store.apply(task.id, lambda t: on_update(t, done), clock.now())
    assert applied is not None and len(applied.task.images) == 2
    return applied


@pytest.mark.parametrize("duplicated", [False, True], ids=["one-run-each", "every-run-twice"])
async def test_two_images_archived_at_once_on_two_stores_succeed_the_task_once(
        open_store: OpenStore, clock: ManualClock, duplicated: bool) -> None:
    """A task's two images archived at the same instant, one on each store (and, duplicated: each image
    archived by both stores, as a rerun job would): the task succeeds exactly once, with one
    task.succeeded event. Without the task's row lock each sees the other image still pending (the task
    stays archiving forever) or both see both done (two task.succeeded)."""
    a, b = await replicas(open_store)
    for _ in range(IMAGE_ROUNDS):
        applied = await _archiving_task(a, clock)
        first, second = applied.task.images
        owner = applied.task.id
        # The duplicates say whose image it is (as the archive job does, having read it): no read to find it.
        calls = [a.image_archived(first.id, ARCHIVED, clock.now()), b.image_archived(second.id, ARCHIVED, clock.now())]
        if duplicated:
            calls += [b.image_archived(first.id, ARCHIVED, clock.now(), owner_id=owner),
                      a.image_archived(second.id, ARCHIVED, clock.now(), owner_id=owner)]
        results = no_errors(await race(*calls))
        succeeded = [r for r in results if r is not None]
        assert len(succeeded) == 1, f"the task succeeded {len(succeeded)} times"
        assert succeeded[0].task.status == TaskStatus.SUCCEEDED and succeeded[0].event.type == "task.succeeded"
        loaded = await b.get_task(applied.task.id)
        assert loaded is not None and loaded.status == TaskStatus.SUCCEEDED
        assert [img.status for img in loaded.images] == ["archived", "archived"]
        types = [e.type for e in await events_of(a, applied.task.id, 2)]
        assert types == ["task.generated", "task.succeeded"], types


# ---- record_attempt ------------------------------------------------------------------------------------
ATTEMPT_ROUNDS = 20
AUTO_DISABLE_AFTER = 3 * 24 * 3600.0


async def test_one_attempt_recorded_twice_at_once_changes_the_delivery_once(open_store: OpenStore,
                                                                            clock: ManualClock) -> None:
    """A delivery's first attempt recorded by two runs of its job at the same instant, on two stores (one
    saw a 200, the other a 500): exactly one changes the delivery (one attempt counted, its outcome the
    delivery's state), and both attempts are kept in the history. Without the delivery's row lock both
    read attempts = 0 and both apply (attempts = 2)."""
    a, b = await replicas(open_store)
    now = clock.now()
    sub = Subscription(id=ids.new_id("sub", now), url="https://subscriber.test/hook", events=["task.*"],
                       keyring="sealed", created_at=now, updated_at=now)
    await a.create_subscription(sub)
    for _ in range(ATTEMPT_ROUNDS):
        task = new_task(clock)
        await a.create_task(task, [])
        queued = await a.apply(task.id, moved_by(TaskUpdate(status=ProviderStatus.QUEUED)), now)
        assert queued is not None
        found, _ = await b.list_deliveries(subscription_id=sub.id, status=None, task_id=task.id,
                                           event_id=queued.event.id, limit=10, cursor=None)
        [delivery] = found

        results = no_errors(await race(
            a.record_attempt(_first_attempt(delivery, 200, now), outcome="succeeded", next_attempt_at=None,
                             auto_disable_after=AUTO_DISABLE_AFTER, now=now),
            b.record_attempt(_first_attempt(delivery, 500, now), outcome="retry", next_attempt_at=now + 5,
                             auto_disable_after=AUTO_DISABLE_AFTER, now=now)))
        recorded = [r for r in results if r is not None]
        assert len(recorded) == 1, f"one attempt changed the delivery {len(recorded)} times"
        winner = recorded[0].delivery
        loaded: Delivery | None = await a.get_delivery(delivery.id)
        assert loaded is not None and loaded.attempts == 1 and loaded.round_attempts == 1
        assert loaded.status == winner.status and loaded.last_status_code == winner.last_status_code
        assert len(await b.list_attempts(delivery.id)) == 2
        # The failure clock follows the attempt that counted: a success stops it (a failure may have started it
        # in an earlier round), a failure starts it or keeps it running.
        clock_of = await b.get_subscription(sub.id)
        assert clock_of is not None
        assert (clock_of.failing_since is None) == (winner.status == "succeeded"), (winner.status, clock_of)
    current = await a.get_subscription(sub.id)
    assert current is not None and current.enabled


async def test_a_success_stops_the_failure_clock_a_failure_started(open_store: OpenStore, clock: ManualClock) -> None:
    """One store, in turn: a failed attempt starts the subscription's failure clock, a later success stops it, and
    a success while it is stopped leaves it stopped (the reset is skipped when the clock is not running)."""
    store = await open_store()
    now = clock.now()
    sub = Subscription(id=ids.new_id("sub", now), url="https://subscriber.test/hook", events=["task.*"],
                       keyring="sealed", created_at=now, updated_at=now)
    await store.create_subscription(sub)
    task = new_task(clock)
    await store.create_task(task, [])

    async def delivery_of(update: TaskUpdate) -> Delivery:
        applied = await store.apply(task.id, moved_by(update), now)
        assert applied is not None
        [delivery], _ = await store.list_deliveries(subscription_id=sub.id, status=None, task_id=task.id,
                                                     event_id=applied.event.id, limit=10, cursor=None)
        return delivery

    async def clock_after(delivery: Delivery, number: int, code: int) -> float | None:
        attempt = Attempt(delivery_id=delivery.id, number=number, at=now, url=delivery.url, status_code=code,
                          latency_ms=1.0, error=None if code == 200 else f"HTTP {code}")
        ok = code == 200
        recorded = await store.record_attempt(attempt, outcome="succeeded" if ok else "retry",
                                              next_attempt_at=None if ok else now + 5,
                                              auto_disable_after=AUTO_DISABLE_AFTER, now=now)
        assert recorded is not None
        state = await store.get_subscription(sub.id)
        assert state is not None and state.enabled
        return state.failing_since

    first = await delivery_of(TaskUpdate(status=ProviderStatus.QUEUED))
    assert await clock_after(first, 1, 500) == now
    assert await clock_after(first, 2, 200) is None
    # The success met the running clock and was recorded under the delivery's lock: each attempt kept once.
    assert [a.number for a in await store.list_attempts(first.id)] == [2, 1]
    second = await delivery_of(TaskUpdate(status=ProviderStatus.RUNNING))
    assert await clock_after(second, 1, 200) is None


async def test_fan_out_follows_each_subscription_change_another_replica_makes(open_store: OpenStore,
                                                                              clock: ManualClock) -> None:
    """A replica keeps the enabled subscriptions from one transition to the next (outbox.Subscribers), and every
    change another replica makes reaches its very next transition: a subscription added, its events changed,
    disabled, enabled again, deleted."""
    a, b = await replicas(open_store)
    now = clock.now()

    async def fanned_out_to() -> set[str | None]:
        task = new_task(clock)
        await a.create_task(task, [])
        applied = await a.apply(task.id, moved_by(TaskUpdate(status=ProviderStatus.QUEUED)), now)
        assert applied is not None
        found, _ = await a.list_deliveries(subscription_id=None, status=None, task_id=task.id,
                                           event_id=applied.event.id, limit=10, cursor=None)
        return {delivery.subscription_id for delivery in found}

    def subscription(events: list[str]) -> Subscription:
        return Subscription(id=ids.new_id("sub", now), url="https://subscriber.test/hook", events=events,
                            keyring="sealed", created_at=now, updated_at=now)

    def changed(**fields: Any) -> Callable[[Subscription], Subscription]:
        def change(sub: Subscription) -> Subscription:
            for name, value in fields.items():
                setattr(sub, name, value)
            return sub
        return change

    assert await fanned_out_to() == set()
    first = await b.create_subscription(subscription(["task.*"]))
    assert await fanned_out_to() == {first.id}
    assert await fanned_out_to() == {first.id}
    await b.update_subscription(first.id, changed(events=["archive.*"]), now)
    assert await fanned_out_to() == set()
    await b.update_subscription(first.id, changed(events=["task.queued"]), now)
    second = await b.create_subscription(subscription(["*"]))
    assert await fanned_out_to() == {first.id, second.id}
    await b.update_subscription(second.id, changed(enabled=False), now)
    assert await fanned_out_to() == {first.id}
    await b.update_subscription(second.id, changed(enabled=True), now)
    assert await fanned_out_to() == {first.id, second.id}
    assert await b.delete_subscription(first.id, now)
    assert await fanned_out_to() == {second.id}


def _first_attempt(delivery: Delivery, status_code: int, now: float) -> Attempt:
    return Attempt(delivery_id=delivery.id, number=1, at=now, url=delivery.url, status_code=status_code,
                   latency_ms=1.0, error=None if status_code == 200 else f"HTTP {status_code}")


# ---- wake-ups across replicas (PostgreSQL: LISTEN/NOTIFY; SQLite has no other process to wake) -----------
WAKE_TIMEOUT = 5.0


async def test_a_job_enqueued_on_one_postgresql_store_wakes_the_other_at_once(clock: ManualClock) -> None:
    """Replica B's worker sleeps until its next poll; a job enqueued (or a task created) on replica A wakes it
    at once through LISTEN/NOTIFY (without it: up to its idle poll later)."""
    from relay.store.postgres import PostgresStore
    from tests.pg import fresh_database

    async with fresh_database() as dsn:
        a, b = PostgresStore(dsn), PostgresStore(dsn)
        await a.open()
        await b.open()
        try:
            woken = asyncio.Event()
            b.on_enqueue(woken.set)
            await a.enqueue([Job(id=ids.new_id("job", clock.now()), kind="poll", run_at=clock.now())])
            async with asyncio.timeout(WAKE_TIMEOUT):
                await woken.wait()

            woken.clear()
            task = new_task(clock)
            await a.create_task(task, [submit_job(task)])
            async with asyncio.timeout(WAKE_TIMEOUT):
                await woken.wait()

            assert await b.job_counts() == {"poll:queued": 1, "submit:queued": 1}
        finally:
            await a.close()
            await b.close()


# ---- replay ------------------------------------------------------------------------------------------------
REPLAYED = 200


async def test_two_replays_of_one_window_at_once_restart_each_delivery_once(open_store: OpenStore,
                                                                           clock: ManualClock) -> None:
    """The same replay sent twice at once (a retried request, two operators), on two stores: each failed delivery
    gets one new round and one due job, and the two counts add up to the deliveries, not twice as many. The
    candidates are read without locks, so without the restart's own status check both replays could restart the
    same deliveries on PostgreSQL, the second making due again a job the first had already had sent."""
    from tests.test_store import _failed_deliveries

    a, b = await replicas(open_store)
    now = clock.now()
    sub_id, made = await _failed_deliveries(a, now, [now + n * 0.01 for n in range(REPLAYED)])
    counts = no_errors(await race(*(store.replay_deliveries(sub_id, since=now, until=now + 60, statuses=["failed"],
                                                            now=now) for store in (a, b))))
    assert sum(count for count, _ in counts) == REPLAYED, counts
    rows = await a._read_all("SELECT status, COUNT(*) AS n FROM deliveries GROUP BY status")
    assert {row["status"]: row["n"] for row in rows} == {"pending": REPLAYED}
    jobs = await a._read_all("SELECT COUNT(*) AS n FROM jobs WHERE kind = 'deliver'")
    assert jobs[0]["n"] == REPLAYED
