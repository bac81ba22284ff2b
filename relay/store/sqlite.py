"""SQLite backend of the store (aiosqlite, WAL): the embedded default. SQL plumbing only.

The use cases and their rules are relay.store.base's; this module provides what they run on. Two
connections: one writer, serialized by a lock around each transaction (relay.store.writerlock; BEGIN
IMMEDIATE, so other processes on the same file wait on busy_timeout rather than fail), and one reader
that never sees another coroutine's uncommitted writes. A whole transaction body runs on the writer's own thread
in one hop (its Tx never suspends), and small independent writes share commits (group commit); those and
the claim, short and bounded, run on the event loop's own thread instead (_tx_on_loop).
Row locks (`FOR_UPDATE`) stay comments here: the one writer already serializes every write transaction.
Migrations are the numbered files in sql/.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import secrets
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from relay.config import SQLITE_SYNCHRONOUS
from relay.models import Job
from relay.outage import Outage
from relay.store import queries as q
from relay.store.base import Store
from relay.store.batching import GroupCommit
from relay.store.tx import Row, Tx
from relay.store.writerlock import WriterLock

T = TypeVar("T")
log = logging.getLogger("relay.store")

CHECKPOINT_INTERVAL = 1.0            # seconds between WAL checkpoints while nothing is written (see SQLiteStore.open)
# ... and while writes come: each checkpoint's fdatasync of the WAL stalls the writes made meanwhile (ext4's journal
# commit holds up the inode update of the next WAL write, on the event loop's thread for callback acks) for as long
# as it takes to flush what was written since the last one: 18-47 ms a second apart under bench.callbacks. A tenth
# of a second apart it flushes a tenth as much: ack p99, API only, 17-29 ms -> 10.5-11.4 ms (0.25 s: 12-17 ms; 5 s:
# 107-127 ms; docs/benchmarks.md, twentieth round).
CHECKPOINT_WRITING_INTERVAL = 0.1
CHECKPOINT_RETRY_CAP = 30.0          # a failing checkpoint (a full disk) is tried again this rarely at most
WAL_RESTART_AT = 32 * 1024 * 1024    # a WAL this big is checkpointed to its end, the writer held (_checkpoint)
# The WAL file's size after it starts over: the first commit after a start-over cuts a larger file back to this
# (or to that commit's own frames); a file no larger is written again in place and keeps its size while idle.
# Four times WAL_RESTART_AT: under steady writes the WAL starts over at 37-70 MB about once a second. Cut back to
# 4 MB each time, the cut ran inside that commit (on the event loop's thread for callback acks) and the file then
# grew again block by block (bench.callbacks ack p99, API only, 23.5-24.0 ms against 5.5-9.7; end-to-end CPU per
# task about 12 % more). Start-overs past it (writes outrunning a second's checkpoint by far: seen at up to
# 188 MB under back-to-back claims at a million jobs) are still cut.
WAL_SIZE_LIMIT = 4 * WAL_RESTART_AT
WAL_RESTART_WAIT_MS = 50             # how long that round waits for reads still in the WAL


def migrations() -> list[tuple[int, str]]:
    """(version, sql) for every file in sql/, in order."""
    folder = resources.files("relay.store") / "sql"
    found = []
    for entry in folder.iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:3].isdigit():
            found.append((int(name[:3]), entry.read_text()))
    return sorted(found)


BUSY_TIMEOUT_MS = 10000              # how long a statement waits for a lock another connection holds
LOOP_WRITE_BYTES = 256 * 1024        # a group commit carrying more goes to the writer's thread (_write_statements)


def _utf8_bound(values: tuple[Any, ...]) -> int:
    """At least the bytes SQLite copies for a row's text and blobs: a str's UTF-8 takes up to 4 bytes a character.
    Stored JSON holds non-ASCII as UTF-8 (relay.jsontext), no longer as 6-character escapes that len() over-counted;
    isascii() on a str is a flag CPython keeps, not a scan. A plain loop: half the time of the sum() over a
    generator it replaced (0.7 against 1.2 µs for a callback job's ten values), on every row of the acks' commits."""
    size = 0
    for value in values:
        if isinstance(value, str):
            size += len(value) if value.isascii() else 4 * len(value)
        elif isinstance(value, bytes):
            size += len(value)
    return size


def _in_transaction(conn: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
    conn.execute("BEGIN IMMEDIATE")
    return _run_and_commit(conn, work)


def _run_and_commit(conn: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
    """`work` inside the transaction just begun, then COMMIT; ROLLBACK if either fails, so the one writer
    connection is never left inside a transaction ("cannot start a transaction within a transaction")."""
    try:
        result = work(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


def _met_a_lock(exc: sqlite3.OperationalError, *also: int) -> bool:
    """Whether `exc` is another connection's lock (SQLITE_BUSY, SQLITE_LOCKED) or one of the codes in `also`:
    what work on the loop's thread hands to a thread that may wait, instead of failing."""
    return exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, *also)


@contextlib.contextmanager
def _waiting_at_most(conn: sqlite3.Connection, milliseconds: int) -> Iterator[None]:
    """What runs inside waits at most `milliseconds` for another connection's lock; then BUSY_TIMEOUT_MS again."""
    conn.execute(f"PRAGMA busy_timeout={milliseconds}")
    try:
        yield
    finally:
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")


def _begun_without_waiting(conn: sqlite3.Connection) -> bool:
    """BEGIN IMMEDIATE if the database's write lock is free now; False (nothing begun) if another connection
    holds it. For the event loop's thread, which must not sleep in SQLite's busy handler."""
    with _waiting_at_most(conn, 0):
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if not _met_a_lock(exc):
                raise
            return False
    return True


class _Rows:
    """A read's result, fetched in full (see _Reader); the cursor methods callers use."""

    def __init__(self, rows: Sequence[sqlite3.Row]) -> None:
        self._rows = list(rows)
        self._next = 0

    async def fetchone(self) -> sqlite3.Row | None:
        if self._next >= len(self._rows):
            return None
        self._next += 1
        return self._rows[self._next - 1]

    async def fetchall(self) -> list[sqlite3.Row]:
        rows, self._next = self._rows[self._next:], len(self._rows)
        return rows


class _Reader:
    """The read connection, shared by every coroutine: each statement runs to its end in one hop to the
    connection's thread (execute and fetch together).

    With execute and fetch as two hops, another coroutine's statement could run between them, inside
    the first one's still-open read transaction, and see a snapshot older than writes its caller had
    already committed: a submit job claimed right after its task was created found no task and ended,
    leaving the task pending forever (found by tests/chaos).
    """

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn

    async def execute(self, sql: str, parameters: Sequence[Any] = ()) -> _Rows:
        return _Rows(list(await self.conn.execute_fetchall(sqlite_spelling(sql), parameters)))


_HINT_MARK = "/*INDEXED BY "
_HINT = re.compile(r"/\*(INDEXED BY \w+)\*/")


@functools.lru_cache(maxsize=256)
def _unmarked(sql: str) -> str:
    return _HINT.sub(r"\1", sql)


def sqlite_spelling(sql: str) -> str:
    """`sql` as SQLite must read it: its index hints (queries.indexed_by) taken out of their comment marks."""
    return _unmarked(sql) if _HINT_MARK in sql else sql


class SQLiteTx(Tx):
    """The writer's sqlite3 connection inside one transaction, on its own thread. Its methods never
    suspend, so a transaction body over it is driven to its end right there (_run_to_end): a whole
    transaction of many statements costs one hop to the writer's thread instead of one per statement."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    async def one(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        return self._conn.execute(sqlite_spelling(sql), args).fetchone()

    async def all(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return self._conn.execute(sqlite_spelling(sql), args).fetchall()

    async def run(self, sql: str, args: Sequence[Any] = ()) -> int:
        return self._conn.execute(sqlite_spelling(sql), args).rowcount

    async def many(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        return self._conn.executemany(sqlite_spelling(sql), rows).rowcount


def _run_to_end(body: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (it only awaits SQLiteTx) to its result."""
    try:
        body.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    body.close()
    raise RuntimeError("a transaction body run on the writer's thread awaited something that suspends")


def claim_sql(kinds: int) -> str:
    """The claim: lease up to `limit` due jobs (of `kinds` kinds, if any), oldest due first.

    A claimed job is held until its lease_until and keeps its run_at, so it stays at the head of jobs_due, passed
    over by the claims after it (queries.NOT_LEASED), due again when its lease runs out. INDEXED BY: the claim
    must walk the due jobs in run_at order and stop after `limit`; left to itself the planner may pick
    jobs_by_state_kind_id and sort every queued job (0.5 s at a million rows, seen in bench.claims). By rowid,
    which jobs_due holds, not by id: `id IN` looked each job up in the id index first, one more page per job
    that a large table no longer has in cache (claim p50 at a million rows 1.5-1.8× that at 10,000; by rowid
    about 1.3×, see docs/benchmarks.md). The lease token (the second argument, see SQLiteStore.claim) is 8
    random characters, not a 26-character ULID: a claim writes it into a row that had none, and on a full page
    (a table filled by appending) the longer token split the page for most jobs claimed (bench.claims, p50 at a
    million rows 1.07-1.14 ms with the ULID, 0.81-0.96 ms with 8 characters).
    """
    kind_filter = f" AND kind IN ({q.marks(kinds)})" if kinds else ""
    return ("UPDATE jobs SET lease_until = ?, lease_token = ?, attempts = attempts + 1 WHERE rowid IN ("
            " SELECT rowid FROM jobs INDEXED BY jobs_due WHERE state = 'queued' AND run_at <= ? "
            f"AND {q.NOT_LEASED}{kind_filter}"
            " ORDER BY run_at LIMIT ?) RETURNING *")


class SQLiteStore(Store):
    SHARES_TRANSACTIONS = True      # one writer: concurrent transitions and attempts share its commits

    def __init__(self, path: str | Path, *, synchronous: str = "normal") -> None:
        """`synchronous`: SQLite's setting for every connection (storage.sqlite_synchronous): "normal" or "full"."""
        self.path = str(path)
        if synchronous not in SQLITE_SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {', '.join(SQLITE_SYNCHRONOUS)}, not {synchronous!r}")
        self._synchronous = synchronous.upper()
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._lock = WriterLock()        # short work on the loop goes ahead of queued thread transactions
        self._background: aiosqlite.Connection | None = None
        self._key_reader: aiosqlite.Connection | None = None     # used on the event loop's thread (_read_key)
        self._checkpoints: asyncio.Task[None] | None = None
        self._page_size = 4096           # read at open: the WAL's frames are pages
        self._restarted_frames = -1      # the WAL's length when a RESTART last started it over (_checkpoint)
        self._data_version = -1          # PRAGMA data_version on the background connection at the last checkpoint
        self._restart_pause = CHECKPOINT_INTERVAL
        self._restart_again_at = 0.0
        # Flushed on the event loop's thread when small (see _write_statements): at most this many writes.
        self._small_writes: GroupCommit[tuple[str, tuple[Any, ...]]] = GroupCommit(self._write_statements,
                                                                                   max_batch=128)

    # ---- lifecycle ------------------------------------------------------------------------------
    async def open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._writer = await self._connect()
        try:
            await self._migrate()
            self._reader = await self._connect()
            if self.path != ":memory:":
                # Checkpoints copy the WAL back into the database file. Left automatic, one runs inside
                # whichever commit crosses 1000 pages, and every caller of that (group) commit waits for
                # it: that was most of the p99 of claims and callback acks. Here they run on a
                # connection of their own, off the write path (PASSIVE: never blocks writers or readers),
                # which also serves the whole-table reads (see _read_whole).
                await self._writer.execute("PRAGMA wal_autocheckpoint=0")
                # The WAL file's size once it starts over: see WAL_SIZE_LIMIT.
                await self._writer.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
                self._background = await self._connect()
                row = await (await self._background.execute("PRAGMA page_size")).fetchone()
                self._page_size = int(row[0]) if row is not None else self._page_size
                self._key_reader = await self._connect()
                await self._key_reader.execute("PRAGMA busy_timeout=0")     # never sleeps on the loop's thread
                self._checkpoints = asyncio.create_task(self._checkpoint_forever(), name="sqlite-checkpoints")
        except BaseException:
            await self.close()
            raise

    async def _checkpoint_forever(self) -> None:
        assert self._background is not None
        trouble = Outage("WAL checkpoint", log, base=CHECKPOINT_INTERVAL, cap=CHECKPOINT_RETRY_CAP)
        delay = CHECKPOINT_INTERVAL
        while True:
            await asyncio.sleep(delay)
            try:
                written = await self._checkpoint()
            except sqlite3.Error as exc:    # busy or I/O trouble: a later round tries again, logged once per interval
                delay = max(CHECKPOINT_INTERVAL, trouble.failed(exc, "checkpointing the WAL"))
            else:
                trouble.succeeded()
                delay = min(CHECKPOINT_INTERVAL, CHECKPOINT_WRITING_INTERVAL) if written else CHECKPOINT_INTERVAL

    async def _checkpoint(self) -> bool:
        """Copy the WAL into the database file, holding up no one (PASSIVE); once the WAL is over WAL_RESTART_AT,
        copy the rest and start it over, holding the writer. True if anything was committed since the last look
        (writes are coming: the next look is due sooner, CHECKPOINT_WRITING_INTERVAL). The signal is the background
        connection's `PRAGMA data_version`, which moves with every commit of any other connection or process; the
        WAL's frame counts would not do, since they start from zero again whenever the WAL starts over.

        SQLite starts the WAL over at a write transaction that began with all of the WAL copied and no read
        still in it, and under a steady stream of writes none does: one is always open, or frames are appended,
        while a checkpoint copies. The WAL then only grows (7.8 GB in a minute of back-to-back claims at a
        million jobs, every checkpoint copying all it saw), and so does every read's search through it. The
        second round runs on the writer's own connection, idle while its lock is held (the background one may
        be busy with a long count for /metrics), and is a RESTART: it copies only what the first left, keeps
        writers of other processes out (`relay retention`), waits up to WAL_RESTART_WAIT_MS for reads still in
        the WAL, and starts it over. Reads that outlast that (a backup, a long scan) leave it for a later round,
        tried again after a doubling pause (up to CHECKPOINT_RETRY_CAP) rather than holding the writer every
        second; a WAL started over and not written since is left alone."""
        assert self._background is not None
        row = await (await self._background.execute("PRAGMA data_version")).fetchone()
        version = int(row[0]) if row is not None else -1
        written, self._data_version = version != self._data_version, version
        row = await (await self._background.execute("PRAGMA wal_checkpoint(PASSIVE)")).fetchone()
        if row is None or row[0]:           # another process's checkpoint is running: it does this round's work
            return written
        frames = row[1]
        loop = asyncio.get_running_loop()
        if frames * self._page_size <= WAL_RESTART_AT:      # started over on its own: no pause carried over
            self._restart_pause, self._restart_again_at = CHECKPOINT_INTERVAL, 0.0
            return written
        if frames == self._restarted_frames or loop.time() < self._restart_again_at:
            return written

        def restart(conn: sqlite3.Connection) -> tuple[int, int, int]:
            with _waiting_at_most(conn, WAL_RESTART_WAIT_MS):
                busy, log_frames, copied = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
            return int(busy), int(log_frames), int(copied)
        await self._lock.acquire()
        busy, log_frames, _ = await self._on_thread_holding_lock(restart, transaction=False)
        if busy:
            self._restart_pause = min(CHECKPOINT_RETRY_CAP, self._restart_pause * 2)
            self._restart_again_at = loop.time() + self._restart_pause
            log.warning("the WAL (%d MB) could not start over: a read, or another process's write or checkpoint, "
                        "held it for over %d ms; trying again in %.1f s", frames * self._page_size // 1_000_000,
                        WAL_RESTART_WAIT_MS, self._restart_pause)
        else:
            self._restart_pause, self._restarted_frames = CHECKPOINT_INTERVAL, log_frames
        return written

    async def _connect(self) -> aiosqlite.Connection:
        # check_same_thread off: the writer's short work also runs on the event loop's thread (_tx_on_loop),
        # never while its own thread uses it (the writer's lock is held until the thread's work is done).
        pending = aiosqlite.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn = await pending
        except BaseException:
            # aiosqlite stops its connection's thread after a failed connect without waiting for it: a loop that
            # closes meanwhile (relay exiting with "cannot start") made the thread print a traceback.
            thread = getattr(pending, "_thread", None)      # aiosqlite 0.22's own; before it, it was the thread
            join = getattr(thread if thread is not None else pending, "join", None)
            if join is not None:
                await asyncio.to_thread(join, 5.0)
            raise
        try:
            conn.row_factory = aiosqlite.Row
            await conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")   # first: the PRAGMAs below may meet a lock
            for attempt in range(1, 51):
                # journal_mode=WAL can answer "database is locked" at once, busy_timeout or not, while another
                # process opens the same fresh file (replicas starting together): wait and ask again.
                try:
                    await conn.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or attempt == 50:
                        raise
                    await asyncio.sleep(0.01 * attempt)
            # WAL + NORMAL: a commit is durable across a crash of the process, and the WAL is fsynced at
            # checkpoints only; a power loss may take the last commits. FULL fsyncs the WAL at every commit: on
            # this project's bench machine 13-20 % fewer callback acknowledgements a second (group commit
            # shares each fsync), end-to-end throughput within the noise.
            await conn.execute(f"PRAGMA synchronous={self._synchronous}")
            await conn.execute("PRAGMA foreign_keys=ON")
        except BaseException:
            await conn.close()      # else its thread outlives the failure and keeps the process alive
            raise
        return conn

    async def _migrate(self) -> None:
        async with self._tx() as db:
            await db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL)")
            rows = await (await db.execute("SELECT version FROM schema_migrations")).fetchall()
            done = {row[0] for row in rows}
            for version, sql in migrations():
                if version in done:
                    continue
                for statement in _split_sql(sql):
                    await db.execute(statement)
                await db.execute("INSERT INTO schema_migrations VALUES (?, strftime('%s','now'))", (version,))

    async def close(self) -> None:
        await self._drain_shared()
        await self._small_writes.drain()
        if self._checkpoints is not None:
            self._checkpoints.cancel()
            await asyncio.gather(self._checkpoints, return_exceptions=True)
            self._checkpoints = None
        key_reader, self._key_reader = self._key_reader, None     # key reads go through the reader meanwhile
        if key_reader is not None:
            await key_reader.close()
        async with self._lock:      # not while a transaction still runs on the writer's thread
            for conn in (self._background, self._reader, self._writer):
                if conn is not None:
                    await conn.close()
            self._background = self._reader = self._writer = None

    async def ping(self) -> None:
        await (await self._r.execute("SELECT 1")).fetchone()

    @property
    def _r(self) -> aiosqlite.Connection:
        assert self._reader is not None, "store is not open"
        # A _Reader, typed as the connection its callers (and _load_task & co.) take: it has the one
        # method they use on it, execute(), whose result has fetchone() and fetchall().
        return _Reader(self._reader)  # type: ignore[return-value]

    @contextlib.asynccontextmanager
    async def _tx(self) -> AsyncIterator[aiosqlite.Connection]:
        assert self._writer is not None, "store is not open"
        async with self._lock:
            db = self._writer
            # Cancellation may land on any await here (a job stopped at shutdown, a client gone).
            # BEGIN sits inside the try and ROLLBACK/COMMIT are shielded, so the shared writer
            # connection is never left inside an open transaction ("cannot start a transaction
            # within a transaction" for every later caller).
            try:
                await db.execute("BEGIN IMMEDIATE")
                yield db
            except BaseException:
                await asyncio.shield(self._rollback(db))
                raise
            await asyncio.shield(self._commit(db))

    async def _tx_in_thread(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` in one write transaction entirely on the connection's own thread: one hop to that
        thread instead of one per statement (BEGIN, each statement, COMMIT), for the hot batched writes.

        Uses aiosqlite's `_execute` and `_conn` (private, stable since 0.17): aiosqlite has no public
        way to run a function on its thread. Cancel-safe: the transaction runs to its end (COMMIT or
        ROLLBACK) on that thread whatever happens to the awaiting coroutine, and the writer's lock is
        held until it has: a caller cancelled meanwhile (a job's timeout, a heartbeat stopped, shutdown)
        must not let _tx_on_loop use the connection while the thread still does.
        """
        assert self._writer is not None, "store is not open"
        await self._lock.acquire()
        return await self._on_thread_holding_lock(work)

    async def _on_thread_holding_lock(self, work: Callable[[sqlite3.Connection], T], *,
                                      transaction: bool = True) -> T:
        """_tx_in_thread with the writer's lock already held (by the caller, who hands it over: it is freed when
        the thread has ended the transaction). `transaction=False`: `work` runs outside one (a checkpoint)."""
        assert self._writer is not None, "store is not open"
        loop = asyncio.get_running_loop()
        freed = False

        def free() -> None:      # on the loop: once, by whichever of the two below comes first
            nonlocal freed
            if not freed:
                freed = True
                self._lock.release()

        def run_then_free(conn: sqlite3.Connection) -> T:
            # The lock is given back from the writer's thread as soon as the transaction has ended, in the same
            # turn of the loop as its result: waiting for the awaiting coroutine to resume and release it took
            # two more turns, each several ms on a busy loop, with the writer idle and short work queued for it
            # (bench.throughput, writer-lock waits).
            try:
                return _in_transaction(conn, work) if transaction else work(conn)
            finally:
                with contextlib.suppress(RuntimeError):       # the loop is closed: nobody is left to wait
                    loop.call_soon_threadsafe(free)

        writer = self._writer
        queued = False

        async def on_writer_thread() -> T:
            nonlocal queued
            if not (writer._running and writer._connection):
                raise ValueError("the writer connection is closed")
            queued = True       # _execute queues the work in this same step (no await before its put)
            return await writer._execute(run_then_free, writer._conn)  # type: ignore[no-any-return,no-untyped-call]

        def done(on_thread: asyncio.Future[Any]) -> None:
            if not queued:
                # Never queued (closed, or cancelled before its first step): the thread will not free the lock.
                # Queued work frees it from the thread alone, even when this task is cancelled (the loop torn
                # down): the connection is the thread's until the transaction has ended.
                free()
            # Read here, so a transaction whose caller went away does not log "exception was never retrieved".
            if not on_thread.cancelled():
                on_thread.exception()
        on_thread = asyncio.ensure_future(on_writer_thread())
        on_thread.add_done_callback(done)
        return await asyncio.shield(on_thread)

    @staticmethod
    async def _commit(db: aiosqlite.Connection) -> None:
        await db.execute("COMMIT")

    @staticmethod
    async def _rollback(db: aiosqlite.Connection) -> None:
        try:
            await db.execute("ROLLBACK")
        except sqlite3.OperationalError:
            pass   # BEGIN itself failed or was cancelled before it ran: nothing to roll back

    # ---- the plumbing relay.store.base runs on -----------------------------------------------------
    async def transact(self, body: Callable[[Tx], Awaitable[T]], *, again_if_key_taken: bool = False) -> T:
        """The whole body on the writer's thread, in one hop; it must await nothing but its Tx. (One writer: no
        key is taken meanwhile.)"""
        def work(conn: sqlite3.Connection) -> T:
            return _run_to_end(body(SQLiteTx(conn)))  # type: ignore[arg-type]
        return await self._tx_in_thread(work)

    async def _read(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        rows = await self._read_all(sql, args)
        return rows[0] if rows else None

    async def _read_all(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        # execute and fetch in one hop (see _Reader)
        assert self._reader is not None, "store is not open"
        return list(await self._reader.execute_fetchall(sqlite_spelling(sql), args))

    async def _read_key(self, sql: str, args: Sequence[Any]) -> Row | None:
        """A read of one small row by its key, right here on the event loop's thread, on a connection of its own.

        Through the reader's thread it cost the loop 16-24 µs of CPU under load (56-68 µs alone) for a lookup
        whose statement takes 8 µs: the hop, the thread taking the GIL from a busy loop, the answer coming back
        through the loop's queue. Every job starts with one (a task, a delivery with its event). In WAL mode a
        read takes no lock a writer holds; should it meet one anyway (SQLITE_BUSY: a WAL being recovered), it
        goes through the reader's thread instead of sleeping on the loop. fetchall ends the statement, and with
        it the read transaction, before this returns."""
        conn = self._key_reader
        if conn is None:        # ":memory:", or not open
            return await self._read(sql, args)
        try:
            rows = conn._conn.execute(sqlite_spelling(sql), args).fetchall()
        except sqlite3.OperationalError as exc:
            if not _met_a_lock(exc, sqlite3.SQLITE_PROTOCOL):    # PROTOCOL: SQLite gave up its retries to begin a read
                raise
            return await self._read(sql, args)
        return rows[0] if rows else None

    async def _write_statements(self, take: Callable[[], list[tuple[str, tuple[Any, ...]]]]) -> None:
        """One group commit of small writes, each one row found by its key (a callback's job, a job's outcome):
        on the event loop's thread (_tx_on_loop) unless its values are large. A callback job carries the raw
        body, up to server.max_body_bytes: 128 bodies of 1 MB held the loop 211 ms, so a batch over
        LOOP_WRITE_BYTES goes to the writer's thread, where SQLite copies them without the GIL. The batch is
        taken once the writer's lock is held (GroupCommit), so writes that came during the wait join it."""
        by_statement: dict[str, list[tuple[Any, ...]]] = {}

        def fits_on_loop() -> bool:
            size = 0
            for sql, args in take():
                by_statement.setdefault(sql, []).append(args)
                size += _utf8_bound(args)
            return size <= LOOP_WRITE_BYTES

        def write(conn: sqlite3.Connection) -> None:
            for sql, rows in by_statement.items():
                conn.executemany(sqlite_spelling(sql), rows)
        await self._tx_on_loop(write, fits=fits_on_loop)

    async def _tx_on_loop(self, work: Callable[[sqlite3.Connection], T], *,
                          fits: Callable[[], bool] = lambda: True) -> T:
        """`work` in one write transaction right here on the event loop's thread; on the writer's thread
        (_tx_in_thread) if another connection holds the write lock. For short, bounded work only: a group
        commit of small writes, a claim (a walk of jobs_due that stops at its limit).

        Such work costs the loop about a millisecond or less (20 small writes: 0.7-0.8 ms; a claim of 32 jobs:
        p50 0.6 ms at 10,000 rows, 1.2 ms at a million), and a hop to the writer's thread costs its callers
        about as much again in waiting: the thread must get the GIL from a busy loop, and the answer must
        come back through the loop's queue. The callback acknowledgement waits on nothing else (bench.callbacks,
        API only, alternating runs: 0.38 / 0.33 → 0.63 / 0.39 of the bare endpoint); with workers, whose claims
        and job ends are most of what a processed callback costs, 3,643 / 3,400 → 5,114 / 4,077 processed/s.
        Longer or many-statement transactions stay on the writer's thread, where SQLite works without the GIL
        while the loop goes on (every transaction and read on the loop, tried once: end-to-end tasks/s and CPU
        per task the same, p99 1.6 s against 0.85 s, the loop's thread at 0.88 cores against 0.58).

        Such work waits for the writer ahead of the transactions queued for its thread, one at a time
        (relay.store.writerlock): under bench.throughput's load 10-15 of those were queued ahead of each group
        commit and claim, and a provider's callback waited 51-62 ms (p50) for its 200; 11-14 ms since, and a
        provider's completion reaches the subscriber with p99 176-221 ms instead of 254-432 (five alternating
        pairs), for about 5 % fewer tasks/s at saturation (claims and commits batch less when they wait less).

        The loop does not sleep in SQLite's busy handler for the write lock: BEGIN does not wait here, and
        work that finds it held by another connection (`relay retention` beside the server) goes to the
        writer's thread, which waits for it as every transaction there does. (In WAL mode, which _connect
        sets, a commit waits for no reader.)"""
        assert self._writer is not None, "store is not open"
        await self._lock.acquire(short=True)        # ahead of queued thread transactions (relay.store.writerlock)
        try:
            conn = self._writer._conn
            # `fits`, asked with the lock held: whether the work is short after all (else: the thread).
            on_loop = fits() and _begun_without_waiting(conn)
        except BaseException:
            self._lock.release()
            raise
        if on_loop:
            try:
                return _run_and_commit(conn, work)
            finally:
                self._lock.release()
        # The thread takes the work over with the lock: not queued again behind the transactions waiting for it.
        return await self._on_thread_holding_lock(work)

    async def claim(self, now: float, *, limit: int, lease_seconds: float,
                    kinds: Sequence[str] | None = None) -> list[Job]:
        # The token only fences this job's holders from each other (with its id): 48 random bits make two claims
        # of one job sharing a token a 1-in-2**48 chance, and keep the row small (see claim_sql).
        args: list[Any] = [now + lease_seconds, secrets.token_urlsafe(6), now, now, *(kinds or ()), limit]
        sql = claim_sql(len(kinds or ()))

        def claim(conn: sqlite3.Connection) -> list[sqlite3.Row]:
            return conn.execute(sql, args).fetchall()
        return self.jobs_from_rows(await self._tx_on_loop(claim))

    async def _read_whole(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        """The whole-table and whole-window reads (/metrics counts: jobs ~0.1 s at a million, tasks 14 ms at
        200,000; the console's Queue page 0.25 s at a million jobs, every 3 s while it is open; its task search 0.1
        s at 200,000 tasks, every 1.5 s; its Providers page's counts of live tasks and of the day's callbacks, 0.1 s
        together at 90,000 and 150,000) on the background connection: they never hold up the reads the API and
        workers share (the reader's one thread)."""
        conn = self._background if self._background is not None else self._reader
        assert conn is not None, "store is not open"
        return list(await conn.execute_fetchall(sqlite_spelling(sql), args))


def _split_sql(sql: str) -> list[str]:
    """Statements of a migration file. Our files keep `--` and `;` out of string literals; a `;` inside a
    trigger's BEGIN … END does not end its statement (sqlite3.complete_statement tells)."""
    lines = [line.split("--", 1)[0] for line in sql.splitlines()]
    statements, pending = [], ""
    for piece in "\n".join(lines).split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                statements.append(pending.strip().removesuffix(";").strip())
            pending = ""
    if pending.strip(" \n;"):
        statements.append(pending.strip().removesuffix(";").strip())
    return statements


def sqlite_path_from_url(url: str) -> str:
    """sqlite:///rel/x.db → rel/x.db ; sqlite:////abs/x.db → /abs/x.db ; sqlite:///:memory: → :memory:"""
    rest = url.split("sqlite://", 1)[1]
    path = rest[1:] if rest.startswith("/") else rest
    return os.path.expanduser(path)
