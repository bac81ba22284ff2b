-- relay schema on PostgreSQL: provider request stats (SQLite's 009, numbered alike).
CREATE TABLE provider_stats (
    provider        TEXT NOT NULL,
    minute          BIGINT NOT NULL,
    requests        BIGINT NOT NULL,
    errors          BIGINT NOT NULL,
    rate_limited    BIGINT NOT NULL,
    latency_buckets TEXT NOT NULL,
    PRIMARY KEY (provider, minute)
);
CREATE INDEX provider_stats_by_minute ON provider_stats (minute);
