"""Upgrading an existing SQLite database keeps its rows: a database at an earlier schema, holding the rows an
OpenAI task leaves while its images wait to be archived, opened by this relay."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path

from relay import ids
from relay.store.sqlite import SQLiteStore, _split_sql, migrations
from tests.upgrades import assert_attempts_name_their_subscription, before_v23


def _database_at(path: Path, version: int) -> None:
    """The schema as relay left it at `version` (every migration up to it, as SQLiteStore._migrate applies them)."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL)")
        for number, sql in migrations():
            if number <= version:
                for statement in _split_sql(sql):
                    db.execute(statement)
                db.execute("INSERT INTO schema_migrations VALUES (?, 0)", (number,))


async def test_an_image_waiting_with_its_inline_source_survives_the_rebuild_that_stores_it_last(
        tmp_path: Path) -> None:
    """Migration 019 rebuilds images with source_data last (SQLite walks a large value's overflow pages to read any
    column after it): every row and column comes through, and the task reads back with its images."""
    path = tmp_path / "relay.db"
    _database_at(path, 17)
    before = _schema_of_images(path)
    now = time.time()
    task_id, image_ids = ids.new_id("tsk", now), [ids.new_id("img", now), ids.new_id("img", now)]
    source = "aW1hZ2U=" * 200_000      # 1.6 MB of base64: kept on overflow pages
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("INSERT INTO tasks (id, provider, status, request, sequence, created_at, updated_at) "
                   "VALUES (?, 'openai', 'archiving', '{\"prompt\": \"p\"}', 2, ?, ?)", (task_id, now, now))
        db.execute("INSERT INTO images (id, task_id, idx, source_url, source_data, source_expires_at, status) "
                   "VALUES (?, ?, 0, NULL, ?, ?, 'pending')", (image_ids[0], task_id, source, now + 3600))
        db.execute("INSERT INTO images (id, task_id, idx, source_url, source_data, source_expires_at, status, sha256, "
                   "content_type, width, height, bytes, path, archived_at) VALUES (?, ?, 1, 'https://x/1.png', NULL, "
                   "NULL, 'archived', ?, 'image/png', 64, 32, 2048, 'ab/cd.png', ?)",
                   (image_ids[1], task_id, "ab" * 32, now))
    store = SQLiteStore(path)
    await store.open()
    try:
        task = await store.get_task(task_id)
        assert task is not None
        pending, archived = task.images
        assert (pending.id, pending.index, pending.status, pending.source_expires_at) == (
            image_ids[0], 0, "pending", now + 3600)
        assert (archived.id, archived.status, archived.sha256, archived.width, archived.height, archived.bytes,
                archived.path, archived.archived_at, archived.source_url) == (
            image_ids[1], "archived", "ab" * 32, 64, 32, 2048, "ab/cd.png", now, "https://x/1.png")
        found = await store.get_image_source(image_ids[0])
        assert found is not None and found[1] == source
    finally:
        await store.close()
    after = _schema_of_images(path)
    assert after["order"][-1] == "source_data" and before["order"][-1] != "source_data"
    # Migration 027 (after the rebuild) replaced images_by_sha256 with images_in_use; the rest is as it was.
    indexes_before, indexes_after = dict(before["indexes"]), dict(after["indexes"])      # type: ignore[call-overload]
    assert indexes_before.pop("images_by_sha256")[2] == indexes_after.pop("images_in_use")[2] == ["sha256"]
    assert {**after, "order": None, "indexes": indexes_after} == {**before, "order": None, "indexes": indexes_before}


def _schema_of_images(path: Path) -> dict[str, object]:
    """The images table as SQLite describes it: each column (type, NOT NULL, default, key), each index (its
    columns, uniqueness and definition) and the columns' order."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        columns = list(db.execute("PRAGMA table_info(images)"))
        indexes = {}
        for _, name, unique, origin, partial in db.execute("PRAGMA index_list(images)"):
            key = name if origin == "c" else f"{origin}:{[r[2] for r in db.execute(f'PRAGMA index_info({name})')]}"
            definition = db.execute("SELECT sql FROM sqlite_master WHERE name = ?", (name,)).fetchone()[0]
            indexes[key] = (unique, partial, [r[2] for r in db.execute(f"PRAGMA index_info({name})")], definition)
        foreign = list(db.execute("PRAGMA foreign_key_list(images)"))
    return {"columns": {c[1]: (c[2], c[3], c[4], c[5]) for c in columns}, "indexes": indexes, "foreign": foreign,
            "order": [c[1] for c in columns]}


async def test_attempts_recorded_before_v23_name_their_subscription_after_it(tmp_path: Path) -> None:
    """Migration 023 gives every attempt its delivery's subscription (tests/upgrades.py)."""
    path = tmp_path / "relay.db"
    _database_at(path, 22)
    now = time.time()
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        for sql, args in before_v23(now):
            db.execute(sql, args)
    store = SQLiteStore(path)
    await store.open()
    try:
        await assert_attempts_name_their_subscription(store, now)
    finally:
        await store.close()
