-- relay schema on PostgreSQL, v3: the per-subscriber concurrency cap across replicas (SQLite's 007).
CREATE TABLE lane_slots (
    lane       TEXT NOT NULL,
    slot       INTEGER NOT NULL,
    holder     TEXT,
    expires_at DOUBLE PRECISION,
    PRIMARY KEY (lane, slot)
);
