"""PostgreSQL backend of the store (asyncpg): for several replicas on one database. SQL plumbing only.

The use cases and their rules are relay.store.base's. Here: a connection pool; each transaction on
one pooled connection, READ COMMITTED, with the row locks the statements ask for (`FOR_UPDATE` in
relay.store.queries becomes `FOR UPDATE`); `?` placeholders numbered `$1, $2, …` once per statement;
claims with `FOR UPDATE SKIP LOCKED`, so replicas never lease one job twice and never wait on each
other's claims; the in-flight cap under a per-provider advisory lock; migrations applied at start
under a session advisory lock (several replicas may start at once); and `LISTEN relay_jobs`, so a job
enqueued by any replica wakes this one's worker at once (and `LISTEN relay_lanes`: a subscriber's slot given
back by any replica wakes the deliveries waiting here for one). A transaction that loses a deadlock or a
serialization race is run again from the start (its body only decides over what it reads).

Speed (see docs/benchmarks.md, the queue and claims sections): pooled connections are handed back
without asyncpg's reset query, a second round trip after every statement (safe: relay keeps no session
state on them: no SET, no LISTEN, no cursors outside a transaction, and the one advisory lock taken on a
pooled connection is transaction-scoped; an open transaction is still rolled back by asyncpg itself);
concurrent small writes (job outcomes, callback settles) share one commit (group commit); a batch insert (`Tx.many`) is one statement over arrays (`unnest`);
writes a transaction never reads back (`Tx.write`) are held and sent together as one statement (PostgresTx).

Connections lost (the server restarted, a backend terminated, a network cut): a read or a claim is tried
once more on another connection (a claim lost after its commit only leaves its jobs leased until the
lease runs out); so is a transaction that failed before its COMMIT was sent (nothing of it was
committed); a write lost during its commit is not, its outcome unknown, nor a transaction sent as one
statement without BEGIN (PostgresTx), which is its own commit. The LISTEN connection is opened
again with capped backoff, then the worker is woken (a notification may have been missed meanwhile);
`ping()` fails while it is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from importlib import resources
from typing import Any, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from relay import ids
from relay.models import Job
from relay.outage import Outage
from relay.store import queries as q
from relay.store.base import Store
from relay.store.batching import GroupCommit
from relay.store.tx import Row, Tx

T = TypeVar("T")
log = logging.getLogger("relay.store")

MIGRATION_LOCK = 0x72656C6179          # "relay": the advisory lock key held while migrating
NOTIFY_CHANNEL = "relay_jobs"
LANES_CHANNEL = "relay_lanes"           # a wanted lane slot given back, its lane_notice as payload (sql/postgres/017)
TRANSACTION_RETRIES = 5
LISTEN_RETRY_BASE = 0.1                # seconds before the LISTEN connection is opened again, doubling …
LISTEN_RETRY_CAP = 5.0                 # … up to this
_RETRYABLE = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)
# The connection went away under a statement: the server restarted or terminated the backend, or the network.
# (InternalClientError: what asyncpg raises on a pooled connection that got its FATAL while idle.)
_LOST = (asyncpg.InterfaceError, asyncpg.PostgresConnectionError, asyncpg.AdminShutdownError,
         asyncpg.InternalClientError, ConnectionError)
_PLACEHOLDER = re.compile(r"\?")
_INSERT_VALUES = re.compile(r"INSERT INTO (\w+) \(([^)]*)\) VALUES \(([^)]*)\)(.*)", re.DOTALL)

COLUMN_TYPES = ("SELECT c.relname AS tbl, a.attname AS col, format_type(a.atttypid, a.atttypmod) AS type "
                "FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
                "WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r' AND a.attnum > 0 "
                "AND NOT a.attisdropped")


# The table a plain INSERT, UPDATE or DELETE writes and the tables it reads (PostgresTx holds such writes to send
# them together, see _plain_write); a list of tables after FROM (a comma join) is not told apart from other
# commas, so a write with one is never held.
_WRITTEN_TABLE = re.compile(r"\s*(?:INSERT INTO|UPDATE|DELETE FROM)\s+(\w+)")
_READ_TABLE = re.compile(r"\b(?:FROM|JOIN|USING)\s+(\w+)", re.IGNORECASE)
_TABLE_LIST = re.compile(r"\bFROM\s+\w+(?:\s+(?:AS\s+)?\w+)?\s*,", re.IGNORECASE)
# asyncpg's cache of prepared statements per connection (its default is 100). Held writes add a statement text
# for each mix of them a transaction sends (bench.throughput: about 50 texts in all); one evicted is prepared
# again, a round trip more.
STATEMENT_CACHE_SIZE = 500
_LOCK_KEY = re.compile(r"[\w.:-]+", re.ASCII)     # a lock key safe as a literal (PostgresTx._first_with_key)
ADVISORY_LOCK = "SELECT pg_advisory_xact_lock(hashtext(?)) AS locked"
_JSON_EXTRACT = re.compile(r"json_extract\((\w+), '\$\.(\w+)'\)")


def to_postgres(sql: str) -> str:
    """relay's shared SQL in PostgreSQL's spelling: `$n` placeholders, real row locks, `->>` for a key of a
    JSON text."""
    numbered = iter(range(1, 10_000))
    sql = _PLACEHOLDER.sub(lambda _m: f"${next(numbered)}", sql)
    sql = _JSON_EXTRACT.sub(r"(\1::json ->> '\2')", sql)
    if "json_extract" in sql:      # another spelling than `json_extract(column, '$.key')`: PostgreSQL has none
        raise ValueError(f"json_extract the PostgreSQL backend cannot read: {sql}")
    return sql.replace(q.FOR_UPDATE, " FOR UPDATE")


# Run with the claim, in its transaction: no plan that sorts. The claim must walk jobs_due in run_at order and
# stop at its limit (its cost then follows the batch, not the table). Before the first ANALYZE of a filled jobs
# table (a new database, a burst) PostgreSQL guesses that few rows are queued and instead reads every queued
# job of the wanted kinds through jobs_by_state_kind and sorts them all: 6 ms instead of 0.4 with 20,000 due
# (bench.queue: 9,900 jobs/s instead of 17,300). PostgreSQL has no index hints; SQLite's INDEXED BY does this.
CLAIM_SETTINGS = "SET LOCAL enable_sort = off"
# The claim's transaction opens with its settings in one message (the simple query protocol runs both): a round
# trip fewer than conn.transaction() and the SET each on its own.
CLAIM_BEGIN = f"BEGIN; {CLAIM_SETTINGS}"
# For a statement marked queries.GENERIC_PLAN, until its transaction ends (PostgresTx._begin_for).
GENERIC_PLAN_SETTING = "SET LOCAL plan_cache_mode = force_generic_plan"


def claim_sql(kinds: bool) -> str:
    """The claim: lease up to `limit` due jobs (of the kinds in an array argument, if `kinds`), oldest due first.

    `ctid = ANY(ARRAY(subquery))`, not `id IN (subquery)`: the subquery then runs once on its own (an InitPlan)
    and the UPDATE goes straight to the rows it locked (a Tid Scan), whatever the plan. With `IN`, the generic
    plan asyncpg's prepared statement may switch to after five runs (LIMIT unknown, guessed large) is a hash join
    over a sequential scan of the whole table: 180 ms at a million rows instead of 1 (see bench/claims.py).
    By ctid rather than by id: the UPDATE then reads no page of jobs_pkey, whose leaves at a million rows are
    seldom in shared buffers (claim p50 at 1,000,000 rows over 10,000: 1.27-1.32 by id, 1.17 by ctid). A ctid
    names one row version: the subquery's lock keeps it from being updated until the claim commits, and a live
    version the statement sees is never pruned, so its ctid cannot be reused meanwhile.
    A job updated by a transaction that committed while this statement ran is locked in its new version, which
    the statement's snapshot does not see: the UPDATE skips it and a later claim takes it (never a wrong row;
    RETURNING may then hold fewer rows than were locked).
    Run under CLAIM_SETTINGS.

    The lease is lease_until and the token, which no index covers (nor attempts): a claim changes no indexed
    column, so PostgreSQL writes it as a HOT update, the new row version on the same page (jobs has a fillfactor
    for that room) and no new entry in any index. When run_at held the lease, every claimed job took a new entry
    in each of jobs' five indexes, and after a checkpoint each page first touched goes into the WAL whole: 773 kB
    of WAL per claim of 32 at a million rows, 234 kB now (claim p50 3.6 → 1.8 ms; see docs/benchmarks.md).
    """
    kind_filter = " AND kind = ANY(?::text[])" if kinds else ""
    return ("UPDATE jobs SET lease_until = ?, lease_token = ?, attempts = attempts + 1 WHERE ctid = ANY(ARRAY("
            f"SELECT ctid FROM jobs WHERE state = 'queued' AND run_at <= ? AND {q.NOT_LEASED}{kind_filter}"
            " ORDER BY run_at LIMIT ? FOR UPDATE SKIP LOCKED)) RETURNING *")


def unnest_insert(sql: str, column_types: Mapping[tuple[str, str], str]) -> str | None:
    """`INSERT INTO t (a, b, c) VALUES (?, 'x', ?) …` as one statement for many rows, one array per `?`:
    `INSERT INTO t (a, b, c) SELECT u.a, 'x', u.c FROM unnest(?::A[], ?::C[]) AS u(a, c) …`.
    None for a statement of another shape (it is then run once per row)."""
    found = _INSERT_VALUES.fullmatch(sql.strip())
    if found is None:
        return None
    table, rest = found.group(1), found.group(4)
    columns = [c.strip() for c in found.group(2).split(",")]
    values = [v.strip() for v in found.group(3).split(",")]
    if len(columns) != len(values):
        return None
    picked, arrays, names = [], [], []
    for column, value in zip(columns, values):
        if value != "?":
            picked.append(value)          # a constant of the statement ('queued', 'pending')
            continue
        kind = column_types.get((table, column))
        if kind is None:
            return None
        picked.append(f"u.{column}")
        arrays.append(f"?::{kind}[]")
        names.append(column)
    return (f"INSERT INTO {table} ({', '.join(columns)}) SELECT {', '.join(picked)} "
            f"FROM unnest({', '.join(arrays)}) AS u({', '.join(names)}){rest}")


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


async def _keep_session(conn: asyncpg.Connection) -> None:
    """A pooled connection handed back as it is (see the module docstring: relay sets no session state)."""


class _Statements:
    """Translations of the shared SQL, made once per statement text."""

    def __init__(self) -> None:
        self._cache: dict[str, str] = {}
        self._bulk_shared: dict[str, str | None] = {}
        self._combined: dict[tuple[str, ...], str] = {}
        self.column_types: dict[tuple[str, str], str] = {}

    def __call__(self, sql: str) -> str:
        found = self._cache.get(sql)
        if found is None:
            found = self._cache[sql] = to_postgres(sql)
        return found

    def bulk_shared(self, sql: str) -> str | None:
        """The one-statement-for-many-rows form of an INSERT (see unnest_insert) still in the shared spelling
        (`?` placeholders: a held write joins others before it is numbered), or None."""
        if sql not in self._bulk_shared:
            self._bulk_shared[sql] = unnest_insert(sql, self.column_types)
        return self._bulk_shared[sql]

    def bulk(self, sql: str) -> str | None:
        """bulk_shared's form in PostgreSQL's spelling, or None."""
        form = self.bulk_shared(sql)
        return None if form is None else self(form)

    def combined(self, writes: tuple[str, ...]) -> str:
        """Several writes as one statement: every one but the last in a WITH clause, the last the statement."""
        found = self._combined.get(writes)
        if found is None:
            head = ", ".join(f"w{n} AS ({sql})" for n, sql in enumerate(writes[:-1]))
            found = self._combined[writes] = to_postgres(f"WITH {head} {writes[-1]}")
        return found


@functools.lru_cache(maxsize=4096)     # statement texts are few; the regexes cost 2 % of the loop (py-spy)
def _plain_write(sql: str) -> tuple[str, frozenset[str]] | None:
    """The table a plain INSERT, UPDATE or DELETE writes and the tables it reads (after FROM, JOIN or USING:
    subqueries, INSERT … SELECT, DELETE … USING), which PostgresTx may hold or send with held writes. None for
    any other statement, and for one whose reads it cannot tell (a list of tables after FROM)."""
    found = _WRITTEN_TABLE.match(sql)
    if found is None or _TABLE_LIST.search(sql, found.end()):
        return None
    return found.group(1), frozenset(_READ_TABLE.findall(sql, found.end()))


class PostgresTx(Tx):
    """One transaction on one pooled connection; every call is a round trip, except held writes.

    `write` and `write_many` hold their statement. The next write of another table the body sends itself (`run`,
    `one`, `many`) takes the held writes along as its WITH clauses; any other call, or the commit, first sends
    them as one statement of their own (data-modifying WITH clauses). A transition that does not end its task
    writes the task's row, its event, its deliveries and their jobs in one round trip where it took four
    (bench.throughput, pre-rendered: 72.9 → 60.5 round trips per task).

    The writes of one statement all see the rows as they were before it, not each other's changes, and run in
    no set order. So a write joins the held ones only when none of them writes its table (two INSERTs of one
    key with ON CONFLICT DO NOTHING: PostgreSQL keeps the second) or a table it reads (it would not see their
    changes); otherwise the held writes are sent first. What a held write reads may be written by a later one:
    it reads the rows as they were before, as it would have sent alone. Writes of different tables commute, and
    foreign keys are checked at the statement's end. A statement's row count and RETURNING rows are its own,
    not its WITH clauses'.

    BEGIN is sent when the body first sends a statement, not before: a body that only holds writes (a new task
    and its first job), or holds writes and ends with `last` (a delivery's success), is sent as one statement,
    atomic on its own and committed with it: one round trip instead of three or four. `committing` turns true
    just before the round trip that commits.
    """

    def __init__(self, conn: asyncpg.Connection | PoolConnectionProxy, sql: _Statements) -> None:
        self._conn = conn
        self._sql = sql
        # (table written, statement in the shared spelling, args), and every table the held writes write
        self._held: list[tuple[str, str, list[Any]]] = []
        self._held_tables: set[str] = set()
        self.begun = False
        self.committing = False
        self._generic_plans = False     # GENERIC_PLAN_SETTING sent

    async def one(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        return await self._conn.fetchrow(*await self._statement(sql, args))

    async def all(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return list(await self._conn.fetch(*await self._statement(sql, args)))

    async def run(self, sql: str, args: Sequence[Any] = ()) -> int:
        return _rowcount(await self._conn.execute(*await self._statement(sql, args)))

    async def last(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        if self.begun or q.GENERIC_PLAN in sql or (self._held and not self._joins_held(_plain_write(sql))):
            return await self.all(sql, args)
        # Nothing sent yet: this statement, with the held writes as its WITH clauses, is the whole transaction.
        held = self._take_held()
        self.committing = True
        statement = self._sql.combined((*(s for _, s, _ in held), sql)) if held else self._sql(sql)
        return list(await self._conn.fetch(statement, *(arg for _, _, values in held for arg in values), *args))

    async def many(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        rows = list(rows)
        if len(rows) == 1:
            return await self.run(sql, rows[0])
        bulk = self._sql.bulk_shared(sql) if rows else None
        if bulk is not None:
            # One statement over one array per column: a round trip and one run of the jobs trigger for the
            # whole batch (executemany pipelines, but runs the statement once per row and reports no count).
            joined = await self._statement(bulk, [list(column) for column in zip(*rows)], write=_plain_write(sql))
            return _rowcount(await self._conn.execute(*joined))
        await self.flush()
        await self._begin()
        statement = self._sql(sql)
        changed = 0
        for args in rows:
            changed += _rowcount(await self._conn.execute(statement, *args))
        return changed

    async def write(self, sql: str, args: Sequence[Any] = ()) -> None:
        write = _plain_write(sql)
        if write is None:
            await self.run(sql, args)
        else:
            await self._hold(write, sql, list(args))

    async def write_many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = list(rows)
        write = _plain_write(sql)
        if not rows:
            return
        if write is None:
            await self.many(sql, rows)
        elif len(rows) == 1:
            await self._hold(write, sql, list(rows[0]))
        elif (bulk := self._sql.bulk_shared(sql)) is not None:
            await self._hold(write, bulk, [list(column) for column in zip(*rows)])
        else:                   # no one-statement form: run now, in order
            await self.many(sql, rows)

    async def _hold(self, write: tuple[str, frozenset[str]], sql: str, args: list[Any]) -> None:
        if not self._joins_held(write):
            await self.flush()
        self._held.append((write[0], sql, args))
        self._held_tables.add(write[0])

    def _take_held(self) -> list[tuple[str, str, list[Any]]]:
        held, self._held = self._held, []
        self._held_tables.clear()
        return held

    async def _statement(self, sql: str, args: Sequence[Any], *,
                         write: tuple[str, frozenset[str]] | None = None) -> tuple[str, Any]:
        """What to send for `sql` (shared spelling) and its arguments: with the held writes as its WITH clauses
        when it may join them (_joins_held; `write`: the plain write it is, if not `sql`'s own), else after
        them. The transaction is begun first."""
        if self.committing:
            raise RuntimeError("a statement after the transaction's last one (Tx.last)")
        if self._held and self._joins_held(write or _plain_write(sql)):
            held = self._take_held()
            await self._begin_for(sql)
            statement = self._sql.combined((*(s for _, s, _ in held), sql))
            return statement, *(arg for _, _, values in held for arg in values), *args
        await self.flush()
        await self._begin_for(sql)
        return self._sql(sql), *args

    def _joins_held(self, write: tuple[str, frozenset[str]] | None) -> bool:
        """Whether a plain write (its table and the tables it reads; None: not one) may go in one statement with
        the held writes: none of them writes a table it writes or reads."""
        if write is None:
            return False
        table, reads = write
        return table not in self._held_tables and self._held_tables.isdisjoint(reads)

    async def _begin(self, then: str = "") -> str:
        """BEGIN, if not yet, and `then` (a statement without arguments) in the same message; `then`'s status."""
        if self.begun:
            return ""
        self.begun = True       # before the round trip: a BEGIN that fails may still have begun
        return str(await self._conn.execute(f"BEGIN; {then}" if then else "BEGIN"))

    async def _begin_for(self, sql: str) -> None:
        """_begin, and for a statement marked queries.GENERIC_PLAN (the first in this transaction) the setting that
        plans it without its values: in BEGIN's message when nothing was sent yet, else a round trip of its own."""
        if q.GENERIC_PLAN not in sql or self._generic_plans:
            await self._begin()
            return
        self._generic_plans = True
        if self.begun:
            await self._conn.execute(GENERIC_PLAN_SETTING)
        else:
            await self._begin(GENERIC_PLAN_SETTING)

    async def _first_with_key(self, sql: str, key: str) -> str | None:
        """`sql` (its one `?` the key) in one message with BEGIN, when it is the transaction's first statement
        (nothing begun, nothing held: held writes go first) and the key is safe as a literal (word characters,
        dots, colons and dashes): the simple query protocol runs both and answers `sql`'s status, a round trip
        fewer. None when not: the caller sends it as any statement, the key an argument."""
        if self.begun or self._held or not _LOCK_KEY.fullmatch(key) or sql.count("?") != 1:
            return None
        return await self._begin(self._sql(sql).replace("$1", f"'{key}'"))

    async def advisory_lock(self, key: str) -> None:
        """A lock on `key` held until the transaction ends (pg_advisory_xact_lock over hashtext(key)); with BEGIN
        when it comes first (_first_with_key)."""
        if await self._first_with_key(ADVISORY_LOCK, key) is None:
            await self.one(ADVISORY_LOCK, (key,))

    async def lock(self, sql: str, key: str) -> bool:
        """With BEGIN when it comes first (_first_with_key): its status, `SELECT n`, tells whether there is the row."""
        status = await self._first_with_key(sql, key)
        return await super().lock(sql, key) if status is None else _rowcount(status) > 0

    async def flush(self) -> None:
        """Send the held writes (one statement, one round trip)."""
        if self._held:
            await self._begin()
            await self._send_held()

    async def _send_held(self) -> None:
        held = self._take_held()
        if len(held) == 1:
            [(_, sql, args)] = held
            await self._conn.execute(self._sql(sql), *args)
        else:
            statement = self._sql.combined(tuple(sql for _, sql, _ in held))
            await self._conn.execute(statement, *(arg for _, _, args in held for arg in args))

    async def commit(self) -> None:
        """End the body: its held writes and the COMMIT, or, if nothing was sent yet, the held writes alone."""
        if self.begun:
            await self.flush()
            self.committing = True
            await self._conn.execute("COMMIT")
        elif self._held:
            self.committing = True
            await self._send_held()

    async def rollback(self) -> None:
        """After a failure: the transaction ended, if one was begun and not committed (the connection may be lost
        or busy with a cancelled statement: asyncpg then rolls back as it takes the connection back)."""
        if self.begun and not self.committing:
            with contextlib.suppress(Exception):
                await self._conn.execute("ROLLBACK")


class PostgresStore(Store):
    TELLS_LANE_RELEASES = True      # NOTIFY relay_lanes from sql/postgres/017, heard on the LISTEN connection
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
        self._listening: asyncio.Task[None] | None = None
        self._closing = False
        self._sql = _Statements()
        self._small_writes: GroupCommit[tuple[str, tuple[Any, ...]]] = GroupCommit(self._write_statements)
        self.listen_outage = Outage("PostgreSQL LISTEN connection", log, base=LISTEN_RETRY_BASE,
                                    cap=LISTEN_RETRY_CAP)

    # ---- lifecycle ------------------------------------------------------------------------------
    async def open(self) -> None:
        self._closing = False
        await self._migrate()
        self._pool = await asyncpg.create_pool(self.dsn, min_size=self._min, max_size=self._max,
                                               reset=_keep_session, statement_cache_size=STATEMENT_CACHE_SIZE)
        try:
            self._sql.column_types = {(r["tbl"], r["col"]): r["type"] for r in await self._pool.fetch(COLUMN_TYPES)}
            await self._listen()
        except BaseException:
            await self.close()
            raise

    async def _listen(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.add_listener(NOTIFY_CHANNEL, self._notified)
            await conn.add_listener(LANES_CHANNEL, self._lane_notified)
        except BaseException:
            conn.terminate()
            raise
        conn.add_termination_listener(self._listener_lost)
        self._listener = conn

    def _notified(self, *_args: Any) -> None:
        self._wake()

    def _lane_notified(self, _conn: Any, _pid: int, _channel: str, notice: object) -> None:
        self._lane_freed(str(notice))

    def _listener_lost(self, conn: asyncpg.Connection | PoolConnectionProxy) -> None:
        if self._closing or conn is not self._listener:
            return
        self._listener = None
        if self._listening is None or self._listening.done():
            self._listening = asyncio.get_running_loop().create_task(self._listen_again(), name="pg-listen")

    async def _listen_again(self) -> None:
        """Open the LISTEN connection again until it works (capped backoff, one log line per interval), then
        wake the worker: a job enqueued elsewhere meanwhile notified nobody here."""
        exc: BaseException = ConnectionError("the server closed the LISTEN connection")
        while not self._closing:
            await asyncio.sleep(self.listen_outage.failed(exc, "listening for enqueued jobs"))
            try:
                await self._listen()
            except Exception as error:  # noqa: BLE001 - whatever it is, listening must be tried again
                exc = error
                continue
            self.listen_outage.succeeded()
            self._wake()
            self._lane_freed(None)       # nor a slot given back: whoever waits for one looks again
            return

    async def _migrate(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            # A session lock on a connection of its own, closed right after (so never on a pooled connection).
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
        self._closing = True
        if self._pool is not None:
            await self._drain_shared()
            await self._small_writes.drain()
        if self._listening is not None:
            self._listening.cancel()
            await asyncio.gather(self._listening, return_exceptions=True)
            self._listening = None
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def ping(self) -> None:
        if self._listener is None or self._listener.is_closed():
            raise ConnectionError("the PostgreSQL LISTEN connection is down (being opened again): jobs enqueued "
                                  "by other replicas wake this one only at its next poll")
        await self._read("SELECT 1 AS ok")

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "store is not open"
        return self._pool

    # ---- the plumbing relay.store.base runs on -----------------------------------------------------
    async def transact(self, body: Callable[[Tx], Awaitable[T]], *, again_if_key_taken: bool = False) -> T:
        lost_once = False
        races = (*_RETRYABLE, asyncpg.exceptions.UniqueViolationError) if again_if_key_taken else _RETRYABLE
        for attempt in range(1, TRANSACTION_RETRIES + 1):
            tx: PostgresTx | None = None
            try:
                async with self.pool.acquire() as conn:
                    tx = PostgresTx(conn, self._sql)
                    try:
                        result = await body(tx)
                        await tx.commit()
                    except BaseException:
                        await tx.rollback()
                        raise
                return result
            except races as exc:
                await self._after_race(attempt, exc)
            except _LOST as exc:
                # What fails from its commit on may have committed: not run again.
                if lost_once or (tx is not None and tx.committing):
                    raise
                lost_once = True
                await self._connection_lost(exc, "running the transaction again (it never reached its commit)")
        raise AssertionError("unreachable")

    @staticmethod
    async def _after_race(attempt: int, exc: BaseException) -> None:
        """PostgreSQL aborted attempt number `attempt` of a transaction (a deadlock, a serialization failure): none
        of it committed. Wait a moment before it runs again, or raise `exc` after TRANSACTION_RETRIES attempts."""
        if attempt == TRANSACTION_RETRIES:
            raise exc
        log.info("transaction lost a race (%s); running it again", type(exc).__name__)
        await asyncio.sleep(0.01 * attempt)

    async def _change(self, sql: str, args: Sequence[Any]) -> list[Row]:
        # Autocommit: one round trip instead of three (BEGIN, the statement, COMMIT). A _change statement is safe to
        # run twice (see StorePlumbing._change), so it is tried once more if its connection was lost.
        return list(await self._again_if_lost(lambda: self.pool.fetch(self._sql(sql), *args)))

    async def _again_if_lost(self, call: Callable[[], Awaitable[T]]) -> T:
        """`call`, and once more on another connection if its connection was lost (reads, claims and _change
        statements only: what may run twice)."""
        try:
            return await call()
        except _LOST as exc:
            await self._connection_lost(exc, "trying once more")
            return await call()

    async def _connection_lost(self, exc: BaseException, then: str) -> None:
        # One pooled connection dead usually means all of them (a restart, a failover): the pool opens new ones
        # on their next use, rather than handing the one retry another dead connection.
        log.info("PostgreSQL connection lost (%s: %s); %s", type(exc).__name__, exc, then)
        await self.pool.expire_connections()

    async def _read(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        if q.GENERIC_PLAN in sql:
            rows = await self._read_all(sql, args)
            return rows[0] if rows else None
        return await self._again_if_lost(lambda: self.pool.fetchrow(self._sql(sql), *args))

    async def _read_all(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        if q.GENERIC_PLAN in sql:
            # In a read-only transaction of its own that plans it without its values: two round trips more.
            return list(await self._again_if_lost(lambda: self._fetch_alone(
                f"BEGIN READ ONLY; {GENERIC_PLAN_SETTING}", self._sql(sql), args)))
        return list(await self._again_if_lost(lambda: self.pool.fetch(self._sql(sql), *args)))

    async def _fetch_alone(self, begin: str, statement: str, args: Sequence[Any]) -> list[Row]:
        """`statement` (as PostgreSQL spells it) in a transaction of its own, opened by `begin` (BEGIN and its
        settings, one message), then COMMIT: three round trips."""
        async with self.pool.acquire() as conn:
            try:
                await conn.execute(begin)
                rows = list(await conn.fetch(statement, *args))
                await conn.execute("COMMIT")
            except BaseException:
                # Not handed back to the pool inside the transaction (asyncpg would roll it back, and log an
                # error for it); a lost connection is the pool's to throw away.
                with contextlib.suppress(Exception):
                    await conn.execute("ROLLBACK")
                raise
            return rows

    async def _write_statements(self, take: Callable[[], list[tuple[str, tuple[Any, ...]]]]) -> None:
        """A group commit's batch in one transaction, run again when PostgreSQL aborts it for a deadlock (its job
        ends and task writes lock rows that transitions lock too, in another order): every caller of the batch
        would otherwise be told it failed, and a finished job would run again once its lease ran out."""
        by_statement: dict[str, list[tuple[Any, ...]]] = {}
        async with self.pool.acquire() as conn:
            for sql, args in take():        # taken once a connection is ours (GroupCommit)
                by_statement.setdefault(sql, []).append(args)
            for attempt in range(1, TRANSACTION_RETRIES + 1):
                try:
                    if len(by_statement) == 1:      # autocommit: one round trip (executemany is atomic on its own)
                        [(sql, rows)] = by_statement.items()
                        await self._write_rows(conn, sql, rows)
                        return
                    async with conn.transaction():
                        for sql, rows in by_statement.items():
                            await self._write_rows(conn, sql, rows)
                    return
                except _RETRYABLE as exc:
                    await self._after_race(attempt, exc)

    async def _write_rows(self, conn: PoolConnectionProxy, sql: str, rows: list[tuple[Any, ...]]) -> None:
        # executemany pipelines the rows in one round trip. (One `DELETE … USING unnest(ids, tokens)` for a
        # batch of finishes measured no faster in bench.queue.)
        if len(rows) == 1:
            await conn.execute(self._sql(sql), *rows[0])
        else:
            await conn.executemany(self._sql(sql), rows)

    async def lock_provider(self, tx: Tx, provider: str) -> None:
        # Held until the transaction ends: replicas count and mark one at a time per provider account.
        assert isinstance(tx, PostgresTx)
        await tx.advisory_lock(f"relay.provider:{provider}")

    async def claim(self, now: float, *, limit: int, lease_seconds: float,
                    kinds: Sequence[str] | None = None) -> list[Job]:
        sql = self._sql(claim_sql(bool(kinds)))
        args = (float(now + lease_seconds), ids.ulid(now), float(now), float(now),
                *([list(kinds)] if kinds else []), limit)

        # Tried again if the connection is lost: a claim committed before the loss only holds its jobs until
        # their lease runs out (nothing is leased twice), and the next claim takes other jobs.
        return self.jobs_from_rows(await self._again_if_lost(lambda: self._fetch_alone(CLAIM_BEGIN, sql, args)))
