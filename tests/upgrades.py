"""Rows written at an earlier schema and what they must mean once this relay has migrated the database: one
definition for the SQLite and the PostgreSQL upgrade tests (tests/test_sqlite_migrations.py,
tests/test_postgres_migrations.py). Statements in relay's shared spelling (`?` placeholders)."""

from __future__ import annotations

from typing import Any

from relay.store.base import Store


def before_v23(now: float) -> list[tuple[str, tuple[Any, ...]]]:
    """A subscription's delivery and a task's own webhook delivery, each with one attempt, as v22 stored them."""
    made: list[tuple[str, tuple[Any, ...]]] = []
    for delivery_id, sub in (("dlv_1", "sub_1"), ("dlv_2", None)):
        made.append(("INSERT INTO deliveries (id, event_id, event_type, task_id, subscription_id, target, url, status, "
                     "created_at, updated_at) VALUES (?, ?, 'task.queued', 'tsk_1', ?, ?, 'http://h/', 'succeeded', "
                     "?, ?)", (delivery_id, f"evt_{delivery_id}", sub, sub or "task", now, now)))
        made.append(("INSERT INTO delivery_attempts (delivery_id, number, at, url, origin, status_code, latency_ms) "
                     "VALUES (?, 1, ?, 'http://h/', 'auto', 200, 7.0)", (delivery_id, now - 60)))
    return made


async def assert_attempts_name_their_subscription(store: Store, now: float) -> None:
    """After v23 every attempt names its delivery's subscription (None for a task's own webhook_url), so the
    console's delivery health counts the attempts made before the upgrade."""
    health = await store.delivery_health(now - 3600)
    assert set(health) == {"sub_1"} and (health["sub_1"].attempts, health["sub_1"].p50_ms) == (1, 7.0)
    [first] = await store.list_attempts("dlv_1")
    [second] = await store.list_attempts("dlv_2")
    assert (first.subscription_id, second.subscription_id) == ("sub_1", None)
