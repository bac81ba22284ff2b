"""/metrics of a running relay (issue 10, item 3): real requests through relay, the exposition parsed by
prometheus_client's own parser, the counts checked against what was done; and `relay serve --processes 2`,
whose children's counters are summed by whichever child answers the scrape.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tests.sink import Sink

from .conftest import RelayFactory
from .harness import Relay, Simulator, child_pids, postgres_database, replica_env, wait_for

pytestmark = pytest.mark.timeout(90)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, by (name, labels)."""
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def scrape(url: str) -> Samples:
    """GET /metrics on a connection of its own (with --processes, any child may answer)."""
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when there is none)."""
    wanted = set(labels.items())
    return sum(v for (n, found), v in samples.items() if n == name and wanted <= found)


@pytest.fixture
def sink() -> Iterator[Sink]:
    with Sink().serving_in_thread() as serving:
        yield serving


def test_metrics_count_what_relay_did(sim: Simulator, relay_factory: RelayFactory, sink: Sink) -> None:
    """A callback task (duplicated callbacks), a polled task behind a 429 and a 500, webhooks to a subscriber:
    every counter moves by what happened, and the store's gauges say where the tasks and jobs are."""
    relay = relay_factory()
    before = scrape(relay.url)
    assert value(before, "relay_task_status_changes_total") == 0
    assert value(before, "relay_provider_requests_total") == 0
    sim.faults(callbacks={"duplicate": 3},
               next=[{"dialect": "apimart", "op": "submit", "fault": "429", "retry_after": 0.2},
                     {"dialect": "apimart", "op": "poll", "fault": "500"}])
    created = relay.api.post("/v1/subscriptions", json={"url": sink.url("/hooks"), "events": ["task.succeeded"]})
    assert created.status_code == 201, created.text
    called_back = relay.create({"provider": "evolink", "prompt": "metrics: a callback"})
    polled = relay.create({"provider": "apimart", "prompt": "metrics: polled"})
    for task in (called_back, polled):
        relay.wait_succeeded(task["id"])
    wait_for(lambda: len(sink.delivered("/hooks")) == 2, 20, "both task.succeeded webhooks")
    wait_for(lambda: value(scrape(relay.url), "relay_callbacks_processed_total") == 3, 20,
             "the three copies of the callback to be processed")

    after = scrape(relay.url)
    for provider in ("evolink", "apimart"):
        assert value(after, "relay_task_status_changes_total", provider=provider, status="pending") == 1
        assert value(after, "relay_task_status_changes_total", provider=provider, status="succeeded") == 1
        assert value(after, "relay_tasks", provider=provider, status="succeeded") == 1
        assert value(after, "relay_provider_requests_total", provider=provider, kind="submit", outcome="ok") == 1
        assert value(after, "relay_provider_requests_total", provider=provider, kind="download", outcome="ok") >= 1
        assert value(after, "relay_archive_bytes_total", provider=provider) > 0
    # Callbacks: three copies acked at the door, one applied (or confirmed), the others changed nothing.
    assert value(after, "relay_callbacks_total", provider="evolink", outcome="acked") == 3
    assert value(after, "relay_callback_ack_seconds_count", provider="evolink") == 3
    assert value(after, "relay_callbacks_processed_total", provider="evolink", outcome="applied") >= 1
    assert value(after, "relay_callbacks_processed_total", provider="evolink", outcome="duplicate") >= 1
    assert value(after, "relay_provider_requests_total", provider="evolink", kind="confirm", outcome="ok") >= 1
    # The 429 on apimart's submit and the 500 on its poll: counted as requests; both asked again as planned re-runs
    # until the task's deadline (relay.jobs.submit, relay.jobs.poll), not as job failures that use up attempts.
    assert value(after, "relay_provider_requests_total", provider="apimart", kind="submit", outcome="rate_limited") == 1
    assert value(after, "relay_provider_rate_limited_total", provider="apimart", kind="submit") == 1
    assert value(after, "relay_provider_requests_total", provider="apimart", kind="poll", outcome="server_error") == 1
    assert value(after, "relay_provider_requests_total", provider="apimart", kind="poll", outcome="ok") >= 1
    assert value(after, "relay_job_failures_total", kind="poll", outcome="retry") == 0
    assert value(after, "relay_provider_unanswered_total", provider="apimart", kind="poll",
                 code="provider_unavailable") == 1
    assert value(after, "relay_provider_unanswered_total", provider="apimart", kind="submit", code="rate_limited") == 1
    requests = value(after, "relay_provider_requests_total")
    assert value(after, "relay_provider_request_seconds_count") == requests
    assert value(after, "relay_archive_seconds_count", outcome="archived") == 2
    # Deliveries: the two webhooks, one attempt each, with their latency.
    assert value(after, "relay_delivery_attempts_total", outcome="succeeded") == 2
    assert value(after, "relay_delivery_attempt_seconds_count", outcome="succeeded") == 2
    # The queue gauges read from the store: jobs by kind/state and a lag per kind, nothing waiting by now.
    assert any(name == "relay_jobs" for name, _ in after)
    assert value(after, "relay_queue_lag_seconds") < 5


def test_circuits_costs_and_archives_are_in_the_scrape(sim: Simulator, relay_factory: RelayFactory) -> None:
    """Every configured provider has a circuit state (0 closed); a provider answering 503 opens its circuit (2) while
    the task fails over and succeeds; today's cost of the serving provider is a gauge; an archive of a link counts
    its creation, start and success in relay_archive_status_changes_total."""
    relay = relay_factory(RELAY_FAILOVER_BREAKER_THRESHOLD="1", RELAY_FAILOVER_BREAKER_COOLDOWN="600")
    before = scrape(relay.url)
    for provider in ("evolink", "apimart", "gmicloud", "pixazo", "openai"):
        assert (("relay_provider_circuit_state", frozenset({("provider", provider)})) in before
                and value(before, "relay_provider_circuit_state", provider=provider) == 0)
    assert value(before, "relay_cost_today") == 0
    sim.faults(next=[{"dialect": "pixazo", "op": "submit", "fault": "503"}])
    task = relay.create({"provider": ["pixazo", "evolink"], "prompt": "metrics: failover"})
    done = relay.wait_succeeded(task["id"])
    link = done["images"][0]["url"]
    archive = relay.api.post("/v1/archives", json={"url": link})
    assert archive.status_code == 202, archive.text
    wait_for(lambda: relay.api.get(f"/v1/archives/{archive.json()['id']}").json()["status"] == "succeeded", 20,
             "the archive to succeed")
    after = scrape(relay.url)
    assert value(after, "relay_provider_circuit_state", provider="pixazo") == 2
    assert value(after, "relay_provider_circuit_state", provider="evolink") == 0
    assert value(after, "relay_cost_today", provider="evolink", currency="USD") == pytest.approx(
        done["cost"]["amount"])
    assert value(after, "relay_cost_today", provider="pixazo") == 0
    for status in ("pending", "archiving", "succeeded"):
        assert value(after, "relay_archive_status_changes_total", status=status) == 1, status
    assert value(after, "relay_task_status_changes_total", provider="link") == 0


@pytest.fixture
def database() -> Iterator[str]:
    with postgres_database() as dsn:
        yield dsn


def _per_process(metrics_dir: Path, tmp_path: Path) -> list[Samples]:
    """What each child counted on its own: its files read alone (MultiProcessCollector over a copy)."""
    found: dict[str, list[Path]] = {}
    for path in metrics_dir.glob("*.db"):
        found.setdefault(path.stem.rsplit("_", 1)[-1], []).append(path)
    result = []
    for pid, files in sorted(found.items()):
        alone = tmp_path / f"alone-{pid}"
        alone.mkdir()
        for path in files:
            shutil.copy(path, alone / path.name)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(alone))
        result.append({(s.name, frozenset(s.labels.items())): s.value
                       for family in registry.collect() for s in family.samples})
    return result


def test_processes_sum_their_counters_on_every_scrape(sim: Simulator, database: str, tmp_path: Path) -> None:
    """`relay serve --processes 2`: both children do work, and every scrape (whichever child answers) reports
    the sum of both children's counters."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    relay = Relay(sim, tmp_path / "data", tmp_path, name="processes", extra_args=["--processes", "2"],
                  extra_env={**replica_env(database, tmp_path / "images"), "TMPDIR": str(tmp)})
    try:
        relay.start()
        assert relay.process.proc is not None
        wait_for(lambda: len(child_pids(relay.process.proc.pid)) == 2 if relay.process.proc else False, 10,
                 "two processes")
        tasks = [relay.create({"provider": provider, "prompt": f"processes {i}"})
                 for i in range(4) for provider in ("gmicloud", "apimart", "pixazo")]
        for task in tasks:
            relay.wait_succeeded(task["id"], timeout=40)
        metrics_dir = next(tmp.glob("relay-metrics-*"))
        per_child = [s for s in _per_process(metrics_dir, Path(tempfile.mkdtemp(dir=tmp_path)))
                     if value(s, "relay_provider_requests_total") > 0]
        assert len(per_child) == 2, "both children sent provider requests"
        total_requests = sum(value(s, "relay_provider_requests_total") for s in per_child)
        for _ in range(6):      # new connections: the kernel hands them to either child
            samples = scrape(relay.url)
            assert value(samples, "relay_task_status_changes_total", status="pending") == len(tasks)
            assert value(samples, "relay_task_status_changes_total", status="succeeded") == len(tasks)
            assert value(samples, "relay_provider_requests_total") >= total_requests
            assert value(samples, "relay_tasks", status="succeeded") == len(tasks)
    finally:
        relay.close()
        if relay.process.logs:
            print(relay.process.output(tail=4000))
