"""Browser fixtures: the simulator and headless Chromium once for the package, a relay per test on each backend
(SQLite and PostgreSQL), a logged-out browser context per test that must never reach outside relay."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright

from tests.e2e.harness import Relay, Simulator
from tests.sink import Sink

from .harness import Console, launch, relay_on


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    report: pytest.TestReport = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="package")
def simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    sim = Simulator(tmp_path_factory.mktemp("browser-sim"))
    try:
        sim.start()
        yield sim
    finally:
        sim.close()


@pytest.fixture
def sim(simulator: Simulator) -> Simulator:
    simulator.process.check_alive()
    simulator.reset()
    return simulator


@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    # Package scope: Playwright's sync API runs its own event loop, which must be gone before any async test runs.
    with sync_playwright() as playwright:
        chromium = launch(playwright)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def relay(request: pytest.FixtureRequest, sim: Simulator, tmp_path: Path) -> Iterator[Relay]:
    with relay_on(request.param, sim, tmp_path) as started:
        yield started
        call = getattr(request.node, "rep_call", None)
        if call is None or call.failed:
            print(started.process.output(tail=8000))


@pytest.fixture
def console(browser: Browser, relay: Relay, request: pytest.FixtureRequest) -> Iterator[Console]:
    """A fresh browser context on the test's relay. Whatever the test did, no page may have loaded anything from
    outside relay, nor logged an error (a Content-Security-Policy violation is one)."""
    opened = Console.open(browser, relay)
    try:
        yield opened
    finally:
        opened.close()
    call = getattr(request.node, "rep_call", None)
    if call is not None and call.passed:
        assert opened.outside_requests() == [], opened.outside_requests()
        assert opened.console_errors == [], opened.console_errors


@pytest.fixture
def sink() -> Iterator[Sink]:
    with Sink().serving_in_thread() as running:
        yield running
