-- relay schema v17: a lane slot is marked wanted while a delivery elsewhere waits for one (PostgreSQL's release
-- then tells every replica; see sql/postgres/017). Kept alike on SQLite, whose statements are the same.
ALTER TABLE lane_slots ADD COLUMN wanted INTEGER NOT NULL DEFAULT 0;
