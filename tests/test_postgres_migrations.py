"""Upgrading an existing PostgreSQL database keeps what its rows mean: a database at an earlier schema, holding
rows written then, opened by this relay (as tests/test_sqlite_migrations.py does for SQLite)."""

from __future__ import annotations

import time

import asyncpg

from relay.store.postgres import PostgresStore, migrations, to_postgres
from tests.pg import fresh_database
from tests.upgrades import assert_attempts_name_their_subscription, before_v23


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
    """Migration 023 gives every attempt its delivery's subscription (tests/upgrades.py)."""
    now = time.time()
    async with fresh_database() as dsn:
        await _database_at(dsn, 22)
        conn = await asyncpg.connect(dsn)
        try:
            for sql, args in before_v23(now):
                await conn.execute(to_postgres(sql), *args)
        finally:
            await conn.close()
        store = PostgresStore(dsn)
        await store.open()
        try:
            await assert_attempts_name_their_subscription(store, now)
        finally:
            await store.close()
