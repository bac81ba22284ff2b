-- relay schema v24 (PostgreSQL; SQLite's v25): the dead jobs of no task (a delivery's) that retention deletes 30 days after they
-- died (queries.DELETE_OLD_DEAD_JOBS), found by the time they died. Dead jobs are few and rarely written, so the
-- index costs the queue nothing; without it each batch reads every dead job. (SQLite's v24 also lists jobs by
-- state and kind through a new index: PostgreSQL's planner already walks jobs_pkey or jobs_dead for those.)
CREATE INDEX jobs_dead_of_no_task ON jobs (run_at) WHERE state = 'dead' AND task_id IS NULL;
