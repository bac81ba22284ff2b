-- relay schema v16: retention of archives, provider stats and uploaded inputs (relay.retention).
-- Finished archives are found oldest first, as finished tasks are (011's tasks_finished).
CREATE INDEX archives_finished ON archives (completed_at) WHERE completed_at IS NOT NULL;

-- Files uploaded to POST /openai/v1/images/edits (relay.web.openai_compat), one row per sha256. Kept (never
-- swept), and each one a user of its sha256 like an image row: retention never deletes a file an upload shares
-- with an expired or deleted image. The row is written before the file is put, under the same tombstone rule as
-- an archive's hold (relay.store.retention).
CREATE TABLE uploads (
    sha256     TEXT PRIMARY KEY,
    key        TEXT NOT NULL,
    created_at REAL NOT NULL
);
