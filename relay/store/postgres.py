"""PostgreSQL backend of the store (asyncpg): for several replicas on one database. SQL plumbing only.

The use cases and their rules are relay.store.base's. Here: a connection pool; each transaction on
one pooled connection, READ COMMITTED, with the row locks the statements ask for (`FOR_UPDATE` in
relay.store.queries becomes `FOR UPDATE`); `?` placeholders numbered `$1, $2, …` once per statement;
claims with `FOR UPDATE SKIP LOCKED`, so replicas never lease one job twice and never wait on each
other's claims; the in-flight cap under a per-provider advisory lock; migrations applied at start
under a session advisory lock (several replicas may start at once); and `LISTEN relay_jobs`, so a job
enqueued by any replica wakes this one's worker at once. A transaction that loses a deadlock or a
serialization race is run again from the start (its body only decides over what it reads).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from importlib import resources
from typing import Any, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from relay import ids
from relay.models import Job
from relay.store import queries as q
from relay.store.base import Store
from relay.store.tx import Row, Tx

T = TypeVar("T")
log = logging.getLogger("relay.store")

MIGRATION_LOCK = 0x72656C6179          # "relay": the advisory lock key held while migrating
NOTIFY_CHANNEL = "relay_jobs"
TRANSACTION_RETRIES = 5
_RETRYABLE = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)
_PLACEHOLDER = re.compile(r"\?")


def to_postgres(sql: str) -> str:
    """relay's shared SQL in PostgreSQL's spelling: `$n` placeholders, real row locks."""
    numbered = iter(range(1, 10_000))
    sql = _PLACEHOLDER.sub(lambda _m: f"${next(numbered)}", sql)
    return sql.replace(q.FOR_UPDATE, " FOR UPDATE")


def migrations() -> list[tuple[int, str]]:
    """(version, sql) for every file in sql/postgres/, in order."""
    folder = resources.files("relay.store") / "sql" / "postgres"
    found = [(int(entry.name[:3]), entry.read_text()) for entry in folder.iterdir()
             if entry.name.endswith(".sql") and entry.name[:3].isdigit()]
    return sorted(found)


def _rowcount(status: str) -> int:
    """asyncpg's command tag ("UPDATE 3", "INSERT 0 1", "DELETE 0") → rows changed."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class _Statements:
    """Translations of the shared SQL, made once per statement text."""

    def __init__(self) -> None:
        self._cache: dict[str, str] = {}

    def __call__(self, sql: str) -> str:
        found = self._cache.get(sql)
        if found is None:
            found = self._cache[sql] = to_postgres(sql)
        return found


class PostgresTx(Tx):
    """One transaction on one pooled connection; every call is a round trip."""

    def __init__(self, conn: asyncpg.Connection | PoolConnectionProxy, sql: _Statements) -> None:
        self._conn = conn
        self._sql = sql

    async def one(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        return await self._conn.fetchrow(self._sql(sql), *args)

    async def all(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return list(await self._conn.fetch(self._sql(sql), *args))

    async def run(self, sql: str, args: Sequence[Any] = ()) -> int:
        return _rowcount(await self._conn.execute(self._sql(sql), *args))

    async def many(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        # One statement per row: callers need the count (ON CONFLICT DO NOTHING skips), which
        # executemany does not report.
        statement = self._sql(sql)
        changed = 0
        for args in rows:
            changed += _rowcount(await self._conn.execute(statement, *args))
        return changed


class PostgresStore(Store):
    # Only events whose writing transaction, and every transaction before it, has ended: seq is taken
    # at insert, so an event log paged by seq would otherwise skip one committed late.
    # Only this database's open transactions count: pg_snapshot_xmin alone would let one idle write transaction
    # in any other database of the server freeze the log. (A session of another role shows no backend_xid
    # without pg_read_all_stats, so it is still counted: a delay, never a skipped event.)
    _visible_events = (
        "xid < (SELECT COALESCE(min(x), pg_snapshot_xmax(pg_current_snapshot())) "
        "FROM pg_snapshot_xip(pg_current_snapshot()) AS x WHERE NOT EXISTS ("
        "SELECT 1 FROM pg_stat_activity a WHERE a.datname <> current_database() AND a.backend_xid IS NOT NULL "
        "AND a.backend_xid::text::bigint = (x::text::numeric % 4294967296)::bigint))")

    def __init__(self, dsn: str, *, min_connections: int = 2, max_connections: int = 10) -> None:
        self.dsn = dsn
        self._min, self._max = min_connections, max_connections
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._sql = _Statements()

    # ---- lifecycle ------------------------------------------------------------------------------
    async def open(self) -> None:
        await self._migrate()
        self._pool = await asyncpg.create_pool(self.dsn, min_size=self._min, max_size=self._max)
        try:
            self._listener = await asyncpg.connect(self.dsn)
            await self._listener.add_listener(NOTIFY_CHANNEL, self._notified)
        except BaseException:
            await self.close()
            raise

    def _notified(self, *_args: Any) -> None:
        self._wake()

    async def _migrate(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
            try:
                await conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations "
                                   "(version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION)")
                done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
                for version, sql in migrations():
                    if version in done:
                        continue
                    async with conn.transaction():
                        await conn.execute(sql)
                        await conn.execute("INSERT INTO schema_migrations VALUES ($1, extract(epoch FROM now()))",
                                           version)
                    log.info("applied PostgreSQL migration %03d", version)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
        finally:
            await conn.close()

    async def close(self) -> None:
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def ping(self) -> None:
        await self._read("SELECT 1 AS ok")

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "store is not open"
        return self._pool

    # ---- the plumbing relay.store.base runs on -----------------------------------------------------
    async def transact(self, body: Callable[[Tx], Awaitable[T]]) -> T:
        for attempt in range(1, TRANSACTION_RETRIES + 1):
            try:
                async with self.pool.acquire() as conn, conn.transaction():
                    return await body(PostgresTx(conn, self._sql))
            except _RETRYABLE as exc:
                if attempt == TRANSACTION_RETRIES:
                    raise
                log.info("transaction lost a race (%s); running it again", type(exc).__name__)
                await asyncio.sleep(0.01 * attempt)
        raise AssertionError("unreachable")

    async def _read(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        return await self.pool.fetchrow(self._sql(sql), *args)

    async def _read_all(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return list(await self.pool.fetch(self._sql(sql), *args))

    async def _write(self, sql: str, args: Sequence[Any]) -> None:
        await self.pool.execute(self._sql(sql), *args)

    async def lock_provider(self, tx: Tx, provider: str) -> None:
        # Held until the transaction ends: replicas count and mark one at a time per provider account.
        await tx.one("SELECT pg_advisory_xact_lock(hashtext(?)) AS locked", (f"relay.provider:{provider}",))

    async def claim(self, now: float, *, limit: int, lease_seconds: float,
                    kinds: Sequence[str] | None = None) -> list[Job]:
        kind_filter = f" AND kind IN ({','.join('?' * len(kinds))})" if kinds else ""
        sql = ("UPDATE jobs SET run_at = ?, lease_token = ?, attempts = attempts + 1 WHERE id IN ("
               f" SELECT id FROM jobs WHERE state = 'queued' AND run_at <= ?{kind_filter}"
               " ORDER BY run_at LIMIT ? FOR UPDATE SKIP LOCKED) RETURNING *")
        rows = await self.pool.fetch(self._sql(sql), float(now + lease_seconds), ids.ulid(now), float(now),
                                     *(kinds or ()), limit)
        return self.jobs_from_rows(rows)
