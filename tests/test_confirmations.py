"""relay.jobs.confirmations: one status request answers every callback of a task received before it was sent."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from relay.clock import ManualClock
from relay.errors import ProviderUnavailable
from relay.jobs.confirmations import Asked, Confirmations
from relay.models import ProviderStatus, TaskUpdate

RUNNING = TaskUpdate(status=ProviderStatus.RUNNING, provider_task_id="p1")


class Answered:
    def __init__(self, asked: Asked, update: TaskUpdate) -> None:
        self.update, self.shared, self.sent_at, self.asked = update, asked.shared, asked.sent_at, asked

    @property
    def applied(self) -> bool:
        return self.asked.applied

    def mark_applied(self) -> None:
        self.asked.mark_applied()


async def answered(confirmations: Confirmations, *args: Any, **kwargs: Any) -> Answered:
    asked = confirmations.ask(*args, **kwargs)
    return Answered(asked, await asked.answer())


class Provider:
    """Counts status requests; each can be held until released."""

    def __init__(self) -> None:
        self.asked = 0
        self.release = asyncio.Event()
        self.release.set()
        self.fail = False

    async def fetch(self) -> TaskUpdate:
        self.asked += 1
        await self.release.wait()
        if self.fail:
            raise ProviderUnavailable("down")
        return RUNNING


async def test_a_request_sent_after_a_callback_arrived_answers_it() -> None:
    clock, provider = ManualClock(100.0), Provider()
    confirmations = Confirmations(clock)
    first = await answered(confirmations, "tsk_a", "p1", 99.0, provider.fetch)
    assert (first.update, first.shared, first.sent_at, provider.asked) == (RUNNING, False, 100.0, 1)
    clock.advance(5)
    again = await answered(confirmations, "tsk_a", "p1", 100.0, provider.fetch)     # received when it was sent
    assert (again.shared, again.sent_at, provider.asked) == (True, 100.0, 1)
    later = await answered(confirmations, "tsk_a", "p1", 100.5, provider.fetch)     # news newer than the answer
    assert (later.shared, later.sent_at, provider.asked) == (False, 105.0, 2)
    other_ticket = await answered(confirmations, "tsk_a", "p2", 50.0, provider.fetch)
    other_task = await answered(confirmations, "tsk_b", "p1", 50.0, provider.fetch)
    fresh = await answered(confirmations, "tsk_a", "p2", 50.0, provider.fetch, fresh=True)
    assert not (other_ticket.shared or other_task.shared or fresh.shared) and provider.asked == 5


async def test_callbacks_arriving_together_share_one_request_in_flight() -> None:
    clock, provider = ManualClock(100.0), Provider()
    confirmations = Confirmations(clock)
    provider.release.clear()
    asks = [asyncio.create_task(answered(confirmations, "tsk_a", "p1", 99.0, provider.fetch)) for _ in range(20)]
    while provider.asked == 0:
        await asyncio.sleep(0)
    provider.release.set()
    answers = await asyncio.gather(*asks)
    assert provider.asked == 1 and [a.shared for a in answers].count(False) == 1
    assert {a.update for a in answers} == {RUNNING}


async def test_a_failed_request_fails_everyone_sharing_it_and_is_not_reused() -> None:
    clock, provider = ManualClock(100.0), Provider()
    confirmations = Confirmations(clock)
    provider.release.clear()
    provider.fail = True
    asks = [asyncio.create_task(answered(confirmations, "tsk_a", "p1", 99.0, provider.fetch)) for _ in range(3)]
    while provider.asked == 0:
        await asyncio.sleep(0)
    provider.release.set()
    results = await asyncio.gather(*asks, return_exceptions=True)
    assert all(isinstance(r, ProviderUnavailable) for r in results) and provider.asked == 1
    provider.fail = False
    retried = await answered(confirmations, "tsk_a", "p1", 99.0, provider.fetch)
    assert not retried.shared and provider.asked == 2


async def test_a_cancelled_caller_leaves_the_request_to_the_others() -> None:
    clock, provider = ManualClock(100.0), Provider()
    confirmations = Confirmations(clock)
    provider.release.clear()
    leaver = asyncio.create_task(answered(confirmations, "tsk_a", "p1", 99.0, provider.fetch))
    stayer = asyncio.create_task(answered(confirmations, "tsk_a", "p1", 99.0, provider.fetch))
    while provider.asked == 0:
        await asyncio.sleep(0)
    leaver.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaver
    provider.release.set()
    assert (await stayer).update == RUNNING and provider.asked == 1


async def test_only_the_newest_tasks_are_remembered() -> None:
    clock, provider = ManualClock(100.0), Provider()
    confirmations = Confirmations(clock, keep=2)
    for task in ("tsk_a", "tsk_b", "tsk_c"):
        await answered(confirmations, task, "p1", 99.0, provider.fetch)
    assert (await answered(confirmations, "tsk_c", "p1", 99.0, provider.fetch)).shared
    assert not (await answered(confirmations, "tsk_a", "p1", 99.0, provider.fetch)).shared     # forgotten
    assert provider.asked == 4


async def test_an_applied_answer_is_known_to_everyone_sharing_it() -> None:
    """Once one callback has applied the shared answer, the others sharing it need not apply it again; a new
    request's answer starts unapplied."""
    clock, provider = ManualClock(100.0), Provider()
    confirmations = Confirmations(clock)
    first = await answered(confirmations, "tsk_a", "p1", 99.0, provider.fetch)
    joined = await answered(confirmations, "tsk_a", "p1", 99.0, provider.fetch)
    assert not (first.applied or joined.applied)
    first.mark_applied()
    assert joined.applied and (await answered(confirmations, "tsk_a", "p1", 100.0, provider.fetch)).applied
    clock.advance(1)
    assert not (await answered(confirmations, "tsk_a", "p1", 100.5, provider.fetch)).applied


async def test_a_cancelled_request_is_not_reused() -> None:
    clock, provider = ManualClock(100.0), Provider()
    confirmations = Confirmations(clock)
    provider.release.clear()
    asked = confirmations.ask("tsk_a", "p1", 99.0, provider.fetch)
    while provider.asked == 0:
        await asyncio.sleep(0)
    asked._request.answer.cancel()       # the loop tore it down (shutdown)
    with pytest.raises(asyncio.CancelledError):
        await asked.answer()
    provider.release.set()
    again = await answered(confirmations, "tsk_a", "p1", 99.0, provider.fetch)
    assert not again.shared and again.update == RUNNING and provider.asked == 2


async def test_one_caller_at_a_time_gathers_with_an_answer() -> None:
    clock, provider = ManualClock(100.0), Provider()
    confirmations = Confirmations(clock)
    first = confirmations.ask("tsk_a", "p1", 99.0, provider.fetch)
    second = confirmations.ask("tsk_a", "p1", 99.0, provider.fetch)
    assert (first.ticket, second.shared) == ("p1", True)
    assert first.take_gathering() and not second.take_gathering()
    first.release_gathering()                 # stopped early: the next one goes on
    assert second.take_gathering() and not first.take_gathering()
    await first.answer()
