-- relay schema v11: retention (relay.retention). Indexes that let housekeeping find old rows oldest first
-- and delete a task's rows by task without walking whole tables (attempts by age: 010's
-- delivery_attempts_by_time), and the image deletion tombstones.
CREATE INDEX tasks_finished ON tasks (completed_at) WHERE completed_at IS NOT NULL;
CREATE INDEX events_by_age ON events (created_at);
CREATE INDEX idempotency_keys_by_task ON idempotency_keys (task_id);
CREATE INDEX images_by_sha256 ON images (sha256) WHERE sha256 IS NOT NULL;
CREATE INDEX images_archived ON images (archived_at) WHERE status = 'archived';

-- A stored file (or object) being deleted: written in the transaction that found no image left using its
-- sha256, removed once the file is gone. While it exists no archive may take that sha256 (see
-- relay.store.retention); one left by a crash is finished by the next housekeeping run.
CREATE TABLE image_deletions (
    sha256     TEXT PRIMARY KEY,
    key        TEXT NOT NULL,       -- the store key (ab/cd/<sha256>.<ext>); '' while an archive checks
    started_at REAL NOT NULL
);
