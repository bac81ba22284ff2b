"""The SQLite store's shared read connection never answers from a snapshot older than a committed write.

Found by tests/chaos: with execute and fetch as two hops to the reader's thread, a read of one
coroutine ran inside another's still-open read transaction and missed a task created (and committed)
just before, so its submit job ended thinking the task was gone and the task stayed pending forever.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from relay import ids
from relay.models import Job, Task
from relay.store.sqlite import SQLiteStore


async def test_a_read_after_a_commit_sees_it_while_other_reads_run(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "relay.db")
    await store.open()
    stop = asyncio.Event()

    async def other_reads() -> None:
        while not stop.is_set():
            await store.next_run_at(time.time())
            await store.job_counts()
            await store.list_tasks(status=None, provider=None, limit=5, cursor=None)

    async def create_then_read() -> bool:
        now = time.time()
        task = Task(id=ids.new_id("tsk", now), provider="gmicloud", request={"prompt": "x"}, created_at=now,
                    updated_at=now)
        job = Job(id=ids.new_id("job", now), kind="submit", task_id=task.id, run_at=now,
                  dedupe_key=f"submit:{task.id}")
        await store.create_task(task, [job])
        return await store.get_task(task.id) is not None

    readers = [asyncio.create_task(other_reads()) for _ in range(3)]
    try:
        seen = [ok for _ in range(10) for ok in await asyncio.gather(*(create_then_read() for _ in range(20)))]
    finally:
        stop.set()
        await asyncio.gather(*readers)
        await store.close()
    assert all(seen), f"{seen.count(False)} of {len(seen)} reads missed a task committed before them"
