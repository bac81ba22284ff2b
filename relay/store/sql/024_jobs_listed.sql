-- relay schema v24 (SQLite): GET /v1/jobs and the console's jobs pages list jobs newest first by state (and kind).
-- With the state a parameter and only (state, kind) to go through, SQLite read every job of the state and sorted
-- them all: at 1,000,000 rows (950,000 queued, 50,000 dead) a page of queued jobs took 705 ms, of dead ones 99, of
-- one kind 61-149 (bench.claims). Now each page walks an index in id order and stops at its limit
-- (queries.jobs_listing): the primary key for queued jobs, jobs_dead for dead ones, and this index, which replaces
-- jobs_by_state_kind (the counts of /metrics and the console read it as they read that one: 113-142 ms and 244-287
-- ms at a million jobs, against 113-119 and 208-231 before, two runs each), for a kind. PostgreSQL keeps (state,
-- kind): its planner, with statistics, already walks jobs_pkey or jobs_dead (every page under 1.2 ms at a million
-- rows), and there this index took 115 MB more at a million rows (its (state, kind) entries are deduplicated) and a
-- larger index write for every job, for nothing measured.
CREATE INDEX jobs_by_state_kind_id ON jobs (state, kind, id);
DROP INDEX jobs_by_state_kind;
