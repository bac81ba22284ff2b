"""What a submit, an API read and a /metrics scrape cost the store with a small and a large stored history: do
they stay flat as finished tasks pile up?

    python -m bench.history [--quick] [--database sqlite|postgresql]

Two stores, one per size, seeded with bench.memory's finished tasks (each with an archived image and four
events, five providers in turn; SQLite through sqlite3, PostgreSQL with COPY and ANALYZE), plus the same live set
in both: 20 running tasks per provider. Then each operation is timed ROUNDS × PER_ROUND times per size, the sizes
taking turns block by block (whatever else the machine does falls on both alike):

- reserve_submit: the in-flight count and mark of every submit, under the writer's lock (a fresh pending task
  each time);
- list_tasks(provider, status=running): GET /v1/tasks filtered, and the console's task list;
- list_events(type=task.failed): GET /v1/events for a type the log does not hold (a rare one reads as much);
- the adoption lookup (queries.TASK_BY_PROVIDER_TASK, in a write transaction): whether a provider task id already
  belongs to a task, for one that does not (what an adoption mostly finds, and the end of the walk it was);
- task_counts: the tasks gauge of a /metrics scrape (a count of every task: this one grows, by design).

Ratio = large / small, p50. Before schema v22 the first four read the whole history (docs/benchmarks.md).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.common import (
    Figure,
    Section,
    create_database,
    drop_database,
    percentile,
    postgres,
    ratio,
    run_loop,
    run_standalone,
    timed,
)
from bench.memory import seed_tasks, seed_tasks_postgres

ROUNDS, PER_ROUND = 10, 20
LIVE_PER_PROVIDER = 20
PROVIDERS = ("gmicloud", "apimart", "evolink", "pixazo", "openai")
OPERATIONS = ("reserve_submit", "list_tasks", "list_events", "adoption", "task_counts")


async def _live_tasks(store: Any, pending: int) -> list[str]:
    """The live set (running tasks of every provider) and `pending` tasks for reserve_submit to take; their ids."""
    now = time.time()
    rows = [(f"tsk_live_{p}_{n:04d}", p, "running", "{}", 2, now, now) for p in PROVIDERS
            for n in range(LIVE_PER_PROVIDER)]
    waiting = [f"tsk_wait_{n:06d}" for n in range(pending)]
    rows += [(task_id, "gmicloud", "pending", "{}", 1, now, now) for task_id in waiting]
    await store.transact(lambda tx: tx.many("INSERT INTO tasks (id, provider, status, request, sequence, created_at, "
                                            "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)", rows))
    return waiting


def _operations(store: Any, waiting: list[str]) -> dict[str, Callable[[], Awaitable[Any]]]:
    from relay.store import queries as q

    ahead = iter(waiting)
    return {
        "reserve_submit": lambda: store.reserve_submit(next(ahead), "gmicloud", 1_000_000, time.time()),
        "list_tasks": lambda: store.list_tasks(status="running", provider="gmicloud", limit=50, cursor=None),
        "list_events": lambda: store.list_events(after=None, type="task.failed", task_id=None, limit=100),
        "adoption": lambda: store.transact(lambda tx: tx.one(q.TASK_BY_PROVIDER_TASK, ("prov-7", "apimart"))),
        "task_counts": lambda: store.task_counts(),
    }


async def _time(stores: list[Any]) -> list[dict[str, float]]:
    waits = [await _live_tasks(store, ROUNDS * PER_ROUND + 5) for store in stores]
    ops = [_operations(store, wait) for store, wait in zip(stores, waits)]
    for op in ops:                      # warm the caches and statements
        for name in OPERATIONS:
            await op[name]()
    spent: list[dict[str, list[float]]] = [{name: [] for name in OPERATIONS} for _ in stores]
    order = list(range(len(stores)))
    for block in range(ROUNDS):
        for n in (order if block % 2 == 0 else order[::-1]):
            for name in OPERATIONS:
                for _ in range(PER_ROUND):
                    began = time.perf_counter()
                    await ops[n][name]()
                    spent[n][name].append((time.perf_counter() - began) * 1000)
    return [{name: percentile(times[name], 50) for name in OPERATIONS} for times in spent]


def _store(database: str) -> Any:
    """The store of a DSN or a SQLite file path."""
    from relay.store.postgres import PostgresStore
    from relay.store.sqlite import SQLiteStore

    return PostgresStore(database) if database.startswith("postgresql") else SQLiteStore(database)


async def _measure(databases: list[str]) -> list[dict[str, float]]:
    stores = [_store(database) for database in databases]
    try:
        for store in stores:
            await store.open()
        return await _time(stores)
    finally:
        for store in stores:
            await store.close()


async def _migrate(database: str) -> None:
    store = _store(database)
    await store.open()
    await store.close()


def measure(sizes: list[int]) -> list[dict[str, float]]:
    if postgres():
        dsns: list[str] = []
        try:
            for size in sizes:
                dsns.append(create_database())
                run_loop(_migrate(dsns[-1]))
                seed_tasks_postgres(dsns[-1], size)
            return run_loop(_measure(dsns))
        finally:
            for dsn in dsns:
                drop_database(dsn)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f"history-{size}.db" for size in sizes]
        for path, size in zip(paths, sizes):
            run_loop(_migrate(str(path)))
            seed_tasks(path, size)
        return run_loop(_measure([str(path) for path in paths]))


LABELS = {
    "reserve_submit": "reserve_submit (every submit; writer held)",
    "list_tasks": "GET /v1/tasks?provider=&status=running",
    "list_events": "GET /v1/events?type= (a type not in the log)",
    "adoption": "adoption lookup, an id no task has (write transaction)",
    "task_counts": "/metrics tasks gauge (counts every task)",
}


@timed
def run(quick: bool) -> Section:
    sizes = [2_000, 50_000] if quick else [2_000, 200_000]
    small, large = measure(sizes)
    lines = [
        f"Two stores: {sizes[0]:,} and {sizes[1]:,} finished tasks stored (each with an archived image and four "
        f"events; five providers in turn), the same live set in both ({LIVE_PER_PROVIDER} running tasks per "
        f"provider). Each operation timed {ROUNDS * PER_ROUND} times per size after a warm-up, the sizes taking "
        f"turns in blocks of {PER_ROUND}.", "",
        f"| operation | p50 ms, {sizes[0]:,} stored | p50 ms, {sizes[1]:,} stored | large / small |",
        "|---|---:|---:|---:|"]
    for name in OPERATIONS:
        r = ratio(large[name], small[name])
        lines.append(f"| {LABELS[name]} | {small[name]:.3f} | {large[name]:.3f} | "
                     f"{'-' if r is None else f'{r:.2f}'} |")
    notes = [
        "Before schema v22 (2026-12-01) the in-flight count of reserve_submit walked every task the provider was "
        "ever given through tasks_by_provider, holding SQLite's one writer (32 ms per submit at 40,000 per "
        "provider); GET /v1/tasks by provider and status did the same (33 ms), the adoption lookup walked that "
        "index for its ORDER BY id (19-34 ms), and a type absent from the event log read the whole log (65 ms; "
        "PostgreSQL a sequential scan). tasks_by_provider_status, tasks_of_provider_task (provider_task_id, "
        "provider, id) and events_by_type (type, seq) bound them; tests/test_history_plans.py holds the plans.",
        "The /metrics gauge counts every stored task by provider and status, so it grows with the history by "
        "what it is; it reads tasks_by_provider_status alone and, on SQLite, runs on the background connection, "
        "so a scrape holds up no other read.",
    ]
    r_submit = ratio(large["reserve_submit"], small["reserve_submit"])
    figures = {f"{name}_{label}_p50_ms": values[name] for label, values in (("small", small), ("large", large))
               for name in OPERATIONS}
    figures["reserve_submit_ratio_p50"] = r_submit or 0.0
    summary = [Figure(f"reserve_submit with {sizes[1]:,} finished tasks stored",
                      f"p50 {large['reserve_submit']:.3f} ms",
                      f"{sizes[0]:,} stored: p50 {small['reserve_submit']:.3f} ms", r_submit, "large / small (p50)")]
    return Section("history", "Store operations vs stored history", "\n".join(lines), notes, figures, summary)


def main() -> None:
    run_standalone(run)


if __name__ == "__main__":
    main()
