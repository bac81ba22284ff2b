"""Assembles a running relay from Settings: store, providers, image store, HTTP clients, worker.

The web app and the CLI both take a Runtime; tests build one with their own
clock and transports. Secrets that the embedded defaults leave empty (API key,
signing secret) are generated once into the data directory with mode 0600.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from relay.clock import Clock, SystemClock
from relay.config import Settings, is_loopback_host, mask_url
from relay.costs import task_cost
from relay.deliveries.handler import DeliverHandler
from relay.deliveries.service import DeliveryService, build_delivery_service
from relay.fastclient import GuardedSession, guarded_client
from relay.images.store import open_image_store
from relay.jobs.archive import ArchiveHandler
from relay.jobs.callback import CALLBACK_JOB, LEGACY_CALLBACK_JOB, CallbackHandler
from relay.jobs.context import JobContext
from relay.jobs.housekeeping import HousekeepingHandler
from relay.jobs.housekeeping import schedule as schedule_housekeeping
from relay.jobs.poll import PollHandler
from relay.jobs.submit import SubmitHandler
from relay import metrics
from relay.links import Signer
from relay.models import Task
from relay.logs import log_task_status
from relay.netguard import NetGuard, provider_resolver
from relay.outage import unreachable_at_start
from relay.providers import PROVIDER_KINDS, build_provider
from relay.providers.base import Provider
from relay.queue import Handler, Worker, WorkerOptions
from relay.ratelimit import RateLimiter, SharedTokenBucket, TokenBucket
from relay.service import TaskService
from relay.store.base import Store
from relay.stats import ProviderStatsRecorder
from relay.store.sqlite import SQLiteStore, sqlite_path_from_url

log = logging.getLogger("relay")


@dataclass
class Runtime:
    settings: Settings
    store: Store
    ctx: JobContext
    worker: Worker
    tasks: TaskService
    api_keys: tuple[str, ...]
    guard: NetGuard
    deliveries: DeliveryService | None = None
    provider_stats: ProviderStatsRecorder | None = None


def read_or_create_secret(path: Path, prefix: str, nbytes: int = 24) -> str:
    """A secret kept in a 0600 file of the data directory, created on first use.

    Safe when several processes start on one data directory at once: the secret is written whole to a
    temporary file and linked into place (link refuses to replace), so a reader never sees a half-written
    file and every process ends up with the one secret that won.
    """
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = prefix + secrets.token_urlsafe(nbytes)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(value + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temp, path)
        except FileExistsError:
            return path.read_text().strip()     # another process won the race: its secret is the one
    finally:
        temp.unlink(missing_ok=True)
    return value


def api_key_file(settings: Settings) -> Path:
    return Path(settings.storage.data_dir) / "api-key"


def resolve_api_keys(settings: Settings) -> tuple[str, ...]:
    if settings.auth.api_keys:
        return settings.auth.api_keys
    return (read_or_create_secret(api_key_file(settings), "rk_"),)


def open_store(settings: Settings) -> Store:
    """The store the database URL names: sqlite:///path (the embedded default) or postgresql://…"""
    url = settings.storage.database
    if url.startswith("sqlite:"):
        return SQLiteStore(sqlite_path_from_url(url), synchronous=settings.storage.sqlite_synchronous)
    from relay.store.postgres import PostgresStore     # asyncpg is needed only here
    return PostgresStore(url)


def shared_database(settings: Settings) -> bool:
    """Whether other replicas may share this database (everything but SQLite)."""
    return not settings.storage.database.startswith("sqlite:")


def build_handlers(ctx: JobContext) -> dict[str, Handler]:
    callbacks = CallbackHandler(ctx)      # one for both kinds: their callbacks share confirmations
    return {"submit": SubmitHandler(ctx), "poll": PollHandler(ctx), "archive": ArchiveHandler(ctx),
            CALLBACK_JOB: callbacks, LEGACY_CALLBACK_JOB: callbacks,
            "housekeeping": HousekeepingHandler(ctx.store, ctx.image_store, ctx.settings.retention, ctx.clock)}


def pricing(settings: Settings) -> Callable[[Task], dict[str, Any] | None]:
    """Prices an ended task with its provider's [providers.NAME.prices] table (relay.costs)."""
    return lambda task: task_cost(task, settings.prices.get(task.provider))


class StartupError(Exception):
    """relay cannot start with these settings (a clear message for the operator)."""


class DatabaseUnreachable(StartupError):
    """relay cannot start now: its database cannot be reached (it may be later; a supervisor starts it again)."""


def check_startup(settings: Settings) -> None:
    """What relay refuses to start with beyond the settings' own checks (`relay check-config` asks the same)."""
    check_callback_url(settings)
    server = settings.server
    for key, path in (("server.ssl_certfile", server.ssl_certfile), ("server.ssl_keyfile", server.ssl_keyfile)):
        # Here, not among the settings' own checks: a client command (relay tasks) run by a user who may not
        # read the server's key still loads these settings.
        if path is not None and not os.access(path, os.R_OK):
            raise StartupError(f"{key} {path!r} cannot be read (no such file, or no permission for this user)")
    if shared_database(settings) and not settings.auth.signing_secret:
        # Callback tokens and image links are HMACs under this secret: one generated per machine would
        # make every replica refuse the others' callback URLs and links.
        raise StartupError("a shared database (PostgreSQL) needs an explicit auth.signing_secret, the same on every "
                           "replica (e.g. signing_secret = \"env:RELAY_SIGNING_SECRET\"); relay will not generate "
                           "one per machine")


def startup_warnings(settings: Settings) -> list[str]:
    """What relay starts with but an operator should hear about (`relay serve` and `relay check-config` say it)."""
    server, warnings = settings.server, []
    if settings.network.allow and not is_loopback_host(server.host):
        warnings.append(f"network.allow exempts {', '.join(settings.network.allow)} from the SSRF guard while relay "
                        f"listens on {server.host}: any API client can make relay call those addresses (webhooks, "
                        "archived links, reference images)")
    if urlsplit(server.public_url).hostname in ("0.0.0.0", "::"):
        warnings.append(f"server.public_url is {server.public_url} (made from server.host): providers' callbacks "
                        "and image links point there, and nobody can reach that address; set server.public_url "
                        "(RELAY_SERVER_PUBLIC_URL) to the address clients and providers reach relay at")
    return warnings


async def opened_store(settings: Settings) -> Store:
    """open_store, opened (migrated): a database that cannot be opened is a StartupError that says which (its
    password hidden) and why; DatabaseUnreachable when it cannot be reached now (down, starting, failing over)."""
    store = open_store(settings)
    try:
        await store.open()
    except Exception as exc:
        log.debug("opening the store failed", exc_info=True)
        with contextlib.suppress(Exception):
            await store.close()         # what it opened before failing (SQLite's connection thread)
        unreachable = unreachable_at_start(exc)
        error = DatabaseUnreachable if unreachable else StartupError
        raise error(f"cannot {'reach' if unreachable else 'open'} the database "
                    f"{mask_url(settings.storage.database)}: {type(exc).__name__}: {exc}") from exc
    return store


def check_callback_url(settings: Settings) -> None:
    """Providers that call back need an HTTPS public_url (they refuse http), unless allowed for local use."""
    users = [name for name, conf in settings.providers.items() if PROVIDER_KINDS[conf.kind].caps.callbacks]
    public = settings.server.public_url
    if users and not public.startswith("https://") and not settings.server.allow_http_callbacks:
        raise StartupError(
            f"providers {', '.join(users)} send callbacks, which need an HTTPS server.public_url (got {public}); "
            "serve HTTPS (server.ssl_certfile/ssl_keyfile, see `relay dev-cert`) or put relay behind a TLS proxy "
            "and set public_url, or set server.allow_http_callbacks = true for local use")


@contextlib.asynccontextmanager
async def open_runtime(settings: Settings, *, clock: Clock | None = None,
                       transport: httpx.AsyncBaseTransport | None = None) -> AsyncIterator[Runtime]:
    """Open everything; close it all on exit. `transport` replaces the guarded network of the provider clients
    (tests); image downloads and webhooks always go out through the guarded aiohttp sessions."""
    check_startup(settings)
    clock = clock or SystemClock()
    data_dir = Path(settings.storage.data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        signing_secret = settings.auth.signing_secret or read_or_create_secret(data_dir / "signing-secret", "")
        api_keys = resolve_api_keys(settings)
    except OSError as exc:
        raise StartupError(f"storage.data_dir {data_dir} cannot be used: {exc.strerror or exc} (relay keeps its "
                           "database, generated secrets and images there: it must be writable by relay's user)") \
            from exc
    guard = NetGuard(settings.network.allow)
    # The providers' own names are looked up apart from those clients give (webhooks, links): a client's name
    # server that never answers cannot hold up a provider call (relay.netguard).
    provider_guard = NetGuard(settings.network.allow, resolver=provider_resolver)
    tls = httpx.create_ssl_context()     # the CA bundle, loaded once (~30 ms) for every client below

    def new_client(*, pooled: bool = True) -> httpx.AsyncClient:
        """A guarded client; `pooled=False`: every request on a new connection, closed after its answer."""
        options: dict[str, Any] = {"follow_redirects": False, "timeout": httpx.Timeout(60.0, connect=10.0),
                                   "headers": {"user-agent": "relay/0.1"}}
        if transport is not None:
            return httpx.AsyncClient(transport=transport, **options)
        return guarded_client(provider_guard, verify=tls, pooled=pooled, **options)

    # One session for image downloads and inputs (aiohttp, relay.fastclient), and one httpx client per
    # provider (each on a pool of its own, so one provider's connections never queue behind another's).
    http = GuardedSession(guard, tls)
    provider_clients: list[httpx.AsyncClient] = []
    store = await opened_store(settings)
    store.on_task_status(metrics.task_status)
    store.on_task_status(log_task_status)
    store.on_archive_status(metrics.archive_status)
    store.pricing = pricing(settings)      # each task's cost, decided when it ends (relay.costs)
    provider_stats = ProviderStatsRecorder(store, clock)   # this process's provider requests, added to the store
    image_store = open_image_store(settings.storage)   # a local directory, or an S3-compatible bucket
    providers: dict[str, Provider] = {}
    limiters: dict[str, RateLimiter] = {}
    ctx = JobContext(settings=settings, store=store, clock=clock, providers=providers, image_store=image_store,
                     http=http, signer=Signer(signing_secret), limiters=limiters)

    async def fetch_input(url: str) -> tuple[bytes, str]:
        from relay.images.download import fetch_bytes
        return await fetch_bytes(http, url, max_bytes=settings.archive.input_max_bytes,
                                 timeout=settings.archive.timeout)

    for name, conf in settings.providers.items():
        client = new_client()
        provider_clients.append(client)
        # A pooled connection may have been closed by the provider just as a request goes out on it (its
        # idle timeout, a load balancer's): the request fails after sending. A fetch is simply retried,
        # and so is a submit that carries an idempotency key the provider honours; any other submit
        # goes out on a connection of its own, never a reused one (one handshake per task).
        submit_client = None
        if not PROVIDER_KINDS[conf.kind].caps.idempotent_submit:
            submit_client = new_client(pooled=False)
            provider_clients.append(submit_client)
        providers[name] = build_provider(conf.kind, client, base_url=conf.base_url, api_key=conf.api_key,
                                         name=name, model=conf.model, fetch_input=fetch_input, timeout=conf.timeout,
                                         submit_http=submit_client)
        providers[name].stats = provider_stats
        # The provider account's rate, whichever replica sends: kept in the database when it is shared.
        limiters[name] = (SharedTokenBucket(store, f"provider:{name}", conf.rate_limit, clock)
                          if shared_database(settings) else TokenBucket(conf.rate_limit))
    ctx.callbacks_enabled = True
    deliveries = build_delivery_service(settings, store, clock, guard=guard, signer=ctx.signer,
                                        signing_secret=signing_secret, shared_lanes=shared_database(settings),
                                        tls=tls)
    await deliveries.start()
    await schedule_housekeeping(store, settings.retention, clock.now())   # once per database (dedupe key)
    w = settings.worker
    worker = Worker(store, {**build_handlers(ctx), "deliver": DeliverHandler(deliveries)}, clock, WorkerOptions(
        concurrency=w.concurrency, lease_seconds=w.lease_seconds, idle_poll_seconds=w.idle_poll_seconds,
        max_attempts=w.max_attempts, retry_base=w.retry_base, retry_cap=w.retry_cap, claim_batch=w.claim_batch))
    runtime = Runtime(settings=settings, store=store, ctx=ctx, worker=worker, tasks=TaskService(ctx, guard),
                      api_keys=api_keys, guard=guard, deliveries=deliveries, provider_stats=provider_stats)
    provider_stats.start()
    try:
        yield runtime
    finally:
        await deliveries.close()
        await provider_stats.close()
        await store.close()
        await http.aclose()
        for client in provider_clients:
            await client.aclose()
