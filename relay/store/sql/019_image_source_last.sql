-- relay schema v19 (SQLite only): an image's inline source is the last column of its row. (No v18: a migration
-- that had that number was reverted, and databases opened meanwhile have it recorded.)
-- OpenAI's images arrive as base64, megabytes each, kept in the row until the image is archived. SQLite keeps
-- such a value on a chain of overflow pages, and reading any column stored after it walks the whole chain: a
-- task's four pending images of 2.1 MB each cost every read of the task 1.9 ms with the source left out of the
-- SELECT (6.1 ms with it). Stored last, the columns read with the task come before it. (PostgreSQL keeps large
-- values out of line, TOAST, and is not rebuilt.) The table is rebuilt as 012 rebuilt it, in the migrations'
-- transaction: the first start after the upgrade copies every image row (waiting sources included), needs about
-- the table's size again in free disk, and holds the write lock until it is done.
CREATE TABLE images_source_last (
    id                TEXT PRIMARY KEY,
    task_id           TEXT NOT NULL,   -- the owner: a task (tsk_…) or an archive (arc_…)
    idx               INTEGER NOT NULL,
    source_url        TEXT,
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
    source_data       TEXT,            -- inline base64 until archived (OpenAI), then cleared
    UNIQUE (task_id, idx)
);
INSERT INTO images_source_last (id, task_id, idx, source_url, source_expires_at, status, sha256, content_type, width,
                                height, bytes, path, archived_at, error, source_data)
    SELECT id, task_id, idx, source_url, source_expires_at, status, sha256, content_type, width, height, bytes, path,
           archived_at, error, source_data FROM images;
DROP TABLE images;
ALTER TABLE images_source_last RENAME TO images;
CREATE INDEX images_by_sha256 ON images (sha256) WHERE sha256 IS NOT NULL;
CREATE INDEX images_archived ON images (archived_at) WHERE status = 'archived';
