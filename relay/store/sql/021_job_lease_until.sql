-- relay schema v21: a claim's lease has a column of its own (lease_until) instead of moving run_at (see
-- sql/postgres/021: there it makes a claim a HOT update; here it keeps the claim out of the jobs_due index).
-- A job is leased while lease_until is in the future; a claimed job keeps its run_at, so the jobs a worker holds
-- stay at the head of jobs_due and the claim passes over them. Leases held when this runs keep their end.
ALTER TABLE jobs ADD COLUMN lease_until REAL;
UPDATE jobs SET lease_until = run_at WHERE lease_token IS NOT NULL;
