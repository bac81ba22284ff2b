-- relay schema v25 (SQLite; PostgreSQL's v24): the dead jobs of no task (a delivery's) that retention deletes 30
-- days after they died (queries.DELETE_OLD_DEAD_JOBS), found by the time they died: through jobs_dead each batch
-- read every dead job (74 ms at 50,000, under the writer's lock, also when none was old). Dead jobs are few and
-- rarely written, so the index costs the queue nothing. IF NOT EXISTS: a database that reached v24 while v24 held it
-- (for a few commits before this round landed) has it already.
CREATE INDEX IF NOT EXISTS jobs_dead_of_no_task ON jobs (run_at) WHERE state = 'dead' AND task_id IS NULL;
