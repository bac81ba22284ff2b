"""Failover between providers, circuit breakers, usage and cost: relay + simulator in process (real apps, ASGI).

The simulator counts what each provider received; "no provider receives the same task twice" is read there.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from relay import ids
from relay.circuit import CLOSED, HALF_OPEN, OPEN
from relay.config import PROVIDER_KINDS
from relay.models import Task
from relay.store.base import Store
from tests.harness import SIM, Harness, harness

ROUTES_TOML = """
[server]
allow_http_callbacks = true
[network]
allow = ["127.0.0.0/8", "::1/128", "localhost"]
[providers.gmicloud]
base_url = "{sim}/gmicloud"
api_key = "sim"
[providers.gmicloud.prices]
default = 0.09
[providers.apimart]
base_url = "{sim}/apimart"
api_key = "sim"
[providers.apimart.prices]
only_successful = true
default = 0.05
low = 0.01
[providers.evolink]
base_url = "{sim}/evolink"
api_key = "sim"
[providers.evolink.prices]
default = 0.03
high = {{ "1024x1024" = 0.2 }}
[providers.pixazo]
base_url = "{sim}/pixazo"
api_key = "sim"
[providers.openai]
base_url = "{sim}/openai"
api_key = "sim"
[routes.cheap]
providers = ["pixazo", "gmicloud", "apimart", "evolink"]
strategy = "cheapest"
[routes.pair]
providers = ["evolink", "apimart"]
"""


def routes_config(tmp_path: Path) -> dict[str, str]:
    path = tmp_path / "relay.toml"
    path.write_text(ROUTES_TOML.format(sim=SIM))
    return {"RELAY_CONFIG": str(path)}


async def sim_submits(h: Harness) -> dict[str, int]:
    stats = (await h.sim.get("/_sim/stats")).json()["dialects"]
    return {d: stats[d]["submits"] for d in PROVIDER_KINDS}


async def sim_prompts(h: Harness) -> Counter[tuple[str, str]]:
    """(dialect, prompt) of every task the simulator accepted."""
    out: Counter[tuple[str, str]] = Counter()
    for summary in (await h.sim.get("/_sim/tasks")).json()["tasks"]:
        detail = (await h.sim.get(f"/_sim/tasks/{summary['dialect']}/{summary['id']}")).json()
        out[summary["dialect"], str(detail["request"].get("prompt"))] += 1
    return out


async def test_503_on_every_submit_fails_over_and_no_provider_gets_a_task_twice(tmp_path: Path) -> None:
    """EvoLink answering 503 to every submit: tasks naming it first succeed at APIMart, each provider got each
    task once, and the task shows who served it and why EvoLink was left."""
    async with harness(tmp_path, RELAY_FAILOVER_BREAKER_THRESHOLD="1000") as h:
        await h.faults(next=[{"dialect": "evolink", "op": "submit", "fault": "503", "count": 1000,
                              "retry_after": 30}])
        tasks = [await h.create(provider=["evolink", "apimart"], prompt=f"failover {i}") for i in range(5)]
        finals = [await h.wait_status(t["id"], timeout=30) for t in tasks]
        for final in finals:
            assert final["status"] == "succeeded", final
            assert final["provider"] == "apimart" and final["providers"] == ["evolink", "apimart"]
            assert final["providers_tried"] == ["evolink", "apimart"]
            left, served = final["attempts"]
            assert left["provider"] == "evolink" and left["outcome"] == "unavailable" and "503" in left["reason"]
            assert served["provider"] == "apimart" and served["outcome"] == "accepted"
        assert await sim_submits(h) == {"gmicloud": 0, "apimart": 5, "evolink": 5, "pixazo": 0, "openai": 0}
        accepted = await sim_prompts(h)
        assert set(accepted) == {("apimart", f"failover {i}") for i in range(5)}
        assert all(count == 1 for count in accepted.values())


async def test_submit_with_unknown_outcome_does_not_fail_over(tmp_path: Path) -> None:
    """A submit that may have reached the provider (sent, then a crash) fails as submit_outcome_unknown; the
    next provider gets nothing. (tests/e2e/test_failover.py does it with a real timeout over sockets.)"""
    async with harness(tmp_path, run_worker=False) as h:
        task = await h.create(provider=["gmicloud", "evolink"], prompt="unknown outcome")
        await h.runtime.store.mark_submit_started(task["id"], h.runtime.ctx.clock.now())
        await h.runtime.worker.drain()
        final = await h.task(task["id"])
        assert final["status"] == "failed" and final["error"]["code"] == "submit_outcome_unknown"
        assert final["provider"] == "gmicloud" and final["providers_tried"] == ["gmicloud"]
        assert await sim_submits(h) == {kind: 0 for kind in PROVIDER_KINDS}


async def test_a_resend_after_an_unknown_outcome_never_fails_over(tmp_path: Path) -> None:
    """APIMart dedupes submits by key, so a submit whose outcome is unknown is resent to it; when the resend
    meets a 503 (or its circuit opens), the task must stay with APIMart: the first send may have been
    accepted, and EvoLink making it too would bill it twice (found by review: it did fail over)."""
    async with harness(tmp_path, run_worker=False, RELAY_FAILOVER_BREAKER_THRESHOLD="1") as h:
        task = await h.create(provider=["apimart", "evolink"], prompt="maybe accepted")
        await h.runtime.store.mark_submit_started(task["id"], h.runtime.ctx.clock.now())   # sent, then a crash
        await h.faults(next=[{"dialect": "apimart", "op": "submit", "fault": "503", "count": 3, "retry_after": 0}])
        async def settled() -> dict[str, Any]:
            while (current := await h.task(task["id"]))["status"] not in ("succeeded", "failed", "canceled"):
                await h.runtime.worker.drain()       # the worker, by hand: nothing ran before the mark was set
                await asyncio.sleep(0.05)
            return current
        final = await asyncio.wait_for(settled(), timeout=30)
        assert final["status"] == "succeeded" and final["provider"] == "apimart", final
        assert final["providers_tried"] == ["apimart"], final
        submits = await sim_submits(h)
        assert submits["evolink"] == 0 and submits["apimart"] == 4, submits


async def test_content_policy_refusal_does_not_fail_over(tmp_path: Path) -> None:
    """A refusal of the prompt itself fails the task as today: the next provider would refuse it too."""
    async with harness(tmp_path) as h:
        task = await h.create(provider=["openai", "evolink"], prompt="[sim:fail] p")
        final = await h.wait_status(task["id"])
        assert final["status"] == "failed" and final["provider"] == "openai"
        assert (await sim_submits(h))["evolink"] == 0


async def test_rate_limit_within_patience_waits_beyond_it_moves_on(tmp_path: Path) -> None:
    """A 429 asking for less than the patience is waited out on the same provider; one asking for more moves on."""
    async with harness(tmp_path, RELAY_FAILOVER_RATE_LIMIT_PATIENCE="5") as h:
        await h.faults(next=[{"dialect": "apimart", "op": "submit", "fault": "429", "count": 1, "retry_after": 0}])
        patient = await h.create(provider=["apimart", "evolink"], prompt="patient")
        final = await h.wait_status(patient["id"], timeout=30)
        assert final["status"] == "succeeded" and final["provider"] == "apimart"
        await h.faults(next=[{"dialect": "apimart", "op": "submit", "fault": "429", "count": 1, "retry_after": 600}])
        impatient = await h.create(provider=["apimart", "evolink"], prompt="impatient")
        final = await h.wait_status(impatient["id"], timeout=30)
        assert final["status"] == "succeeded" and final["provider"] == "evolink"
        assert final["attempts"][0]["outcome"] == "rate_limited"


async def test_circuit_opens_and_later_tasks_skip_the_provider(tmp_path: Path) -> None:
    """After `breaker_threshold` failed submits the circuit opens: the next task skips the provider without
    sending it anything, and GET /v1/providers shows the circuit open."""
    async with harness(tmp_path, RELAY_FAILOVER_BREAKER_THRESHOLD="2", RELAY_FAILOVER_BREAKER_COOLDOWN="600") as h:
        await h.faults(next=[{"dialect": "evolink", "op": "submit", "fault": "500", "count": 2}])
        for i in range(2):
            task = await h.create(provider=["evolink", "apimart"], prompt=f"trip {i}")
            assert (await h.wait_status(task["id"], timeout=30))["provider"] == "apimart"
        providers = {p["name"]: p for p in (await h.api.get("/v1/providers")).json()["data"]}
        assert providers["evolink"]["circuit"]["state"] == "open"
        assert providers["evolink"]["circuit"]["consecutive_failures"] == 2
        assert providers["apimart"]["circuit"]["state"] == "closed"
        skipped = await h.create(provider=["evolink", "apimart"], prompt="skipped")
        final = await h.wait_status(skipped["id"], timeout=30)
        assert final["status"] == "succeeded" and final["attempts"][0]["outcome"] == "skipped"
        assert (await sim_submits(h))["evolink"] == 2
        # A task with evolink alone still goes there: the breaker never drops a task's only provider.
        alone = await h.create(provider="evolink", prompt="alone")
        assert (await h.wait_status(alone["id"], timeout=30))["status"] == "succeeded"


async def test_circuit_half_open_probe_closes_it(store: Store) -> None:
    """Open → (cooldown) one probe admitted, others not → the probe's success closes it; shared via the store."""
    for _ in range(3):
        await store.circuit_failed("p", "provider_unavailable: 503", 100.0, threshold=3, cooldown=10.0)
    assert (await store.circuits())["p"].state == OPEN
    assert not await store.circuit_admit("p", 105.0, 10.0)
    assert await store.circuit_admit("p", 111.0, 10.0)          # the probe
    assert (await store.circuits())["p"].state == HALF_OPEN
    assert not await store.circuit_admit("p", 112.0, 10.0)      # one probe at a time
    await store.circuit_succeeded("p", 113.0)
    circuit = (await store.circuits())["p"]
    assert circuit.state == CLOSED and circuit.failures == 0
    assert await store.circuit_admit("p", 113.5, 10.0)


async def test_failed_probe_reopens_the_circuit(store: Store) -> None:
    """A half-open probe that fails opens the circuit again for another cooldown."""
    await store.circuit_failed("p", "x", 0.0, threshold=1, cooldown=10.0)
    assert await store.circuit_admit("p", 11.0, 10.0)
    circuit = await store.circuit_failed("p", "x", 12.0, threshold=5, cooldown=10.0)
    assert circuit.state == OPEN and circuit.retry_at == 22.0


@pytest.mark.parametrize("body, field", [
    ({"provider": ["evolink", "nope"]}, "provider"),
    ({"provider": []}, "provider"),
    ({"provider": ["evolink", "evolink"]}, "provider"),
    ({"provider": ["gmicloud", "evolink"], "n": 2}, "n"),                   # evolink: n must be 1
    ({"provider": ["gmicloud", "apimart"], "output_format": "webp"}, "output_format"),
])
async def test_every_listed_provider_must_exist_and_support_the_request(tmp_path: Path, body: dict[str, Any],
                                                                        field: str) -> None:
    """A list naming an unknown provider, or one that cannot do an option asked, is a 422 naming the field."""
    async with harness(tmp_path, run_worker=False) as h:
        response = await h.api.post("/v1/tasks", json={"prompt": "p", **body})
        assert response.status_code == 422 and response.json()["error"]["field"] == field, response.text


async def test_single_provider_task_is_unchanged(tmp_path: Path) -> None:
    """A task naming one provider: no failover, its 5xx retried on the same provider as always."""
    async with harness(tmp_path) as h:
        await h.faults(next=[{"dialect": "evolink", "op": "submit", "fault": "503", "count": 2, "retry_after": 0}])
        task = await h.create(provider="evolink", prompt="single")
        final = await h.wait_status(task["id"], timeout=30)
        assert final["status"] == "succeeded" and final["provider"] == "evolink"
        assert final["providers"] == ["evolink"] and final["route"] is None
        assert [a["outcome"] for a in final["attempts"]] == ["accepted"]


async def test_cheapest_route_orders_by_price_among_providers_that_can(tmp_path: Path) -> None:
    """`strategy = "cheapest"`: the request's price orders the route, unpriced providers last, and a provider
    that cannot honour an option is left out."""
    async with harness(tmp_path, **routes_config(tmp_path)) as h:
        low = await h.create(provider="cheap", prompt="p", quality="low")
        assert low["route"] == "cheap" and low["providers"] == ["apimart", "evolink", "gmicloud", "pixazo"]
        assert low["provider"] == "apimart"
        high = await h.create(provider="cheap", prompt="p", quality="high", size="1024x1024")
        assert high["providers"] == ["apimart", "gmicloud", "evolink", "pixazo"]
        webp = await h.create(provider="cheap", prompt="p", output_format="webp")   # apimart, evolink: no webp
        assert webp["providers"] == ["gmicloud", "pixazo"]
        two = await h.create(provider="cheap", prompt="p", n=2)                  # evolink: n = 1 only
        assert "evolink" not in two["providers"]
        response = await h.api.post("/v1/tasks", json={"provider": "pair", "prompt": "p", "output_format": "webp"})
        assert response.status_code == 422 and response.json()["error"] == {
            "code": "unsupported", "field": "output_format", "message": response.json()["error"]["message"]}
        ordered = await h.create(provider="pair", prompt="p")
        assert ordered["providers"] == ["evolink", "apimart"]
        for task in (low, high, webp, two, ordered):
            assert (await h.wait_status(task["id"], timeout=30))["status"] == "succeeded"
        listing = (await h.api.get("/v1/providers")).json()
        assert {r["name"]: r["strategy"] for r in listing["routes"]} == {"cheap": "cheapest", "pair": "ordered"}


async def test_cost_on_tasks_and_totals_per_provider_per_day(tmp_path: Path) -> None:
    """Each ended task carries its cost (reported from usage where the provider reports it, else estimated
    from the price table); GET /v1/providers sums them per provider per day. APIMart bills only successes."""
    async with harness(tmp_path) as h:     # the embedded profile's illustrative prices (relay.config.DEMO_PRICES)
        evolink = await h.create(provider="evolink", prompt="p")
        openai = await h.create(provider="openai", prompt="p")
        apimart = [await h.create(provider="apimart", prompt="p", quality="low") for _ in range(2)]
        failed = await h.create(provider="apimart", prompt="[sim:fail] p", quality="low")
        finals = {t["id"]: await h.wait_status(t["id"], timeout=30) for t in (evolink, openai, *apimart, failed)}
        e = finals[evolink["id"]]
        assert e["usage"]["credits_reserved"] == 2.5
        assert e["cost"] == {"amount": 0.03, "currency": "USD", "source": "reported"}     # 2.5 credits × 0.012
        o = finals[openai["id"]]
        assert o["usage"]["output_tokens"] > 0 and o["cost"]["source"] == "reported" and o["cost"]["amount"] > 0
        assert finals[apimart[0]["id"]]["cost"] == {"amount": 0.008, "currency": "USD", "source": "estimated"}
        f = finals[failed["id"]]
        assert f["status"] == "failed" and f["cost"]["amount"] == 0.0
        listing = {p["name"]: p for p in (await h.api.get("/v1/providers")).json()["data"]}
        (day,) = listing["apimart"]["costs"]
        assert day["tasks"] == 3 and day["amount"] == pytest.approx(0.016) and day["currency"] == "USD"
        assert listing["evolink"]["costs"][0]["amount"] == pytest.approx(0.03)
        assert listing["pixazo"]["costs"] == [] and listing["apimart"]["prices"]["only_successful"] is True


async def test_replicas_share_one_circuit_and_one_failover(open_store: Callable[[], Awaitable[Store]]) -> None:
    """Two stores on one database (two replicas): failures counted at once on both add up and open the circuit
    for both; two runs moving the same task on at once move it once."""
    a, b = await open_store(), await open_store()
    await asyncio.gather(*(s.circuit_failed("evolink", "503", 10.0, threshold=6, cooldown=30.0)
                           for s in (a, b) for _ in range(3)))
    for s in (a, b):
        circuit = (await s.circuits())["evolink"]
        assert circuit.state == OPEN and circuit.failures == 6
        assert not await s.circuit_admit("evolink", 20.0, 30.0)
    probes = await asyncio.gather(a.circuit_admit("evolink", 41.0, 30.0), b.circuit_admit("evolink", 41.0, 30.0))
    assert sorted(probes) == [False, True]          # one probe between the two replicas
    task = Task(id=ids.new_id("tsk", 1.0), provider="evolink", request={"prompt": "p", "n": 1}, created_at=1.0,
                updated_at=1.0, candidates=["evolink", "apimart"])
    await a.create_task(task, [])
    attempt = {"provider": "evolink", "outcome": "unavailable", "reason": "503", "at": "x"}
    await a.mark_submit_started(task.id, 1.5)
    assert not await a.fail_over(task.id, "evolink", "apimart", attempt, 2.0, None), "another run's mark is on it"
    moved = await asyncio.gather(a.fail_over(task.id, "evolink", "apimart", attempt, 2.0, 1.5),
                                 b.fail_over(task.id, "evolink", "apimart", attempt, 2.0, 1.5))
    assert sorted(moved) == [False, True]
    stored = await b.get_task(task.id)
    assert stored is not None and stored.provider == "apimart" and stored.attempts == [attempt]
    assert stored.candidates == ["evolink", "apimart"]
