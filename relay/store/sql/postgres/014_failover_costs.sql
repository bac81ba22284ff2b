-- relay schema on PostgreSQL: failover and task costs (SQLite's 014, numbered alike).
ALTER TABLE tasks ADD COLUMN candidates TEXT;
ALTER TABLE tasks ADD COLUMN route TEXT;
ALTER TABLE tasks ADD COLUMN attempts TEXT;
ALTER TABLE tasks ADD COLUMN usage TEXT;
ALTER TABLE tasks ADD COLUMN cost TEXT;
ALTER TABLE tasks ADD COLUMN cost_amount DOUBLE PRECISION;
ALTER TABLE tasks ADD COLUMN cost_currency TEXT;
ALTER TABLE tasks ADD COLUMN cost_day BIGINT;
CREATE INDEX tasks_cost_by_day ON tasks (cost_day) WHERE cost_day IS NOT NULL;
