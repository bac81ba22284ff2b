"""Reading a task whose images wait, inline, to be archived: does the read cost what its rows cost, or what the
images' inline sources weigh?

    python -m bench.reads [--quick] [--database sqlite|postgresql]

OpenAI answers with its images inline, as base64 (megabytes each for a 1024x1024 PNG); relay keeps each in its
image's row until the archive job has saved it. Meanwhile the task is read by every job and transition it goes
through. A store (a SQLiteStore on a temp file, or a PostgresStore on a fresh database) holds two tasks with
IMAGES images each: one whose images wait with their sources (SOURCE_BYTES of random bytes each, as base64), one
whose images are archived (nothing inline). Each is read READS times with store.get_task (what GET /v1/tasks/{id}
and the jobs read) and with the locked read every transition and archived image makes (Tx.lock, then
Store._locked_task, inside a transaction). Ratio: waiting / archived, get_task p50.
"""

from __future__ import annotations

import base64
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (Figure, Section, create_database, drop_database, percentile, postgres, ratio, run_loop,
                          run_standalone, timed)
from relay.store import queries as q

IMAGES = 4
SOURCE_BYTES = 2_100_000       # a 1024x1024 PNG as gpt-image-1.5 returns it, about; 2.8 MB of base64
READS = 50


async def _locked_read(store: Any, tx: Any, task_id: str) -> Any:
    """What a transition reads: the task's lock, then the task with its images (Store.apply)."""
    locked = await tx.lock(q.LOCK_TASK_ROW, task_id)
    assert locked
    return await store._locked_task(tx, task_id)    # noqa: SLF001 - the read timed


async def _timed_reads(store: Any, task_id: str, reads: int) -> dict[str, float]:
    gets, locked = [], []
    for _ in range(reads):
        began = time.perf_counter()
        task = await store.get_task(task_id)
        gets.append((time.perf_counter() - began) * 1000)
        assert task is not None and len(task.images) == IMAGES
        began = time.perf_counter()
        await store.transact(lambda tx: _locked_read(store, tx, task_id))
        locked.append((time.perf_counter() - began) * 1000)
    return {"get_p50": percentile(gets, 50), "get_p99": percentile(gets, 99), "locked_p50": percentile(locked, 50)}


async def _measure(reads: int, source_bytes: int) -> dict[str, dict[str, float]]:
    """Both tasks in a store of their own (a fresh PostgreSQL database, dropped after, or a temp SQLite file)."""
    folder = tempfile.TemporaryDirectory()
    dsn = create_database() if postgres() else None
    try:
        if dsn is not None:
            from relay.store.postgres import PostgresStore
            store: Any = PostgresStore(dsn)
        else:
            from relay.store.sqlite import SQLiteStore
            store = SQLiteStore(Path(folder.name) / "relay.db")
        await store.open()
        try:
            return await _read_both(store, reads, source_bytes)
        finally:
            await store.close()
    finally:
        if dsn is not None:
            drop_database(dsn)
        folder.cleanup()


async def _read_both(store: Any, reads: int, source_bytes: int) -> dict[str, dict[str, float]]:
    from relay import ids
    from relay.models import Task
    from relay.store import queries as q

    found = {}
    for label, inline in (("waiting", True), ("archived", False)):
        now = time.time()
        task = Task(id=ids.new_id("tsk", now), provider="openai", request={"prompt": "bench", "n": IMAGES},
                    created_at=now, updated_at=now)
        await store.create_task(task, [])

        async def images(tx: Any, task_id: str = task.id, inline: bool = inline) -> None:
            for index in range(IMAGES):
                image_id = ids.new_id("img", time.time())
                source = base64.b64encode(os.urandom(source_bytes)).decode() if inline else None
                await tx.run(q.INSERT_IMAGE, (image_id, task_id, index, None, source, None))
                if not inline:
                    await tx.run(q.IMAGE_ARCHIVED, ("ab" * 32, "image/png", 1024, 1024, source_bytes,
                                                     f"ab/{image_id}.png", time.time(), image_id))
        await store.transact(images)
        await _timed_reads(store, task.id, 5)        # warm: statements prepared, pages cached
        found[label] = await _timed_reads(store, task.id, reads)
    return found


@timed
def run(quick: bool) -> Section:
    reads = 10 if quick else READS
    found = run_loop(_measure(reads, SOURCE_BYTES))
    waiting, archived = found["waiting"], found["archived"]
    r = ratio(waiting["get_p50"], archived["get_p50"])
    backend = "a PostgresStore on a fresh database" if postgres() else "a SQLiteStore on a temp file"
    mb = SOURCE_BYTES * 4 / 3 / 1e6
    lines = [f"{backend}: two OpenAI tasks of {IMAGES} images each, one whose images wait to be archived with their "
             f"inline sources ({mb:.1f} MB of base64 each), one whose images are archived; each read {reads} times "
             "after 5 warm-up reads, with store.get_task and with the locked read of a transition (in a "
             "transaction).", "",
             "| task's images | get_task p50 ms | get_task p99 ms | locked read p50 ms |", "|---|---:|---:|---:|"]
    for label, x in found.items():
        lines.append(f"| {label} | {x['get_p50']:.2f} | {x['get_p99']:.2f} | {x['locked_p50']:.2f} |")
    lines += ["", f"Ratio waiting / archived (get_task p50): **{r:.2f}**." if r is not None else ""]
    notes = [
        "A task's images are read without their sources (relay.store.queries.IMAGE_COLUMNS); only the archive job "
        "reads the one image it saves with its source. Before 2026-11-30 every read took every source along: "
        "20 ms per read on PostgreSQL and 6-9 ms on SQLite for this task, on each transition and archived image.",
        "On SQLite a value this large lives on a chain of overflow pages, and reading any column stored after it "
        "walks the chain: source_data is the last column of images (migration 019), so the columns read with the "
        "task come before it (1.9 ms per read with the source left out of the SELECT but stored mid-row). "
        "PostgreSQL keeps such values out of line (TOAST) whatever their place.",
    ]
    title = "Task reads with inline images waiting"
    figure = Figure(f"get_task, {IMAGES} images waiting inline ({mb:.1f} MB each)",
                    f"p50 {waiting['get_p50']:.2f} / p99 {waiting['get_p99']:.2f} ms",
                    f"images archived: p50 {archived['get_p50']:.2f} ms", r, "waiting / archived (p50)")
    return Section(key="reads", title=title, body="\n".join(lines), notes=notes,
                   figures={"ratio_p50": r if r is not None else float("nan"), **{
                       f"{label}_{k}": v for label, x in found.items() for k, v in x.items()}},
                   summary=[figure])


if __name__ == "__main__":
    run_standalone(run)
