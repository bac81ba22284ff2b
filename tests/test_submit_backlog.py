"""A backlog behind a provider's max_in_flight: the waiting submits look at the provider's room before anything
that costs (no reference image downloaded, none of the provider's rate spent), look less often the longer they
wait, and one whose deadline passes while waiting ends as a timeout without being sent (it was sent, billed, and
failed at its first poll)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from relay.clock import ManualClock
from relay.jobs.poll import PollHandler
from relay.jobs.submit import IN_FLIGHT_RECHECK_MAX, SubmitHandler
from relay.models import Job
from tests.harness import harness


async def test_a_backlog_waits_for_room_cheaply_and_never_sends_past_its_deadline(tmp_path: Path) -> None:
    clock = ManualClock()
    async with harness(tmp_path, run_worker=False, clock=clock, RELAY_PROVIDERS_GMICLOUD_MAX_IN_FLIGHT="1",
                       RELAY_POLLING_TASK_TIMEOUT="600") as h:
        ctx, store = h.runtime.ctx, h.runtime.store
        holding = await h.create(provider="gmicloud", prompt="holds the only place")
        waiting = await h.create(provider="gmicloud", prompt="waits")
        t0 = clock.now()
        assert await store.mark_submit_started(holding["id"], t0)     # in flight at the provider
        provider = ctx.providers["gmicloud"]
        costly: list[str] = []
        real_fetch_inputs, real_throttle = provider.fetch_inputs, ctx.throttle

        async def fetch_inputs(*args: Any, **kwargs: Any) -> Any:
            costly.append("download")
            return await real_fetch_inputs(*args, **kwargs)

        async def throttle(name: str) -> None:
            costly.append("rate")
            await real_throttle(name)
        provider.fetch_inputs = fetch_inputs  # type: ignore[method-assign]
        ctx.throttle = throttle  # type: ignore[method-assign]

        handler = SubmitHandler(ctx)
        job = Job(id="job_w", kind="submit", task_id=waiting["id"], run_at=clock.now())
        delays = []
        for _ in range(6):
            again = await handler.run(job)
            assert again is not None
            delays.append(again.after)
            job = Job(id="job_w", kind="submit", task_id=waiting["id"], run_at=clock.now(), payload=again.payload)
        # The first run goes straight to its reservation (which counts); once the provider was found full, none
        # of the looks again downloads the references or takes a token of the provider's rate.
        assert costly == ["download", "rate"], costly
        assert delays[0] < delays[2] < delays[4] and max(delays) <= IN_FLIGHT_RECHECK_MAX * 1.2, delays
        assert (await h.task(waiting["id"]))["status"] == "pending"

        clock.advance(601)       # the deadline passes while the provider is still full
        sent: list[str] = []
        real_submit = provider.submit

        async def submit(*args: Any, **kwargs: Any) -> Any:
            sent.append("submit")
            return await real_submit(*args, **kwargs)
        provider.submit = submit  # type: ignore[method-assign]
        await store.clear_submit_started(holding["id"], t0)      # room again, too late for the waiting one
        assert await handler.run(job) is None
        failed = await h.task(waiting["id"])
        assert failed["status"] == "failed" and failed["error"]["code"] == "timeout", failed
        assert "(max_in_flight); it was not sent" in failed["error"]["message"], failed
        assert sent == [] and costly == ["download", "rate"]


async def test_the_poll_at_the_deadline_asks_the_provider_once_more(tmp_path: Path) -> None:
    """The provider finished between the last poll and the deadline: the poll run at the deadline fetches once
    more and the task is archived, not failed as a timeout."""
    clock = ManualClock()
    async with harness(tmp_path, run_worker=False, clock=clock, RELAY_POLLING_TASK_TIMEOUT="60") as h:
        ctx = h.runtime.ctx
        task = await h.create(provider="pixazo", prompt="[sim:duration=0.05] done just before the deadline")
        await SubmitHandler(ctx).run(Job(id="job_s", kind="submit", task_id=task["id"], run_at=clock.now()))
        submitted = await h.task(task["id"])
        assert submitted["provider_task_id"], submitted

        async def finished() -> bool:
            served = await h.sim.get(f"/_sim/tasks/pixazo/{submitted['provider_task_id']}")
            return bool(served.json().get("images"))
        from tests.harness import wait_for
        await wait_for(finished, 10, "the simulator to finish the task")
        clock.advance(61)
        await PollHandler(ctx).run(Job(id="job_p", kind="poll", task_id=task["id"], run_at=clock.now()))
        assert (await h.task(task["id"]))["status"] == "archiving"


def test_the_poll_backoff_stays_finite_however_long_a_task_is_polled(tmp_path: Path) -> None:
    from relay.jobs.context import JobContext
    from tests.harness import settings_for
    ctx = JobContext(settings=settings_for(tmp_path), store=None, clock=ManualClock(), providers={},  # type: ignore[arg-type]
                     image_store=None, http=None, signer=None, limiters={})  # type: ignore[arg-type]
    assert ctx.next_poll_delay(5000) <= ctx.settings.polling.max_delay * (1 + ctx.settings.polling.jitter)


async def test_a_send_that_went_unanswered_past_its_deadline_with_no_room_ends(tmp_path: Path) -> None:
    """An earlier send went unanswered (the mark stands), the provider dedupes by key, and it is full: past the
    deadline the task ends as a timeout instead of looking again at once, for as long as the provider is full."""
    clock = ManualClock()
    async with harness(tmp_path, run_worker=False, clock=clock, RELAY_PROVIDERS_APIMART_MAX_IN_FLIGHT="1",
                       RELAY_POLLING_TASK_TIMEOUT="600") as h:
        ctx, store = h.runtime.ctx, h.runtime.store
        holding = await h.create(provider="apimart", prompt="holds the only place")
        unanswered = await h.create(provider="apimart", prompt="sent, no answer")
        assert await store.mark_submit_started(holding["id"], clock.now())
        assert await store.mark_submit_started(unanswered["id"], clock.now())
        clock.advance(601)
        run = await SubmitHandler(ctx).run(Job(id="job_u", kind="submit", task_id=unanswered["id"],
                                               run_at=clock.now()))
        assert run is None
        failed = await h.task(unanswered["id"])
        assert failed["status"] == "failed" and failed["error"]["code"] == "timeout", failed
        assert "earlier send went unanswered" in failed["error"]["message"]


async def _waiting_at_a_full_provider_whose_circuit_opens(h: Any, clock: ManualClock) -> tuple[SubmitHandler,
                                                                                                 dict[str, Any], Any]:
    """A task with [gmicloud, apimart] waiting for room at gmicloud (max_in_flight 1, held by another task), whose
    circuit then opens: its handler, the task, and the run's Again (payload "full": 1)."""
    ctx, store = h.runtime.ctx, h.runtime.store
    holding = await h.create(provider="gmicloud", prompt="holds the only place")
    assert await store.mark_submit_started(holding["id"], clock.now())
    waiting = await h.create(provider=["gmicloud", "apimart"], prompt="waits")
    handler = SubmitHandler(ctx)
    again = await handler.run(Job(id="job_w", kind="submit", task_id=waiting["id"], run_at=clock.now()))
    assert again is not None and again.payload.get("full") == 1
    f = ctx.settings.failover
    for _ in range(f.breaker_threshold):
        await store.circuit_failed("gmicloud", "503", clock.now(), threshold=f.breaker_threshold,
                                   cooldown=f.breaker_cooldown)
    return handler, waiting, again


async def test_a_backlog_moves_on_when_its_providers_circuit_opens(tmp_path: Path) -> None:
    """Tasks with a provider list wait for room at the first; its circuit then opens: their next look moves them
    to the next provider (the room look must not keep them from the circuit's, failing them at their deadline)."""
    clock = ManualClock()
    async with harness(tmp_path, run_worker=False, clock=clock, RELAY_PROVIDERS_GMICLOUD_MAX_IN_FLIGHT="1") as h:
        handler, waiting, again = await _waiting_at_a_full_provider_whose_circuit_opens(h, clock)
        await handler.run(Job(id="job_w", kind="submit", task_id=waiting["id"], run_at=clock.now(),
                              payload=again.payload))
        moved = await h.task(waiting["id"])
        assert moved["provider"] == "apimart", moved


async def test_a_backlogs_look_again_never_takes_a_cooled_circuits_probe(tmp_path: Path) -> None:
    """The provider's circuit has cooled down (its next submit is the probe) and the provider is still full: a
    waiting task's look again finds no room and waits, leaving the circuit open for a submit that will be sent
    (taking the probe without sending held every other task off the provider for another cooldown)."""
    clock = ManualClock()
    async with harness(tmp_path, run_worker=False, clock=clock, RELAY_PROVIDERS_GMICLOUD_MAX_IN_FLIGHT="1") as h:
        handler, waiting, again = await _waiting_at_a_full_provider_whose_circuit_opens(h, clock)
        store, f = h.runtime.store, h.runtime.ctx.settings.failover
        clock.advance(f.breaker_cooldown + 1)          # cooled down: the next submit sent there is the probe
        looked = await handler.run(Job(id="job_w", kind="submit", task_id=waiting["id"], run_at=clock.now(),
                                       payload=again.payload))
        assert looked is not None and looked.payload.get("full") == 2, "it waits for room"
        assert (await store.circuits())["gmicloud"].state == "open", "the probe was taken by a look"
        assert (await h.task(waiting["id"]))["provider"] == "gmicloud"


async def test_an_unanswered_send_to_a_provider_that_dedupes_is_sent_again_past_the_deadline(tmp_path: Path) -> None:
    """The send went unanswered (the mark stands) to a provider that dedupes by key, and the deadline has passed:
    it is sent again with the same key (free if the first was accepted), which tells the provider's task, whose
    images may be made already: the poll at the deadline asks once more. It is not failed blind."""
    clock = ManualClock()
    async with harness(tmp_path, run_worker=False, clock=clock, RELAY_POLLING_TASK_TIMEOUT="600") as h:
        ctx, store = h.runtime.ctx, h.runtime.store
        task = await h.create(provider="apimart", prompt="sent, unanswered")
        assert await store.mark_submit_started(task["id"], clock.now())
        clock.advance(601)
        assert await SubmitHandler(ctx).run(Job(id="job_d", kind="submit", task_id=task["id"],
                                                run_at=clock.now())) is None
        resent = await h.task(task["id"])
        assert resent["provider_task_id"] and resent["status"] in ("queued", "running"), resent
