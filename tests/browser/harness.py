"""The browser tests' world: `relay simulate` and `relay serve` as processes (tests/e2e's harness), a subscriber
(tests/sink.py), and headless Chromium from Debian's package driven by Playwright, which records every request
a page makes so a test can say that nothing came from outside relay.

Shared by the tests (conftest.py) and by `python -m tests.browser.screenshots`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import re
import secrets
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from playwright.sync_api import Browser, BrowserContext, Page, Playwright, Response

from relay import ids
from relay.models import Job
from relay.store.base import Store
from relay.store.postgres import PostgresStore
from relay.store.sqlite import SQLiteStore
from tests.e2e.harness import Relay, Simulator, replica_env, wait_for
from tests.pg import PREFIX, admin_connection, drop_database, dsn_for

T = TypeVar("T")
CHROMIUM = "/usr/bin/chromium"     # Debian's chromium (`playwright install` cannot download browsers here)
PASSWORD = "console-password-0123"
WAIT = 20.0                        # seconds any one expectation in a page may take (ms for Playwright: * 1000)

# Short delivery schedule: a failing subscriber's delivery becomes a dead letter within a second.
RELAY_ENV = {"RELAY_DASHBOARD_PASSWORD": PASSWORD, "RELAY_DELIVERIES_SCHEDULE": "0,0.2",
             "RELAY_DELIVERIES_JITTER": "0", "RELAY_DELIVERIES_TIMEOUT": "5", "RELAY_WORKER_MAX_ATTEMPTS": "2"}


def launch(playwright: Playwright) -> Browser:
    return playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])


def _off_thread(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to its end on a thread of its own: Playwright's sync API owns this thread's event loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result(timeout=WAIT)


@contextlib.contextmanager
def _postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database (tests/pg.py's server) for relay to use: its DSN; dropped afterwards."""
    name = PREFIX + secrets.token_hex(8)

    async def create() -> None:
        admin = await admin_connection()
        try:
            await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        finally:
            await admin.close()
    _off_thread(create())
    try:
        yield dsn_for(name)
    finally:
        _off_thread(drop_database(name))


@contextlib.contextmanager
def relay_on(backend: str, sim: Simulator, workdir: Path, **extra_env: str) -> Iterator[Relay]:
    """A started relay on SQLite (a file in workdir) or on a fresh PostgreSQL database; stopped (and the database
    dropped) afterwards."""
    with contextlib.ExitStack() as stack:
        env = {**RELAY_ENV, **extra_env}
        if backend == "postgresql":
            env.update(replica_env(stack.enter_context(_postgres_database()), workdir / "images"))
        relay = Relay(sim, workdir / "data", workdir, extra_env=env)
        stack.callback(relay.close)
        relay.start()
        yield relay


@dataclass
class Console:
    """One browser context on one relay: its page, and every request and console error of every page in it."""

    relay: Relay
    context: BrowserContext
    page: Page
    requests: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, browser: Browser, relay: Relay) -> Console:
        context = browser.new_context(base_url=relay.url)
        context.set_default_timeout(WAIT * 1000)
        console = cls(relay=relay, context=context, page=context.new_page())
        context.on("request", lambda request: console.requests.append(request.url))
        # A policy violation (something the CSP refused) or a script error; not "Failed to load resource" for the
        # 401/403 pages some tests ask for on purpose.
        context.on("console", lambda msg: console.console_errors.append(msg.text)
                   if msg.type == "error" and "Failed to load resource" not in msg.text else None)
        console.page.on("pageerror", lambda exc: console.console_errors.append(str(exc)))
        return console

    def close(self) -> None:
        self.context.close()

    def goto(self, path: str) -> Response:
        response = self.page.goto(path)
        assert response is not None, f"no response for {path}"
        return response

    def login(self, credential: str = PASSWORD) -> Response | None:
        """Open the console (which leads to the login form) and log in; the response to the form's POST."""
        self.goto("/")
        def login_post(response: Response) -> bool:
            return response.url.endswith("/console/login") and response.request.method == "POST"
        with self.page.expect_response(login_post) as posted:
            self.page.fill("#credential", credential)
            self.page.click("form[action='/console/login'] button[type=submit]")
        self.page.wait_for_load_state()
        return posted.value

    def csrf(self) -> str:
        """The CSRF token of the page shown (every form carries it)."""
        value = self.page.locator("input[name=csrf]").first.get_attribute("value")
        assert value, "the page has no CSRF token"
        return value

    def outside_requests(self) -> list[str]:
        """Requests any page made to anywhere but relay itself."""
        return [url for url in self.requests if not url.startswith(self.relay.url + "/")]


def text_of(page: Page, selector: str) -> str:
    return page.locator(selector).inner_text()


def wait_status(relay: Relay, delivery_filter: dict[str, str], status: str, count: int = 1) -> list[dict[str, object]]:
    """Wait until `count` deliveries matching the filter have `status` (through the API)."""
    def reached() -> list[dict[str, object]] | None:
        relay.process.check_alive()
        found = relay.api.get("/v1/deliveries", params={**delivery_filter, "limit": 200}).json()["data"]
        matching = [d for d in found if d["status"] == status]
        return matching if len(matching) >= count else None
    return wait_for(reached, WAIT, f"{count} deliveries {delivery_filter} to be {status}")


SECRET = re.compile(r"whsec_[A-Za-z0-9+/=]+")


def bury_a_job(relay: Relay, task_id: str, error: str) -> str:
    """Put a job in the dead state the way the worker does (claim it, then bury it: Store.bury_job), on the relay's
    own database; its id. Relay's handlers give up through their own paths (a poll's give-up fails the task
    and deletes the job), so a test that needs a dead job makes one."""
    database = relay.process.env.get("RELAY_STORAGE_DATABASE") or str(relay.data_dir / "relay.db")

    async def bury() -> str:
        store: Store = PostgresStore(database) if database.startswith("postgresql") else SQLiteStore(database)
        await store.open()
        try:
            later = time.time() + 3600          # not due: relay's own worker leaves it alone
            job = Job(id=ids.new_id("job"), kind="poll", task_id=task_id, payload={"polls": 0}, run_at=later,
                      dedupe_key=f"poll:{task_id}", max_attempts=3)
            await store.enqueue([job])
            claimed = await store.claim(later, limit=1, lease_seconds=60, kinds=["poll"])
            assert [c.id for c in claimed] == [job.id], claimed
            await store.bury_job(claimed[0], error, time.time())
            return job.id
        finally:
            await store.close()

    return _off_thread(bury())


def open_a_circuit(relay: Relay, provider: str, error: str, cooldown: float = 600.0) -> None:
    """Open `provider`'s circuit on the relay's own database, as failed submits do (Store.circuit_failed at its
    threshold): no test has to fail five submits to see it."""
    database = relay.process.env.get("RELAY_STORAGE_DATABASE") or str(relay.data_dir / "relay.db")

    async def fail() -> None:
        store: Store = PostgresStore(database) if database.startswith("postgresql") else SQLiteStore(database)
        await store.open()
        try:
            await store.circuit_failed(provider, error, time.time(), threshold=1, cooldown=cooldown)
        finally:
            await store.close()

    _off_thread(fail())
