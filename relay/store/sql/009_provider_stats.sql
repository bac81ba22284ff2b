-- relay schema v9: provider request stats per provider per minute, added to by every process
-- (relay.stats), summed by the dashboard's Providers page. minute: unix seconds of the minute's start;
-- latency_buckets: a JSON list of counts per relay.stats.LATENCY_BUCKETS bucket (the last: slower).
CREATE TABLE provider_stats (
    provider        TEXT NOT NULL,
    minute          INTEGER NOT NULL,
    requests        INTEGER NOT NULL,
    errors          INTEGER NOT NULL,
    rate_limited    INTEGER NOT NULL,
    latency_buckets TEXT NOT NULL,
    PRIMARY KEY (provider, minute)
);
CREATE INDEX provider_stats_by_minute ON provider_stats (minute);
