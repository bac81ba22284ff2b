"""Job-claim latency with a small and a large jobs table: does claiming stay flat as the table grows?

    python -m bench.claims [--quick] [--sizes 10000,1000000]

A SQLiteStore (relay/store/sqlite.py) on a temp file; the jobs table is seeded directly through
sqlite3 (executemany in big transactions, the schema of relay/store/sql/) with a mix like a busy
relay's: mostly future polls and delivery retries, a small due backlog, some dead jobs. Then
store.claim(now, limit=32, lease_seconds=60, kinds=<the worker's five kinds>) is timed CLAIMS times;
each claimed batch is handed back with retry_job(run_at=now) so the due backlog stays the same size
(the jobs go to the back of it). Baseline: the same at the small size; ratio = large / small.
"""

from __future__ import annotations

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
    percentile,
    ratio,
    run_loop,
    run_standalone,
    timed,
)

KINDS = ["submit", "poll", "archive", "callback", "deliver"]    # what relay's worker claims
# (kind, share) of the seeded rows; due / future / dead shares below.
MIX = (("poll", 0.35), ("deliver", 0.45), ("archive", 0.08), ("submit", 0.06), ("callback", 0.06))
DUE_SHARE, DEAD_SHARE = 0.02, 0.05
CLAIMS = 200
BATCH = 50_000


def _ulid_like(ms: int, n: int) -> str:
    return f"job_{ms:013d}{n:013d}"


def seed(path: Path, rows: int, now: float, rng: random.Random) -> dict[str, int]:
    """Insert `rows` jobs straight through sqlite3. Returns how many are due, future and dead."""
    counts = {"due": 0, "future": 0, "dead": 0}
    kinds = [k for k, _ in MIX]
    weights = [w for _, w in MIX]
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
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
        db.execute("BEGIN")
        db.executemany("INSERT INTO jobs (id, kind, task_id, payload, run_at, state, dedupe_key, attempts, "
                       "max_attempts, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)", batch)
        db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return counts


async def claim_latency(path: Path, claims: int, pragmas: tuple[str, ...] = ()) -> dict[str, Any]:
    from relay.store.sqlite import SQLiteStore, claim_sql

    store = SQLiteStore(path)
    await store.open()
    for pragma in pragmas:     # diagnosis only: relay itself runs with its own settings
        await store._writer.execute(pragma)   # type: ignore[union-attr]  # noqa: SLF001
    try:
        claim_ms, retry_ms, claimed = [], [], 0
        for _ in range(10):       # warm the page cache and the statement cache
            jobs = await store.claim(time.time(), limit=32, lease_seconds=60, kinds=KINDS)
            for job in jobs:
                await store.retry_job(job, time.time(), None)
        for _ in range(claims):
            now = time.time()
            began = time.perf_counter()
            jobs = await store.claim(now, limit=32, lease_seconds=60, kinds=KINDS)
            claim_ms.append((time.perf_counter() - began) * 1000)
            claimed += len(jobs)
            began = time.perf_counter()
            for job in jobs:
                await store.retry_job(job, now, None)
            retry_ms.append((time.perf_counter() - began) * 1000 / max(1, len(jobs)))
        inner = claim_sql(len(KINDS)).split("WHERE id IN (", 1)[1].rsplit(") RETURNING", 1)[0]
        plan = await (await store._r.execute(   # noqa: SLF001 - the bench reads the plan of relay's claim query
            "EXPLAIN QUERY PLAN " + inner, (time.time(), *KINDS, 32))).fetchall()
    finally:
        await store.close()
    return {"p50": percentile(claim_ms, 50), "p99": percentile(claim_ms, 99), "mean_batch": claimed / claims,
            "retry_p50": percentile(retry_ms, 50), "plan": " / ".join(str(row[3]) for row in plan)}


def measure(sizes: list[int]) -> list[dict[str, Any]]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for rows in sizes:
            path = Path(tmp) / f"jobs-{rows}.db"
            run_loop(_migrate(path))
            began = time.monotonic()
            counts = seed(path, rows, time.time(), random.Random(rows))
            seeded = time.monotonic() - began
            found = run_loop(claim_latency(path, CLAIMS))
            found.update(rows=rows, seed_seconds=seeded, file_mb=path.stat().st_size / 1e6, **counts)
            results.append(found)
            path.unlink()
    return results


async def _migrate(path: Path) -> None:
    from relay.store.sqlite import SQLiteStore

    store = SQLiteStore(path)
    await store.open()
    await store.close()


@timed
def run(quick: bool) -> Section:
    sizes = [10_000, 200_000] if quick else [10_000, 1_000_000]
    results = measure(sizes)
    small, large = results[0], results[1]
    r = ratio(large["p50"], small["p50"])
    r99 = ratio(large["p99"], small["p99"])
    lines = [
        "store.claim(now, limit=32, lease_seconds=60, kinds=[submit, poll, archive, callback, deliver]) on a "
        "SQLiteStore (WAL, synchronous=NORMAL, the file on local disk), timed over "
        f"{CLAIMS} claims after 10 warm-up claims. The jobs table is seeded directly with sqlite3: "
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
              if r is not None and r99 is not None else "",
              "", f"Query plan of the claim's inner SELECT: `{large['plan']}`."]
    notes = [
        "The claim walks the partial index `jobs_due (run_at) WHERE state = 'queued'` from the oldest due job "
        "and stops after 32 matches, so its cost follows the batch, not the table: dead jobs are outside the "
        "index and future jobs lie past the point where it stops.",
        "What would make it grow: a large due backlog of kinds the worker does not claim (it would be "
        "walked and skipped each time); relay's worker claims every kind it has a handler for, so that "
        "does not happen with one worker role.",
        "The claim's cost is mostly fixed: BEGIN IMMEDIATE, the UPDATE … RETURNING of 32 rows, COMMIT (a WAL "
        "append), each an aiosqlite thread hop. retry_job is one small transaction per job. The p50 grows a "
        "little with the table because the 32 rows a claim touches (and their index entries) are spread over "
        "more pages that SQLite's 2 MB page cache does not hold, so they are read back from the OS cache.",
        "WAL checkpoints run on a connection of their own every second (PASSIVE), not inside commits: left "
        "automatic, a checkpoint ran inside the COMMIT of whichever transaction crossed 1000 WAL pages and "
        "was most of the p99 (15.3 ms at 1,000,000 rows when this was diagnosed, 2.7 ms without). A large "
        "table makes each claim dirty more distinct pages, so the background checkpoints copy more; what "
        "remains of the p99 is the fsync-free WAL append and page reads from the OS cache.",
    ]
    figures = {"small_rows": small["rows"], "large_rows": large["rows"], "small_p50_ms": small["p50"],
               "small_p99_ms": small["p99"], "large_p50_ms": large["p50"], "large_p99_ms": large["p99"],
               "ratio_p50": r or 0.0, "ratio_p99": r99 or 0.0}
    summary = [Figure(f"job claim (32) with {large['rows']:,} jobs rows",
                      f"p50 {large['p50']:.2f} / p99 {large['p99']:.2f} ms",
                      f"{small['rows']:,} rows: p50 {small['p50']:.2f} / p99 {small['p99']:.2f} ms", r,
                      "large / small (p50)")]
    return Section("claims", "Job claims", "\n".join(lines), notes, figures, summary)


def main() -> None:
    run_standalone(run)


if __name__ == "__main__":
    main()
