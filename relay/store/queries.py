"""Every SQL statement relay runs, by name, in the one dialect both backends read.

Written for SQLite and PostgreSQL alike: `?` placeholders (the PostgreSQL backend numbers them
`$1, $2, …`), `IS NOT DISTINCT FROM` for a null-safe comparison, `ON CONFLICT … DO NOTHING`,
`RETURNING`, `json_extract(column, '$.key')` for a key of a JSON text (read as PostgreSQL's `->>`).
`FOR_UPDATE` marks a row lock: PostgreSQL takes it (so a read-decide-write is atomic
against other replicas), SQLite drops it (its one writer already serializes every write transaction).
The few statements that differ by backend (the claim, migrations, the event log's visibility rule)
live in that backend's module.
"""

from __future__ import annotations

from collections.abc import Sequence

FOR_UPDATE = " /*FOR UPDATE*/"


def indexed_by(index: str) -> str:
    """Marks a table read that must go through `index` whatever the planner would pick (where one plan reads the
    rows asked for and another every row of a history). SQLite is told so (INDEXED BY: SQLiteStore takes the
    comment marks off, relay.store.sqlite.sqlite_spelling); PostgreSQL, which has no hints, keeps the comment."""
    return f" /*INDEXED BY {index}*/"

# PostgreSQL plans a statement marked so without its values (plan_cache_mode force_generic_plan: for the rest of
# the transaction in a write, PostgresTx; in a read-only transaction of its own, two round trips more, in a plain
# read, PostgresStore._read_all): where its plans for the values misjudge two correlated columns (a pair rare where
# each value alone is common) and walk far, and the plan without them takes the index that fits. SQLite reads it
# as a comment.
GENERIC_PLAN = "/*relay: generic plan*/ "


# ---- tasks -----------------------------------------------------------------------------------------
INSERT_TASK = (
    "INSERT INTO tasks (id, provider, provider_task_id, status, progress, request, error, metadata, webhook_url, "
    "webhook_events, sequence, created_at, updated_at, completed_at, deadline_at, submit_started_at) "
    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)")
LOAD_TASK = "SELECT * FROM tasks WHERE id = ?"
LOCK_TASK = "SELECT * FROM tasks WHERE id = ?" + FOR_UPDATE
LOCK_TASK_ROW = "SELECT 1 FROM tasks WHERE id = ?" + FOR_UPDATE     # the lock alone (Tx.lock)
UPDATE_TASK_STATE = (
    "UPDATE tasks SET status = ?, sequence = ?, updated_at = ?, progress = ?, provider_task_id = ?, error = ?, "
    "completed_at = ? WHERE id = ?")
TASK_USAGE_COLUMNS = ("usage",)
TASK_COST_COLUMNS = ("cost", "cost_amount", "cost_currency", "cost_day")


def update_task_state(*, usage: bool, cost: bool) -> str:
    """UPDATE_TASK_STATE also writing the usage a provider reported and/or the cost the task ended with (their
    values after the state's, before the id): one write of the row, as two writes of one table are two
    statements on PostgreSQL (PostgresTx)."""
    extra = (*(TASK_USAGE_COLUMNS if usage else ()), *(TASK_COST_COLUMNS if cost else ()))
    return UPDATE_TASK_STATE.replace(" WHERE id", "".join(f", {column} = ?" for column in extra) + " WHERE id")
# A compare-and-set: the mark is made only while the task is as the submitting run read it (its mark, the value
# of the last argument; no provider task; not ended). A run that outlived its job's lease finds another run's
# mark there, or the provider's task, and must not send (Store.reserve_submit).
MARK_SUBMIT_STARTED = (
    "UPDATE tasks SET submit_started_at = COALESCE(submit_started_at, ?) WHERE id = ? AND provider_task_id IS NULL "
    "AND status NOT IN ('succeeded', 'failed', 'canceled') AND submit_started_at IS NOT DISTINCT FROM ?")
# A provider task accepted for a task canceled meanwhile (relay.jobs.submit): kept, to cancel it at the provider.
NOTE_CANCELED_PROVIDER_TASK = ("UPDATE tasks SET provider_task_id = ? WHERE id = ? AND status = 'canceled' "
                               "AND (provider_task_id IS NULL OR provider_task_id = ?)")     # safe to run twice
# Only the mark the caller made (a run that outlived its lease must not clear the mark of the run that took over).
CLEAR_SUBMIT_STARTED = ("UPDATE tasks SET submit_started_at = NULL WHERE id = ? AND provider_task_id IS NULL "
                        "AND submit_started_at = ?")
# Each count reads only the live tasks: those queued or running through tasks_by_provider_status (sql/022), those
# whose submit started through the partial index tasks_submitting (sql/004; SQLite's planner would rather read
# the whole pending backlog through the other), whose WHERE this one must imply word for word.
COUNT_IN_FLIGHT = (
    "SELECT (SELECT COUNT(*) FROM tasks WHERE status IN ('queued', 'running') AND provider = ?)"
    " + (SELECT COUNT(*) FROM tasks" + indexed_by("tasks_submitting") + " WHERE status = 'pending'"
    " AND submit_started_at IS NOT NULL"
    "    AND provider = ? AND id != ?) AS n")

# ---- idempotency keys ------------------------------------------------------------------------------
# Insert-or-keep, then read the row that holds the key, locked: two requests with one key at the same
# instant serialize on the key's row, and the second sees the first's task.
CLAIM_IDEMPOTENCY_KEY = (
    "INSERT INTO idempotency_keys (scope, key, body_hash, task_id, created_at) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (scope, key) DO NOTHING")
LOCK_IDEMPOTENCY_KEY = (
    "SELECT body_hash, task_id, created_at FROM idempotency_keys WHERE scope = ? AND key = ?" + FOR_UPDATE)
REPLACE_IDEMPOTENCY_KEY = (
    "UPDATE idempotency_keys SET body_hash = ?, task_id = ?, created_at = ? WHERE scope = ? AND key = ?")

# ---- images ----------------------------------------------------------------------------------------
INSERT_IMAGE = (
    "INSERT INTO images (id, task_id, idx, source_url, source_data, source_expires_at, status) "
    "VALUES (?, ?, ?, ?, ?, ?, 'pending') ON CONFLICT (task_id, idx) DO NOTHING")
# Every column of an image but its inline source (OpenAI's base64, megabytes per image until it is archived): what
# a task's images are read with each time the task is (IMAGE_COLUMNS), and the one image with its source for the
# archive job that saves it (LOAD_IMAGE_WITH_SOURCE).
IMAGE_COLUMNS = ("id, task_id, idx, source_url, source_expires_at, status, sha256, content_type, width, height, bytes, "
                 "path, archived_at, error")
IMAGES_OF_TASK = f"SELECT {IMAGE_COLUMNS} FROM images WHERE task_id = ? ORDER BY idx"


# The subscriptions' stamp (sql/020), read along with a task or an archive: see relay.store.outbox.Subscribers.
SUBSCRIPTIONS_STAMP = "(SELECT stamp FROM subscriptions_stamp)"


def with_images(table: str) -> str:
    """A task's (or an archive's) row with its images in one statement instead of two: a row per image, the
    owner's columns repeated and the image's named image_<column>; one row with NULL images when it has none.
    plumbing.owner_with_images builds it. Never with a row lock: after waiting for the lock PostgreSQL (READ
    COMMITTED) reads the locked row again but keeps the images as they were before the wait, so the row is
    locked first (Tx.lock) and read with its images by this statement after (Store._locked_task)."""
    columns = ", ".join(f"i.{name.strip()} AS image_{name.strip()}" for name in IMAGE_COLUMNS.split(","))
    return (f"SELECT o.*, {columns}, {SUBSCRIPTIONS_STAMP} AS subscriptions_stamp FROM {table} o "
            f"LEFT JOIN images i ON i.task_id = o.id WHERE o.id = ? ORDER BY i.idx")


LOAD_TASK_WITH_IMAGES = with_images("tasks")
LOAD_ARCHIVE_WITH_IMAGES = with_images("archives")
LOAD_IMAGE = f"SELECT {IMAGE_COLUMNS} FROM images WHERE id = ?"
LOAD_IMAGE_WITH_SOURCE = "SELECT * FROM images WHERE id = ?"
IMAGE_ARCHIVED = (
    "UPDATE images SET status = 'archived', sha256 = ?, content_type = ?, width = ?, height = ?, bytes = ?, "
    "path = ?, archived_at = ?, source_data = NULL WHERE id = ? AND status = 'pending'")
IMAGE_FAILED = "UPDATE images SET status = 'failed', error = ?, source_data = NULL WHERE id = ? AND status = 'pending'"

# ---- events ----------------------------------------------------------------------------------------
INSERT_EVENT = "INSERT INTO events (id, type, task_id, sequence, data, created_at) VALUES (?,?,?,?,?,?)"
EVENT_EXISTS = "SELECT 1 FROM events WHERE id = ?"

# ---- callbacks -------------------------------------------------------------------------------------
LOAD_CALLBACK = "SELECT * FROM inbox WHERE id = ?"
# Inserted when a callback job settles. A job queued by an earlier relay, which wrote the row at receipt, updates
# it; a job run twice (a crash between settling and finishing) keeps the first outcome.
_KEEP_SETTLED = ("ON CONFLICT (id) DO UPDATE SET status = excluded.status, note = excluded.note, "
                 "processed_at = excluded.processed_at WHERE inbox.status = 'received'")
SETTLE_CALLBACK = ("INSERT INTO inbox (id, provider, task_id, body, received_at, status, note, processed_at) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?) " + _KEEP_SETTLED)
# A task's callback jobs no worker holds, received by a time, a page at a time after a cursor (an id): a worker
# that has judged one callback of the task settles them with it (relay.jobs.callback, lock_waiting_jobs). Through
# the task's jobs: SQLite otherwise walked every queued job of the kind, each task's (124 ms a page with 250,000
# callbacks queued, as after an outage, up to 50 pages per gathering).
WAITING_CALLBACK_JOBS = ("SELECT id, json_extract(payload, '$.provider') AS provider, "
                         f"json_extract(payload, '$.body') AS body FROM jobs{indexed_by('jobs_by_task')} "
                         "WHERE task_id = ? AND kind = ? "
                         "AND state = 'queued' AND lease_token IS NULL AND created_at <= ? AND id > ? "
                         "ORDER BY id LIMIT ?")

# ---- jobs ------------------------------------------------------------------------------------------
# A job is leased while its lease_until is ahead of now (the argument): a claim sets it and leaves run_at alone.
NOT_LEASED = "(lease_until IS NULL OR lease_until <= ?)"
# Where a statement must walk jobs_due in run_at order. SQLite's planner, with no statistics, prefers
# jobs_by_state_kind_id (state = 'queued') and reads every queued job instead: 0.6 s at a million rows against
# 0.1 ms.
BY_DUE = indexed_by("jobs_due")
INSERT_JOB = (
    "INSERT INTO jobs (id, kind, task_id, payload, run_at, state, dedupe_key, attempts, max_attempts, created_at) "
    "VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?) ON CONFLICT (dedupe_key) DO NOTHING")
DELETE_WATCH_JOBS = "DELETE FROM jobs WHERE task_id = ? AND kind IN ('poll', 'confirm') AND state = 'queued'"
EXTEND_LEASE = ("UPDATE jobs SET lease_until = ? WHERE id = ? AND lease_token IS NOT DISTINCT FROM ? "
                "AND state = 'queued'")
FINISH_JOB = "DELETE FROM jobs WHERE id = ? AND lease_token IS NOT DISTINCT FROM ?"
RETRY_JOB = (
    "UPDATE jobs SET run_at = ?, last_error = ?, lease_token = NULL, lease_until = NULL, "
    "payload = COALESCE(?, payload), attempts = CASE WHEN ? = 1 THEN 0 ELSE attempts END "
    "WHERE id = ? AND lease_token IS NOT DISTINCT FROM ?")
# A dead job keeps its dedupe key aside (dead_key) for a manual retry (relay.store.console).
# Its run_at becomes the time it died (what retention ages a dead job of no task by).
BURY_JOB = ("UPDATE jobs SET state = 'dead', dead_key = dedupe_key, dedupe_key = NULL, last_error = ?, run_at = ?, "
            "lease_token = NULL, lease_until = NULL WHERE id = ? AND lease_token IS NOT DISTINCT FROM ?")
JOB_COUNTS = "SELECT kind, state, COUNT(*) AS n FROM jobs GROUP BY kind, state"


def next_run_at_sql(kinds: int) -> str:
    """When the worker should look again: the earliest run_at of the jobs no worker holds, or the earliest end
    of a lease on a job already due (a replica that died holding it), whichever is first; of `kinds` kinds, if
    any. Arguments: now, *kinds, now, now, *kinds. Held jobs stay at the head of jobs_due: the second walk reads
    just those when the worker is idle. Only the kinds the worker has handlers for: a due job of another kind (a
    kind a later version added, or an earlier one left) would have it look again at once, forever."""
    kind_filter = f" AND kind IN ({marks(kinds)})" if kinds else ""
    return (f"SELECT MIN(due) AS due FROM (SELECT MIN(run_at) AS due FROM jobs{BY_DUE} WHERE state = 'queued' "
            f"AND {NOT_LEASED}{kind_filter} UNION ALL SELECT MIN(lease_until) FROM jobs{BY_DUE} "
            f"WHERE state = 'queued' AND run_at <= ? AND lease_until > ?{kind_filter}) AS looks")

# A job brought forward loses its lease: whatever a run holding it does next cannot finish the job.
JOB_DUE_NOW = ("UPDATE jobs SET run_at = CASE WHEN run_at < ? THEN run_at ELSE ? END, lease_token = NULL, "
               "lease_until = NULL "
               "WHERE dedupe_key = ? AND state = 'queued'")
WAKE_JOB = ("UPDATE jobs SET run_at = ? WHERE dedupe_key = ? AND state = 'queued' AND lease_token IS NULL "
            "AND run_at > ?")

# ---- shared rate buckets ---------------------------------------------------------------------------
CLAIM_BUCKET = "INSERT INTO rate_buckets (key, tokens, updated_at) VALUES (?, ?, ?) ON CONFLICT (key) DO NOTHING"
LOCK_BUCKET = "SELECT tokens, updated_at FROM rate_buckets WHERE key = ?" + FOR_UPDATE
UPDATE_BUCKET = "UPDATE rate_buckets SET tokens = ?, updated_at = ? WHERE key = ?"
READ_BUCKET = "SELECT tokens, updated_at FROM rate_buckets WHERE key = ?"
# Only from the state the take was worked out from (Store.take_tokens): exact, both are stored as 8-byte floats.
SWAP_BUCKET = ("UPDATE rate_buckets SET tokens = ?, updated_at = ? WHERE key = ? AND tokens = ? AND updated_at = ? "
               "RETURNING key")

# ---- delivery lanes (the per-subscriber cap across processes) ----------------------------------------
INSERT_LANE_SLOT = "INSERT INTO lane_slots (lane, slot) VALUES (?, ?) ON CONFLICT (lane, slot) DO NOTHING"
# The first free slot below the cap (free: no holder, this holder, or a lease run out; this holder's own first, so
# a take run again after a lost answer keeps the slot it got), taken in one statement. The subquery locks the slot
# it picks; one that another statement is taking is waited for and looked at again as it is then (PostgreSQL, READ
# COMMITTED), and passed over if taken meanwhile: the lane is reported full only when every slot below the cap is
# held. (SKIP LOCKED would not wait, and would also pass over a slot whose taker then fails.)
TAKE_LANE_SLOT = (
    "UPDATE lane_slots SET holder = ?, expires_at = ? WHERE lane = ? AND slot = ("
    "SELECT slot FROM lane_slots WHERE lane = ? AND slot < ? AND (holder IS NULL OR holder = ? OR expires_at <= ?) "
    "ORDER BY holder IS NOT DISTINCT FROM ? DESC, slot LIMIT 1" + FOR_UPDATE + ") RETURNING slot")
COUNT_LANE_SLOTS = "SELECT count(*) AS n FROM lane_slots WHERE lane = ? AND slot < ?"
RELEASE_LANE_SLOT = ("UPDATE lane_slots SET holder = NULL, expires_at = NULL, wanted = 0 "
                     "WHERE lane = ? AND slot = ? AND holder = ?")
# Mark the lane's held slots wanted (their release is then told to every replica); the slots it marked: fewer than
# the cap means one is free (or its lease ran out) by now.
WANT_LANE_SLOT = ("UPDATE lane_slots SET wanted = 1 WHERE lane = ? AND slot < ? AND holder IS NOT NULL "
                  "AND expires_at > ? RETURNING slot")

# ---- subscriptions ---------------------------------------------------------------------------------
INSERT_SUBSCRIPTION = (
    "INSERT INTO subscriptions (id, url, events, description, enabled, disabled_reason, signing, keyring, "
    "public_key, previous_public_key, previous_expires_at, failing_since, created_at, updated_at) "
    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)")
LOAD_SUBSCRIPTION = "SELECT * FROM subscriptions WHERE id = ?"
LOCK_SUBSCRIPTION = "SELECT * FROM subscriptions WHERE id = ?" + FOR_UPDATE
# With their stamp: one row with a NULL id when none is enabled.
ENABLED_SUBSCRIPTIONS = ("SELECT s.id, s.url, s.events, z.stamp FROM subscriptions_stamp z "
                         "LEFT JOIN subscriptions s ON s.enabled = 1")
UPDATE_SUBSCRIPTION = (
    "UPDATE subscriptions SET url = ?, events = ?, description = ?, enabled = ?, disabled_reason = ?, keyring = ?, "
    "public_key = ?, previous_public_key = ?, previous_expires_at = ?, failing_since = ?, updated_at = ? "
    "WHERE id = ?")
DELETE_SUBSCRIPTION = "DELETE FROM subscriptions WHERE id = ?"
SUBSCRIPTION_FAILING = ("UPDATE subscriptions SET failing_since = COALESCE(failing_since, ?) WHERE id = ? "
                        "AND enabled = 1 RETURNING failing_since")
SUBSCRIPTION_HEALTHY = "UPDATE subscriptions SET failing_since = NULL WHERE id = ? AND failing_since IS NOT NULL"
DISABLE_SUBSCRIPTION = ("UPDATE subscriptions SET enabled = 0, disabled_reason = ?, updated_at = ? "
                        "WHERE id = ? AND enabled = 1")

# ---- deliveries ------------------------------------------------------------------------------------
INSERT_DELIVERY = (
    "INSERT INTO deliveries (id, event_id, event_type, task_id, subscription_id, target, url, status, "
    "next_attempt_at, created_at, updated_at) VALUES (?,?,?,?,?,?,?,'pending',?,?,?) "
    "ON CONFLICT (event_id, target) DO NOTHING")
LOAD_DELIVERY = "SELECT * FROM deliveries WHERE id = ?"
LOCK_DELIVERY = "SELECT * FROM deliveries WHERE id = ?" + FOR_UPDATE
# With its subscription's failure clock, read with the lock: an attempt's success resets the clock only if it
# runs (one statement fewer per successful delivery: a round trip on PostgreSQL). The clock is read in this
# statement's snapshot (PostgreSQL, READ COMMITTED: from before any wait for the delivery's lock), so a failure
# another replica commits meanwhile is ordered after this success and its clock stands, as if it came later:
# the old separate reset had the same window from its own statement to the commit, a little shorter.
LOCK_DELIVERY_FOR_ATTEMPT = ("SELECT d.*, (SELECT s.failing_since FROM subscriptions s WHERE s.id = d.subscription_id) "
                             "AS sub_failing_since FROM deliveries d WHERE d.id = ?" + FOR_UPDATE)
# A subscription's pending deliveries, through its own (sql/028: through deliveries_by_status it read every pending
# delivery of every subscription, 36-38 ms at 20,000 pending, under the writer's lock).
CANCEL_PENDING_DELIVERIES = (
    f"UPDATE deliveries{indexed_by('deliveries_by_subscription_status')} SET status = 'canceled', last_error = ?, "
    "next_attempt_at = NULL, completed_at = ?, updated_at = ? WHERE subscription_id = ? AND status = 'pending'")
INSERT_ATTEMPT = ("INSERT INTO delivery_attempts (delivery_id, number, at, url, origin, status_code, latency_ms, "
                  "response, error, subscription_id) VALUES (?,?,?,?,?,?,?,?,?,?)")
RECORD_DELIVERY_ATTEMPT = (
    "UPDATE deliveries SET status = ?, attempts = attempts + 1, round_attempts = round_attempts + 1, "
    "next_attempt_at = ?, last_attempt_at = ?, last_status_code = ?, last_error = ?, url = ?, updated_at = ?, "
    "completed_at = ? WHERE id = ?")
# A success recorded without reading the delivery first: only if it is still at this attempt (the attempts it
# had before it, the last argument) and its subscription's failure clock is not running (a success stops a running
# clock, under the delivery's lock); the row as it is now returned, none when it was not changed.
RECORD_DELIVERY_SUCCESS = (
    RECORD_DELIVERY_ATTEMPT + " AND status = 'pending' AND attempts = ? AND NOT EXISTS (SELECT 1 FROM subscriptions s "
    "WHERE s.id = deliveries.subscription_id AND s.failing_since IS NOT NULL) RETURNING *")
SETTLE_DELIVERY = (
    "UPDATE deliveries SET status = ?, last_error = ?, next_attempt_at = NULL, completed_at = ?, updated_at = ? "
    "WHERE id = ? AND status = 'pending'")
DELIVERY_DUE_NOW = "UPDATE deliveries SET next_attempt_at = ?, updated_at = ? WHERE id = ?"
# Not a pending one: a replay reads its candidates unlocked, and another replay (or a retry) may have restarted one
# meanwhile; PostgreSQL re-checks the row once that one's lock is free, and it is then pending.
RESTART_DELIVERY = (
    "UPDATE deliveries SET status = 'pending', round_attempts = 0, round_origin = ?, next_attempt_at = ?, "
    "completed_at = NULL, updated_at = ? WHERE id = ? AND status <> 'pending'")
LIST_ATTEMPTS = "SELECT * FROM delivery_attempts WHERE delivery_id = ? ORDER BY id DESC LIMIT ?"
DELIVERY_COUNTS = "SELECT status, COUNT(*) AS n FROM deliveries GROUP BY status"
LOAD_SEND_TARGET = (
    "SELECT d.*, e.data AS event_data, e.created_at AS event_created_at, s.id AS sub_id, s.url AS sub_url, "
    "s.events AS sub_events, s.description AS sub_description, s.enabled AS sub_enabled, "
    "s.disabled_reason AS sub_disabled_reason, s.signing AS sub_signing, s.keyring AS sub_keyring, "
    "s.public_key AS sub_public_key, s.previous_public_key AS sub_previous_public_key, "
    "s.previous_expires_at AS sub_previous_expires_at, s.failing_since AS sub_failing_since, "
    "s.created_at AS sub_created_at, s.updated_at AS sub_updated_at "
    "FROM deliveries d JOIN events e ON e.id = d.event_id "
    "LEFT JOIN subscriptions s ON s.id = d.subscription_id WHERE d.id = ?")
ORPHANED_DELIVERIES = (
    "SELECT d.id, d.next_attempt_at FROM deliveries d WHERE d.status = 'pending' AND NOT EXISTS "
    "(SELECT 1 FROM jobs j WHERE j.dedupe_key = 'deliver:' || d.id)")


# ---- observability: provider request stats (relay.stats) and the gauges of /metrics (relay.metrics) ---
# Additive upsert in three steps (make the row, lock it, write the sums): the latency histogram is a JSON
# list merged in Python, the same on both backends.
CLAIM_PROVIDER_STATS = (
    "INSERT INTO provider_stats (provider, minute, requests, errors, rate_limited, latency_buckets) "
    "VALUES (?, ?, 0, 0, 0, '[]') ON CONFLICT (provider, minute) DO NOTHING")
LOCK_PROVIDER_STATS = (
    "SELECT requests, errors, rate_limited, latency_buckets FROM provider_stats WHERE provider = ? AND minute = ?"
    + FOR_UPDATE)
UPDATE_PROVIDER_STATS = (
    "UPDATE provider_stats SET requests = ?, errors = ?, rate_limited = ?, latency_buckets = ? "
    "WHERE provider = ? AND minute = ?")
PROVIDER_STATS_SINCE = (
    "SELECT provider, requests, errors, rate_limited, latency_buckets FROM provider_stats WHERE minute >= ?")
TASK_COUNTS = "SELECT provider, status, COUNT(*) AS n FROM tasks GROUP BY provider, status"
# Leased jobs are not due (held by a worker): this is what waits for one. Arguments: now, now.
OLDEST_DUE_JOBS = (f"SELECT kind, MIN(run_at) AS due FROM jobs{BY_DUE} WHERE state = 'queued' AND run_at <= ? "
                   f"AND {NOT_LEASED} GROUP BY kind")

# ---- console (relay.store.console: the operator's dashboard and /v1/jobs) ----------------------------
# Tasks whose id or provider task id is the search text, or whose metadata JSON contains it (a scan of the
# filtered tasks: the console's search, not an API path).
# Case-insensitive on both backends (SQLite's LIKE is, for ASCII; PostgreSQL's is not): lower() on both sides,
# the text lowered by the caller.
TASK_SEARCH = "(id = ? OR provider_task_id = ? OR lower(metadata) LIKE ? ESCAPE '\\')"


def attempts_of_deliveries(delivery_ids: Sequence[str]) -> tuple[str, list[str]]:
    """The attempts of the deliveries a task's timeline shows (one or more, at most its limit), oldest first: the
    statement and its arguments. Every attempt of every delivery of the task was read before, with no bound: 60
    ms for a task of 14,000 deliveries and 19,000 attempts on PostgreSQL."""
    listed, args = padded_in(delivery_ids)
    return f"SELECT * FROM delivery_attempts WHERE delivery_id IN {listed} ORDER BY id", args


DELIVERIES_OF_TASK = "SELECT * FROM deliveries WHERE task_id = ? ORDER BY id DESC LIMIT ?"     # the newest
EVENTS_OF_TASK = "SELECT * FROM events WHERE task_id = ? ORDER BY seq DESC LIMIT ?"      # the newest
# Each attempt names its subscription (sql/023): these read the attempts of the window, never a subscription's
# every delivery. The counts name the index by time for SQLite, which would rather walk every attempt in
# subscription order than sort the window's groups (39 ms against 11 at 479,000 attempts).
SUBSCRIPTION_ATTEMPT_COUNTS = (
    "SELECT a.subscription_id AS subscription_id, COUNT(*) AS n, "
    "SUM(CASE WHEN a.status_code >= 200 AND a.status_code < 300 AND a.error IS NULL THEN 1 ELSE 0 END) AS ok "
    f"FROM delivery_attempts a{indexed_by('delivery_attempts_by_time')} WHERE a.at >= ? "
    "AND a.subscription_id IS NOT NULL GROUP BY a.subscription_id")
# The latency at one rank (nearest-rank percentiles, the same on both backends: SQLite has no percentile_cont).
SUBSCRIPTION_LATENCY_AT = (
    "SELECT a.latency_ms FROM delivery_attempts a WHERE a.subscription_id = ? AND a.at >= ? "
    "AND a.latency_ms IS NOT NULL ORDER BY a.latency_ms LIMIT 1 OFFSET ?")
SUBSCRIPTION_LAST_ERROR = (
    "SELECT a.error, a.at FROM delivery_attempts a WHERE a.subscription_id = ? AND a.at >= ? "
    "AND a.error IS NOT NULL ORDER BY a.at DESC LIMIT 1")
IN_FLIGHT_BY_PROVIDER = (
    "SELECT provider, COUNT(*) AS n FROM tasks WHERE status IN ('queued', 'running') "
    "OR (status = 'pending' AND submit_started_at IS NOT NULL) GROUP BY provider")
CALLBACKS_BY_PROVIDER = (
    "SELECT provider, status, COUNT(*) AS n FROM inbox WHERE received_at >= ? GROUP BY provider, status")
# Per kind and state the count, and for queued jobs those due, held and the oldest due, in one statement (one
# snapshot). The second part walks through jobs_due only the jobs due by a bound a little ahead of now (the last
# argument): the jobs workers hold are among them, as a claim takes only due jobs and leaves their run_at alone,
# unless the claimer's clock ran ahead of this reader's or the lease was carried over by migration 021 (run_at =
# the lease's end), which the bound's margin covers (relay.store.console.HELD_AHEAD_SECONDS). Over every row it
# took 0.85 s at a million jobs with 2 % due on SQLite, 0.22 s so; with every job due it costs as much as before.
# Arguments: now, now, now, now, now, the bound.
QUEUE_BY_KIND = (
    "SELECT c.kind, c.state, c.n, d.due, d.running, d.oldest_due "
    "FROM (SELECT kind, state, COUNT(*) AS n FROM jobs GROUP BY kind, state) AS c LEFT JOIN ("
    f"SELECT kind, SUM(CASE WHEN run_at <= ? AND {NOT_LEASED} THEN 1 ELSE 0 END) AS due, "
    "SUM(CASE WHEN lease_until > ? THEN 1 ELSE 0 END) AS running, "
    f"MIN(CASE WHEN run_at <= ? AND {NOT_LEASED} THEN run_at END) AS oldest_due FROM jobs{BY_DUE} "
    "WHERE state = 'queued' AND run_at <= ? GROUP BY kind) AS d ON d.kind = c.kind AND c.state = 'queued'")
LOAD_JOB = "SELECT * FROM jobs WHERE id = ?"
LOCK_JOB = "SELECT * FROM jobs WHERE id = ?" + FOR_UPDATE
LIVE_JOB_WITH_KEY = "SELECT id FROM jobs WHERE dedupe_key = ?"
DELETE_DEAD_JOB = "DELETE FROM jobs WHERE id = ? AND state = 'dead'"
REQUEUE_DEAD_JOB = (
    "UPDATE jobs SET state = 'queued', dedupe_key = ?, dead_key = NULL, run_at = ?, attempts = 0, lease_token = NULL, "
    "lease_until = NULL "
    "WHERE id = ? AND state = 'dead'")


JOB_STATES = ("queued", "dead")     # a job's states (finished jobs are deleted)


def jobs_listing(state: str, kind: bool) -> tuple[str, list[str]]:
    """The table (with its index) and filters of a page of jobs in `state`, of one kind if `kind` (its `?`), for
    plumbing's newest-first page: on SQLite each walks an index in id order and stops at its limit (sql/024; its
    planner read every job of the state and sorted them, 705 ms a page at a million jobs). The state, one of two,
    is written into the statement: the partial index jobs_dead then applies, and PostgreSQL (which picks these
    walks from its statistics) plans each state for itself."""
    if state not in JOB_STATES:
        raise ValueError(f"not a job state: {state!r}")
    if kind:
        index = "jobs_by_state_kind_id"
    elif state == "dead":
        index = "jobs_dead"
    else:
        # The primary key: nearly every job is queued. (With few queued and many dead, a page reads through the
        # dead ones: 50,000 of them cost what a sort of every queued job cost at a million.)
        index = "sqlite_autoindex_jobs_1"
    return "jobs" + indexed_by(index), [f"state = '{state}'", *(["kind = ?"] if kind else [])]


def deliveries_listing(*, subscription: bool, status: bool, task: bool, event: bool) -> str:
    """The table (with its index) of a page of deliveries filtered by these: an event's or a task's walk their own
    index (SQLite otherwise walked every delivery of a status for one event's or task's: 0.2-0.65 s at 500,000
    deliveries, for a page of none or one), a subscription's its own, with a status those of that status (sql/028;
    through either index alone, a large subscription's few failed ones or a small one's among a down subscriber's
    many failed ones were the long walk: 18-43 ms at 300,000 deliveries). PostgreSQL plans that one without its
    values (GENERIC_PLAN): for a pair rare where each value alone is common, its plan for the values walked the
    primary key backwards (28-32 ms)."""
    if subscription and status and not (event or task):
        return "deliveries" + indexed_by("deliveries_by_subscription_status") + " " + GENERIC_PLAN
    for given, index in ((event, "sqlite_autoindex_deliveries_2"), (task, "deliveries_by_task"),
                         (subscription, "deliveries_by_subscription")):
        if given:
            return "deliveries" + indexed_by(index)    # sqlite_autoindex_deliveries_2: UNIQUE (event_id, target)
    return "deliveries"


def replay_candidates(statuses: int) -> str:
    """A subscription's deliveries created in [since, until) with one of `statuses` statuses, oldest first, after
    an id (the window's low id, or the last of the previous batch). Per status (subscription_id, status, since,
    until, low id, high id, limit), then the limit again: each status's walk of deliveries_by_subscription_status
    (sql/028) is bounded by the window's ids (ids.id_range: an id holds its creation time) and by the limit, and
    the walks are merged in id order. Through the subscription's deliveries it read every one it had before the
    window, under the writer's lock (19 ms for the last hour with 300,000 in 30 days on SQLite); with the statuses
    as one `IN`, PostgreSQL's generic plan (asyncpg's prepared statement after five runs) walked the primary key
    over the whole window instead, 117-138 ms a batch at 526,000 deliveries (a read-only audit). Planned without
    its values there (GENERIC_PLAN): for a subscription whose deliveries of a status are common overall but few of
    its own, the plans for the values walked the primary key too (55 ms a batch at 300,000 deliveries)."""
    arm = (f"SELECT id FROM deliveries{indexed_by('deliveries_by_subscription_status')} WHERE subscription_id = ? "
           "AND status = ? AND created_at >= ? AND created_at < ? AND id > ? AND id < ? ORDER BY id LIMIT ?")
    return GENERIC_PLAN + " UNION ALL ".join(f"SELECT id FROM ({arm}) AS s{n}" for n in range(statuses)) + \
        " ORDER BY id LIMIT ?"


def images_of_tasks(task_ids: Sequence[str]) -> tuple[str, list[str]]:
    """The images of one or more tasks (or archives): the statement and its arguments."""
    listed, args = padded_in(task_ids)
    return f"SELECT {IMAGE_COLUMNS} FROM images WHERE task_id IN {listed} ORDER BY idx", args


def filtered(table: str, filters: list[str], *, order: str) -> str:
    """`SELECT * FROM table [WHERE f1 AND f2 …] ORDER BY … LIMIT ?` (filters are fixed SQL with `?`)."""
    where = " WHERE " + " AND ".join(filters) if filters else ""
    return f"SELECT * FROM {table}{where} ORDER BY {order} LIMIT ?"


# ---- retention (relay.retention decides what is old; relay.store.retention deletes it) ----------------
# Old rows oldest first, never one a pending delivery still needs (it would lose its event and task). The pending
# delivery is looked for among the row's own deliveries (by event, by task), the index named for SQLite: its
# planner walked deliveries_by_status instead, every pending delivery for each old row (with 10,200 pending, a
# subscriber down, it held the writer 537 ms per batch of 500 old events). sqlite_autoindex_deliveries_2 is the
# index of UNIQUE (event_id, target) (sql/003; the first is the primary key's).
_BY_OWNER = {"event_id": indexed_by("sqlite_autoindex_deliveries_2"), "task_id": indexed_by("deliveries_by_task")}


def _no_pending_delivery(column: str, owner: str) -> str:
    return (f"NOT EXISTS (SELECT 1 FROM deliveries d{_BY_OWNER[column]} WHERE d.{column} = {owner}.id "
            "AND d.status = 'pending')")


OLD_FINISHED_TASKS = (
    "SELECT id FROM tasks WHERE completed_at IS NOT NULL AND completed_at < ? AND "
    f"{_no_pending_delivery('task_id', 'tasks')} ORDER BY completed_at LIMIT ?")
OLD_EVENTS = (f"SELECT id FROM events WHERE created_at < ? AND {_no_pending_delivery('event_id', 'events')} "
              "ORDER BY created_at LIMIT ?")
DELETE_OLD_ATTEMPTS = ("DELETE FROM delivery_attempts WHERE id IN "
                       "(SELECT id FROM delivery_attempts WHERE at < ? ORDER BY at LIMIT ?)")
OLD_ARCHIVED_IMAGES = ("SELECT id FROM images WHERE status = 'archived' AND archived_at < ? "
                       "ORDER BY archived_at LIMIT ?")
COUNT_OLD_FINISHED_TASKS = ("SELECT COUNT(*) AS n FROM tasks WHERE completed_at IS NOT NULL AND completed_at < ? "
                            f"AND {_no_pending_delivery('task_id', 'tasks')}")
COUNT_OLD_EVENTS = ("SELECT COUNT(*) AS n FROM events WHERE created_at < ? AND "
                    f"{_no_pending_delivery('event_id', 'events')}")
COUNT_OLD_ATTEMPTS = "SELECT COUNT(*) AS n FROM delivery_attempts WHERE at < ?"
COUNT_OLD_ARCHIVED_IMAGES = "SELECT COUNT(*) AS n FROM images WHERE status = 'archived' AND archived_at < ?"
# Image files: a tombstone row per sha256 being deleted, the rendezvous of deletion and archive (see
# relay.store.retention for why inserting it is what makes the two exclusive).
START_IMAGE_DELETION = ("INSERT INTO image_deletions (sha256, key, started_at, owner, owned_until) "
                        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (sha256) DO NOTHING")
END_IMAGE_DELETION = "DELETE FROM image_deletions WHERE sha256 = ?"          # in the transaction that inserted it
# A deletion's file is deleted only by its owner (sql/029, postgres/028): the sweep that decided it, or one that took
# it over (a crash's leftover) once its owner's lease ran out; the owner renews the lease before each file.
# Also the rows this owner took already: run again after a lost connection (_change), it answers them again.
TAKE_OVER_IMAGE_DELETIONS = (
    "UPDATE image_deletions SET owner = ?, owned_until = ? WHERE key <> '' AND (owned_until <= ? OR owner = ?) "
    "AND sha256 IN (SELECT sha256 FROM image_deletions WHERE key <> '' AND (owned_until <= ? OR owner = ?) "
    "ORDER BY started_at LIMIT ?) RETURNING sha256, key")
RENEW_IMAGE_DELETION = "UPDATE image_deletions SET owned_until = ? WHERE sha256 = ? AND owner = ? RETURNING sha256"
# A file its owner could not delete (the store failed): any sweep may take it over at once.
DISOWN_IMAGE_DELETION = "UPDATE image_deletions SET owned_until = 0 WHERE sha256 = ? AND owner = ?"
END_OWNED_IMAGE_DELETION = "DELETE FROM image_deletions WHERE sha256 = ? AND owner = ?"
# A file is in use while an image not expired (a task's or an archive's: any owner) or an upload has its sha256.
# The images through images_in_use, which holds only those (sql/027, postgres/026): not the expired ones that share
# the bytes, however many.
IMAGE_IN_USE = ("SELECT 1 AS used FROM images WHERE sha256 = ? AND status <> 'expired' "
                "UNION ALL SELECT 1 AS used FROM uploads WHERE sha256 = ? LIMIT 1")
HOLD_IMAGE = "UPDATE images SET sha256 = ? WHERE id = ? AND status = 'pending'"
# Archives of any link (relay.store.archives) go as tasks do: finished ones, never one a pending delivery needs.
OLD_FINISHED_ARCHIVES = (
    "SELECT id FROM archives WHERE completed_at IS NOT NULL AND completed_at < ? AND "
    f"{_no_pending_delivery('task_id', 'archives')} ORDER BY completed_at LIMIT ?")
COUNT_OLD_FINISHED_ARCHIVES = ("SELECT COUNT(*) AS n FROM archives WHERE completed_at IS NOT NULL AND completed_at < ? "
                               f"AND {_no_pending_delivery('task_id', 'archives')}")
# Provider request stats (relay.stats) by minute, oldest minutes first.
DELETE_OLD_PROVIDER_STATS = (
    "DELETE FROM provider_stats WHERE (provider, minute) IN "
    "(SELECT provider, minute FROM provider_stats WHERE minute < ? ORDER BY minute LIMIT ?)")
COUNT_OLD_PROVIDER_STATS = "SELECT COUNT(*) AS n FROM provider_stats WHERE minute < ?"
# A delivery's job has no task, so no task's deletion takes it; dead (its delivery settled as failed) it stays for
# the operator until it died (its run_at, BURY_JOB) before the events' age (the argument), the longest dead first,
# through jobs_dead_of_no_task (sql/025: through jobs_dead, each batch read every dead job, 74 ms at 50,000, under
# the writer's lock). The outer `state = 'dead'`: on PostgreSQL a job an operator retried (queued again) while the
# DELETE waited for its row is checked again against it, and stays; by id, or SQLite walks every dead job for it.
_OLD_DEAD_JOBS = (f"FROM jobs{indexed_by('jobs_dead_of_no_task')} WHERE state = 'dead' AND task_id IS NULL "
                  "AND run_at < ?")
DELETE_OLD_DEAD_JOBS = (f"DELETE FROM jobs{indexed_by('sqlite_autoindex_jobs_1')} WHERE state = 'dead' AND id IN "
                        f"(SELECT id {_OLD_DEAD_JOBS} ORDER BY run_at LIMIT ?)")
COUNT_OLD_DEAD_JOBS = f"SELECT COUNT(*) AS n {_OLD_DEAD_JOBS}"
# An uploaded edit input (relay.web.openai_compat): kept, a user of its sha256 (see IMAGE_IN_USE).
INSERT_UPLOAD = "INSERT INTO uploads (sha256, key, created_at) VALUES (?, ?, ?) ON CONFLICT (sha256) DO NOTHING"


def padded_in(values: Sequence[str]) -> tuple[str, list[str]]:
    """`(?, ?, …)` for an IN list of one or more values, and the values padded (the last one again) to a power of
    two: ten statement texts in all, not one per count. PostgreSQL prepares each text on every pooled connection,
    and asyncpg keeps 500 of them: one per page size or count of deliveries pushed the workers' statements out."""
    size = 1 << (len(values) - 1).bit_length()
    return f"({marks(size)})", [*values, *[values[-1]] * (size - len(values))]


def marks(count: int) -> str:
    """`count` placeholders for an IN list: "?,?,?"."""
    return ",".join("?" * count)


def settled_deliveries_of(column: str, count: int) -> str:
    """Delete the deliveries of `count` tasks or events (`column`: task_id | event_id) that are no longer
    pending; their ids. A delivery made pending again meanwhile (a retry) stays, and keeps its event."""
    return (f"DELETE FROM deliveries WHERE {column} IN ({marks(count)}) AND status <> 'pending' "
            "RETURNING id")


def still_delivered(column: str, count: int) -> str:
    """Which of `count` tasks or events still have a delivery (one made pending again since they were picked)."""
    return f"SELECT DISTINCT {column} AS id FROM deliveries WHERE {column} IN ({marks(count)})"


def delete_in(table: str, column: str, count: int, *, returning: str = "") -> str:
    """`DELETE FROM table WHERE column IN (…count…) [RETURNING …]` (table and column are fixed names)."""
    tail = f" RETURNING {returning}" if returning else ""
    return f"DELETE FROM {table} WHERE {column} IN ({marks(count)}){tail}"


def lock_waiting_jobs(count: int) -> str:
    """Of `count` jobs (by id), those still waiting for a worker (queued, no lease), locked in id order (one lock
    order for every replica)."""
    return (f"SELECT id FROM jobs WHERE id IN ({marks(count)}) AND state = 'queued' AND lease_token IS NULL "
            "ORDER BY id" + FOR_UPDATE)


def settle_carried_callbacks(count: int) -> str:
    """The inbox rows of the callbacks `count` callback jobs (by id) carry, with one status, note and time (the
    first three values), made from the jobs' payloads in SQL. As SETTLE_CALLBACK: a callback settled already keeps
    its first outcome."""
    return ("INSERT INTO inbox (id, provider, task_id, body, received_at, status, note, processed_at) "
            "SELECT json_extract(payload, '$.inbox_id'), json_extract(payload, '$.provider'), task_id, "
            "json_extract(payload, '$.body'), CAST(json_extract(payload, '$.received_at') AS DOUBLE PRECISION), "
            f"?, ?, ? FROM jobs WHERE id IN ({marks(count)}) " + _KEEP_SETTLED)


def expire_images(count: int) -> str:
    """Mark `count` archived images expired (their file is to go); their sha256 and key."""
    return (f"UPDATE images SET status = 'expired', error = ? WHERE id IN ({marks(count)}) "
            "AND status = 'archived' RETURNING sha256, path")


# ---- failover and costs (relay.store.routing) ---------------------------------------------------------
SET_TASK_ROUTE = "UPDATE tasks SET candidates = ?, route = ? WHERE id = ?"
# Move a task that no provider accepted to the next one: only while it is still pending there.
FAIL_OVER_TASK = (
    "UPDATE tasks SET provider = ?, attempts = ?, submit_started_at = NULL, updated_at = ? "
    "WHERE id = ? AND provider = ? AND status = 'pending' AND provider_task_id IS NULL "
    "AND submit_started_at IS NOT DISTINCT FROM ?")
COST_TOTALS_SINCE = (
    "SELECT provider, cost_day, cost_currency, COUNT(*) AS tasks, SUM(cost_amount) AS amount FROM tasks "
    "WHERE cost_day >= ? GROUP BY provider, cost_day, cost_currency")
CLAIM_CIRCUIT = ("INSERT INTO provider_circuits (provider, state, failures, updated_at) VALUES (?, 'closed', 0, ?) "
                 "ON CONFLICT (provider) DO NOTHING")
LOAD_CIRCUIT = "SELECT * FROM provider_circuits WHERE provider = ?"
LOCK_CIRCUIT = "SELECT * FROM provider_circuits WHERE provider = ?" + FOR_UPDATE
UPDATE_CIRCUIT = ("UPDATE provider_circuits SET state = ?, failures = ?, opened_at = ?, retry_at = ?, last_error = ?, "
                  "updated_at = ? WHERE provider = ?")
# An accepted submit closes the circuit; a no-op (no row changed) while it is closed with no failures counted.
CLOSE_CIRCUIT = ("UPDATE provider_circuits SET state = 'closed', failures = 0, opened_at = NULL, retry_at = NULL, "
                 "updated_at = ? WHERE provider = ? AND (state <> 'closed' OR failures > 0)")
ALL_CIRCUITS = "SELECT * FROM provider_circuits ORDER BY provider"


# ---- archives of any link and adopted tasks (relay.store.archives) -----------------------------------
INSERT_ARCHIVE = (
    "INSERT INTO archives (id, source_url, url_key, expires_at, status, error, metadata, webhook_url, sequence, "
    "created_at, updated_at, completed_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (url_key) DO NOTHING")
LOAD_ARCHIVE = "SELECT * FROM archives WHERE id = ?"
LOCK_ARCHIVE_ROW = "SELECT 1 FROM archives WHERE id = ?" + FOR_UPDATE     # the lock alone (Tx.lock)
ARCHIVE_BY_URL_KEY = "SELECT * FROM archives WHERE url_key = ?"
# A failed archive gives its link back (its key gets the archive's id appended), so asking again tries again.
RETIRE_FAILED_ARCHIVE = "UPDATE archives SET url_key = url_key || ':' || id WHERE url_key = ? AND status = 'failed'"
UPDATE_ARCHIVE_STATE = (
    "UPDATE archives SET status = ?, sequence = ?, updated_at = ?, error = ?, completed_at = ? WHERE id = ?")
ARCHIVE_STARTED = ("UPDATE archives SET status = 'archiving', sequence = sequence + 1, updated_at = ? "
                   "WHERE id = ? AND status = 'pending'")
CLAIM_ADOPTION = (
    "INSERT INTO adoptions (provider, provider_task_id, task_id, created_at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (provider, provider_task_id) DO NOTHING")
LOCK_ADOPTION = "SELECT task_id FROM adoptions WHERE provider = ? AND provider_task_id = ?" + FOR_UPDATE
SET_ADOPTION = "UPDATE adoptions SET task_id = ? WHERE provider = ? AND provider_task_id = ?"
TASK_BY_PROVIDER_TASK = "SELECT id FROM tasks WHERE provider_task_id = ? AND provider = ? ORDER BY id LIMIT 1"
