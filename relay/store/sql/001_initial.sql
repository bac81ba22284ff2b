-- relay schema v1: tasks, their images, the event log (outbox), jobs, idempotency keys.
-- Times are unix seconds (REAL). JSON columns hold text.

CREATE TABLE tasks (
    id                TEXT PRIMARY KEY,
    provider          TEXT NOT NULL,
    provider_task_id  TEXT,
    status            TEXT NOT NULL,
    progress          INTEGER,
    request           TEXT NOT NULL,
    error             TEXT,
    metadata          TEXT,
    webhook_url       TEXT,
    webhook_events    TEXT,
    sequence          INTEGER NOT NULL,
    created_at        REAL NOT NULL,
    updated_at        REAL NOT NULL,
    completed_at      REAL,
    deadline_at       REAL,
    submit_started_at REAL
);
CREATE INDEX tasks_by_status ON tasks (status, id);
CREATE INDEX tasks_by_provider ON tasks (provider, id);

CREATE TABLE images (
    id                TEXT PRIMARY KEY,
    task_id           TEXT NOT NULL REFERENCES tasks (id),
    idx               INTEGER NOT NULL,
    source_url        TEXT,
    source_data       TEXT,            -- inline base64 until archived (OpenAI), then cleared
    source_expires_at REAL,
    status            TEXT NOT NULL,   -- pending | archived | failed
    sha256            TEXT,
    content_type      TEXT,
    width             INTEGER,
    height            INTEGER,
    bytes             INTEGER,
    path              TEXT,
    archived_at       REAL,
    error             TEXT,
    UNIQUE (task_id, idx)
);

CREATE TABLE events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,   -- the log's order
    id         TEXT NOT NULL UNIQUE,
    type       TEXT NOT NULL,
    task_id    TEXT NOT NULL,
    sequence   INTEGER NOT NULL,                    -- the task's sequence after this change
    data       TEXT NOT NULL,                       -- the task object at that moment
    created_at REAL NOT NULL
);
CREATE INDEX events_by_task ON events (task_id, seq);

CREATE TABLE jobs (
    id           TEXT PRIMARY KEY,
    kind         TEXT NOT NULL,
    task_id      TEXT,
    payload      TEXT NOT NULL,
    run_at       REAL NOT NULL,      -- due time; while leased, the lease expiry
    state        TEXT NOT NULL,      -- queued | dead (finished jobs are deleted)
    dedupe_key   TEXT UNIQUE,        -- at most one live job per key; cleared when a job dies
    attempts     INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    lease_token  TEXT,
    last_error   TEXT,
    created_at   REAL NOT NULL
);
CREATE INDEX jobs_due ON jobs (run_at) WHERE state = 'queued';
CREATE INDEX jobs_by_task ON jobs (task_id);

CREATE TABLE idempotency_keys (
    scope      TEXT NOT NULL,        -- hash of the API key that used it
    key        TEXT NOT NULL,
    body_hash  TEXT NOT NULL,
    task_id    TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (scope, key)
);
