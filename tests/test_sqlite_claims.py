"""A claim on SQLite rewrites its jobs' rows in place (relay.store.sqlite.claim_sql, migration 018).

New rows are appended to full pages; a claim writing the lease token where there was NULL used to outgrow
the page and split it (16 more pages in the WAL per claim of 32 at a million rows, bench.claims). Each new
row carries room for the lease, which the claim gives up as it writes the token: the table keeps its pages."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from relay import ids
from relay.clock import ManualClock
from relay.models import Job
from relay.store.sqlite import SQLiteStore

JOBS = 2000


def _table_pages(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return int(db.execute("SELECT count(*) FROM dbstat WHERE name = 'jobs'").fetchone()[0])


async def test_claiming_every_new_job_splits_no_page(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    clock = ManualClock()
    store = SQLiteStore(path)
    await store.open()
    try:
        now = clock.now()
        await store.enqueue([Job(id=ids.new_id("job", now), kind="poll", payload={"n": n}, run_at=now,
                                 max_attempts=5) for n in range(JOBS)])
        before = _table_pages(path)
        claimed = 0
        while batch := await store.claim(now, limit=32, lease_seconds=60):
            assert all(job.lease_token for job in batch)
            claimed += len(batch)
        assert claimed == JOBS
        assert before > 20      # a table of many full pages, each of which a growing row would split
        assert _table_pages(path) == before
    finally:
        await store.close()
