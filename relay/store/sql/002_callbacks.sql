-- relay schema v2: the callback inbox. A provider callback is written here (with its processing job)
-- before it is acknowledged, so a crash after the 200 never loses it.

CREATE TABLE inbox (
    id          TEXT PRIMARY KEY,
    provider    TEXT NOT NULL,
    task_id     TEXT NOT NULL,
    body        TEXT NOT NULL,
    received_at REAL NOT NULL,
    status      TEXT NOT NULL,      -- received | applied | ignored | rejected
    note        TEXT,
    processed_at REAL
);
CREATE INDEX inbox_by_task ON inbox (task_id, received_at);
