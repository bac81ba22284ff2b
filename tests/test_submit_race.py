"""A submit job that decided on an old read never fails a task whose provider task is known by now.

Found by tests/chaos: an EvoLink submit was sent, relay was SIGKILLed before the answer, and after
the restart the provider's callback (confirmed with the provider) moved the task to archiving just
as the submit job, which had read the task before, failed it as `submit_outcome_unknown`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from relay.jobs.poll import PollHandler
from relay.jobs.submit import SubmitHandler
from relay.models import Job, ProviderImage, ProviderStatus, TaskUpdate
from relay.states import on_update
from tests.harness import harness


async def test_the_callback_that_came_first_wins_over_a_stale_submit_job(tmp_path: Path) -> None:
    async with harness(tmp_path, run_worker=False) as h:
        store = h.runtime.store
        created = await h.create(provider="evolink", prompt="sent, then relay died")
        task_id = created["id"]
        await store.mark_submit_started(task_id, time.time())          # the submit was sent; no answer recorded
        before = await store.get_task(task_id)                           # what the restarted submit job reads …
        done = TaskUpdate(status=ProviderStatus.SUCCEEDED, provider_task_id="task-unified-1",
                          images=(ProviderImage(url="http://sim.test/files/x.png"),))
        assert await store.apply(task_id, lambda t: on_update(t, done), time.time())   # … then the callback lands

        handler = SubmitHandler(h.runtime.ctx)
        real_get_task = store.get_task

        async def stale_get_task(wanted: str, *, images: bool = True):  # type: ignore[no-untyped-def]
            return before if wanted == task_id else await real_get_task(wanted, images=images)

        store.get_task = stale_get_task  # type: ignore[method-assign]
        try:
            await handler.run(Job(id="job_1", kind="submit", task_id=task_id, run_at=time.time()))
        finally:
            store.get_task = real_get_task  # type: ignore[method-assign]
        task = await h.task(task_id)
        assert task["status"] == "archiving" and task["error"] is None, task
        assert task["provider_task_id"] == "task-unified-1"


async def test_a_poll_past_the_deadline_never_fails_a_task_already_being_archived(tmp_path: Path) -> None:
    """The poll job read the task (still running) and found the deadline passed; meanwhile a callback moved
    it to archiving. The timeout must not be applied: the provider finished and its images are being saved."""
    async with harness(tmp_path, run_worker=False, RELAY_POLLING_TASK_TIMEOUT="0.01") as h:
        store = h.runtime.store
        created = await h.create(provider="evolink", prompt="finished as the deadline passed")
        task_id = created["id"]
        running = TaskUpdate(status=ProviderStatus.RUNNING, provider_task_id="task-unified-2")
        assert await store.apply(task_id, lambda t: on_update(t, running), time.time())
        before = await store.get_task(task_id)                           # what the poll job reads …
        done = TaskUpdate(status=ProviderStatus.SUCCEEDED, provider_task_id="task-unified-2",
                          images=(ProviderImage(url="http://sim.test/files/y.png"),))
        assert await store.apply(task_id, lambda t: on_update(t, done), time.time())   # … then the callback lands

        real_get_task = store.get_task

        async def stale_get_task(wanted: str, *, images: bool = True):  # type: ignore[no-untyped-def]
            return before if wanted == task_id else await real_get_task(wanted, images=images)

        store.get_task = stale_get_task  # type: ignore[method-assign]
        try:
            await PollHandler(h.runtime.ctx).run(Job(id="job_2", kind="poll", task_id=task_id, run_at=time.time()))
        finally:
            store.get_task = real_get_task  # type: ignore[method-assign]
        task = await h.task(task_id)
        assert task["status"] == "archiving" and task["error"] is None, task


@pytest.mark.parametrize("meanwhile", ["another run marked it", "another run submitted it", "it was canceled"])
async def test_a_submit_run_that_outlived_its_lease_does_not_send(tmp_path: Path, meanwhile: str) -> None:
    """A run of the submit job reads the task, then stalls past its lease (a long GC or VM pause, lease
    extensions failing through a store outage); the job is claimed again and that run marks and sends the
    submit. When the first run resumes, its reservation must find the task changed and send nothing: a second
    send to a provider without idempotent submits is a second task and a second charge."""
    async with harness(tmp_path, run_worker=False) as h:
        store = h.runtime.store
        task_id = (await h.create(provider="evolink", prompt="two runs of one submit job"))["id"]
        before = await store.get_task(task_id)                          # what the stalled run read
        assert before is not None and before.submit_started_at is None
        handler = SubmitHandler(h.runtime.ctx)
        provider = h.runtime.ctx.provider("evolink")
        sent: list[str] = []
        real_submit = provider.submit

        async def counted_submit(*args: Any, **kwargs: Any) -> Any:
            sent.append(task_id)
            return await real_submit(*args, **kwargs)

        provider.submit = counted_submit  # type: ignore[method-assign]
        if meanwhile == "another run marked it":        # and is waiting for the provider's answer
            assert await store.reserve_submit(task_id, "evolink", 100, time.time()) == "reserved"
        elif meanwhile == "another run submitted it":
            await handler.run(Job(id="job_s", kind="submit", task_id=task_id, run_at=time.time()))
            assert len(sent) == 1 and (await h.task(task_id))["provider_task_id"]
        else:
            await h.runtime.tasks.cancel(task_id)
        after = await store.get_task(task_id)
        real_get_task = store.get_task

        async def stale_get_task(wanted: str, *, images: bool = True):  # type: ignore[no-untyped-def]
            return before if wanted == task_id else await real_get_task(wanted, images=images)

        store.get_task = stale_get_task  # type: ignore[method-assign]
        try:
            again = await handler.run(Job(id="job_s", kind="submit", task_id=task_id, run_at=time.time()))
        finally:
            store.get_task = real_get_task  # type: ignore[method-assign]
        assert len(sent) == (1 if meanwhile == "another run submitted it" else 0)
        # Looked at again, not ended on the stale read, once the other run's send has had its timeout.
        assert again is not None and again.after >= h.runtime.settings.providers["evolink"].timeout
        assert await store.get_task(task_id) == after   # and nothing about the task changed


async def test_an_accepted_submit_is_recorded_through_a_store_hiccup(tmp_path: Path) -> None:
    """The provider accepted the submit and the store failed to record it (locked, full, a lost connection):
    the answer lives only in the run's memory, so the run keeps trying to record it instead of failing, which
    would leave the mark with no provider task (a task failed as submit_outcome_unknown, its provider task lost).
    The provider's circuit failing to count the success changes nothing."""
    async with harness(tmp_path, run_worker=False) as h:
        store = h.runtime.store
        created = await h.create(provider="gmicloud", prompt="accepted, then the store hiccups")
        real_apply, failures = store.apply, iter([ConnectionError("reset"), ConnectionError("reset")])

        async def hiccup(*args: Any, **kwargs: Any) -> Any:
            failure = next(failures, None)
            if failure is not None:
                raise failure
            return await real_apply(*args, **kwargs)

        async def uncounted(*args: Any, **kwargs: Any) -> Any:
            raise ConnectionError("reset")
        store.apply = hiccup  # type: ignore[method-assign]
        store.circuit_succeeded = uncounted  # type: ignore[method-assign]
        assert await SubmitHandler(h.runtime.ctx).run(
            Job(id="job_a", kind="submit", task_id=created["id"], run_at=time.time())) is None
        task = await h.task(created["id"])
        assert task["provider_task_id"] and task["status"] in ("queued", "running"), task


async def test_a_task_canceled_while_its_submit_was_on_its_way_keeps_the_providers_task_and_cancels_it(
        tmp_path: Path) -> None:
    """The client cancels while the submit is in flight; the provider accepts it anyway. The task stays canceled,
    the provider's task is recorded on it (it exists, and may bill), and relay asks the provider to cancel it
    where the dialect can (it was dropped: the provider's task ran on unseen)."""
    from dataclasses import replace

    from relay.states import on_cancel
    async with harness(tmp_path, run_worker=False) as h:
        store, ctx = h.runtime.store, h.runtime.ctx
        created = await h.create(provider="apimart", prompt="canceled on the way")
        provider = ctx.providers["apimart"]
        provider.caps = replace(provider.caps, cancel=True)
        canceled_there: list[str] = []
        real_submit = provider.submit

        async def submit_while_canceled(*args: Any, **kwargs: Any) -> Any:
            assert await store.apply(created["id"], on_cancel, time.time())      # the client's cancel lands
            return await real_submit(*args, **kwargs)

        async def cancel(provider_task_id: str) -> None:
            canceled_there.append(provider_task_id)
        provider.submit = submit_while_canceled  # type: ignore[method-assign]
        provider.cancel = cancel  # type: ignore[method-assign]
        await SubmitHandler(ctx).run(Job(id="job_c", kind="submit", task_id=created["id"], run_at=time.time()))
        task = await h.task(created["id"])
        assert task["status"] == "canceled" and task["provider_task_id"], task
        assert canceled_there == [task["provider_task_id"]]
