"""Store use cases of failover and costs: moving a task to its next provider, the shared circuit breakers,
the cost totals per provider per day. Backend-neutral, like relay.store.base (the decisions are
relay.circuit's; these read, lock and write)."""

from __future__ import annotations

import abc
from typing import Any

from relay.circuit import CLOSED, Circuit, admit, failed, shut
from relay.models import Task
from relay.store import queries as q
from relay.store.plumbing import StorePlumbing
from relay.store.rows import dumps, loads
from relay.store.tx import Row, Tx


def circuit_from_row(row: Row) -> Circuit:
    return Circuit(provider=row["provider"], state=row["state"], failures=int(row["failures"]),
                   opened_at=row["opened_at"], retry_at=row["retry_at"], last_error=row["last_error"],
                   updated_at=row["updated_at"])


class RoutingCases(StorePlumbing):
    @abc.abstractmethod
    async def get_task(self, task_id: str) -> Task | None: ...

    # ---- failover --------------------------------------------------------------------------------
    async def fail_over(self, task_id: str, from_provider: str, to_provider: str, attempt: dict[str, Any],
                        now: float, mark: float | None) -> bool:
        """Move a task nobody accepted from `from_provider` to `to_provider`, recording `attempt`; one transaction.

        Locks the task row; False (nothing written) unless the task is still pending at `from_provider` with no
        provider task and its submit mark still `mark` (the caller's, or None): a callback or another run that got
        further meanwhile (one that took over after the caller's lease ran out, and sent) wins.
        """
        async def body(tx: Tx) -> bool:
            row = await tx.one(q.LOCK_TASK, (task_id,))
            if row is None:
                return False
            attempts = [*(loads(row["attempts"]) or []), attempt]
            return await tx.run(q.FAIL_OVER_TASK, (to_provider, dumps(attempts), now, task_id, from_provider,
                                                   mark)) == 1
        return await self.transact(body)

    # ---- circuit breakers ------------------------------------------------------------------------
    async def circuit_shut(self, provider: str, now: float) -> bool:
        """Whether circuit_admit would refuse `provider` now, without taking its probe: a read."""
        row = await self._read(q.LOAD_CIRCUIT, (provider,))
        return row is not None and shut(circuit_from_row(row), now)

    async def circuit_admit(self, provider: str, now: float, cooldown: float) -> bool:
        """Whether a submit may go to `provider` now. A closed (or unknown) circuit costs one read; an open one
        that has cooled down is moved to half-open under its row lock, so only one replica's submit probes."""
        row = await self._read(q.LOAD_CIRCUIT, (provider,))
        if row is None or row["state"] == CLOSED:
            return True

        async def body(tx: Tx) -> bool:
            locked = await tx.one(q.LOCK_CIRCUIT, (provider,))
            if locked is None:
                return True
            allowed, changed = admit(circuit_from_row(locked), now, cooldown)
            if changed is not None:
                await self._write_circuit(tx, changed)
            return allowed
        return await self.transact(body)

    async def circuit_failed(self, provider: str, error: str, now: float, *, threshold: int,
                             cooldown: float) -> Circuit:
        """Count a failed submit (locks the provider's circuit row; opens it at the threshold)."""
        async def body(tx: Tx) -> Circuit:
            await tx.run(q.CLAIM_CIRCUIT, (provider, now))
            row = await tx.one(q.LOCK_CIRCUIT, (provider,))
            assert row is not None
            changed = failed(circuit_from_row(row), now, error, threshold=threshold, cooldown=cooldown)
            await self._write_circuit(tx, changed)
            return changed
        return await self.transact(body)

    async def circuit_succeeded(self, provider: str, now: float) -> None:
        """An accepted submit closes the provider's circuit (one statement; a no-op when already closed)."""
        await self._write(q.CLOSE_CIRCUIT, (now, provider))

    async def circuits(self) -> dict[str, Circuit]:
        return {row["provider"]: circuit_from_row(row) for row in await self._read_all(q.ALL_CIRCUITS)}

    @staticmethod
    async def _write_circuit(tx: Tx, c: Circuit) -> None:
        await tx.run(q.UPDATE_CIRCUIT, (c.state, c.failures, c.opened_at, c.retry_at, c.last_error, c.updated_at,
                                        c.provider))

    # ---- costs -----------------------------------------------------------------------------------
    async def cost_totals(self, since_day: int) -> list[dict[str, Any]]:
        """Per provider, UTC day and currency from `since_day` on: tasks that ended with a cost, and its sum. It
        reads every such task of the window (51-67 ms for 7 days of 40,000 tasks on SQLite, 0.33 s for 90), at
        every /metrics scrape and GET /v1/providers: _read_whole."""
        rows = await self._read_whole(q.COST_TOTALS_SINCE, (int(since_day),))
        return [{"provider": r["provider"], "day": int(r["cost_day"]), "currency": r["cost_currency"],
                 "tasks": int(r["tasks"]), "amount": round(float(r["amount"] or 0.0), 6)} for r in rows]
