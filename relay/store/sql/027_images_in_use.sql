-- relay schema v27 (SQLite; PostgreSQL's v26): whether a stored file is still in use (queries.IMAGE_IN_USE, asked
-- under the writer's lock for each file retention would delete) looks only at the images that still use one. Through
-- images_by_sha256 it walked every image ever archived with those bytes, expired ones first, to find one not
-- expired: 5.3 ms with 50,000 expired sharing one file here (18-55 ms on a slower machine), once per batch while
-- retention expires them (`retention.images`). Bytes shared that widely are what a provider sends for every
-- refused prompt, a placeholder, or one seed and prompt asked again. An image leaves this index when it expires.
CREATE INDEX images_in_use ON images (sha256) WHERE sha256 IS NOT NULL AND status <> 'expired';
DROP INDEX images_by_sha256;
