"""Upgrading an existing PostgreSQL database keeps what its rows mean: a database at an earlier schema, holding
rows written then, opened by this relay (as tests/test_sqlite_migrations.py does for SQLite)."""

from __future__ import annotations

import time

import asyncpg

from relay.store.postgres import PostgresStore, migrations
from tests.pg import fresh_database


async def _database_at(dsn: str, version: int) -> None:
    """The schema as relay left it at `version` (every migration up to it, recorded as PostgresStore._migrate does)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TABLE schema_migrations "
                           "(version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION)")
        for number, sql in migrations():
            if number <= version:
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO schema_migrations VALUES ($1, 0)", number)
    finally:
        await conn.close()


async def test_attempts_recorded_before_v23_name_their_subscription_after_it() -> None:
    """Migration 023 gives every attempt its delivery's subscription (None for a task's own webhook_url), so the
    console's delivery health still counts the attempts made before the upgrade."""
    now = time.time()
    async with fresh_database() as dsn:
        await _database_at(dsn, 22)
        conn = await asyncpg.connect(dsn)
        try:
            for delivery_id, sub in (("dlv_1", "sub_1"), ("dlv_2", None)):
                await conn.execute(
                    "INSERT INTO deliveries (id, event_id, event_type, task_id, subscription_id, target, url, status, "
                    "created_at, updated_at) VALUES ($1, $2, 'task.queued', 'tsk_1', $3, $4, 'http://h/', "
                    "'succeeded', $5, $5)", delivery_id, f"evt_{delivery_id}", sub, sub or "task", now)
                await conn.execute(
                    "INSERT INTO delivery_attempts (delivery_id, number, at, url, origin, status_code, latency_ms) "
                    "VALUES ($1, 1, $2, 'http://h/', 'auto', 200, 7.0)", delivery_id, now - 60)
        finally:
            await conn.close()
        store = PostgresStore(dsn)
        await store.open()
        try:
            health = await store.delivery_health(now - 3600)
            assert set(health) == {"sub_1"} and (health["sub_1"].attempts, health["sub_1"].p50_ms) == (1, 7.0)
            [first] = await store.list_attempts("dlv_1")
            [second] = await store.list_attempts("dlv_2")
            assert (first.subscription_id, second.subscription_id) == ("sub_1", None)
        finally:
            await store.close()
