-- relay schema v26 (PostgreSQL; SQLite's v27): whether a stored file is still in use (queries.IMAGE_IN_USE, asked
-- under the writer's lock for each file retention would delete) looks only at the images that still use one. With
-- images_by_sha256 the planner read the whole images table when many expired images shared the bytes (3.3-6.4 ms
-- with 50,000 of 100,000 sharing one file, a sequential scan), once per batch while retention expires them
-- (`retention.images`). An image leaves this index when it expires. The old index is dropped last: a DROP INDEX
-- keeps every read of images out until the migration commits.
CREATE INDEX images_in_use ON images (sha256) WHERE sha256 IS NOT NULL AND status <> 'expired';
DROP INDEX images_by_sha256;
