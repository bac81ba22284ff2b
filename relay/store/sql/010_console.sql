-- relay schema v10: what the operator's console (relay.web.console) and /v1/jobs read and do.
-- A dead job remembers the dedupe key it held, so a retry can take it back (or see the work is queued again).
ALTER TABLE jobs ADD COLUMN dead_key TEXT;
CREATE INDEX jobs_dead ON jobs (id) WHERE state = 'dead';
-- Success rate and latency per subscription, callbacks per provider: read over the last hour and day.
CREATE INDEX delivery_attempts_by_time ON delivery_attempts (at);
CREATE INDEX inbox_by_time ON inbox (received_at);
