-- relay schema on PostgreSQL, v1: the same tables and columns as SQLite's migrations 001-005, so the
-- statements of relay/store/queries.py read both. Times are unix seconds (DOUBLE PRECISION), JSON
-- columns hold text, booleans are 0/1 integers.

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
    created_at        DOUBLE PRECISION NOT NULL,
    updated_at        DOUBLE PRECISION NOT NULL,
    completed_at      DOUBLE PRECISION,
    deadline_at       DOUBLE PRECISION,
    submit_started_at DOUBLE PRECISION
);
CREATE INDEX tasks_by_status ON tasks (status, id);
CREATE INDEX tasks_by_provider ON tasks (provider, id);
CREATE INDEX tasks_submitting ON tasks (provider) WHERE status = 'pending' AND submit_started_at IS NOT NULL;

CREATE TABLE images (
    id                TEXT PRIMARY KEY,
    task_id           TEXT NOT NULL REFERENCES tasks (id),
    idx               INTEGER NOT NULL,
    source_url        TEXT,
    source_data       TEXT,
    source_expires_at DOUBLE PRECISION,
    status            TEXT NOT NULL,
    sha256            TEXT,
    content_type      TEXT,
    width             INTEGER,
    height            INTEGER,
    bytes             BIGINT,
    path              TEXT,
    archived_at       DOUBLE PRECISION,
    error             TEXT,
    UNIQUE (task_id, idx)
);

-- The log's order is seq; xid is the writing transaction, so that readers are shown only events whose
-- transaction, and every one before it, has ended (seq is assigned at insert, not at commit).
CREATE TABLE events (
    seq        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id         TEXT NOT NULL UNIQUE,
    type       TEXT NOT NULL,
    task_id    TEXT NOT NULL,
    sequence   INTEGER NOT NULL,
    data       TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    xid        xid8 NOT NULL DEFAULT pg_current_xact_id()
);
CREATE INDEX events_by_task ON events (task_id, seq);

CREATE TABLE jobs (
    id           TEXT PRIMARY KEY,
    kind         TEXT NOT NULL,
    task_id      TEXT,
    payload      TEXT NOT NULL,
    run_at       DOUBLE PRECISION NOT NULL,
    state        TEXT NOT NULL,
    dedupe_key   TEXT UNIQUE,
    attempts     INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    lease_token  TEXT,
    last_error   TEXT,
    created_at   DOUBLE PRECISION NOT NULL
);
CREATE INDEX jobs_due ON jobs (run_at) WHERE state = 'queued';
CREATE INDEX jobs_by_task ON jobs (task_id);
CREATE INDEX jobs_by_state_kind ON jobs (state, kind);

-- A job inserted on one replica wakes the workers of every replica at once (delivered at commit,
-- one notification per transaction).
CREATE FUNCTION relay_jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('relay_jobs', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_notify AFTER INSERT ON jobs FOR EACH STATEMENT EXECUTE FUNCTION relay_jobs_notify();

CREATE TABLE idempotency_keys (
    scope      TEXT NOT NULL,
    key        TEXT NOT NULL,
    body_hash  TEXT NOT NULL,
    task_id    TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (scope, key)
);

CREATE TABLE inbox (
    id           TEXT PRIMARY KEY,
    provider     TEXT NOT NULL,
    task_id      TEXT NOT NULL,
    body         TEXT NOT NULL,
    received_at  DOUBLE PRECISION NOT NULL,
    status       TEXT NOT NULL,
    note         TEXT,
    processed_at DOUBLE PRECISION
);
CREATE INDEX inbox_by_task ON inbox (task_id, received_at);

CREATE TABLE subscriptions (
    id                  TEXT PRIMARY KEY,
    url                 TEXT NOT NULL,
    events              TEXT NOT NULL,
    description         TEXT,
    enabled             INTEGER NOT NULL,
    disabled_reason     TEXT,
    signing             TEXT NOT NULL,
    keyring             TEXT NOT NULL,
    public_key          TEXT,
    previous_public_key TEXT,
    previous_expires_at DOUBLE PRECISION,
    failing_since       DOUBLE PRECISION,
    created_at          DOUBLE PRECISION NOT NULL,
    updated_at          DOUBLE PRECISION NOT NULL
);
CREATE INDEX subscriptions_enabled ON subscriptions (enabled);

CREATE TABLE deliveries (
    id               TEXT PRIMARY KEY,
    event_id         TEXT NOT NULL,
    event_type       TEXT NOT NULL,
    task_id          TEXT NOT NULL,
    subscription_id  TEXT,
    target           TEXT NOT NULL,
    url              TEXT NOT NULL,
    status           TEXT NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    round_attempts   INTEGER NOT NULL DEFAULT 0,
    round_origin     TEXT NOT NULL DEFAULT 'auto',
    next_attempt_at  DOUBLE PRECISION,
    last_attempt_at  DOUBLE PRECISION,
    last_status_code INTEGER,
    last_error       TEXT,
    created_at       DOUBLE PRECISION NOT NULL,
    updated_at       DOUBLE PRECISION NOT NULL,
    completed_at     DOUBLE PRECISION,
    UNIQUE (event_id, target)
);
CREATE INDEX deliveries_by_subscription ON deliveries (subscription_id, id);
CREATE INDEX deliveries_by_status ON deliveries (status, id);
CREATE INDEX deliveries_by_task ON deliveries (task_id, id);

CREATE TABLE delivery_attempts (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id  TEXT NOT NULL,
    number       INTEGER NOT NULL,
    at           DOUBLE PRECISION NOT NULL,
    url          TEXT NOT NULL,
    origin       TEXT NOT NULL,
    status_code  INTEGER,
    latency_ms   DOUBLE PRECISION,
    response     TEXT,
    error        TEXT
);
CREATE INDEX delivery_attempts_by_delivery ON delivery_attempts (delivery_id, id);
