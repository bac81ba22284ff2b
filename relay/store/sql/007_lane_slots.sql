-- relay schema v7: the per-subscriber concurrency cap across processes. A lane (a subscription, or the
-- origin of a task's webhook_url) has `cap` slots; an attempt holds one under a lease while it is sent,
-- so a process that dies mid-attempt gives its slot back when the lease runs out.
CREATE TABLE lane_slots (
    lane       TEXT NOT NULL,
    slot       INTEGER NOT NULL,
    holder     TEXT,
    expires_at REAL,
    PRIMARY KEY (lane, slot)
);
