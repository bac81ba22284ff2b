-- relay schema v3: subscriptions, deliveries (one per event and subscriber), and every attempt.
-- Times are unix seconds (REAL). JSON columns hold text. Secrets are encrypted (relay.deliveries.secrets).

CREATE TABLE subscriptions (
    id                  TEXT PRIMARY KEY,
    url                 TEXT NOT NULL,
    events              TEXT NOT NULL,          -- JSON list of filters: exact types, task.*, *
    description         TEXT,
    enabled             INTEGER NOT NULL,
    disabled_reason     TEXT,                   -- manual | gone (410) | failing (auto-disabled)
    signing             TEXT NOT NULL,          -- hmac | ed25519
    keyring             TEXT NOT NULL,          -- encrypted JSON: current and previous keys
    public_key          TEXT,                   -- whpk_ (ed25519)
    previous_public_key TEXT,
    previous_expires_at REAL,                   -- previous keys sign beside the new until then
    failing_since       REAL,                   -- start of the current run of failed attempts
    created_at          REAL NOT NULL,
    updated_at          REAL NOT NULL
);
CREATE INDEX subscriptions_enabled ON subscriptions (enabled);

CREATE TABLE deliveries (
    id               TEXT PRIMARY KEY,
    event_id         TEXT NOT NULL,
    event_type       TEXT NOT NULL,
    task_id          TEXT NOT NULL,
    subscription_id  TEXT,                      -- NULL: the task's own webhook_url (kept when the subscription goes)
    target           TEXT NOT NULL,             -- subscription id or 'task': one delivery per event and target
    url              TEXT NOT NULL,
    status           TEXT NOT NULL,             -- pending | succeeded | failed | canceled
    attempts         INTEGER NOT NULL DEFAULT 0,
    round_attempts   INTEGER NOT NULL DEFAULT 0,  -- attempts since the round began (the schedule position)
    round_origin     TEXT NOT NULL DEFAULT 'auto', -- auto | retry | replay
    next_attempt_at  REAL,
    last_attempt_at  REAL,
    last_status_code INTEGER,
    last_error       TEXT,
    created_at       REAL NOT NULL,
    updated_at       REAL NOT NULL,
    completed_at     REAL,
    UNIQUE (event_id, target)
);
CREATE INDEX deliveries_by_subscription ON deliveries (subscription_id, id);
CREATE INDEX deliveries_by_status ON deliveries (status, id);
CREATE INDEX deliveries_by_task ON deliveries (task_id, id);

CREATE TABLE delivery_attempts (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    delivery_id  TEXT NOT NULL,
    number       INTEGER NOT NULL,
    at           REAL NOT NULL,
    url          TEXT NOT NULL,
    origin       TEXT NOT NULL,                 -- auto | retry (manual) | replay: what started its round
    status_code  INTEGER,
    latency_ms   REAL,
    response     TEXT,                          -- first 4 KiB of the body
    error        TEXT
);
CREATE INDEX delivery_attempts_by_delivery ON delivery_attempts (delivery_id, id);
