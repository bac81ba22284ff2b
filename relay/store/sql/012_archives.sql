-- relay schema v12: archives of any link (POST /v1/archives) and adopted provider tasks.
--
-- An archive is its own table, not a kind of task: a task carries a provider, a request, submit and poll
-- state, in-flight counts and per-provider metrics, none of which an archive has, and every task query
-- (lists, counts, the in-flight cap, the console) would otherwise have to leave archives out. What the two
-- share is reused as is: the images table, the archive job, the event log, the fan-out and deliveries, the
-- idempotency keys. Those rows name their owner by id (images.task_id, events.task_id, deliveries.task_id,
-- idempotency_keys.task_id), a task's tsk_… or an archive's arc_…, so images.task_id can no longer be a
-- foreign key to tasks: SQLite rebuilds the table without it (nothing references images).
CREATE TABLE archives (
    id           TEXT PRIMARY KEY,
    source_url   TEXT NOT NULL,
    url_key      TEXT NOT NULL UNIQUE,   -- sha256 of the normalized URL: the same link twice is one archive
    expires_at   REAL NOT NULL,
    status       TEXT NOT NULL,          -- pending | archiving | succeeded | failed
    error        TEXT,
    metadata     TEXT,
    webhook_url  TEXT,
    sequence     INTEGER NOT NULL,
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL,
    completed_at REAL
);
CREATE INDEX archives_by_status ON archives (status, id);

-- One row per adopted (provider, provider task id): adopting it again finds the first relay task.
CREATE TABLE adoptions (
    provider         TEXT NOT NULL,
    provider_task_id TEXT NOT NULL,
    task_id          TEXT NOT NULL,
    created_at       REAL NOT NULL,
    PRIMARY KEY (provider, provider_task_id)
);
-- Adopting a task relay submitted itself finds that task.
CREATE INDEX tasks_by_provider_task ON tasks (provider_task_id) WHERE provider_task_id IS NOT NULL;

CREATE TABLE images_owned (
    id                TEXT PRIMARY KEY,
    task_id           TEXT NOT NULL,   -- the owner: a task (tsk_…) or an archive (arc_…)
    idx               INTEGER NOT NULL,
    source_url        TEXT,
    source_data       TEXT,
    source_expires_at REAL,
    status            TEXT NOT NULL,
    sha256            TEXT,
    content_type      TEXT,
    width             INTEGER,
    height            INTEGER,
    bytes             INTEGER,
    path              TEXT,
    archived_at       REAL,
    error             TEXT,
    UNIQUE (task_id, idx)
);
INSERT INTO images_owned (id, task_id, idx, source_url, source_data, source_expires_at, status, sha256, content_type,
                          width, height, bytes, path, archived_at, error)
    SELECT id, task_id, idx, source_url, source_data, source_expires_at, status, sha256, content_type, width, height,
           bytes, path, archived_at, error FROM images;
DROP TABLE images;
ALTER TABLE images_owned RENAME TO images;
CREATE INDEX images_by_sha256 ON images (sha256) WHERE sha256 IS NOT NULL;
CREATE INDEX images_archived ON images (archived_at) WHERE status = 'archived';
