"""A provider frozen mid-work (SIGSTOP: its sockets accept, nothing answers) and resumed (SIGCONT).

While frozen, every request relay sends is read by nobody and times out, submits included: a submit that
timed out may have reached the provider. After the thaw nothing may be lost and nothing submitted twice:
APIMart dedupes submits by relay's Idempotency-Key, so its tasks are resent and all succeed as one
provider task each; GMI does not, so a GMI submit caught in the freeze either succeeds (its answer came in
time) or fails as `submit_outcome_unknown`, never as a second provider task.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from .harness import Relay, Simulator, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def freezable(sim: Simulator) -> Iterator[Simulator]:
    """The shared simulator; whatever happens in the test, it is running again afterwards."""
    try:
        yield sim
    finally:
        assert sim.process.proc is not None
        os.killpg(sim.process.proc.pid, signal.SIGCONT)


def _freeze(sim: Simulator, on: bool) -> None:
    assert sim.process.proc is not None
    os.killpg(sim.process.proc.pid, signal.SIGSTOP if on else signal.SIGCONT)


def test_frozen_provider_loses_nothing_and_submits_nothing_twice(relay_factory: object,
                                                                 freezable: Simulator) -> None:
    """Tasks before, during and after a provider freeze all end as planned; one provider task per relay task."""
    sim = freezable
    assert callable(relay_factory)
    relay: Relay = relay_factory(RELAY_PROVIDERS_APIMART_TIMEOUT="1", RELAY_PROVIDERS_GMICLOUD_TIMEOUT="1")
    before = [relay.create({"provider": "apimart", "prompt": f"before {i}"}) for i in range(3)]
    for task in before:
        relay.wait_status(task["id"], ("queued", "running", "archiving", "succeeded"))

    _freeze(sim, True)
    during = [relay.create({"provider": "apimart", "prompt": f"during {i}"}) for i in range(3)]
    gmi = [relay.create({"provider": "gmicloud", "prompt": f"gmi {i}"}) for i in range(2)]
    # Condition, not a sleep: relay has seen submits time out against the frozen provider.
    wait_for(lambda: relay.process.output().count("submit sent but no answer") >= 3, 30,
             "submits to time out against the frozen simulator")
    _freeze(sim, False)

    after = [relay.create({"provider": "apimart", "prompt": f"after {i}"}) for i in range(2)]
    apimart = before + during + after
    for task in apimart:
        final = relay.wait_terminal(task["id"], timeout=60)
        assert final["status"] == "succeeded", final
    for task in gmi:
        final = relay.wait_terminal(task["id"], timeout=60)
        assert final["status"] == "succeeded" or final["error"]["code"] == "submit_outcome_unknown", final

    provider_ids = [relay.task(t["id"])["provider_task_id"] for t in apimart]
    assert len(set(provider_ids)) == len(apimart), "each relay task is its own provider task"
    assert len(sim.tasks("apimart")) == len(apimart), "the resent submits were deduplicated by the provider"
    assert len(sim.tasks("gmicloud")) <= len(gmi), "no GMI submit was sent twice"
    for task in apimart:
        types = [e["type"] for e in relay.events(task["id"])]
        assert types.count("task.succeeded") == 1 and types.count("task.queued") == 1, types
