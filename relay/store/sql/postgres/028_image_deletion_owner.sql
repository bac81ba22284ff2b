-- relay schema v28 (PostgreSQL; SQLite's v29): an owner for each image deletion (relay.store.retention). Two sweeps
-- at once (the housekeeping job and `relay retention`, or a replica taking over a lease it thought lost) could both
-- delete one file: the second from a list of tombstones it read before the first ended the deletion, after an
-- archive of the same bytes had put the file anew. Now only the sweep that owns a tombstone deletes its file
-- (the one that decided it, or one that took over a crash's leftover once its owner's lease ran out), which
-- renews the lease before each file it deletes. Rows from before: no owner, a lease long run out.
ALTER TABLE image_deletions ADD COLUMN owner TEXT NOT NULL DEFAULT '';
ALTER TABLE image_deletions ADD COLUMN owned_until DOUBLE PRECISION NOT NULL DEFAULT 0;
