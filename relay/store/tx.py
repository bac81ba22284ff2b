"""One open write transaction, as the backend-neutral use cases see it: four ways to run a named statement.

A backend hands its use cases a `Tx` over its own connection. On SQLite the transaction body runs on
the writer's thread (one thread hop for the whole transaction), so a Tx method must never suspend:
everything a body awaits is a Tx method, nothing else (checked: see relay.store.sqlite). On PostgreSQL
each call is a round trip on the transaction's connection, except writes held to go together (`write`),
and statements marked `FOR_UPDATE` in relay.store.queries lock the rows they read until the transaction ends.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from typing import Any

Row = Any      # sqlite3.Row or asyncpg.Record: indexable by column name


class Tx(abc.ABC):
    @abc.abstractmethod
    async def one(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        """The first row of a query (or of an UPDATE … RETURNING), or None."""

    @abc.abstractmethod
    async def all(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        """Every row of a query."""

    @abc.abstractmethod
    async def run(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run a statement; how many rows it changed."""

    @abc.abstractmethod
    async def many(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        """Run a statement once per row of arguments; how many rows they changed together."""

    async def last(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        """The body's last statement (nothing is sent after it), its rows returned: a write with RETURNING,
        typically. A backend may send it with the held writes as the commit: on PostgreSQL a body that sent
        nothing before it is then one statement, one round trip instead of three."""
        return await self.all(sql, args)

    async def lock(self, sql: str, key: str) -> bool:
        """Lock the row the `FOR_UPDATE` query `sql` finds by its one argument, `key`, until the transaction ends;
        whether there is one. Its columns are read after, by another statement, which sees the row (and whatever
        else the lock guards) as the last holder committed it. A backend may send the lock with BEGIN: on
        PostgreSQL, as the body's first statement, one round trip for both."""
        return await self.one(sql, (key,)) is not None

    async def write(self, sql: str, args: Sequence[Any] = ()) -> None:
        """Run an INSERT, UPDATE or DELETE whose outcome this transaction never reads: no count, no rows, and no
        error caught around the call. A backend may hold it and send it later together with other held
        writes, always before the transaction's next statement of any other kind and before its commit (on
        PostgreSQL several held writes are one statement, one round trip). An error it raises then surfaces
        at that later call, and the transaction fails all the same."""
        await self.run(sql, args)

    async def write_many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """`many` whose count this transaction never reads; held like `write`."""
        await self.many(sql, rows)
