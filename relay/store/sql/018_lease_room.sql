-- relay schema v18 (SQLite only): room in every new job row for the lease its first claim writes.
-- Rows are appended to full pages, and a claim writes an 8-character token where there was NULL: the row
-- outgrows its page and SQLite splits it, about 16 more pages in the WAL per claim of 32 jobs at a million
-- rows (47 against 31 at 10,000). The claim sets
-- lease_room to NULL as it writes the token, so the row keeps its size and is rewritten in place
-- (claim_sql in relay/store/sqlite.py; bench.claims in docs/benchmarks.md). 9 bytes: the token's 8, and one
-- for a later claim after a retry gave the token's bytes back, which also takes attempts past 1 (an integer
-- of 0 or 1 takes no bytes, 2 to 127 one). Rows queued before this migration have no room stored.
ALTER TABLE jobs ADD COLUMN lease_room BLOB DEFAULT X'000000000000000000';
