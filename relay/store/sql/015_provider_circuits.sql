-- relay schema v15: one circuit breaker per provider (relay.circuit), shared by every replica.
CREATE TABLE provider_circuits (
    provider   TEXT PRIMARY KEY,
    state      TEXT NOT NULL,        -- closed | open | half_open
    failures   INTEGER NOT NULL,     -- consecutive failed submits
    opened_at  REAL,
    retry_at   REAL,
    last_error TEXT,
    updated_at REAL NOT NULL
);
