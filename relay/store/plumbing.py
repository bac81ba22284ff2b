"""The base every part of the store stands on: the plumbing a backend provides, the wake-ups and status
listeners told after a commit, and the newest-first page every list reads.

relay.store.base.Store and each use-case mixin (deliveries, console, retention, routing, archives) inherit
this one class, so the plumbing is declared once; relay.store.sqlite and relay.store.postgres implement it.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

from relay.models import Event, ImageRecord, Task, TaskStatus
from relay.store import queries as q
from relay.store.batching import GroupCommit, SharedTransactions
from relay.store.outbox import Subscribers
from relay.store.rows import image_from_row
from relay.store.tx import Row, Tx

T = TypeVar("T")

# Told of every committed status change: (task, the status it reached, its event; None for a new task).
StatusListener = Callable[[Task, TaskStatus, Event | None], None]


class Identified(Protocol):
    @property
    def id(self) -> str: ...


class WithImages(Identified, Protocol):
    @property
    def images(self) -> list[ImageRecord]: ...


I = TypeVar("I", bound=Identified)
W = TypeVar("W", bound=WithImages)


def owner_with_images(rows: Sequence[Row], build: Callable[[Row], W]) -> W | None:
    """The task (or archive) a queries.with_images statement read, built, with its images; None if unknown."""
    if not rows:
        return None
    owner = build(rows[0])
    owner.images.extend(image_from_row(row, "image_") for row in rows if row["image_id"] is not None)
    return owner


class StorePlumbing(abc.ABC):
    """What every store use case speaks through; the abstract methods are a backend's."""

    SHARES_TRANSACTIONS = False     # see transact_shared
    TELLS_LANE_RELEASES = False     # the database tells every process of a lane slot given back (see on_lane_freed)

    @functools.cached_property
    def subscribers(self) -> Subscribers:
        """The enabled subscriptions transitions fan out to, kept while they are unchanged (outbox.Subscribers)."""
        return Subscribers()

    @abc.abstractmethod
    async def transact(self, body: Callable[[Tx], Awaitable[T]], *, again_if_key_taken: bool = False) -> T:
        """Run `body` in one write transaction: committed when it returns, rolled back when it raises.

        `again_if_key_taken`: a unique key the body writes was taken meanwhile by a transaction its reads could
        not see yet (PostgreSQL; SQLite's one writer never meets one): run the body again, which then sees it."""

    async def transact_shared(self, body: Callable[[Tx], Awaitable[T]]) -> T:
        """`transact`, sharing one transaction and its commit with the bodies that arrive meanwhile (group
        commit, relay.store.batching.SharedTransactions): for frequent use cases independent of each other
        (a transition, an attempt, an archived image). The body may run more than once.

        Only where the backend says sharing pays (SHARES_TRANSACTIONS): SQLite has one writer and every
        transaction is a hop to its thread. With several writers (PostgreSQL, replicas) a batch would lock
        its rows in arrival order and could deadlock with another replica's: each body runs alone there. (A
        backend that held writes to its commit (Tx.write) and shared transactions would first have to send
        them at the end of each body: SharedTransactions tells a body's failure from the commit's by where
        it is raised.)"""
        if not self.SHARES_TRANSACTIONS:
            return await self.transact(body)
        shared: SharedTransactions | None = getattr(self, "_shared", None)
        if shared is None:
            shared = self._shared = SharedTransactions(self.transact)
        return await shared.run(body)

    async def _drain_shared(self) -> None:
        """Wait for the shared transactions under way (before closing the connections)."""
        shared: SharedTransactions | None = getattr(self, "_shared", None)
        if shared is not None:
            await shared.drain()

    async def _change(self, sql: str, args: Sequence[Any]) -> list[Row]:
        """One statement that is a whole transaction (it changes rows and returns what its RETURNING names).
        PostgreSQL runs it without BEGIN and COMMIT: one round trip instead of three. It must be safe to run twice:
        PostgreSQL runs it again when the connection was lost before its answer (the outcome is then unknown)."""
        async def body(tx: Tx) -> list[Row]:
            return await tx.all(sql, args)
        return await self.transact(body)

    @abc.abstractmethod
    async def _read(self, sql: str, args: Sequence[Any] = ()) -> Row | None: ...

    @abc.abstractmethod
    async def _read_all(self, sql: str, args: Sequence[Any] = ()) -> list[Row]: ...

    async def _read_key(self, sql: str, args: Sequence[Any]) -> Row | None:
        """`_read` of one row found by its primary key, whose values are small (a task without its images, a
        delivery with its event): the reads every job starts with. A backend may serve these more cheaply than
        other reads (SQLite: on the event loop's thread, see SQLiteStore._read_key)."""
        return await self._read(sql, args)

    async def _read_whole(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        """`_read_all` of a statement whose reads grow with a table or a window rather than with what it returns
        (the counts of /metrics and of the console's Queue, Providers and Subscriptions pages, the console's text
        search): a backend may keep these apart from the reads the API and workers wait on (SQLite: on its
        background connection, see SQLiteStore._read_whole)."""
        return await self._read_all(sql, args)

    # Job outcomes are the most frequent writes (every job ends with one): concurrent ones share a commit (group
    # commit, with other small independent writes such as settling a callback), each caller still returning only
    # once its own write is committed. The backend makes the group commit and flushes its batches
    # (_write_statements). Not tried again when the connection is lost: the outcome is unknown, and the worker's
    # lease brings the job back.
    _small_writes: GroupCommit[tuple[str, tuple[Any, ...]]]

    async def _write(self, sql: str, args: Sequence[Any]) -> None:
        """One small write that needs no other statement with it (job outcomes, callback settles)."""
        await self._small_writes.submit((sql, tuple(args)))

    async def _write_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """`_write` of several rows at once (the ends of a group of jobs): they share the group commit."""
        await self._small_writes.submit_many([(sql, tuple(args)) for args in rows])

    def on_enqueue(self, callback: Callable[[], None]) -> None:
        """Register a wake-up called after a transaction that enqueued due jobs commits."""
        self._wakeups = [*getattr(self, "_wakeups", []), callback]

    def _wake(self) -> None:
        for callback in getattr(self, "_wakeups", []):
            callback()

    def on_lane_freed(self, callback: Callable[[str | None], None]) -> None:
        """Register a callback told of lane slots given back (release_lane_slot), with the lane's notice
        (relay.store.deliveries.lane_notice): each one this process gives back, or, where the database tells every
        process sharing it (TELLS_LANE_RELEASES), each one any of them gives back after a process asked for it
        (want_lane_slot). None: any lane's may have been (releases went untold meanwhile)."""
        self._lane_listeners = [*getattr(self, "_lane_listeners", []), callback]

    def _lane_freed(self, notice: str | None) -> None:
        for callback in getattr(self, "_lane_listeners", []):
            callback(notice)

    def on_task_status(self, listener: StatusListener) -> None:
        """Register a listener told of each task created and each status change, after its commit
        (metrics and log lines: every path that changes a task goes through here)."""
        self._status_listeners = [*getattr(self, "_status_listeners", []), listener]

    def _told(self, task: Task, status: TaskStatus, event: Event | None) -> None:
        for listener in getattr(self, "_status_listeners", []):
            listener(task, status, event)

    def _task_created(self, result: tuple[Task, bool]) -> tuple[Task, bool]:
        """After a create commits, `result` = (task, created): a created task wakes the workers and is told."""
        task, created = result
        if created:
            self._wake()
            self._told(task, task.status, None)
        return result

    async def _one_with_images(self, sql: str, owner_id: str, build: Callable[[Row], W]) -> W | None:
        """The owner a queries.with_images statement loads by `owner_id`, built, with its images (a task's or an
        archive's); None if unknown."""
        return owner_with_images(await self._read_all(sql, (owner_id,)), build)

    async def _page(self, table: str, filters: list[str], args: list[Any], *, cursor: str | None, limit: int,
                    build: Callable[[Row], I], scan: bool = False) -> tuple[list[I], str | None]:
        """Up to `limit` rows of `table` matching `filters`, newest first, each built; the cursor is the last id
        of the previous page, and the one returned (None on the last page) is this page's last id. `scan`: the
        filters may read the whole table (a text search), so the page is read as _read_whole reads."""
        if cursor:
            filters, args = [*filters, "id < ?"], [*args, cursor]
        read = self._read_whole if scan else self._read_all
        rows = await read(q.filtered(table, filters, order="id DESC"), (*args, limit + 1))
        found = [build(row) for row in rows[:limit]]
        return found, (found[-1].id if len(rows) > limit else None)

    async def _page_with_images(self, table: str, filters: list[str], args: list[Any], *, cursor: str | None,
                                limit: int, build: Callable[[Row], W],
                                scan: bool = False) -> tuple[list[W], str | None]:
        """`_page` of image owners (tasks, archives), each with its images, read in one more query."""
        found, next_cursor = await self._page(table, filters, args, cursor=cursor, limit=limit, build=build,
                                              scan=scan)
        if found:
            by_id = {owner.id: owner for owner in found}
            for row in await self._read_all(*q.images_of_tasks(list(by_id))):
                by_id[row["task_id"]].images.append(image_from_row(row))
        return found, next_cursor
