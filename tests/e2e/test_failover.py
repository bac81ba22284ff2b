"""Failover, circuit breakers and costs against real `relay serve` and `relay simulate` processes."""

from __future__ import annotations

import datetime as dt

import pytest

from .conftest import RelayFactory
from .harness import Relay, Simulator

pytestmark = pytest.mark.e2e


def test_provider_answering_503_fails_over_and_nothing_is_submitted_twice(sim: Simulator, relay: Relay) -> None:
    """EvoLink answers 503 to every submit: tasks naming it first all succeed through APIMart; the simulator saw
    each task at most once per provider; EvoLink's circuit opens and later tasks skip it."""
    sim.faults(next=[{"dialect": "evolink", "op": "submit", "fault": "503", "count": 100000, "retry_after": 30}])
    # Two rounds: the first (5 tasks, all refused by EvoLink) opens its circuit (5 in a row); the second skips it.
    created, finals = [], []
    for round_ in range(2):
        batch = [relay.create({"provider": ["evolink", "apimart"], "prompt": f"failover e2e {round_}.{i}"})
                 for i in range(5 if round_ == 0 else 7)]
        created += batch
        finals += [relay.wait_succeeded(t["id"], timeout=30) for t in batch]
    for final in finals:
        assert final["provider"] == "apimart" and final["providers_tried"] == ["evolink", "apimart"]
        assert final["attempts"][0]["outcome"] in ("unavailable", "skipped")
        assert final["attempts"][-1] | {"at": None} == {"provider": "apimart", "outcome": "accepted", "reason": None,
                                                        "at": None}
    evolink, apimart = sim.stats("evolink"), sim.stats("apimart")
    # Every EvoLink submit was refused (503), one per task of the first round; the open circuit spared the second.
    assert evolink["submits"] == evolink["faults"]["503"] == 5
    assert sim.tasks("evolink") == []
    assert apimart["submits"] == len(created) == len(sim.tasks("apimart"))
    prompts = [sim.task("apimart", f["provider_task_id"])["request"]["prompt"] for f in finals]
    assert sorted(prompts) == sorted(t["request"]["prompt"] for t in created)      # each task once, its own
    assert [f["attempts"][0]["outcome"] for f in finals] == ["unavailable"] * 5 + ["skipped"] * 7
    providers = {p["name"]: p for p in relay.api.get("/v1/providers").json()["data"]}
    assert providers["evolink"]["circuit"]["state"] == "open"
    assert "503" in providers["evolink"]["circuit"]["last_error"]
    assert providers["apimart"]["circuit"]["state"] == "closed"


def test_submit_timeout_does_not_fail_over(sim: Simulator, relay_factory: RelayFactory) -> None:
    """A submit that times out after sending (outcome unknown) fails the task; the second provider gets nothing,
    although the first did create the task (the simulator shows it): no double billing."""
    relay = relay_factory(RELAY_PROVIDERS_GMICLOUD_TIMEOUT="1")
    sim.faults(timeout_seconds=4, next=[{"dialect": "gmicloud", "op": "submit", "fault": "timeout"}])
    task = relay.create({"provider": ["gmicloud", "apimart"], "prompt": "timeout e2e"})
    final = relay.wait_terminal(task["id"], timeout=30)
    assert final["status"] == "failed" and final["error"]["code"] == "submit_outcome_unknown"
    assert final["provider"] == "gmicloud" and final["providers_tried"] == ["gmicloud"]
    assert sim.stats("apimart")["submits"] == 0 and sim.stats("gmicloud")["submits"] == 1
    assert len(sim.tasks("gmicloud")) == 1


def test_demo_tasks_show_their_cost_per_provider_per_day(sim: Simulator, relay: Relay) -> None:
    """Tasks on every provider (the embedded profile's illustrative prices) end with a cost, and GET
    /v1/providers sums today's per provider: what the task objects say, to the cent."""
    created = [relay.create({"provider": kind, "prompt": f"cost e2e {kind} {i}"})
               for kind in ("gmicloud", "apimart", "evolink", "pixazo", "openai") for i in range(2)]
    finals = [relay.wait_succeeded(t["id"], timeout=30) for t in created]
    expected: dict[str, float] = {}
    for final in finals:
        assert final["cost"]["currency"] == "USD" and final["cost"]["amount"] > 0, final
        expected[final["provider"]] = expected.get(final["provider"], 0.0) + final["cost"]["amount"]
    assert {f["provider"]: f["cost"]["source"] for f in finals} == {
        "gmicloud": "estimated", "apimart": "estimated", "evolink": "reported", "pixazo": "estimated",
        "openai": "reported"}
    today = dt.datetime.now(dt.UTC).date().isoformat()
    listing = relay.api.get("/v1/providers", params={"days": 1}).json()["data"]
    for provider in listing:
        (day,) = provider["costs"]
        assert day["day"] == today and day["tasks"] == 2
        assert day["amount"] == pytest.approx(expected[provider["name"]])
