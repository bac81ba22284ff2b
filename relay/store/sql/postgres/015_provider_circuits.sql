-- relay schema on PostgreSQL: provider circuit breakers (SQLite's 015, numbered alike).
CREATE TABLE provider_circuits (
    provider   TEXT PRIMARY KEY,
    state      TEXT NOT NULL,
    failures   BIGINT NOT NULL,
    opened_at  DOUBLE PRECISION,
    retry_at   DOUBLE PRECISION,
    last_error TEXT,
    updated_at DOUBLE PRECISION NOT NULL
);
