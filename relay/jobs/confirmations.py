"""One status request to the provider answers every callback of a task that arrived before it was sent.

Providers call back in bursts: each state change is announced once per attempt (retried at 1, 2, 4 s
when an answer is slow), some announce progress too, and every callback is confirmed with the
provider's status endpoint before anything is applied (relay.jobs.callback). Asked once per callback,
a burst of a hundred callbacks costs a hundred status requests against the provider's rate limit,
all answering the same question. Here the callbacks of one task share a request:

- a request sent at or after a callback was received answers it: the provider's state it reports is
  at least as recent as the news the callback brings;
- so a callback joins the newest request for its task (and provider task id) when that was sent no
  earlier than the callback's receipt, in flight or answered; otherwise it sends a new one.

What a shared answer means for each callback is still judged per callback (relay.jobs.callback), and a
callback whose claim the shared answer does not confirm asks again (once for the callbacks of a task run
together, whose request was sent after all of them arrived): receipt times come from whichever replica
took the callback, and a clock running behind must not let an older answer overrule a newer callback.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from relay.clock import Clock
from relay.models import TaskUpdate

KEEP = 1024     # tasks whose newest request is remembered; older ones are forgotten first


@dataclass
class _Request:
    ticket: str                          # the provider's task id asked about
    sent_at: float
    answer: asyncio.Future[TaskUpdate]
    applied: bool = False                # a caller has applied the answer (committed)
    gathering: bool = False              # a caller is settling the callbacks still waiting with it

    def failed(self) -> bool:
        return self.answer.done() and (self.answer.cancelled() or self.answer.exception() is not None)


@dataclass(frozen=True)
class Asked:
    """The request that answers a callback: sent for it, or shared with the callbacks of its task."""
    shared: bool          # another caller sent it
    sent_at: float        # it answers every callback of the task received by then
    ticket: str           # the provider task id it asked about
    _request: _Request = field(repr=False)

    async def answer(self) -> TaskUpdate:
        """The provider's answer; raises what the request raised (every caller sharing it sees it)."""
        # shield: a caller that is cancelled (shutdown) leaves the request running for the others.
        return await asyncio.shield(self._request.answer)

    @property
    def applied(self) -> bool:
        """Whether a caller has applied the answer already: applying it again can change nothing (a state
        machine update is a no-op when repeated, or when the task has moved on since)."""
        return self._request.applied

    def mark_applied(self) -> None:
        self._request.applied = True

    def as_shared(self) -> Asked:
        """This request, as an answer shared with callbacks it was not sent for."""
        return replace(self, shared=True)

    def take_gathering(self) -> bool:
        """True for one caller at a time: it settles the task's waiting callbacks with this answer (the others
        would find the same ones)."""
        taken, self._request.gathering = self._request.gathering, True
        return not taken

    def release_gathering(self) -> None:
        """The gathering stopped before the end (failed, or at its page limit): a later caller may go on."""
        self._request.gathering = False


class Confirmations:
    def __init__(self, clock: Clock, keep: int = KEEP) -> None:
        self._clock = clock
        self._keep = keep
        self._newest: OrderedDict[str, _Request] = OrderedDict()    # task id → its newest request

    def ask(self, task_id: str, ticket: str, received_at: float, fetch: Callable[[], Awaitable[TaskUpdate]], *,
            fresh: bool = False) -> Asked:
        """The request for `ticket` that answers a callback received at `received_at`: the task's newest one if
        it was sent no earlier (in flight or answered, not failed), else a new one made with `fetch`.
        `fresh`: always a new one."""
        request = self._newest.get(task_id)
        if fresh or request is None or request.ticket != ticket or request.sent_at < received_at or request.failed():
            request = self._send(task_id, ticket, fetch)
            return Asked(False, request.sent_at, ticket, request)
        return Asked(True, request.sent_at, ticket, request)

    def _send(self, task_id: str, ticket: str, fetch: Callable[[], Awaitable[TaskUpdate]]) -> _Request:
        answer = asyncio.ensure_future(fetch())
        answer.add_done_callback(_retrieved)
        request = _Request(ticket, self._clock.now(), answer)
        self._newest[task_id] = request
        self._newest.move_to_end(task_id)
        while len(self._newest) > self._keep:
            self._newest.popitem(last=False)
        return request


def _retrieved(answer: asyncio.Future[TaskUpdate]) -> None:
    # Every caller sees the failure; this only keeps asyncio from reporting it as never retrieved when
    # the last caller was cancelled before the answer came.
    if not answer.cancelled():
        answer.exception()
