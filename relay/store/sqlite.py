"""SQLite backend of the store (aiosqlite, WAL): the embedded default.

Two connections: one writer, serialized by an asyncio lock around each
transaction (BEGIN IMMEDIATE, so other processes on the same file wait on
busy_timeout rather than fail), and one reader that never sees another
coroutine's uncommitted writes. Migrations are the numbered files in sql/.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from relay import ids
from relay.deliveries.store import SQLiteDeliveries
from relay.errors import Conflict
from relay.models import Event, ImageRecord, Job, Task, TaskStatus
from relay.outage import Outage
from relay.present import task_object
from relay.states import Transition, on_archived, on_failure
from relay.store.base import Applied, ArchiveResult, Decide, Store
from relay.store.batching import GroupCommit

T = TypeVar("T")
log = logging.getLogger("relay.store")

IDEMPOTENCY_WINDOW = 24 * 3600.0
CHECKPOINT_INTERVAL = 1.0            # seconds between WAL checkpoints (see SQLiteStore.open)
CHECKPOINT_RETRY_CAP = 30.0          # a failing checkpoint (a full disk) is tried again this rarely at most
WAL_SIZE_LIMIT = 4 * 1024 * 1024     # bytes the WAL file is cut back to after a checkpoint
# Archive jobs are ordered by how soon their source dies: run_at is moved back by the time a link
# has less than this horizon, so a backlog saves the soonest-dying images first.
ARCHIVE_HORIZON = 24 * 3600.0


def archive_job(image: ImageRecord, now: float) -> Job:
    urgency = 0.0
    if image.source_expires_at is not None:
        urgency = max(0.0, ARCHIVE_HORIZON - max(0.0, image.source_expires_at - now))
    return Job(id=ids.new_id("job", now), kind="archive", task_id=image.task_id,
               payload={"image_id": image.id}, run_at=now - urgency, dedupe_key=f"archive:{image.id}")


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _loads(value: str | None) -> Any:
    return None if value is None else json.loads(value)


def migrations() -> list[tuple[int, str]]:
    """(version, sql) for every file in sql/, in order."""
    folder = resources.files("relay.store") / "sql"
    found = []
    for entry in folder.iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:3].isdigit():
            found.append((int(name[:3]), entry.read_text()))
    return sorted(found)


def _in_transaction(conn: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = work(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result


_INSERT_JOB = ("INSERT INTO jobs (id, kind, task_id, payload, run_at, state, dedupe_key, attempts, max_attempts, "
               "created_at) VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?) ON CONFLICT (dedupe_key) DO NOTHING")


def _job_row(job: Job) -> tuple[Any, ...]:
    return (job.id, job.kind, job.task_id, _dumps(job.payload), job.run_at, job.dedupe_key, job.attempts,
            job.max_attempts, job.run_at)


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
        return _Rows(list(await self.conn.execute_fetchall(sql, parameters)))


class _CursorInThread:
    """A sqlite3 cursor with aiosqlite's awaitable reads (see _ConnectionInThread)."""

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._cursor = cursor

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()


class _ConnectionInThread:
    """The writer's sqlite3 connection, on its own thread, dressed as the aiosqlite connection the store's
    transaction bodies are written against. Its awaitables never suspend, so such a body can be driven to
    its end right there (_run_to_end): a whole transaction of many statements costs one hop to the
    writer's thread instead of one per statement."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    @property
    def total_changes(self) -> int:
        return self._conn.total_changes

    async def execute(self, sql: str, parameters: Sequence[Any] = ()) -> _CursorInThread:
        return _CursorInThread(self._conn.execute(sql, parameters))

    async def executemany(self, sql: str, rows: Any) -> _CursorInThread:
        return _CursorInThread(self._conn.executemany(sql, rows))


def _run_to_end(body: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (it only awaits _ConnectionInThread) to its result."""
    try:
        body.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    body.close()
    raise RuntimeError("a transaction body run on the writer's thread awaited something that suspends")


def claim_sql(kinds: int) -> str:
    """The claim: lease up to `limit` due jobs (of `kinds` kinds, if any), oldest due first.

    run_at doubles as the lease: a claimed job is due again when its lease runs out. INDEXED BY: the claim
    must walk the due jobs in run_at order and stop after `limit`; left to itself the planner may pick
    jobs_by_state_kind and sort every queued job (0.5 s at a million rows, seen in bench.claims).
    """
    kind_filter = f" AND kind IN ({','.join('?' * kinds)})" if kinds else ""
    return ("UPDATE jobs SET run_at = ?, lease_token = ?, attempts = attempts + 1 WHERE id IN ("
            f" SELECT id FROM jobs INDEXED BY jobs_due WHERE state = 'queued' AND run_at <= ?{kind_filter}"
            " ORDER BY run_at LIMIT ?) RETURNING *")


class SQLiteStore(SQLiteDeliveries, Store):
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._background: aiosqlite.Connection | None = None
        self._checkpoints: asyncio.Task[None] | None = None
        self._callbacks: GroupCommit[tuple[tuple[Any, ...], Job]] = GroupCommit(self._write_callbacks)
        self._small_writes: GroupCommit[tuple[str, tuple[Any, ...]]] = GroupCommit(self._write_statements)

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
                # which also serves the slow whole-table counts of /metrics (see job_counts).
                await self._writer.execute("PRAGMA wal_autocheckpoint=0")
                # And a WAL grown by a burst is cut back once it restarts, instead of staying that size.
                await self._writer.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
                self._background = await self._connect()
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
                await self._background.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as exc:    # busy or I/O trouble: a later round tries again, logged once per interval
                delay = max(CHECKPOINT_INTERVAL, trouble.failed(exc, "checkpointing the WAL"))
            else:
                trouble.succeeded()
                delay = CHECKPOINT_INTERVAL

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        conn.row_factory = aiosqlite.Row
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA synchronous=NORMAL")   # WAL + NORMAL: durable across process crashes
        await conn.execute("PRAGMA busy_timeout=10000")
        await conn.execute("PRAGMA foreign_keys=ON")
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
        await self._callbacks.drain()
        await self._small_writes.drain()
        if self._checkpoints is not None:
            self._checkpoints.cancel()
            await asyncio.gather(self._checkpoints, return_exceptions=True)
            self._checkpoints = None
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
        ROLLBACK) on that thread whatever happens to the awaiting coroutine, and the thread's queue is
        FIFO, so a later BEGIN always comes after it.
        """
        assert self._writer is not None, "store is not open"
        async with self._lock:
            conn = self._writer._conn
            return await self._writer._execute(_in_transaction, conn, work)  # type: ignore[no-any-return]

    async def _tx_body_in_thread(self, body: Callable[[aiosqlite.Connection], Coroutine[Any, Any, T]]) -> T:
        """Run a transaction body written against the aiosqlite connection (`await db.execute(...)`) on the
        writer's thread in one hop. The body must await nothing but `db`; it commits when it returns and
        rolls back when it raises, as under `_tx`."""
        def work(conn: sqlite3.Connection) -> T:
            return _run_to_end(body(_ConnectionInThread(conn)))  # type: ignore[arg-type]
        return await self._tx_in_thread(work)

    @staticmethod
    async def _commit(db: aiosqlite.Connection) -> None:
        await db.execute("COMMIT")

    @staticmethod
    async def _rollback(db: aiosqlite.Connection) -> None:
        try:
            await db.execute("ROLLBACK")
        except sqlite3.OperationalError:
            pass   # BEGIN itself failed or was cancelled before it ran: nothing to roll back

    # ---- tasks -----------------------------------------------------------------------------------
    async def create_task(self, task: Task, jobs: Sequence[Job], *,
                          idempotency: tuple[str, str, str] | None = None) -> tuple[Task, bool]:
        async def body(db: aiosqlite.Connection) -> tuple[Task, bool]:
            if idempotency is not None:
                scope, key, body_hash = idempotency
                row = await (await db.execute(
                    "SELECT body_hash, task_id, created_at FROM idempotency_keys WHERE scope = ? AND key = ?",
                    (scope, key))).fetchone()
                if row is not None and row["created_at"] > task.created_at - IDEMPOTENCY_WINDOW:
                    if row["body_hash"] != body_hash:
                        raise Conflict("this Idempotency-Key was used with a different request body",
                                       field="Idempotency-Key")
                    existing = await self._load_task(db, row["task_id"])
                    if existing is not None:
                        return existing, False
                await db.execute(
                    "INSERT OR REPLACE INTO idempotency_keys (scope, key, body_hash, task_id, created_at) "
                    "VALUES (?, ?, ?, ?, ?)", (scope, key, body_hash, task.id, task.created_at))
            await db.execute(
                "INSERT INTO tasks (id, provider, provider_task_id, status, progress, request, error, metadata, "
                "webhook_url, webhook_events, sequence, created_at, updated_at, completed_at, deadline_at, "
                "submit_started_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (task.id, task.provider, task.provider_task_id, task.status.value, task.progress,
                 _dumps(task.request), _dumps(task.error), _dumps(task.metadata), task.webhook_url,
                 _dumps(task.webhook_events), task.sequence, task.created_at, task.updated_at,
                 task.completed_at, task.deadline_at, task.submit_started_at))
            await self._insert_jobs(db, jobs)
            return task, True
        result = await self._tx_body_in_thread(body)     # one hop: the API's hottest write
        if result[1]:
            self._wake()
        return result

    async def get_task(self, task_id: str) -> Task | None:
        return await self._load_task(self._r, task_id)

    async def list_tasks(self, *, status: str | None, provider: str | None, limit: int,
                         cursor: str | None) -> tuple[list[Task], str | None]:
        where, args = [], []
        if status:
            where.append("status = ?")
            args.append(status)
        if provider:
            where.append("provider = ?")
            args.append(provider)
        if cursor:
            where.append("id < ?")
            args.append(cursor)
        sql = "SELECT * FROM tasks" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY id DESC LIMIT ?"
        rows = await (await self._r.execute(sql, (*args, limit + 1))).fetchall()
        tasks = [_task_from_row(row) for row in rows[:limit]]
        await self._attach_images(self._r, tasks)
        next_cursor = tasks[-1].id if len(rows) > limit else None
        return tasks, next_cursor

    async def apply(self, task_id: str, decide: Decide, now: float, *,
                    default_expiry: float = 86400.0, jobs: Sequence[Job] = ()) -> Applied | None:
        async def body(db: aiosqlite.Connection) -> Any:
            task = await self._load_task(db, task_id)
            if task is None:
                return None
            transition = decide(task)
            if transition is None:
                return None
            applied = await self._write_transition(db, task, transition, now, default_expiry)
            await self._insert_jobs(db, jobs)
            return applied
        applied = await self._tx_body_in_thread(body)
        self._wake()
        return applied

    async def mark_submit_started(self, task_id: str, now: float) -> Task | None:
        async with self._tx() as db:
            await db.execute("UPDATE tasks SET submit_started_at = COALESCE(submit_started_at, ?) WHERE id = ?",
                             (now, task_id))
            return await self._load_task(db, task_id)

    async def clear_submit_started(self, task_id: str) -> None:
        async with self._tx() as db:
            await db.execute("UPDATE tasks SET submit_started_at = NULL WHERE id = ? AND provider_task_id IS NULL",
                             (task_id,))

    async def reserve_submit(self, task_id: str, provider: str, max_in_flight: int, now: float) -> bool:
        # One write transaction: the count and the mark cannot interleave with another submit's.
        async with self._tx() as db:
            row = await (await db.execute(
                "SELECT (SELECT COUNT(*) FROM tasks WHERE status IN ('queued', 'running') AND provider = ?)"
                " + (SELECT COUNT(*) FROM tasks WHERE status = 'pending' AND submit_started_at IS NOT NULL"
                "    AND provider = ? AND id != ?)", (provider, provider, task_id))).fetchone()
            if int(row[0]) >= max_in_flight:
                return False
            await db.execute("UPDATE tasks SET submit_started_at = COALESCE(submit_started_at, ?) WHERE id = ?",
                             (now, task_id))
            return True

    async def _write_transition(self, db: aiosqlite.Connection, task: Task, t: Transition, now: float,
                                default_expiry: float) -> Applied:
        """Apply `t` to `task` in the open transaction: the row, its event, and new images with archive jobs."""
        task.status = t.status
        task.sequence += 1
        task.updated_at = now
        if t.progress is not None:
            task.progress = t.progress
        if t.provider_task_id and not task.provider_task_id:
            task.provider_task_id = t.provider_task_id
        if t.error is not None:
            task.error = t.error
        if t.status.terminal:
            task.completed_at = now
        await db.execute(
            "UPDATE tasks SET status = ?, sequence = ?, updated_at = ?, progress = ?, provider_task_id = ?, "
            "error = ?, completed_at = ? WHERE id = ?",
            (task.status.value, task.sequence, now, task.progress, task.provider_task_id, _dumps(task.error),
             task.completed_at, task.id))
        if t.images:
            new_images = []
            for index, source in enumerate(t.images):
                expires = source.expires_at
                if expires is None:
                    expires = now + default_expiry
                image = ImageRecord(id=ids.new_id("img", now), task_id=task.id, index=index,
                                    source_url=source.url, source_expires_at=expires)
                await db.execute(
                    "INSERT INTO images (id, task_id, idx, source_url, source_data, source_expires_at, status) "
                    "VALUES (?, ?, ?, ?, ?, ?, 'pending') ON CONFLICT (task_id, idx) DO NOTHING",
                    (image.id, task.id, index, source.url, source.b64, expires))
                new_images.append(image)
            task.images = await self._images_of(db, task.id)
            await self._insert_jobs(db, [archive_job(img, now) for img in task.images if img.status == "pending"])
        if t.status.terminal:
            # Nothing left to poll or confirm for a finished task.
            await db.execute("DELETE FROM jobs WHERE task_id = ? AND kind IN ('poll', 'confirm') AND state = 'queued'",
                             (task.id,))
        event = Event(id=ids.new_id("evt", now), type=t.event, task_id=task.id, sequence=task.sequence,
                      created_at=now, data=task_object(task))
        await db.execute("INSERT INTO events (id, type, task_id, sequence, data, created_at) VALUES (?,?,?,?,?,?)",
                         (event.id, event.type, event.task_id, event.sequence, _dumps(event.data), now))
        await self._fan_out(db, event, task, now)
        return Applied(task=task, transition=t, event=event)

    async def _fan_out(self, db: aiosqlite.Connection, event: Event, task: Task, now: float) -> None:
        """Hook: turn a new event into deliveries in the same transaction (the outbox). See deliveries."""
        await self._fan_out_deliveries(db, event, task, now)

    # ---- provider callbacks ------------------------------------------------------------------------
    async def receive_callback(self, inbox_id: str, provider: str, task_id: str, body: str, now: float,
                               job: Job) -> None:
        # Callbacks arrive in bursts; group commit shares one transaction among concurrent ones.
        await self._callbacks.submit(((inbox_id, provider, task_id, body, now), job))
        self._wake()

    async def _write_callbacks(self, batch: list[tuple[tuple[Any, ...], Job]]) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.executemany("INSERT INTO inbox (id, provider, task_id, body, received_at, status) "
                             "VALUES (?, ?, ?, ?, ?, 'received')", [row for row, _ in batch])
            conn.executemany(_INSERT_JOB, [_job_row(job) for _, job in batch])
        await self._tx_in_thread(write)

    async def get_callback(self, inbox_id: str) -> dict[str, Any] | None:
        row = await (await self._r.execute("SELECT * FROM inbox WHERE id = ?", (inbox_id,))).fetchone()
        return None if row is None else dict(row)

    async def settle_callback(self, inbox_id: str, status: str, note: str | None, now: float) -> None:
        await self._small_writes.submit(("UPDATE inbox SET status = ?, note = ?, processed_at = ? WHERE id = ?",
                                         (status, note, now, inbox_id)))

    # ---- images ----------------------------------------------------------------------------------
    async def get_image(self, image_id: str) -> ImageRecord | None:
        row = await (await self._r.execute("SELECT * FROM images WHERE id = ?", (image_id,))).fetchone()
        return None if row is None else _image_from_row(row)

    async def get_image_source(self, image_id: str) -> tuple[ImageRecord, str | None] | None:
        row = await (await self._r.execute("SELECT * FROM images WHERE id = ?", (image_id,))).fetchone()
        return None if row is None else (_image_from_row(row), row["source_data"])

    async def image_archived(self, image_id: str, result: ArchiveResult, now: float) -> Applied | None:
        async def body(db: aiosqlite.Connection) -> Applied | None:
            row = await (await db.execute("SELECT task_id, status FROM images WHERE id = ?", (image_id,))).fetchone()
            if row is None or row["status"] != "pending":
                return None
            await db.execute(
                "UPDATE images SET status = 'archived', sha256 = ?, content_type = ?, width = ?, height = ?, "
                "bytes = ?, path = ?, archived_at = ?, source_data = NULL WHERE id = ?",
                (result.sha256, result.content_type, result.width, result.height, result.bytes, result.path,
                 now, image_id))
            task = await self._load_task(db, row["task_id"])
            if task is None:
                return None
            all_done = all(img.status == "archived" for img in task.images)
            transition = on_archived(task, all_done)
            if transition is None:
                return None
            return await self._write_transition(db, task, transition, now, 0.0)
        applied = await self._tx_body_in_thread(body)
        self._wake()
        return applied

    async def image_failed(self, image_id: str, code: str, message: str, now: float) -> Applied | None:
        async def body(db: aiosqlite.Connection) -> Applied | None:
            row = await (await db.execute("SELECT task_id, status FROM images WHERE id = ?", (image_id,))).fetchone()
            if row is None or row["status"] != "pending":
                return None
            await db.execute("UPDATE images SET status = 'failed', error = ?, source_data = NULL WHERE id = ?",
                             (f"{code}: {message}", image_id))
            task = await self._load_task(db, row["task_id"])
            if task is None:
                return None
            transition = on_failure(task, code, message)
            if transition is None:
                return None
            return await self._write_transition(db, task, transition, now, 0.0)
        applied = await self._tx_body_in_thread(body)
        self._wake()
        return applied

    # ---- events ----------------------------------------------------------------------------------
    async def list_events(self, *, after: str | None, type: str | None, task_id: str | None,
                          limit: int) -> list[Event]:
        where, args = [], []
        if after:
            where.append("seq > (SELECT seq FROM events WHERE id = ?)")
            args.append(after)
        if type:
            where.append("type = ?")
            args.append(type)
        if task_id:
            where.append("task_id = ?")
            args.append(task_id)
        sql = "SELECT * FROM events" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY seq LIMIT ?"
        rows = await (await self._r.execute(sql, (*args, limit))).fetchall()
        return [Event(id=r["id"], type=r["type"], task_id=r["task_id"], sequence=r["sequence"],
                      created_at=r["created_at"], data=_loads(r["data"])) for r in rows]

    async def event_exists(self, event_id: str) -> bool:
        row = await (await self._r.execute("SELECT 1 FROM events WHERE id = ?", (event_id,))).fetchone()
        return row is not None

    # ---- jobs ------------------------------------------------------------------------------------
    async def enqueue(self, jobs: Sequence[Job]) -> int:
        if not jobs:
            return 0
        async with self._tx() as db:
            added = await self._insert_jobs(db, jobs)
        self._wake()
        return added

    async def _insert_jobs(self, db: aiosqlite.Connection, jobs: Sequence[Job]) -> int:
        if not jobs:
            return 0
        before = db.total_changes
        await db.executemany(_INSERT_JOB, [_job_row(job) for job in jobs])
        return db.total_changes - before

    async def claim(self, now: float, *, limit: int, lease_seconds: float,
                    kinds: Sequence[str] | None = None) -> list[Job]:
        token = ids.ulid(now)
        args: list[Any] = [now + lease_seconds, token, now, *(kinds or ()), limit]
        sql = claim_sql(len(kinds or ()))

        def claim(conn: sqlite3.Connection) -> list[sqlite3.Row]:
            return conn.execute(sql, args).fetchall()
        rows = await self._tx_in_thread(claim)     # one hop to the writer's thread, not four
        return [_job_from_row(row) for row in rows]

    async def extend_lease(self, job: Job, until: float) -> bool:
        def extend(conn: sqlite3.Connection) -> bool:
            return conn.execute("UPDATE jobs SET run_at = ? WHERE id = ? AND lease_token IS ? AND state = 'queued'",
                                (until, job.id, job.lease_token)).rowcount == 1
        return await self._tx_in_thread(extend)

    # Job outcomes are the most frequent writes (every job ends with one): concurrent ones share a
    # transaction (group commit, with other small independent writes such as settling a callback),
    # each caller still returning only once its own write is durable.
    async def finish_job(self, job: Job) -> None:
        await self._small_writes.submit(("DELETE FROM jobs WHERE id = ? AND lease_token IS ?",
                                         (job.id, job.lease_token)))

    async def retry_job(self, job: Job, run_at: float, error: str | None, *,
                        payload: dict[str, Any] | None = None, reset_attempts: bool = False) -> None:
        await self._small_writes.submit((
            "UPDATE jobs SET run_at = ?, last_error = ?, lease_token = NULL, payload = COALESCE(?, payload), "
            "attempts = CASE WHEN ? THEN 0 ELSE attempts END WHERE id = ? AND lease_token IS ?",
            (run_at, error, _dumps(payload), reset_attempts, job.id, job.lease_token)))
        self._wake()

    async def _write_statements(self, batch: list[tuple[str, tuple[Any, ...]]]) -> None:
        def write(conn: sqlite3.Connection) -> None:
            for sql, args in batch:
                conn.execute(sql, args)
        await self._tx_in_thread(write)

    async def bury_job(self, job: Job, error: str) -> None:
        async with self._tx() as db:
            await db.execute(
                "UPDATE jobs SET state = 'dead', dedupe_key = NULL, last_error = ?, lease_token = NULL "
                "WHERE id = ? AND lease_token IS ?", (error, job.id, job.lease_token))

    async def job_counts(self) -> dict[str, int]:
        # A count over the whole jobs table (~0.1 s at a million rows, with jobs_by_state_kind): on the
        # background connection, so a /metrics scrape never holds up the reads the API and workers share.
        conn = self._background if self._background is not None else self._reader
        assert conn is not None, "store is not open"
        rows = await conn.execute_fetchall("SELECT kind, state, COUNT(*) AS n FROM jobs GROUP BY kind, state")
        return {f"{r['kind']}:{r['state']}": r["n"] for r in rows}

    async def next_run_at(self) -> float | None:
        row = await (await self._r.execute("SELECT MIN(run_at) FROM jobs WHERE state = 'queued'")).fetchone()
        return None if row is None else row[0]

    # ---- loading ---------------------------------------------------------------------------------
    async def _load_task(self, db: aiosqlite.Connection, task_id: str) -> Task | None:
        row = await (await db.execute("SELECT * FROM tasks WHERE id = ?", (task_id,))).fetchone()
        if row is None:
            return None
        task = _task_from_row(row)
        task.images = await self._images_of(db, task_id)
        return task

    async def _images_of(self, db: aiosqlite.Connection, task_id: str) -> list[ImageRecord]:
        rows = await (await db.execute("SELECT * FROM images WHERE task_id = ? ORDER BY idx", (task_id,))).fetchall()
        return [_image_from_row(r) for r in rows]

    async def _attach_images(self, db: aiosqlite.Connection, tasks: list[Task]) -> None:
        if not tasks:
            return
        by_id = {t.id: t for t in tasks}
        marks = ",".join("?" * len(by_id))
        rows = await (await db.execute(f"SELECT * FROM images WHERE task_id IN ({marks}) ORDER BY idx",
                                       tuple(by_id))).fetchall()
        for row in rows:
            by_id[row["task_id"]].images.append(_image_from_row(row))


def _split_sql(sql: str) -> list[str]:
    """Statements of a migration file. Our files keep `--` and `;` out of string literals."""
    lines = [line.split("--", 1)[0] for line in sql.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def _task_from_row(row: aiosqlite.Row) -> Task:
    return Task(
        id=row["id"], provider=row["provider"], request=_loads(row["request"]),
        status=TaskStatus(row["status"]), provider_task_id=row["provider_task_id"], progress=row["progress"],
        error=_loads(row["error"]), metadata=_loads(row["metadata"]), webhook_url=row["webhook_url"],
        webhook_events=_loads(row["webhook_events"]), sequence=row["sequence"], created_at=row["created_at"],
        updated_at=row["updated_at"], completed_at=row["completed_at"], deadline_at=row["deadline_at"],
        submit_started_at=row["submit_started_at"])


def _image_from_row(row: aiosqlite.Row) -> ImageRecord:
    return ImageRecord(
        id=row["id"], task_id=row["task_id"], index=row["idx"], source_url=row["source_url"],
        source_expires_at=row["source_expires_at"], status=row["status"], sha256=row["sha256"],
        content_type=row["content_type"], width=row["width"], height=row["height"], bytes=row["bytes"],
        path=row["path"], archived_at=row["archived_at"], error=row["error"])


def _job_from_row(row: aiosqlite.Row) -> Job:
    return Job(id=row["id"], kind=row["kind"], task_id=row["task_id"], payload=_loads(row["payload"]) or {},
               run_at=row["run_at"], dedupe_key=row["dedupe_key"], attempts=row["attempts"],
               max_attempts=row["max_attempts"], lease_token=row["lease_token"], last_error=row["last_error"])


def body_hash(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def sqlite_path_from_url(url: str) -> str:
    """sqlite:///rel/x.db → rel/x.db ; sqlite:////abs/x.db → /abs/x.db ; sqlite:///:memory: → :memory:"""
    rest = url.split("sqlite://", 1)[1]
    path = rest[1:] if rest.startswith("/") else rest
    return os.path.expanduser(path)
