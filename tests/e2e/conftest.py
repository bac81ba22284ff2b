"""End-to-end fixtures: `relay simulate` and `relay serve` as real processes over real sockets.

The simulator runs once per session (reset before every test); each test gets its own relay
process with a fresh data directory, started from the embedded defaults (no config file) and
`RELAY_*` overrides only. Relay can be SIGKILLed and restarted on the same data dir and port.
Processes are always stopped, and their output is printed when the test did not pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .harness import Relay, Simulator


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    """Keep each phase's report on the item so fixtures can tell whether the test passed."""
    report: pytest.TestReport = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def _test_failed(node: pytest.Item) -> bool:
    call = getattr(node, "rep_call", None)
    setup = getattr(node, "rep_setup", None)
    return call is None or call.failed or (setup is not None and setup.failed)


@pytest.fixture(scope="session")
def simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    sim = Simulator(tmp_path_factory.mktemp("simulator"))
    try:
        sim.start()
        yield sim
    finally:
        sim.close()


@pytest.fixture
def sim(simulator: Simulator, request: pytest.FixtureRequest) -> Iterator[Simulator]:
    """The shared simulator, reset (tasks, faults, stats, knobs) before the test."""
    simulator.process.check_alive()
    simulator.reset()
    yield simulator
    if _test_failed(request.node):
        print(simulator.process.output(tail=5000))


RelayFactory = Callable[..., Relay]


@pytest.fixture
def relay_factory(sim: Simulator, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RelayFactory]:
    """Start relay processes (extra RELAY_* env as keyword arguments); all are stopped after the test."""
    started: list[Relay] = []

    def make(**extra_env: str) -> Relay:
        index = len(started)
        relay = Relay(sim, tmp_path / f"data{index}", tmp_path, name=f"relay{index}", extra_env=extra_env)
        started.append(relay)
        relay.start()
        return relay

    try:
        yield make
    finally:
        failed = _test_failed(request.node)
        for relay in started:
            try:
                relay.close()
            finally:
                if failed:
                    print(relay.process.output())


@pytest.fixture
def relay(relay_factory: RelayFactory) -> Relay:
    return relay_factory()
