-- relay schema v22 (SQLite): the jobs table is stored in the order claims read it. A WITHOUT ROWID table whose
-- primary key is (state, run_at, id) keeps the due jobs side by side in run_at order, so a claim of 32 reads and
-- rewrites the few pages they share instead of 32 scattered rows (a rowid table keeps rows in insertion order, and
-- at a million rows nearly every one was on a page no claim had touched: claim p50 1.3-1.9 times that at 10,000
-- rows, see docs/benchmarks.md). The primary key replaces the jobs_due index; an id stays unique and is what
-- every other statement finds a job by. The payload is the last column: a claim reads state, run_at, kind and
-- lease_until of the rows it passes over, and a long payload (a callback's raw body) would push those columns it
-- reads past the part of the row stored in the page. Jobs keep everything they had, leases included. The price:
-- a job whose run_at changes (a retry, a poll put off) moves, and so do its entries in every index, which hold
-- the key (bench.claims: retry_job p50 0.12-0.18 ms before, 0.20-0.26 after). Rewriting a million jobs here
-- took 26 s on a 2-core machine; a relay between tasks holds a few thousand.
CREATE TABLE jobs_v22 (
    state        TEXT NOT NULL,      -- queued | dead (finished jobs are deleted)
    run_at       REAL NOT NULL,      -- due time (a claim leaves it; the lease ends at lease_until)
    id           TEXT NOT NULL UNIQUE,
    kind         TEXT NOT NULL,
    task_id      TEXT,
    dedupe_key   TEXT UNIQUE,        -- at most one live job per key; kept aside in dead_key when a job dies
    attempts     INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    lease_token  TEXT,
    lease_until  REAL,
    last_error   TEXT,
    dead_key     TEXT,
    created_at   REAL NOT NULL,
    payload      TEXT NOT NULL,
    PRIMARY KEY (state, run_at, id)
) WITHOUT ROWID;
INSERT INTO jobs_v22 (state, run_at, id, kind, task_id, dedupe_key, attempts, max_attempts, lease_token, lease_until,
                      last_error, dead_key, created_at, payload)
    SELECT state, run_at, id, kind, task_id, dedupe_key, attempts, max_attempts, lease_token, lease_until,
           last_error, dead_key, created_at, payload FROM jobs;
DROP TABLE jobs;
ALTER TABLE jobs_v22 RENAME TO jobs;
CREATE INDEX jobs_by_task ON jobs (task_id);
CREATE INDEX jobs_by_state_kind ON jobs (state, kind);
CREATE INDEX jobs_dead ON jobs (id) WHERE state = 'dead';
