"""The lock of SQLite's one writer connection: first come, first served, but short work goes first.

Everything relay writes to SQLite goes through one connection, one transaction at a time. Two kinds of work
wait for it: transactions run on the writer's thread (transitions, archived images, delivery attempts,
shared by whoever is waiting; each holds the writer about 1 ms, and up to 18 ms at p99 under load, most of
it the hop to the thread and back through a busy loop), and short work run right on the event loop's thread
(a group commit of small writes such as received callbacks and job ends, a claim; well under a millisecond
each, relay.store.sqlite's _tx_on_loop). Under bench.throughput's load the writer is busy all the time and
a plain FIFO lock kept 10-15 thread transactions ahead of every group commit: a provider's callback waited
44 ms (p50) for its durable write, and a claim as long, on every step of a task.

So short work goes ahead of the transactions queued for the thread, but never twice in a row while any of
those wait: after a holder of the short kind, the next holder is a queued transaction if there is one. With
k transactions queued ahead of it, a transaction lets at most k + 1 short holders go first (one before each
of them and one before itself); the j-th short waiter in line (from 0) waits for at most j + 1 transactions
besides the current holder. Neither kind can be starved by the other.

The lock is handed over directly on release (it stays locked for the next holder), so nobody can take it
between a release and the woken waiter's turn.
"""

from __future__ import annotations

import asyncio
from collections import deque
from types import TracebackType


class WriterLock:
    def __init__(self) -> None:
        self._locked = False
        self._short: deque[asyncio.Future[None]] = deque()
        self._long: deque[asyncio.Future[None]] = deque()
        self._short_held_last = False       # the kind of the current (or last) holder
        self._kind_before_handover = False  # the kind of the holder before it, in case the new one never runs

    def locked(self) -> bool:
        return self._locked

    def waiting(self) -> int:
        """Waiters queued (for tests and diagnostics)."""
        return len(self._short) + len(self._long)

    async def acquire(self, *, short: bool = False) -> None:
        """Wait for the writer. `short`: bounded work on the loop's thread, served ahead of queued long work
        (see the module's docstring)."""
        if not self._locked:
            self._locked, self._short_held_last = True, short
            return
        handed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._short if short else self._long
        queue.append(handed)
        try:
            await handed
        except asyncio.CancelledError:
            if handed.done() and not handed.cancelled():
                # Handed the lock as the caller was cancelled: pass it on, as the holder before would have.
                self._short_held_last = self._kind_before_handover
                self.release()
            elif handed in queue:
                queue.remove(handed)
            raise

    def release(self) -> None:
        """Hand the writer to the next waiter (see the module's docstring for which), or free it."""
        if not self._locked:
            raise RuntimeError("release of a writer lock not held")
        # After short work, a queued long transaction goes next; otherwise short work first.
        order = (self._long, self._short) if self._short_held_last else (self._short, self._long)
        for queue in order:
            while queue:
                handed = queue.popleft()
                if not handed.done():                  # a waiter cancelled before its turn is passed over
                    self._kind_before_handover = self._short_held_last
                    self._short_held_last = queue is self._short
                    handed.set_result(None)
                    return
        self._locked = False

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.release()
