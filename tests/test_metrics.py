"""relay.metrics in-process: the labels call sites get, and the gauges read from the store at a scrape (both
backends). The counters over real requests, and several processes, are tests/e2e/test_metrics.py's.
"""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from relay import ids, metrics
from relay.models import Job, Task
from relay.states import on_failure
from relay.store.base import Store

NOW = 1_790_000_000.0


@pytest.mark.parametrize(("status", "outcome"), [(200, "ok"), (202, "ok"), (429, "rate_limited"),
                                                 (404, "client_error"), (503, "server_error"),
                                                 (None, "transport_error")])
def test_a_request_outcome_is_named_by_its_status(status: int | None, outcome: str) -> None:
    """2xx ok, 429 rate_limited, other 4xx client_error, 5xx server_error, no answer transport_error."""
    assert metrics.request_outcome(status) == outcome


def test_a_request_kind_is_named_by_the_job_it_is_made_for() -> None:
    """A submit is a submit anywhere; otherwise the job tells: poll, confirm (a callback's), download; else other."""
    assert metrics.request_kind(submit=True, job_kind="callback") == "submit"
    assert metrics.request_kind(submit=False, job_kind="poll") == "poll"
    assert metrics.request_kind(submit=False, job_kind="callback") == "confirm"
    assert metrics.request_kind(submit=False, job_kind="archive") == "download"
    assert metrics.request_kind(submit=False, job_kind=None) == "other"


def _task(provider: str) -> tuple[Task, Job]:
    task = Task(id=ids.new_id("tsk", NOW), provider=provider, request={"prompt": "x"}, created_at=NOW, updated_at=NOW)
    job = Job(id=ids.new_id("job", NOW), kind="submit", task_id=task.id, run_at=NOW - 30,
              dedupe_key=f"submit:{task.id}")
    return task, job


async def test_a_scrape_reads_tasks_jobs_and_queue_lag_from_the_store(store: Store) -> None:
    """relay_tasks by provider/status, relay_jobs by kind/state and the lag of the oldest due job, per kind."""
    for provider in ("evolink", "evolink", "apimart"):
        task, job = _task(provider)
        await store.create_task(task, [job])
    await store.apply(task.id, lambda t: on_failure(t, "x", "y"), NOW)
    body, content_type = await metrics.exposition(store, NOW)
    assert content_type.startswith("text/plain; version=0.0.4")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(body.decode()) for s in family.samples}
    assert samples[("relay_tasks", (("provider", "evolink"), ("status", "pending")))] == 2
    assert samples[("relay_tasks", (("provider", "apimart"), ("status", "failed")))] == 1
    assert samples[("relay_jobs", (("kind", "submit"), ("state", "queued")))] == 3
    assert samples[("relay_queue_lag_seconds", (("kind", "submit"),))] == pytest.approx(30.0)
    assert ("relay_provider_requests_total", ()) not in samples      # labelled counters only, no bare ones


async def test_every_task_created_and_status_change_is_counted(store: Store) -> None:
    """A Store status listener sees each creation (pending) and each change after it commits, never a no-op."""
    store.on_task_status(metrics.task_status)

    def count(status: str) -> float:
        return REGISTRY.get_sample_value("relay_task_status_changes_total",
                                         {"provider": "pixazo", "status": status}) or 0.0
    pending, failed = count("pending"), count("failed")
    task, job = _task("pixazo")
    await store.create_task(task, [job])
    await store.apply(task.id, lambda t: on_failure(t, "x", "y"), NOW)
    await store.apply(task.id, lambda t: on_failure(t, "x", "y"), NOW)      # already failed: nothing written
    assert (count("pending") - pending, count("failed") - failed) == (1, 1)


def _samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


async def test_a_scrape_reads_circuit_states_and_todays_cost_from_the_store(store: Store) -> None:
    """relay_provider_circuit_state is 0 closed (also a configured provider with no circuit yet), 1 half-open,
    2 open; relay_cost_today sums the costs of tasks that ended today, by provider and currency, not yesterday's."""
    await store.circuit_failed("evolink", "503", NOW, threshold=1, cooldown=60)          # open
    await store.circuit_failed("pixazo", "503", NOW - 120, threshold=1, cooldown=60)     # open, cooled down …
    assert await store.circuit_admit("pixazo", NOW, 60)                                  # … half-open: a probe
    await store.circuit_failed("apimart", "503", NOW, threshold=5, cooldown=60)          # one failure: closed
    store.pricing = lambda task: {"amount": 0.25, "currency": "USD", "source": "estimated"}
    for when in (NOW - 86400, NOW, NOW):
        task, job = _task("gmicloud")
        await store.create_task(task, [job])
        await store.apply(task.id, lambda t: on_failure(t, "x", "y"), when)
    body, _ = await metrics.exposition(store, NOW, ["apimart", "evolink", "gmicloud", "pixazo"])
    samples = _samples(body)
    assert {p: samples[("relay_provider_circuit_state", (("provider", p),))]
            for p in ("apimart", "evolink", "gmicloud", "pixazo")} == {"apimart": 0, "evolink": 2, "gmicloud": 0,
                                                                        "pixazo": 1}
    assert samples[("relay_cost_today", (("currency", "USD"), ("provider", "gmicloud")))] == pytest.approx(0.5)
    assert [k for k in samples if k[0] == "relay_cost_today"] == [
        ("relay_cost_today", (("currency", "USD"), ("provider", "gmicloud")))]


async def test_every_archive_created_and_status_change_is_counted(store: Store) -> None:
    """A Store archive listener counts an archive's creation (pending), archiving and its outcome, once each after
    the commit, in relay_archive_status_changes_total (not in the tasks' counter)."""
    from relay.models import Archive
    from relay.sourcelinks import url_key
    from relay.store.base import ArchiveResult

    store.on_archive_status(metrics.archive_status)

    def count(status: str) -> float:
        return REGISTRY.get_sample_value("relay_archive_status_changes_total", {"status": status}) or 0.0
    before = {s: count(s) for s in ("pending", "archiving", "succeeded", "failed")}
    tasks_before = REGISTRY.get_sample_value("relay_task_status_changes_total", {"provider": "link",
                                                                                 "status": "succeeded"})
    archives = [Archive(id=ids.new_id("arc", NOW), source_url=url, url_key=url_key(url), expires_at=NOW + 3600,
                        created_at=NOW, updated_at=NOW) for url in ("https://cdn.test/a.png", "https://cdn.test/b.png")]
    made = await store.create_archives(archives, NOW)
    await store.create_archives(archives[:1], NOW)                   # the same link again: no new archive
    (ok, _), (bad, _) = made
    await store.archive_started(ok.id, NOW)
    await store.archive_started(ok.id, NOW)                          # already archiving: not counted again
    result = ArchiveResult(sha256="ab" * 32, content_type="image/png", width=8, height=8, bytes=100, path="ab/x.png")
    await store.image_archived(ok.images[0].id, result, NOW)
    await store.image_archived(ok.images[0].id, result, NOW)         # settled already: nothing
    await store.image_failed(bad.images[0].id, "source_expired", "gone", NOW)
    assert {s: count(s) - n for s, n in before.items()} == {"pending": 2, "archiving": 1, "succeeded": 1,
                                                            "failed": 1}
    assert REGISTRY.get_sample_value("relay_task_status_changes_total", {"provider": "link",
                                                                         "status": "succeeded"}) == tasks_before
