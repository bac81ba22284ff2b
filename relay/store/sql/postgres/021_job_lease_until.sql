-- relay schema on PostgreSQL, v21: a claim's lease has a column of its own (lease_until) instead of moving run_at,
-- as sql/021 on SQLite. No index covers lease_until, lease_token or attempts, so a claim changes no indexed
-- column and PostgreSQL can write it as a HOT update (the new row version on the same page, no new entry in
-- any of the five indexes): a claimed job costs one heap page in the WAL instead of about six, and after a
-- checkpoint each of those pages is written whole (full_page_writes). fillfactor leaves the room on each page
-- that a HOT update needs (pages written from now on). Leases held when this runs keep their end: run_at was it.
-- Pages written before keep no room: a claim of a row on one is HOT once the page has been pruned or rewritten.
ALTER TABLE jobs ADD COLUMN lease_until DOUBLE PRECISION;
ALTER TABLE jobs SET (fillfactor = 90);
UPDATE jobs SET lease_until = run_at WHERE lease_token IS NOT NULL;
-- A replica of an earlier version still running during a rolling upgrade claims by moving run_at and setting a
-- token, lease_until untouched: this refuses that claim (its worker backs off as from a failing store) rather
-- than letting it take a job a new replica holds, which its run_at in the past would show as due.
ALTER TABLE jobs ADD CONSTRAINT jobs_lease_has_an_end CHECK (lease_token IS NULL OR lease_until IS NOT NULL);
