"""Shared fixtures: a store per backend (the contract suite runs against each), a manual clock.

Every test that takes `store` runs twice: on SQLite (a file in tmp_path) and on PostgreSQL (a fresh
database, see tests/pg.py; an unreachable server fails the test, it is never skipped). A test that needs
several stores on one database (two replicas) takes `open_store` and calls it once per store; one that
needs several fresh databases takes `databases`.
SQLite white-box tests (WAL, PRAGMAs, the claim's plan, `_writer`) build their SQLiteStore themselves.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from relay.clock import ManualClock
from relay.store.base import Store
from relay.store.sqlite import SQLiteStore

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(params=BACKENDS)
async def databases(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Callable[[], Awaitable[str]]]:
    """Make fresh, empty databases of this test's backend: SQLite file paths in tmp_path, or the DSNs of new
    PostgreSQL databases (see tests/pg.py), every one dropped at the end of the test, pass or fail."""
    async with contextlib.AsyncExitStack() as stack:
        made = 0

        async def make() -> str:
            nonlocal made
            made += 1
            if request.param == "sqlite":
                return str(tmp_path / ("relay.db" if made == 1 else f"relay-{made}.db"))
            from tests.pg import fresh_database
            return await stack.enter_async_context(fresh_database())
        yield make


@pytest.fixture
async def database(databases: Callable[[], Awaitable[str]]) -> str:
    """The test's database: a SQLite file path, or the DSN of a fresh PostgreSQL database."""
    return await databases()


def _new_store(database: str) -> Store:
    if database.startswith(("postgresql://", "postgres://")):
        # Imported here: the SQLite tests do not need the PostgreSQL backend (or asyncpg) to import.
        from relay.store.postgres import PostgresStore
        return PostgresStore(database)
    return SQLiteStore(database)


@pytest.fixture
def new_store() -> Callable[[str], Store]:
    """An unopened store on a database from `database` / `databases`; opening and closing are the caller's."""
    return _new_store


@pytest.fixture
async def open_store(database: str) -> AsyncIterator[Callable[[], Awaitable[Store]]]:
    """Open another store on the test's database (each call a new instance, as another replica would);
    all of them are closed at the end of the test."""
    opened: list[Store] = []

    async def open_one() -> Store:
        backend = _new_store(database)
        await backend.open()
        opened.append(backend)
        return backend
    try:
        yield open_one
    finally:
        for backend in reversed(opened):
            await backend.close()


@pytest.fixture
async def store(open_store: Callable[[], Awaitable[Store]]) -> Store:
    return await open_store()
