-- relay schema v14: failover between providers and the cost of tasks (relay.routing, relay.costs).
-- candidates: the providers to try in order (JSON list; NULL: the task's provider alone); route: the
-- [routes.NAME] asked for; attempts: the providers left behind, with why (JSON list). usage: what the
-- provider reported about usage and billing (JSON); cost: {amount, currency, source} (JSON) once the task
-- ended, with its amount, currency and UTC day (days since 1970-01-01) as columns for the per-day totals.
ALTER TABLE tasks ADD COLUMN candidates TEXT;
ALTER TABLE tasks ADD COLUMN route TEXT;
ALTER TABLE tasks ADD COLUMN attempts TEXT;
ALTER TABLE tasks ADD COLUMN usage TEXT;
ALTER TABLE tasks ADD COLUMN cost TEXT;
ALTER TABLE tasks ADD COLUMN cost_amount REAL;
ALTER TABLE tasks ADD COLUMN cost_currency TEXT;
ALTER TABLE tasks ADD COLUMN cost_day INTEGER;
CREATE INDEX tasks_cost_by_day ON tasks (cost_day) WHERE cost_day IS NOT NULL;
