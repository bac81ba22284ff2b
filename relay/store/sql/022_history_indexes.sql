-- relay schema v22: statements that ran on every submit, scrape or page read walked every task a provider was
-- ever given, finished ones included (measured at 200,000 stored tasks, 40,000 per provider, on SQLite):
-- - the in-flight count of each submit, under the writer's lock (queries.COUNT_IN_FLIGHT): 32 ms, now 0.03;
-- - GET /v1/tasks and the console filtered by provider and status: 33 ms, now 0.2;
-- - the tasks gauge of /metrics (queries.TASK_COUNTS), counted from this index alone: 221 ms, now 14;
-- - the adoption of a provider task (queries.TASK_BY_PROVIDER_TASK, in a write transaction): it walked
--   tasks_by_provider for its ORDER BY id; 19-34 ms, now 0.004 (tasks_of_provider_task, which replaces
--   tasks_by_provider_task).
-- - GET /v1/events?type=: a type that is rare or absent read the whole log in seq order (65 ms at 770,000 events).
-- The old index is dropped last: on PostgreSQL a DROP INDEX keeps every read and write of tasks out until the
-- migration commits, so it comes after the builds (which only hold writes back).
CREATE INDEX tasks_by_provider_status ON tasks (provider, status, id);
CREATE INDEX events_by_type ON events (type, seq);
CREATE INDEX tasks_of_provider_task ON tasks (provider_task_id, provider, id) WHERE provider_task_id IS NOT NULL;
DROP INDEX tasks_by_provider_task;
