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
-- new token, lease_until untouched; a job a new replica holds keeps its run_at in the past, due as that replica
-- sees it. The trigger refuses such a claim (its worker backs off as from a failing store) instead of letting
-- it take the job and run it twice. Its WHEN is checked without calling the function, so relay's own claims
-- pay next to nothing, and a trigger does not keep an update from being HOT. Going back to an earlier version
-- of relay after this migration: stop every replica, DROP TRIGGER jobs_claimed_the_earlier_way ON jobs, start
-- the earlier version (and create the trigger again before upgrading again: v21 is not applied twice).
CREATE FUNCTION relay_refuse_earlier_claim() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'job % claimed without lease_until: a relay older than schema v21 is running on this database',
        NEW.id USING ERRCODE = 'check_violation';
END
$$;
CREATE TRIGGER jobs_claimed_the_earlier_way BEFORE UPDATE OF lease_token ON jobs FOR EACH ROW
    WHEN (NEW.lease_token IS NOT NULL AND NEW.lease_token IS DISTINCT FROM OLD.lease_token
          AND NEW.lease_until IS NOT DISTINCT FROM OLD.lease_until)
    EXECUTE FUNCTION relay_refuse_earlier_claim();
