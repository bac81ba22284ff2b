-- relay schema v6: request-rate buckets shared by every process on this database (one row per key,
-- e.g. a provider account), so a provider's rate_limit holds however many replicas send to it.
CREATE TABLE rate_buckets (
    key        TEXT PRIMARY KEY,
    tokens     REAL NOT NULL,
    updated_at REAL NOT NULL
);
