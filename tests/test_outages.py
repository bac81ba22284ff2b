"""Failing resources of our own: a full disk under the database and under the images.

The database is made full for real: `PRAGMA max_page_count` caps the writer's file at its size, so
SQLite itself answers SQLITE_FULL ("database or disk is full") as it does on a full disk, while reads
still work. The image disk is full by injection: an image store whose writes fail with ENOSPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from relay import ids
from relay.clock import Clock, ManualClock, SystemClock
from relay.errors import ArchiveError
from relay.images import download as download_module
from relay.images.store import LocalImageStore
from relay.models import Job
from relay.outage import Outage, is_unavailable
from relay.queue import Again, Worker, WorkerOptions
from relay.store.sqlite import SQLiteStore
from tests.harness import harness, wait_for

FILLER = "filler"      # a job kind no worker handles: rows that fill the database and are never claimed


# ---- helpers ----------------------------------------------------------------------------------------
class Ticks:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def disk_full_error() -> sqlite3.OperationalError:
    """A real SQLITE_FULL, answered by SQLite itself: a write past an in-memory database's page cap."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("CREATE TABLE t (b BLOB)")
        conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0]}")
        conn.execute("INSERT INTO t VALUES (zeroblob(100000))")
    except sqlite3.OperationalError as exc:
        return exc
    finally:
        conn.close()
    raise AssertionError("SQLite took a write past max_page_count")


async def set_max_pages(store: SQLiteStore, pages: int | None = None) -> None:
    """Cap the database at `pages` (None: its current size); past it SQLite answers SQLITE_FULL."""
    async with store._lock:     # white-box: max_page_count is per connection, and the writer's is the one that counts
        db = store._writer
        assert db is not None
        if pages is None:
            row = await (await db.execute("PRAGMA page_count")).fetchone()
            assert row is not None
            pages = int(row[0])
        await db.execute(f"PRAGMA max_page_count = {pages}")


async def fill_database(store: SQLiteStore, clock: Clock) -> None:
    """Cap the database at its size and fill what is left with jobs nobody claims, down to the last bytes."""
    await set_max_pages(store)
    for size in (1000, 100, 10, 0):
        with contextlib.suppress(sqlite3.OperationalError):
            while True:
                await store.enqueue([Job(id=ids.new_id("job", clock.now()), kind=FILLER, run_at=clock.now() + 1e9,
                                         payload={"x": "y" * size} if size else {},
                                         dedupe_key=ids.new_id("fill", clock.now()))])
    # And the pages of the jobs already there: once a page has overflowed, rows appended later never land on it,
    # and a claim whose rows still fit in the room left there (how much depends on the layout, e.g. on pages a
    # migration freed) would not meet the full disk at all. Grown until a whole pass grows none of them: growing
    # one row can move others to a page with room again.
    async with store._lock:     # white-box, as set_max_pages
        db = store._writer
        assert db is not None
        live = [row[0] for row in await db.execute_fetchall("SELECT id FROM jobs WHERE kind != ?", (FILLER,))]
        grew = True
        while grew:
            grew = False
            for job_id in live:
                for size in (1000, 100, 10, 1):
                    while await _grown(db, job_id, size):
                        grew = True


async def _grown(db: Any, job_id: str, size: int) -> bool:
    """Grow the job's last_error by `size` bytes; False when the database is full."""
    try:
        await db.execute("UPDATE jobs SET last_error = COALESCE(last_error, '') || ? WHERE id = ?",
                         ("x" * size, job_id))
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorcode != sqlite3.SQLITE_FULL:
            raise
        return False
    return True


class CountingClaims(SQLiteStore):
    """The SQLite store, counting calls to claim()."""

    claims = 0

    async def claim(self, now: float, *, limit: int, lease_seconds: float,
                    kinds: Sequence[str] | None = None) -> list[Job]:
        self.claims += 1
        return await super().claim(now, limit=limit, lease_seconds=lease_seconds, kinds=kinds)


class Recorder:
    """A handler that remembers the jobs it ran; the first `failures` runs raise a real SQLITE_FULL."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.runs: list[Job] = []
        self.gave_up: list[str] = []

    async def run(self, job: Job) -> Again | None:
        self.runs.append(job)
        if len(self.runs) <= self.failures:
            raise disk_full_error()
        return None

    async def give_up(self, job: Job, reason: str) -> None:
        self.gave_up.append(reason)


class FullImageDisk(LocalImageStore):
    """A local image store whose disk is full until `full` is cleared: moving a file in fails with ENOSPC."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.full = True
        self.refused = 0
        self.refused_by: set[str] = set()     # which put was refused: put_file (a temp file) or put_bytes

    async def put_file(self, tmp_path: Path, sha256: str, ext: str) -> str:
        self._refuse_while_full("put_file", str(tmp_path))
        return await super().put_file(tmp_path, sha256, ext)

    async def put_bytes(self, data: bytes, sha256: str, ext: str) -> str:
        self._refuse_while_full("put_bytes", sha256)
        return await super().put_bytes(data, sha256, ext)

    def _refuse_while_full(self, put: str, what: str) -> None:
        if self.full:
            self.refused += 1
            self.refused_by.add(put)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), what)


def records(caplog: pytest.LogCaptureFixture, logger: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == logger]


def until(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def predicate() -> bool:
        return check()
    return predicate


# ---- the shared helper ------------------------------------------------------------------------------
def test_outage_backs_off_doubling_to_its_cap_and_resets_on_success() -> None:
    """Delays double from base to the cap (±20 %), survive a huge count, and start over after a success."""
    outage = Outage("db", logging.getLogger("test.outage"), base=0.1, cap=5.0, monotonic=Ticks())
    delays = [outage.failed(disk_full_error(), "x") for _ in range(10)]
    for n, delay in enumerate(delays, start=1):
        expected = min(5.0, 0.1 * 2 ** (n - 1))
        assert expected * 0.8 <= delay <= expected * 1.2
    outage.failures = 10_000_000
    assert 4.0 <= outage.failed(disk_full_error(), "x") <= 6.0
    outage.succeeded()
    assert not outage.failing and outage.remaining() == 0.0
    assert 0.08 <= outage.failed(disk_full_error(), "x") <= 0.12


def test_outage_logs_the_first_failure_then_once_per_interval_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    """1000 failures over 59 s with a 30 s interval: two lines (one traceback each), then one recovery line."""
    ticks = Ticks()
    outage = Outage("database", logging.getLogger("test.outage"), log_interval=30.0, monotonic=ticks)
    with caplog.at_level(logging.INFO, logger="test.outage"):
        for i in range(1000):
            ticks.now = 1000.0 + i * 0.059
            outage.failed(disk_full_error(), "claiming jobs")
        outage.succeeded()
    lines = records(caplog, "test.outage")
    assert len(lines) == 3
    assert "database failed (claiming jobs): OperationalError: database or disk is full" in lines[0].getMessage()
    assert "still failing" in lines[1].getMessage() and "509 failures in the last 30 s" in lines[1].getMessage()
    assert "recovered after 1000 failures" in lines[2].getMessage()
    assert [r.exc_info is not None for r in lines] == [True, True, False]


def test_a_flapping_resource_logs_at_most_two_lines_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    """Failure, success, failure … 1000 times within one interval: one failure line and one recovery line."""
    ticks = Ticks()
    outage = Outage("database", logging.getLogger("test.outage"), log_interval=30.0, monotonic=ticks)
    with caplog.at_level(logging.INFO, logger="test.outage"):
        for i in range(1000):
            ticks.now = 1000.0 + i * 0.02
            outage.failed(disk_full_error(), "claiming jobs")
            outage.succeeded()
    assert len(records(caplog, "test.outage")) == 2


def test_outage_names_the_problem_only_while_failing() -> None:
    """problem() says what fails, how often and for how long; None before and after."""
    ticks = Ticks()
    outage = Outage("database", logging.getLogger("test.outage"), monotonic=ticks)
    assert outage.problem() is None
    outage.failed(disk_full_error(), "x")
    ticks.now += 12
    outage.failed(disk_full_error(), "x")
    assert outage.problem() == "OperationalError: database or disk is full (2 failures in 12 s)"
    outage.succeeded()
    assert outage.problem() is None


def test_unavailable_tells_a_full_disk_from_a_bug() -> None:
    """SQLITE_FULL and ENOSPC/EROFS/EIO are outages; bad SQL, constraints and other errors are not."""
    assert is_unavailable(disk_full_error())
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO):
        assert is_unavailable(OSError(code, os.strerror(code)))
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY)")
    conn.execute("INSERT INTO t VALUES (1)")
    bugs: list[BaseException] = [KeyError("x"), OSError(errno.ENOENT, "gone"), ValueError("x")]
    for sql in ("SELECT nope FROM t", "INSERT INTO t VALUES (1)"):
        try:
            conn.execute(sql)
        except sqlite3.Error as exc:
            bugs.append(exc)
    conn.close()
    assert len(bugs) == 5 and not any(is_unavailable(exc) for exc in bugs)


# ---- the worker on a full database ------------------------------------------------------------------
async def test_worker_backs_off_on_a_full_database_and_runs_every_job_once_space_returns(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Claims failing with SQLITE_FULL are paced by backoff and logged once; after space returns all jobs run."""
    caplog.set_level(logging.INFO, logger="relay")
    store = CountingClaims(tmp_path / "relay.db")
    await store.open()
    clock = SystemClock()
    handler = Recorder()
    jobs = [Job(id=ids.new_id("job", clock.now()), kind="k", run_at=clock.now()) for _ in range(5)]
    await store.enqueue(jobs)
    await fill_database(store, clock)
    worker = Worker(store, {"k": handler}, clock, WorkerOptions(store_retry_base=0.01, store_retry_cap=0.05,
                                                                 store_log_interval=60.0))
    started = time.monotonic()
    runner = asyncio.create_task(worker.run_forever())
    try:
        await wait_for(until(lambda: worker.store_outage.failures >= 30), 20, "30 failed claims")
        elapsed, claims = time.monotonic() - started, store.claims
        # Every wait after the third is at least 0.05 s - 20 %: the spinning loop made ~1260 claims a second.
        assert claims <= 4 + elapsed / 0.04, (claims, elapsed)
        lines = records(caplog, "relay.worker")
        assert len(lines) == 1 and lines[0].exc_info is not None
        assert "database or disk is full" in lines[0].getMessage() and handler.runs == []
        await set_max_pages(store, 1_000_000)
        await wait_for(until(lambda: len(handler.runs) == 5), 20, "every job to run")
        await wait_for(until(lambda: not worker.store_outage.failing), 5, "the outage to end")
    finally:
        await worker.stop()
        await asyncio.gather(runner, return_exceptions=True)
        counts = await store.job_counts()
        await store.close()
    assert {job.id for job in handler.runs} == {job.id for job in jobs} and handler.gave_up == []
    assert set(counts) == {f"{FILLER}:queued"}
    lines = records(caplog, "relay.worker")
    assert len(lines) == 2 and "database recovered after" in lines[1].getMessage()


async def test_a_job_that_meets_a_full_database_keeps_its_attempts(
        store: SQLiteStore, clock: ManualClock, caplog: pytest.LogCaptureFixture) -> None:
    """A handler failing 8 times on SQLITE_FULL (max_attempts 3) is put back each time, not given up, and runs."""
    caplog.set_level(logging.INFO, logger="relay")
    handler = Recorder(failures=8)
    worker = Worker(store, {"k": handler}, clock, WorkerOptions(max_attempts=3, store_retry_cap=1.0))
    await store.enqueue([Job(id=ids.new_id("job", clock.now()), kind="k", run_at=clock.now(), max_attempts=3)])
    for _ in range(20):
        await worker.drain()
        clock.advance(2.0)
    assert len(handler.runs) == 9 and handler.gave_up == [] and await store.job_counts() == {}
    assert [job.attempts for job in handler.runs] == [1] * 9
    assert handler.runs[1].last_error == "store_unavailable: OperationalError: database or disk is full"
    lines = records(caplog, "relay.worker")
    assert [r.levelno for r in lines] == [logging.WARNING, logging.WARNING]
    assert "database recovered after 8 failures" in lines[1].getMessage()


async def test_readyz_reports_a_full_database_and_every_task_completes_once_space_returns(tmp_path: Path) -> None:
    """While the worker's store calls fail /readyz is 503 naming the database; after space returns all succeed."""
    async with harness(tmp_path, run_worker=False) as h:
        store = h.runtime.store
        assert isinstance(store, SQLiteStore)
        worker = Worker(store, h.runtime.worker.handlers, h.runtime.ctx.clock,
                        replace(h.runtime.worker.options, store_retry_base=0.01, store_retry_cap=0.05))
        h.runtime.worker = worker
        tasks = [await h.create(provider=p, prompt="a lighthouse")
                 for p in ("gmicloud", "apimart", "evolink", "pixazo", "openai")]
        await fill_database(store, h.runtime.ctx.clock)
        assert (await h.api.get("/readyz")).status_code == 200     # a read still works: the ping cannot tell
        runner = asyncio.create_task(worker.run_forever())
        try:
            await wait_for(until(lambda: worker.store_outage.failures >= 10), 20, "the worker to meet the full disk")
            response = await h.api.get("/readyz")
            assert response.status_code == 503
            body = response.json()
            assert body["ok"] is False and "database or disk is full" in body["problems"]["database"]
            await set_max_pages(store, 1_000_000)
            for task in tasks:
                assert (await h.wait_status(task["id"], timeout=30))["status"] == "succeeded"
            response = await h.api.get("/readyz")
            assert response.status_code == 200 and response.json() == {"ok": True}
        finally:
            await worker.stop()
            await asyncio.gather(runner, return_exceptions=True)


# ---- images on a full disk --------------------------------------------------------------------------
@pytest.mark.parametrize("put", ["put_file", "put_bytes"])
async def test_a_write_the_filesystem_refuses_is_image_store_unavailable(tmp_path: Path, put: str) -> None:
    """LocalImageStore turns a real OSError of the move into a retryable ArchiveError that names the cause."""
    store = LocalImageStore(tmp_path / "images")
    tmp = store.tmp_dir() / "a.part"
    tmp.write_bytes(b"x")
    sha = hashlib.sha256(b"x").hexdigest()
    (store.root / sha[:2]).write_bytes(b"")      # a file where the shard directory must go: mkdir fails
    with pytest.raises(ArchiveError) as raised:
        await (store.put_file(tmp, sha, "png") if put == "put_file" else store.put_bytes(b"x", sha, "png"))
    assert raised.value.code == "image_store_unavailable"
    assert raised.value.message.startswith("the image store could not be written: ")


@pytest.mark.parametrize("body", ["in memory", "in a temp file"])
async def test_a_full_image_disk_is_waited_out_and_the_image_archived_when_space_returns(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, body: str) -> None:
    """ENOSPC on the image store keeps the task archiving (no internal error, no temp files), then it succeeds;
    whether the download was held in memory or, past the spool, written to a temp file."""
    if body == "in a temp file":
        monkeypatch.setattr(download_module, "SPOOL_BYTES", 0)
    caplog.set_level(logging.INFO, logger="relay")
    async with harness(tmp_path) as h:
        disk = FullImageDisk(Path(h.runtime.settings.storage.images_dir))
        h.runtime.ctx.image_store = disk
        task = await h.create(provider="gmicloud", prompt="a lighthouse")
        await wait_for(until(lambda: disk.refused >= 3), 15, "three refused writes")
        assert (await h.task(task["id"]))["status"] == "archiving"
        assert disk.refused_by == ({"put_bytes"} if body == "in memory" else {"put_file"})
        disk.full = False
        final = await h.wait_status(task["id"])
        assert final["status"] == "succeeded", final
        response = await h.api.get(final["images"][0]["url"])
        assert hashlib.sha256(response.content).hexdigest() == final["images"][0]["sha256"]
        assert list(disk.tmp_dir().iterdir()) == []
    lines = records(caplog, "relay.archive")
    assert len(lines) == 2 and [r.exc_info is not None for r in lines] == [True, False]
    assert "No space left on device" in lines[0].getMessage() and "recovered" in lines[1].getMessage()
    assert not [r for r in records(caplog, "relay.worker") if r.levelno >= logging.ERROR]


async def test_an_image_disk_full_until_the_link_dies_fails_the_task_naming_the_store(tmp_path: Path) -> None:
    """If the source link dies while the image disk is still full, the task fails saying the store was why."""
    async with harness(tmp_path) as h:
        h.runtime.ctx.image_store = FullImageDisk(Path(h.runtime.settings.storage.images_dir))
        task = await h.create(provider="apimart", prompt="[sim:ttl=1] a lighthouse")
        final = await h.wait_status(task["id"], timeout=20)
        assert final["status"] == "failed"
        assert final["error"]["code"] == "image_store_unavailable"
        assert final["error"]["message"].startswith("the image store could not be written: No space left on device")


def test_postgresql_connection_failures_count_as_an_outage() -> None:
    """A PostgreSQL server that is down or restarting is waited out like a full disk, not treated as a bug."""
    import asyncpg

    from relay.outage import is_unavailable
    assert is_unavailable(asyncpg.CannotConnectNowError("the database system is starting up"))
    assert is_unavailable(asyncpg.InterfaceError("connection is closed"))
    assert is_unavailable(ConnectionRefusedError(111, "Connection refused"))
    assert not is_unavailable(asyncpg.UniqueViolationError("duplicate key"))
