-- relay schema on PostgreSQL, v2: request-rate buckets shared by every replica (SQLite's 006).
CREATE TABLE rate_buckets (
    key        TEXT PRIMARY KEY,
    tokens     DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL
);
