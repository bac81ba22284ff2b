"""Fixtures for the delivery end-to-end tests: one simulator per session, relays and sinks per test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.sink import Sink

from .harness import Relay, Simulator


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    report: pytest.TestReport = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def delivery_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    sim = Simulator(tmp_path_factory.mktemp("delivery-sim"))
    try:
        sim.start()
        yield sim
    finally:
        sim.process.stop()


RelayFactory = Callable[..., Relay]


@pytest.fixture
def relays(delivery_sim: Simulator, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RelayFactory]:
    """Start relay processes (extra RELAY_* env as keyword arguments); stopped after the test, logs shown on failure."""
    started: list[Relay] = []

    def make(**env: str) -> Relay:
        relay = Relay(delivery_sim, tmp_path / f"data{len(started)}", tmp_path, **env)
        started.append(relay)
        relay.start()
        return relay

    yield make
    call = getattr(request.node, "rep_call", None)
    for relay in started:
        relay.close()
        if call is None or call.failed:
            print(relay.process.output())


@pytest.fixture
def sink() -> Iterator[Sink]:
    with Sink().serving_in_thread() as running:
        yield running
