-- relay schema on PostgreSQL, v21: a claim's lease has a column of its own (lease_until) instead of moving run_at,
-- as sql/021 on SQLite. No index covers lease_until, lease_token or attempts, so a claim changes no indexed
-- column and PostgreSQL can write it as a HOT update (the new row version on the same page, no new entry in
-- any of the five indexes): a claimed job costs one heap page in the WAL instead of about six, and after a
-- checkpoint each of those pages is written whole (full_page_writes). fillfactor leaves the room on each page
-- that a HOT update needs (pages written from now on). Leases held when this runs keep their end: run_at was it.
ALTER TABLE jobs ADD COLUMN lease_until DOUBLE PRECISION;
ALTER TABLE jobs SET (fillfactor = 90);
UPDATE jobs SET lease_until = run_at WHERE lease_token IS NOT NULL AND state = 'queued';
