-- relay schema on PostgreSQL, v12: archives of any link (POST /v1/archives) and adopted provider tasks.
-- See the SQLite file of the same number for why an archive is its own table whose images, events,
-- deliveries and idempotency keys name it by id (so images.task_id is no longer a foreign key to tasks).
CREATE TABLE archives (
    id           TEXT PRIMARY KEY,
    source_url   TEXT NOT NULL,
    url_key      TEXT NOT NULL UNIQUE,
    expires_at   DOUBLE PRECISION NOT NULL,
    status       TEXT NOT NULL,
    error        TEXT,
    metadata     TEXT,
    webhook_url  TEXT,
    sequence     INTEGER NOT NULL,
    created_at   DOUBLE PRECISION NOT NULL,
    updated_at   DOUBLE PRECISION NOT NULL,
    completed_at DOUBLE PRECISION
);
CREATE INDEX archives_by_status ON archives (status, id);

CREATE TABLE adoptions (
    provider         TEXT NOT NULL,
    provider_task_id TEXT NOT NULL,
    task_id          TEXT NOT NULL,
    created_at       DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (provider, provider_task_id)
);
CREATE INDEX tasks_by_provider_task ON tasks (provider_task_id) WHERE provider_task_id IS NOT NULL;

ALTER TABLE images DROP CONSTRAINT IF EXISTS images_task_id_fkey;
