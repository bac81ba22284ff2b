"""Job-claim latency with a small and a large jobs table: does claiming stay flat as the table grows?

    python -m bench.claims [--quick] [--database sqlite|postgresql]

SQLite: a SQLiteStore (relay/store/sqlite.py) on a temp file; the jobs table is seeded directly through
sqlite3 (executemany in big transactions, the schema of relay/store/sql/). PostgreSQL: a PostgresStore
(relay/store/postgres.py) on a fresh database per size, dropped after; the jobs table is seeded with
COPY through asyncpg, then VACUUM (ANALYZE) and a CHECKPOINT (the state of a table that grew under
autovacuum, not of a bulk load still settling). The same rows either
way, a mix like a busy relay's: mostly future polls and delivery retries, a small due backlog, some
dead jobs. Then store.claim(now, limit=32, lease_seconds=60, kinds=<the worker's five kinds>) is timed
CLAIMS times on each size, the sizes taking turns in ROUNDS blocks; each claimed batch is handed back with
retry_job(run_at=now) so the due backlog stays the same size (the jobs go to the back of it). Baseline: the same
at the small size; ratio = large / small.
On PostgreSQL the claim statement relay sent is also run under EXPLAIN (ANALYZE, BUFFERS) (rolled back).
"""

from __future__ import annotations

import contextlib
import json
import random
import sqlite3
import tempfile
import time
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

KINDS = ["submit", "poll", "archive", "callback_body", "callback", "deliver"]    # what relay's worker claims
# (kind, share) of the seeded rows; due / future / dead shares below.
MIX = (("poll", 0.35), ("deliver", 0.45), ("archive", 0.08), ("submit", 0.06), ("callback_body", 0.06))
DUE_SHARE, DEAD_SHARE = 0.02, 0.05
CLAIMS = 200
ROUNDS = 10       # blocks of CLAIMS // ROUNDS claims per size, the sizes taking turns
BATCH = 50_000


def _ulid_like(ms: int, n: int) -> str:
    return f"job_{ms:013d}{n:013d}"


COLUMNS = ("id", "kind", "task_id", "payload", "run_at", "state", "dedupe_key", "attempts", "max_attempts",
           "created_at")


def job_batches(rows: int, now: float, rng: random.Random, counts: dict[str, int]) -> Any:
    """The seeded jobs, BATCH rows at a time (tuples in COLUMNS order); tallies due / future / dead in `counts`."""
    kinds = [k for k, _ in MIX]
    weights = [w for _, w in MIX]
    base_ms = int((now - 86400) * 1000)
    for start in range(0, rows, BATCH):
        batch = []
        for n in range(start, min(rows, start + BATCH)):
            kind = rng.choices(kinds, weights)[0]
            roll = rng.random()
            task = f"tsk_{n // 3:026d}"
            if roll < DEAD_SHARE:
                state, run_at, dedupe = "dead", now - rng.uniform(0, 86400), None
                counts["dead"] += 1
            elif roll < DEAD_SHARE + DUE_SHARE:
                state, run_at, dedupe = "queued", now - rng.uniform(0, 600), f"{kind}:{n}"
                counts["due"] += 1
            else:
                state, run_at, dedupe = "queued", now + rng.uniform(30, 36000), f"{kind}:{n}"
                counts["future"] += 1
            batch.append((_ulid_like(base_ms + n, n), kind, task, json.dumps({"n": n}), run_at, state, dedupe,
                          rng.randint(0, 3), 12, now - 3600))
        yield batch


def seed(path: Path, rows: int, now: float, rng: random.Random) -> dict[str, int]:
    """Insert `rows` jobs straight through sqlite3. Returns how many are due, future and dead."""
    counts = {"due": 0, "future": 0, "dead": 0}
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    for batch in job_batches(rows, now, rng, counts):
        db.execute("BEGIN")
        db.executemany("INSERT INTO jobs (id, kind, task_id, payload, run_at, state, dedupe_key, attempts, "
                       "max_attempts, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)", batch)
        db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return counts


async def time_claims(stores: list[Any], claims: int) -> list[dict[str, Any]]:
    """Claim 32 and hand the batch back (retry_job, run_at = now) `claims` times on each store, after 10 warm-up
    rounds each, the stores taking turns (ROUNDS blocks, the order flipped every block) so that whatever else
    the machine does meanwhile falls on every size alike: measured one size after the other, the ratio moved
    by ±40 % between runs here."""
    claim_ms: list[list[float]] = [[] for _ in stores]
    retry_ms: list[list[float]] = [[] for _ in stores]
    claimed = [0 for _ in stores]
    for store in stores:
        for _ in range(10):       # warm the caches (pages, statements)
            jobs = await store.claim(time.time(), limit=32, lease_seconds=60, kinds=KINDS)
            for job in jobs:
                await store.retry_job(job, time.time(), None)
    order = list(range(len(stores)))
    for block in range(ROUNDS):
        for n in (order if block % 2 == 0 else order[::-1]):
            for _ in range(claims // ROUNDS):
                now = time.time()
                began = time.perf_counter()
                jobs = await stores[n].claim(now, limit=32, lease_seconds=60, kinds=KINDS)
                claim_ms[n].append((time.perf_counter() - began) * 1000)
                claimed[n] += len(jobs)
                began = time.perf_counter()
                for job in jobs:
                    await stores[n].retry_job(job, now, None)
                retry_ms[n].append((time.perf_counter() - began) * 1000 / max(1, len(jobs)))
    return [{"p50": percentile(claim_ms[n], 50), "p99": percentile(claim_ms[n], 99),
             "mean_batch": claimed[n] / len(claim_ms[n]), "retry_p50": percentile(retry_ms[n], 50)}
            for n in order]


PAGES = (("queued", None), ("queued", "submit"), ("dead", None), ("dead", "deliver"))     # GET /v1/jobs filters
PAGE_LOOKS = 20


async def time_pages(stores: list[Any]) -> list[dict[str, float]]:
    """p50 ms of a page of 50 jobs, newest first (store.list_jobs: GET /v1/jobs, the console's jobs pages), per
    PAGES filter, PAGE_LOOKS times each after one warm-up, the stores taking turns."""
    spent: list[dict[str, list[float]]] = [{f"{st}/{kind}": [] for st, kind in PAGES} for _ in stores]
    for store in stores:
        for st, kind in PAGES:
            await store.list_jobs(state=st, kind=kind, limit=50, cursor=None)
    for _ in range(PAGE_LOOKS):
        for n, store in enumerate(stores):
            for st, kind in PAGES:
                began = time.perf_counter()
                await store.list_jobs(state=st, kind=kind, limit=50, cursor=None)
                spent[n][f"{st}/{kind}"].append((time.perf_counter() - began) * 1000)
    return [{name: percentile(times, 50) for name, times in each.items()} for each in spent]


async def claim_latency(paths: list[Path], claims: int, pragmas: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    from relay.store.sqlite import SQLiteStore, claim_sql

    stores = [SQLiteStore(path) for path in paths]
    try:
        for store in stores:
            await store.open()
            for pragma in pragmas:     # diagnosis only: relay itself runs with its own settings
                await store._writer.execute(pragma)   # type: ignore[union-attr]  # noqa: SLF001
        found = await time_claims(stores, claims)
        for result, pages in zip(found, await time_pages(stores)):
            result["pages"] = pages
        inner = claim_sql(len(KINDS)).split("WHERE rowid IN (", 1)[1].rsplit(") RETURNING", 1)[0]
        for store, result in zip(stores, found):
            plan = await (await store._r.execute(   # noqa: SLF001 - the bench reads the plan of relay's claim query
                "EXPLAIN QUERY PLAN " + inner, (time.time(), time.time(), *KINDS, 32))).fetchall()
            result["plan"] = " / ".join(str(row[3]) for row in plan)
    finally:
        for store in stores:
            await store.close()
    return found


class _StatementSpy:
    """Stands in for a PostgresStore's pool for one call: keeps the statements and arguments relay sends on
    the connection it acquires (the claim's settings, then the claim)."""

    def __init__(self, pool: Any) -> None:
        self.pool, self.sent = pool, []

    @contextlib.asynccontextmanager
    async def acquire(self) -> Any:
        async with self.pool.acquire() as conn:
            yield _ConnectionSpy(conn, self.sent)


class _ConnectionSpy:
    def __init__(self, conn: Any, sent: list[tuple[str, tuple[Any, ...]]]) -> None:
        self.conn, self.sent = conn, sent

    def transaction(self) -> Any:
        return self.conn.transaction()

    async def execute(self, sql: str, *args: Any) -> Any:
        self.sent.append((sql, args))
        return await self.conn.execute(sql, *args)

    async def fetch(self, sql: str, *args: Any) -> Any:
        self.sent.append((sql, args))
        return await self.conn.fetch(sql, *args)


async def sent_claim(store: Any) -> tuple[list[str], str, tuple[Any, ...]]:
    """The settings, claim statement and arguments PostgresStore.claim sends (one real claim, its jobs handed
    back)."""
    spy = _StatementSpy(store._pool)   # noqa: SLF001 - the bench reads the statement relay runs
    store._pool = spy                   # noqa: SLF001
    try:
        jobs = await store.claim(time.time(), limit=32, lease_seconds=60, kinds=KINDS)
    finally:
        store._pool = spy.pool          # noqa: SLF001
    for job in jobs:
        await store.retry_job(job, time.time(), None)
    # What it sends: its transaction opened with the settings (one message), the claim, COMMIT.
    [(sql, args)] = [(sql, args) for sql, args in spy.sent if sql.lstrip().upper().startswith("UPDATE")]
    settings = [part.strip() for sent, _ in spy.sent if "SET " in sent.upper()
                for part in sent.split(";") if part.strip().upper().startswith("SET ")]
    return settings, sql, args


def _literal(value: Any) -> str:
    if isinstance(value, list):
        return "ARRAY[" + ", ".join(_literal(v) for v in value) + "]::text[]"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value)


async def explain(conn: Any, sql: str, args: tuple[Any, ...], settings: list[str], generic: bool = False) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of `sql` with `args`, in a transaction rolled back after.

    `generic`: the plan of the statement prepared, the placeholders unknown when it is planned
    (`plan_cache_mode = force_generic_plan`), which is what asyncpg's prepared statement may get from the
    sixth run on if PostgreSQL finds it no dearer than the custom plans so far."""
    tx = conn.transaction()
    await tx.start()
    try:
        for setting in settings:        # as relay runs the claim (PostgresStore.claim)
            await conn.execute(setting)
        if generic:
            await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            await conn.execute("PREPARE bench_claim AS " + sql)
            rows = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) EXECUTE bench_claim("
                                    + ", ".join(_literal(a) for a in args) + ")")
        else:
            rows = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + sql, *args)
    finally:
        await tx.rollback()
        if generic:
            await conn.execute("DEALLOCATE bench_claim")
    return "\n".join(row[0] for row in rows)


async def pg_claim_latency(dsns: list[str], sizes: list[int], claims: int) -> list[dict[str, Any]]:
    """Seed each database (one per size) with COPY, ANALYZE, checkpoint, then time claims as on SQLite, the sizes
    taking turns; the plans of the claim."""
    from relay.store.postgres import PostgresStore

    stores = [PostgresStore(dsn) for dsn in dsns]
    results: list[dict[str, Any]] = []
    try:
        for store, rows in zip(stores, sizes):
            await store.open()     # migrations
            counts = {"due": 0, "future": 0, "dead": 0}
            began = time.monotonic()
            async with store.pool.acquire() as conn:
                for batch in job_batches(rows, time.time(), random.Random(rows), counts):
                    await conn.copy_records_to_table("jobs", records=batch, columns=COLUMNS)
                seeded = time.monotonic() - began
                # A table that grew to this size under relay has been vacuumed and analyzed along the way, its
                # pages written out: not a bulk load whose first readers set every row's hint bits (dirtying each
                # page), with an autovacuum of a million fresh rows and a checkpoint of their WAL still to come
                # (those put 58 ms into the p99 when they ran during the timed claims). As on SQLite
                # (checkpointed after seeding).
                await conn.execute("VACUUM (ANALYZE) jobs")
            results.append({**counts, "rows": rows, "seed_seconds": seeded})
        async with stores[0].pool.acquire() as conn:
            await conn.execute("CHECKPOINT")       # the whole cluster's: every size's pages written out
        for result, found in zip(results, await time_claims(stores, claims)):
            result.update(found)
        for result, pages in zip(results, await time_pages(stores)):
            result["pages"] = pages
        for store, result in zip(stores, results):
            settings, sql, args = await sent_claim(store)
            args = (args[0], args[1], time.time(), time.time(), *args[4:])
            async with store.pool.acquire() as conn:
                custom = await explain(conn, sql, args, settings)
                generic = await explain(conn, sql, args, settings, generic=True)
                size = await conn.fetchval("SELECT pg_database_size(current_database())")
                tables = await conn.fetchval("SELECT pg_total_relation_size('jobs')")
                stats = await conn.fetchrow("SELECT n_live_tup, n_dead_tup FROM pg_stat_user_tables "
                                            "WHERE relname = 'jobs'")
            result.update(file_mb=size / 1e6, jobs_mb=tables / 1e6, dead_tuples=stats["n_dead_tup"],
                          statement="; ".join([*settings, sql]), explain=custom, explain_generic=generic,
                          plan=_plan_line(custom))
    finally:
        for store in stores:
            await store.close()
    return results


def _plan_line(explain_text: str) -> str:
    """The plan's node lines, without timings, on one line (for the table)."""
    import re

    nodes = []
    for line in explain_text.splitlines():
        stripped = line.strip().removeprefix("->").strip()
        if not stripped or stripped.startswith(("Planning", "Execution", "Buffers", "Filter", "Index Cond",
                                                "Rows Removed", "Sort Key", "Sort Method", "Output", "Trigger")):
            continue
        nodes.append(re.sub(r"\s*\(cost=.*", "", stripped))
    return " → ".join(nodes)


def measure(sizes: list[int]) -> list[dict[str, Any]]:
    if postgres():
        return measure_postgres(sizes)
    with tempfile.TemporaryDirectory() as tmp:
        paths, seeded = [Path(tmp) / f"jobs-{rows}.db" for rows in sizes], []
        for path, rows in zip(paths, sizes):
            run_loop(_migrate(path))
            began = time.monotonic()
            counts = seed(path, rows, time.time(), random.Random(rows))
            seeded.append({"rows": rows, "seed_seconds": time.monotonic() - began,
                           "file_mb": path.stat().st_size / 1e6, **counts})
        found = run_loop(claim_latency(paths, CLAIMS))
    return [{**made, **timed} for made, timed in zip(seeded, found)]


def measure_postgres(sizes: list[int]) -> list[dict[str, Any]]:
    dsns: list[str] = []
    try:
        for _ in sizes:
            dsns.append(create_database())     # a fresh database per size, dropped after
        return run_loop(pg_claim_latency(dsns, sizes, CLAIMS))
    finally:
        for dsn in dsns:
            drop_database(dsn)


async def _migrate(path: Path) -> None:
    from relay.store.sqlite import SQLiteStore

    store = SQLiteStore(path)
    await store.open()
    await store.close()


PAGES_NOTE = (
    "The pages of jobs walk an index in id order and stop at 50 (SQLite schema v24, queries.jobs_listing): the "
    "primary key for queued jobs, jobs_dead for dead ones, jobs_by_state_kind_id (state, kind, id) for a kind. Before, "
    "with the state a parameter and only (state, kind) to go through, SQLite read every job of the state and "
    "sorted them: at 400,000 rows (380,000 queued, 20,000 dead) 288 ms a page of queued jobs, 40 ms of dead ones, "
    "22-71 ms of one kind; after, 1.0-1.2 ms each (one scratch run); at a million rows 705, 149, 99 and 61 ms "
    "before, 1.0-1.1 ms after. PostgreSQL's planner already walked jobs_pkey or jobs_dead from its statistics "
    "(0.85-1.1 ms a page at a million rows), so it keeps its (state, kind) index: (state, kind, id) took 115 MB "
    "more there at a million rows, for nothing measured.")
SQLITE_NOTES = [
    "The claim walks the partial index `jobs_due (run_at) WHERE state = 'queued'` from the oldest due job "
    "and stops after 32 matches, so its cost follows the batch, not the table: dead jobs are outside the "
    "index and future jobs lie past the point where it stops.",
    "The UPDATE reaches the claimed jobs by rowid (`WHERE rowid IN (SELECT rowid … INDEXED BY jobs_due …)`: "
    "jobs_due holds each entry's rowid). It used to be `id IN (SELECT id …)`, which looked every job up in "
    "the index of ids first: one more page per job, at a million rows nearly always a page SQLite's cache "
    "does not hold (p50 ratio 1.52 with `id`, 1.28 with `rowid` in one scratch run on the same files).",
    "What is left of the growth: each of the 32 rows a claim takes lies on a page no claim touched before, read "
    "from the operating system's cache rather than SQLite's (at 10,000 rows the whole table stays in SQLite's), "
    "and the seeded rows were appended to full pages, as relay's are: a claim writing its 8-character lease token "
    "and its lease_until where there were NULLs outgrows the page and SQLite splits it (a WAL-frame tally: 47 "
    "pages written per claim at 1,000,000 rows, 31 at 10,000, where the warm-up claims split the few pages "
    "already; counted before the lease had a column of its own). Rows given 9 bytes "
    "of room that the claim gives up as it writes the token took the ratio from 1.48-1.58 to 1.26-1.32 (four "
    "alternating pairs), but were not kept: claims then succeed on a full database while every other write "
    "fails, so the worker leases due jobs that cannot record their outcome and they come back only when the "
    "lease runs out (tests/test_outages.py). A larger page cache (4,000 pages, 200 MB) or mmap (1 GB) did not "
    "help (same or slower).",
    "What would make it grow: a large due backlog of kinds the worker does not claim (it would be "
    "walked and skipped each time); relay's worker claims every kind it has a handler for, so that "
    "does not happen with one worker role. The jobs workers hold are walked and skipped too (a claim leaves "
    "run_at alone since 2026-11-30): as many as are running, whatever the table's size; bench.queue, whose "
    "workers hold up to 32 each, did not move (relay / PgQueuer 2.52 and 2.47 before, 2.76 and 2.54 after).",
    "WAL checkpoints run on a connection of their own (PASSIVE; every 0.1 s while writes come, every second "
    "when idle), not inside commits: left "
    "automatic, a checkpoint ran inside the COMMIT of whichever transaction crossed 1000 WAL pages and "
    "was most of the p99 (15.3 ms at 1,000,000 rows when this was diagnosed, 2.7 ms without).",
]
POSTGRES_NOTES = [
    "The claim is `UPDATE jobs … WHERE ctid = ANY(ARRAY(SELECT ctid … ORDER BY run_at LIMIT $5 FOR UPDATE SKIP "
    "LOCKED)) RETURNING *`: the subquery is an InitPlan that walks `jobs_due (run_at) WHERE state = 'queued'` "
    "from the oldest due job and stops at 32, and the UPDATE goes to the rows it locked by their ctid (a Tid "
    "Scan), in the custom plan and in the generic one alike (both above). Until 2026-12-01 it found them by id "
    "through jobs_pkey, whose leaf pages at 1,000,000 rows are seldom in shared buffers: p50 ratio 1.27-1.32 by "
    "id, 1.17 by ctid (three alternating pairs on one machine). It used to be `id IN (SELECT …)`, whose generic plan "
    "(what asyncpg's prepared statement may switch to from its sixth run) was a hash semi join over a "
    "sequential scan of all of jobs: 192 ms at 1,000,000 rows against 1.3 ms for the custom plan. The kinds are "
    "one array argument, so one prepared statement serves any set of kinds. The claim runs in a transaction "
    "with `SET LOCAL enable_sort = off`: on a table not analyzed yet PostgreSQL guessed few queued rows and read "
    "every queued job of the kinds through jobs_by_state_kind to sort them (6 ms per claim with 20,000 due; see "
    "the queue section); that setting leaves it no plan but the walk of jobs_due. It costs the claim two more "
    "round trips: BEGIN and the SET go in one message, then COMMIT (three, about 0.15 ms here, before 2026-11-29).",
    "Why the p50 still grows with the table: the WAL. The first change to a page after a checkpoint writes the "
    "whole 8 kB page into the WAL (full_page_writes), and the bench checkpoints right after seeding: at 10,000 "
    "rows the warm-up claims have already touched every page, at 1,000,000 each claimed job lies on a page "
    "untouched since the checkpoint. Until 2026-11-30 a claim moved run_at, which jobs_due indexes, so no claim "
    "was a HOT update: every claimed row got a new heap tuple and an entry in each of the five indexes of jobs, "
    "about six pages per job, 773 kB of WAL per claim at 1,000,000 rows (p50 2.75-2.93 ms, ratio 1.35-1.60 in "
    "three runs). The lease is now lease_until, which no index covers, and jobs has fillfactor 90: a claim is a "
    "HOT update (tests/test_postgres_claims.py counts it), one heap page per job, 234 kB per claim (p50 "
    "1.77-2.05 ms, ratio 1.26-1.45 in the three runs alternating with those). What is left is that one page: a "
    "lease written into the job's row dirties it, and a lease kept anywhere else would only move the page to "
    "the job's end (its DELETE or retry writes the row anyway). The retry_job column pays the index entries "
    "now (a new run_at), and a job that ends pays none. `wal_compression = pglz` cut the WAL by two thirds but "
    "made the claim slower (CPU); with shared_buffers = 1 GB (every page a hit) the ratio was the same (1.66, "
    "before HOT claims). Between checkpoints (5 min by default) a busy queue touches the same pages again and "
    "pays this once per page.",
]


@timed
def run(quick: bool) -> Section:
    sizes = [10_000, 200_000] if quick else [10_000, 1_000_000]
    results = measure(sizes)
    small, large = results[0], results[1]
    r = ratio(large["p50"], small["p50"])
    r99 = ratio(large["p99"], small["p99"])
    if postgres():
        store_text = ("a PostgresStore (asyncpg pool, a fresh database per size on the local PostgreSQL server, "
                      "synchronous_commit on, the claim one `UPDATE … WHERE ctid = ANY(ARRAY(SELECT ctid … "
                      "FOR UPDATE SKIP LOCKED)) RETURNING *` statement)")
        seed_text = ("seeded directly with COPY through asyncpg, then `VACUUM (ANALYZE) jobs` and a `CHECKPOINT` (the "
                     "steady state of a table that grew under autovacuum; seeding time excludes them)")
    else:
        store_text = "a SQLiteStore (WAL, synchronous=NORMAL, the file on local disk)"
        seed_text = "seeded directly with sqlite3"
    lines = [
        "store.claim(now, limit=32, lease_seconds=60, kinds=[submit, poll, archive, callback, deliver]) on "
        f"{store_text}, timed over {CLAIMS} claims after 10 warm-up claims, the sizes taking turns in blocks of "
        f"{CLAIMS // ROUNDS} (both open at once). The jobs table is {seed_text}: "
        f"{DUE_SHARE:.0%} due (a backlog), {DEAD_SHARE:.0%} dead, the rest queued for later (polls and delivery "
        "retries up to 10 h ahead); kinds 45 % deliver, 35 % poll, 8 % archive, 6 % submit, 6 % callback. Each "
        "claimed batch is handed back with retry_job(run_at=now), so the backlog keeps its size.", "",
        "| jobs rows | due | dead | DB MB | seeded in s | claim p50 ms | claim p99 ms | jobs per claim | "
        "retry_job p50 ms |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in results:
        rows, seeded = f"{x['rows']:,}", f"{x['seed_seconds']:.1f}"
        lines.append(f"| {rows} | {x['due']:,} | {x['dead']:,} | {x['file_mb']:.0f} | {seeded} | "
                     f"{x['p50']:.2f} | {x['p99']:.2f} | {x['mean_batch']:.0f} | {x['retry_p50']:.2f} |")
    lines += ["", f"Ratio {large['rows']:,} / {small['rows']:,} rows: p50 **{r:.2f}**, p99 {r99:.2f}."
              if r is not None and r99 is not None else ""]
    lines += ["", f"A page of 50 jobs, newest first (store.list_jobs: GET /v1/jobs and the console's jobs pages), "
              f"p50 of {PAGE_LOOKS} looks per size:", "",
              f"| state / kind | {small['rows']:,} rows, ms | {large['rows']:,} rows, ms | large / small |",
              "|---|---:|---:|---:|"]
    for st, kind in PAGES:
        name = f"{st}/{kind}"
        page_ratio = ratio(large["pages"][name], small["pages"][name])
        lines.append(f"| {st} / {kind or 'any kind'} | {small['pages'][name]:.2f} | {large['pages'][name]:.2f} | "
                     f"{'-' if page_ratio is None else f'{page_ratio:.2f}'} |")
    if postgres():
        lines += ["", f"The claim as relay sends it (PostgresStore.claim, in one transaction): `{large['statement']}`", "",
                  f"EXPLAIN (ANALYZE, BUFFERS) at {large['rows']:,} rows after the timed claims "
                  f"({large['dead_tuples']:,} dead tuples in jobs by then), in a transaction rolled back after; "
                  "the plan PostgreSQL picks for these values:", "", "```", large["explain"], "```", "",
                  "and the generic plan (`plan_cache_mode = force_generic_plan`: what a prepared statement may "
                  "switch to after five runs, the placeholders unknown):", "", "```", large["explain_generic"],
                  "```"]
        notes = [*POSTGRES_NOTES, PAGES_NOTE]
    else:
        lines += ["", f"Query plan of the claim's inner SELECT: `{large['plan']}`."]
        notes = [*SQLITE_NOTES, PAGES_NOTE]
    figures = {"small_rows": small["rows"], "large_rows": large["rows"], "small_p50_ms": small["p50"],
               "small_p99_ms": small["p99"], "large_p50_ms": large["p50"], "large_p99_ms": large["p99"],
               "ratio_p50": r or 0.0, "ratio_p99": r99 or 0.0,
               **{f"page_{st}_{kind or 'any'}_{label}_p50_ms": x["pages"][f"{st}/{kind}"]
                  for st, kind in PAGES for label, x in (("small", small), ("large", large))}}
    summary = [Figure(f"job claim (32) with {large['rows']:,} jobs rows",
                      f"p50 {large['p50']:.2f} / p99 {large['p99']:.2f} ms",
                      f"{small['rows']:,} rows: p50 {small['p50']:.2f} / p99 {small['p99']:.2f} ms", r,
                      "large / small (p50)")]
    return Section("claims", "Job claims", "\n".join(lines), list(notes), figures, summary)


def main() -> None:
    run_standalone(run)


if __name__ == "__main__":
    main()
