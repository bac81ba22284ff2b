"""Store contract for archives of any link and adopted tasks (run on SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from relay import ids
from relay.clock import ManualClock
from relay.deliveries.models import Subscription
from relay.errors import Conflict
from relay.models import Archive, Task, TaskStatus
from relay.sourcelinks import url_key
from relay.store.base import ArchiveResult, Store
from tests.harness import listed_events

RESULT = ArchiveResult(sha256="ab" * 32, content_type="image/png", width=8, height=8, bytes=100, path="ab/x.png")


def archive(clock: ManualClock, url: str, **fields: object) -> Archive:
    now = clock.now()
    return Archive(id=ids.new_id("arc", now), source_url=url, url_key=url_key(url), expires_at=now + 3600,
                   created_at=now, updated_at=now, **fields)  # type: ignore[arg-type]


def adopted(clock: ManualClock, provider_task_id: str, provider: str = "evolink") -> Task:
    now = clock.now()
    return Task(id=ids.new_id("tsk", now), provider=provider, request={"adopted": True},
                provider_task_id=provider_task_id, created_at=now, updated_at=now)


async def test_archive_is_created_with_its_image_and_archive_job(store: Store, clock: ManualClock) -> None:
    """A new link: one archive (pending), one pending image it owns, one archive job."""
    [(created, fresh)] = await store.create_archives([archive(clock, "https://cdn.test/a.png")], clock.now())
    assert fresh and created.status == TaskStatus.PENDING
    loaded = await store.get_archive(created.id)
    assert loaded is not None and loaded.source_url == "https://cdn.test/a.png"
    assert [(i.task_id, i.status, i.source_url) for i in loaded.images] == [(created.id, "pending",
                                                                             "https://cdn.test/a.png")]
    assert (await store.job_counts()) == {"archive:queued": 1}


async def test_the_same_link_twice_is_one_archive(store: Store, clock: ManualClock) -> None:
    """Another spelling of a known link, in a later request or the same batch, answers with the first archive."""
    [(first, _)] = await store.create_archives([archive(clock, "https://cdn.test/a.png?x=1&y=2")], clock.now())
    result = await store.create_archives([archive(clock, "https://CDN.test:443/a.png?y=2&x=1"),
                                           archive(clock, "https://cdn.test/b.png"),
                                           archive(clock, "https://cdn.test/b.png#again")], clock.now())
    assert (result[0][0].id, result[0][1]) == (first.id, False)
    assert result[1][1] and not result[2][1] and result[1][0].id == result[2][0].id
    assert (await store.job_counts()) == {"archive:queued": 2}


async def test_idempotency_key_replays_and_conflicts(store: Store, clock: ManualClock) -> None:
    """The same key and body give the same archives; the same key with another body is a conflict."""
    [(first, _)] = await store.create_archives([archive(clock, "https://cdn.test/a.png")], clock.now(),
                                               idempotency=("s", "k", "h1"))
    [(again, created)] = await store.create_archives([archive(clock, "https://cdn.test/a.png")], clock.now(),
                                                     idempotency=("s", "k", "h1"))
    assert again.id == first.id and not created
    with pytest.raises(Conflict):
        await store.create_archives([archive(clock, "https://cdn.test/other.png")], clock.now(),
                                    idempotency=("s", "k", "h2"))
    archives, _ = await store.list_archives(status=None, limit=10, cursor=None)
    assert [a.id for a in archives] == [first.id]


async def test_archived_image_succeeds_the_archive_with_one_event(store: Store, clock: ManualClock) -> None:
    """Saving the image moves the archive to succeeded and writes archive.succeeded, delivered to archive.*
    subscribers (and the archive's own webhook_url), not to task.* ones."""
    now = clock.now()
    wants = Subscription(id=ids.new_id("sub", now), url="https://sub.test/a", events=["archive.*"], keyring="k",
                         created_at=now, updated_at=now)
    tasks_only = Subscription(id=ids.new_id("sub", now), url="https://sub.test/t", events=["task.*"], keyring="k",
                              created_at=now, updated_at=now)
    await store.create_subscription(wants)
    await store.create_subscription(tasks_only)
    [(arc, _)] = await store.create_archives([archive(clock, "https://cdn.test/a.png",
                                                      webhook_url="https://hook.test/h")], now)
    await store.archive_started(arc.id, now)
    started = await store.get_archive(arc.id)
    assert started is not None and started.status == TaskStatus.ARCHIVING and started.sequence == 2
    clock.advance(1)
    await store.image_archived(arc.images[0].id, RESULT, clock.now())
    done = await store.get_archive(arc.id)
    assert done is not None and done.status == TaskStatus.SUCCEEDED and done.completed_at == clock.now()
    assert done.images[0].status == "archived" and done.images[0].sha256 == RESULT.sha256
    events = await listed_events(store, 1, task_id=arc.id)
    assert [e.type for e in events] == ["archive.succeeded"]
    assert events[0].data is not None and events[0].data["object"] == "archive"
    assert events[0].data["images"][0]["sha256"] == RESULT.sha256
    deliveries, _ = await store.list_deliveries(subscription_id=None, status=None, task_id=arc.id, event_id=None,
                                                limit=10, cursor=None)
    assert sorted(d.url for d in deliveries) == ["https://hook.test/h", "https://sub.test/a"]
    # A repeated outcome changes nothing.
    await store.image_archived(arc.images[0].id, RESULT, clock.now())
    assert len(await listed_events(store, 1, task_id=arc.id)) == 1


async def test_failed_image_fails_the_archive_with_the_reason(store: Store, clock: ManualClock) -> None:
    """A dead link fails the archive (even one the job never marked started) with the code and message."""
    [(arc, _)] = await store.create_archives([archive(clock, "https://cdn.test/dead.png")], clock.now())
    await store.image_failed(arc.images[0].id, "source_gone", "the link answered 410", clock.now())
    failed = await store.get_archive(arc.id)
    assert failed is not None and failed.status == TaskStatus.FAILED
    assert failed.error == {"code": "source_gone", "message": "the link answered 410"}
    assert [e.type for e in await listed_events(store, 1, type="archive.failed")] == ["archive.failed"]
    listed, _ = await store.list_archives(status="failed", limit=10, cursor=None)
    assert [a.id for a in listed] == [arc.id]
    assert (await store.list_archives(status="succeeded", limit=10, cursor=None))[0] == []


async def test_asking_again_for_a_failed_link_tries_again_but_a_replay_does_not(store: Store,
                                                                                   clock: ManualClock) -> None:
    """A failed archive does not hold its link forever: a new request makes a new archive (the old one keeps
    its failure); the same request replayed with its Idempotency-Key answers what it first got."""
    url = "https://cdn.test/was-down.png"
    [(first, _)] = await store.create_archives([archive(clock, url)], clock.now(), idempotency=("s", "k1", "h"))
    await store.image_failed(first.images[0].id, "source_unavailable", "503 until expiry", clock.now())
    [(replayed, created)] = await store.create_archives([archive(clock, url)], clock.now(),
                                                        idempotency=("s", "k1", "h"))
    assert (replayed.id, created, replayed.status) == (first.id, False, TaskStatus.FAILED)
    clock.advance(1)
    [(retry, created)] = await store.create_archives([archive(clock, url)], clock.now())
    assert created and retry.id != first.id and retry.status == TaskStatus.PENDING
    [(same, created)] = await store.create_archives([archive(clock, url)], clock.now())    # still one live archive
    assert (same.id, created) == (retry.id, False)
    old = await store.get_archive(first.id)
    assert old is not None and old.status == TaskStatus.FAILED


async def test_archives_page_newest_first(store: Store, clock: ManualClock) -> None:
    """Paging as tasks: newest first, next_cursor the last id of a full page."""
    made = []
    for n in range(3):
        clock.advance(1)
        made += await store.create_archives([archive(clock, f"https://cdn.test/{n}.png")], clock.now())
    page, cursor = await store.list_archives(status=None, limit=2, cursor=None)
    assert [a.id for a in page] == [made[2][0].id, made[1][0].id] and cursor == made[1][0].id
    rest, end = await store.list_archives(status=None, limit=2, cursor=cursor)
    assert [a.id for a in rest] == [made[0][0].id] and end is None and rest[0].images


async def test_adopting_a_provider_task_twice_returns_the_first(store: Store, clock: ManualClock) -> None:
    """One relay task per (provider, provider task id); another provider's same id is another task."""
    first, created = await store.adopt_task(adopted(clock, "task-unified-1"), [])
    again, created_again = await store.adopt_task(adopted(clock, "task-unified-1"), [])
    assert created and not created_again and again.id == first.id
    other, created_other = await store.adopt_task(adopted(clock, "task-unified-1", provider="apimart"), [])
    assert created_other and other.id != first.id
    loaded = await store.get_task(first.id)
    assert loaded is not None and loaded.provider_task_id == "task-unified-1" and loaded.request == {"adopted": True}


async def test_adopting_a_task_relay_submitted_returns_that_task(store: Store, clock: ManualClock) -> None:
    """A provider task relay itself submitted is found by its provider task id, not tracked twice."""
    now = clock.now()
    own = Task(id=ids.new_id("tsk", now), provider="evolink", request={"prompt": "p", "n": 1},
               provider_task_id="task-unified-own", created_at=now, updated_at=now)
    await store.create_task(own, [])
    found, created = await store.adopt_task(adopted(clock, "task-unified-own"), [])
    assert not created and found.id == own.id


async def test_adoption_with_idempotency_key(store: Store, clock: ManualClock) -> None:
    """Idempotency-Key on an adoption: replayed with the same body, a conflict with another."""
    first, _ = await store.adopt_task(adopted(clock, "t-1"), [], idempotency=("s", "key", "h"))
    again, created = await store.adopt_task(adopted(clock, "t-1"), [], idempotency=("s", "key", "h"))
    assert again.id == first.id and not created
    with pytest.raises(Conflict):
        await store.adopt_task(adopted(clock, "t-2"), [], idempotency=("s", "key", "other"))


async def test_two_replicas_archiving_one_link_and_adopting_one_task_make_one_each(
        open_store: Callable[[], Awaitable[Store]], clock: ManualClock) -> None:
    """The same link archived, and the same provider task adopted, on two stores at the same instant: one
    archive and one task, which both answers name (the url_key's and the adoption's row decide)."""
    a, b = await open_store(), await open_store()
    for round_ in range(5):
        link = f"https://cdn.test/race-{round_}.png"
        first, second = await asyncio.gather(a.create_archives([archive(clock, link)], clock.now()),
                                             b.create_archives([archive(clock, link)], clock.now()))
        assert first[0][0].id == second[0][0].id and first[0][1] != second[0][1]
        one, two = await asyncio.gather(a.adopt_task(adopted(clock, f"race-{round_}"), []),
                                        b.adopt_task(adopted(clock, f"race-{round_}"), []))
        assert one[0].id == two[0].id and one[1] != two[1]
    archives, _ = await a.list_archives(status=None, limit=50, cursor=None)
    assert len(archives) == 5 and (await a.job_counts()) == {"archive:queued": 5}
