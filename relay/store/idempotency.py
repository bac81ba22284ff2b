"""Idempotency-Key windows, for every create that takes the header (tasks, adoptions, archives).

Backend-neutral: it speaks only through a Tx and the named statements of relay.store.queries.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from relay.errors import Conflict
from relay.models import IDEMPOTENCY_WINDOW
from relay.store import queries as q
from relay.store.tx import Tx

T = TypeVar("T")


async def replay_or_claim(tx: Tx, idempotency: tuple[str, str, str], owner_id: str, now: float,
                          load: Callable[[str], Awaitable[T | None]]) -> T | None:
    """`idempotency` = (scope, key, body_hash). What the key already stands for (`load` of its owner id) when
    it was used with this body within 24 h: the caller answers with that. None: the key now names `owner_id`
    (it was new, older than the window, or its owner is gone), and the caller goes on creating.

    Raises Conflict when the key was used with another body. Locks the key's row: the same key sent to two
    replicas at once serializes here, and the second sees the first's owner.
    """
    scope, key, body_hash = idempotency
    await tx.run(q.CLAIM_IDEMPOTENCY_KEY, (scope, key, body_hash, owner_id, now))
    row = await tx.one(q.LOCK_IDEMPOTENCY_KEY, (scope, key))
    assert row is not None
    if row["task_id"] == owner_id:
        return None
    if row["created_at"] > now - IDEMPOTENCY_WINDOW:
        if row["body_hash"] != body_hash:
            raise Conflict("this Idempotency-Key was used with a different request body", field="Idempotency-Key")
        existing = await load(row["task_id"])
        if existing is not None:
            return existing
    await tx.run(q.REPLACE_IDEMPOTENCY_KEY, (body_hash, owner_id, now, scope, key))
    return None
