"""Prometheus metrics: what relay counts as it works, and the /metrics exposition.

Counted where it happens (prometheus-client counters and histograms, all labelled, base units):

    relay_task_status_changes_total{provider,status}          tasks created (pending) and each status reached
    relay_callbacks_total{provider,outcome}                   at the door: acked | rejected (bad token, junk body)
    relay_callback_ack_seconds{provider}                      arrival to 200 (the durable write)
    relay_callbacks_processed_total{provider,outcome}         applied | duplicate | ignored | rejected
    relay_provider_requests_total{provider,kind,outcome}      kind: submit | poll | confirm | download | other;
                                                              outcome: ok | rate_limited | client_error |
                                                              server_error | transport_error
    relay_provider_request_seconds{provider,kind}
    relay_provider_rate_limited_total{provider,kind}          the 429s among them
    relay_archive_bytes_total{provider}, relay_archive_seconds{outcome}
    relay_delivery_attempts_total{outcome}, relay_delivery_attempt_seconds{outcome}
                                                              outcome: succeeded | retry | gone | refused
    relay_job_failures_total{kind,outcome}                    outcome: retry | dead
    relay_archive_status_changes_total{status}                archives of any link (POST /v1/archives) created
                                                              (pending) and each status reached

Read from the store at each scrape (so every replica reports the same, whole-database values):

    relay_tasks{provider,status}        tasks by status
    relay_jobs{kind,state}              jobs by kind and state (queue depth)
    relay_queue_lag_seconds{kind}       how long the oldest due, unclaimed job has waited (0: none waiting)
    relay_provider_circuit_state{provider}   the provider's circuit breaker: 0 closed, 1 half-open, 2 open
    relay_cost_today{provider,currency}      the cost of the tasks that ended today (UTC), as priced by relay.costs

Archives count in their own counter rather than in relay_task_status_changes_total: an archive has no provider,
and with a made-up one every sum over tasks (by status, a provider's failure rate) would mix archives in.
Cost is a gauge read at the scrape, not a counter each process adds to: a task's cost is written in the
transaction that ends it, by whichever replica that is, and the database is its one record; a counter would
count each cost in one replica's process only (lost when it restarts), and a total over all time read from
the database would fall when retention deletes old tasks, which a counter must never do. Today's total is
what the Providers page and GET /v1/providers show; it starts again at 0 at midnight UTC.

Several processes (`relay serve --processes N`): the parent calls `use_multiprocess_dir` with a fresh
directory before forking, so every child writes its counters to files there (prometheus-client's
multiprocess mode), `process_exited` drops a dead child's live values, and a scrape that lands on any
child sums every child's counters (MultiProcessCollector). Separate replicas are scraped one by one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from relay.circuit import CLOSED, HALF_OPEN, OPEN
from relay.costs import cost_day
from relay.models import Event, Task, TaskStatus
from relay.stats import LATENCY_BUCKETS

if TYPE_CHECKING:     # providers record here, and providers never import the store
    from relay.store.base import Store

_requests_log = logging.getLogger("relay.providers")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"     # prometheus-client's own switch for multiprocess mode
# Archiving: a download and a verify; a big image over a slow link takes a while.
ARCHIVE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# A `_created` timestamp beside every counter doubles the exposition and tells a scraper nothing it needs.
disable_created_metrics()  # type: ignore[no-untyped-call]
CIRCUIT_STATE_VALUES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}

TASK_STATUS_CHANGES = Counter("relay_task_status_changes", "Tasks created (status pending) and status changes, "
                              "by provider and the status reached.", ["provider", "status"])
CALLBACKS = Counter("relay_callbacks", "Provider callbacks at the door: acked (recorded, 200) or rejected "
                    "(unknown provider or token: 404; a body that is not JSON: 400).", ["provider", "outcome"])
CALLBACK_ACK_SECONDS = Histogram("relay_callback_ack_seconds", "From a callback's arrival to its 200.",
                                 ["provider"], buckets=LATENCY_BUCKETS)
CALLBACKS_PROCESSED = Counter("relay_callbacks_processed", "Recorded callbacks after processing: applied (changed "
                              "the task), duplicate (repeated or stale: no change), ignored (not confirmed by the "
                              "provider, or the task had moved on), rejected (unreadable, unknown task).",
                              ["provider", "outcome"])
PROVIDER_REQUESTS = Counter("relay_provider_requests", "Requests to providers, by kind and outcome.",
                            ["provider", "kind", "outcome"])
PROVIDER_REQUEST_SECONDS = Histogram("relay_provider_request_seconds", "Latency of provider requests.",
                                     ["provider", "kind"], buckets=LATENCY_BUCKETS)
PROVIDER_RATE_LIMITED = Counter("relay_provider_rate_limited", "Provider answers 429 (Too Many Requests).",
                                ["provider", "kind"])
# Submits and polls run again as planned after these, so relay_job_failures_total no longer sees them; and junk at
# HTTP 200 counts as "ok" among the requests above (the body is read after the count). By the error's code:
# rate_limited, provider_unavailable (5xx, no connection, no answer), provider_protocol_error (junk).
PROVIDER_UNANSWERED = Counter("relay_provider_unanswered", "Submits and polls a provider did not answer usably "
                              "(each asked again later, or a submit moved to another provider), by the error's "
                              "code.", ["provider", "kind", "code"])
ARCHIVE_BYTES = Counter("relay_archive_bytes", "Bytes of images saved to the image store.", ["provider"])
ARCHIVE_SECONDS = Histogram("relay_archive_seconds", "Time to fetch, verify and store one image, by outcome "
                            "(archived, retry, failed).", ["outcome"], buckets=ARCHIVE_BUCKETS)
DELIVERY_ATTEMPTS = Counter("relay_delivery_attempts", "Webhook delivery attempts by outcome.", ["outcome"])
DELIVERY_SECONDS = Histogram("relay_delivery_attempt_seconds", "Latency of webhook delivery attempts.",
                             ["outcome"], buckets=LATENCY_BUCKETS)
ARCHIVE_STATUS_CHANGES = Counter("relay_archive_status_changes", "Archives of any link created (status pending) "
                                 "and status changes, by the status reached.", ["status"])
JOB_FAILURES = Counter("relay_job_failures", "Jobs that failed: retried later, or dead (attempts used up).",
                       ["kind", "outcome"])


# ---- what call sites record -------------------------------------------------------------------------
_children: dict[tuple[Any, tuple[str, ...]], Any] = {}


def labeled(metric: Any, *values: str) -> Any:
    """`metric.labels(*values)`, kept: prometheus-client checks the label names and takes a lock on every
    labels() call (1-1.5 µs, several per callback, job and request on the hot paths); the child it returns
    is the same every time, so it is looked up once per label set. Label values are a few fixed words and
    configured provider names, so this stays small."""
    key = (metric, values)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*values)
    return child


# The job a non-submit provider request is made for tells its kind: a poll, or the confirmation of a callback.
_KIND_OF_JOB = {"submit": "submit", "poll": "poll", "callback": "confirm", "callback_body": "confirm",
                "archive": "download"}


def request_kind(*, submit: bool, job_kind: str | None) -> str:
    """submit | poll | confirm | download | other (outside a job: a cancel from the API)."""
    return "submit" if submit else _KIND_OF_JOB.get(job_kind or "", "other")


def request_outcome(status_code: int | None) -> str:
    """A provider request's outcome label from its status (None: no answer)."""
    if status_code is None:
        return "transport_error"
    if status_code == 429:
        return "rate_limited"
    if 200 <= status_code < 300:
        return "ok"
    return "client_error" if status_code < 500 else "server_error"


def provider_request(provider: str, kind: str, status_code: int | None, seconds: float, *, what: str,
                     error: str | None = None) -> None:
    """Count one provider request and log its outcome in one line (`what`: the request, e.g. "GET /v1/x";
    `error`: why no answer came)."""
    outcome = request_outcome(status_code)
    labeled(PROVIDER_REQUESTS, provider, kind, outcome).inc()
    labeled(PROVIDER_REQUEST_SECONDS, provider, kind).observe(seconds)
    if status_code == 429:
        labeled(PROVIDER_RATE_LIMITED, provider, kind).inc()
    _requests_log.log(logging.INFO if outcome == "ok" else logging.WARNING, "%s %s %s → %s in %.0f ms", provider,
                      kind, what, status_code if status_code is not None else error or "no answer", seconds * 1000,
                      extra={"provider": provider, "kind": kind, "outcome": outcome, "status_code": status_code,
                             "latency_ms": round(seconds * 1000, 1)})


def task_status(task: Task, status: TaskStatus, event: Event | None) -> None:
    """A Store status listener (Store.on_task_status)."""
    labeled(TASK_STATUS_CHANGES, task.provider, status.value).inc()


def archive_status(archive_id: str, status: TaskStatus) -> None:
    """A Store archive status listener (Store.on_archive_status)."""
    labeled(ARCHIVE_STATUS_CHANGES, status.value).inc()


# ---- several processes --------------------------------------------------------------------------------
def use_multiprocess_dir(path: str) -> None:
    """Count in files under `path` from now on (call before forking the children, with an empty directory)."""
    os.environ[MULTIPROC_ENV] = path
    # prometheus-client picks its value class when first imported; a labelled metric makes its values
    # when a label set is first used, so switching now covers every metric above.
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    _children.clear()      # nothing is labelled before this switch; cleared so that stays true if it ever is


def process_exited(pid: int) -> None:
    """A child is gone: its live gauges stop counting (its counters stay in the sums, as counters must)."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


# ---- the exposition -------------------------------------------------------------------------------------
class _Families(Collector):
    """Metric families made before the scrape (the store's reads are async, collectors are not)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


class _Delegate(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterable[Metric]:
        return self.registry.collect()


async def store_families(store: Store, now: float, providers: Iterable[str] = ()) -> list[Metric]:
    """The gauges read from the store: tasks by status, jobs by kind and state, queue lag by kind, circuit
    states (of `providers`, the configured ones, and any other with a circuit) and today's costs."""
    tasks = GaugeMetricFamily("relay_tasks", "Tasks by provider and status.", labels=["provider", "status"])
    for (provider, status), n in sorted((await store.task_counts()).items()):
        tasks.add_metric([provider, status], n)
    jobs = GaugeMetricFamily("relay_jobs", "Jobs in the queue by kind and state.", labels=["kind", "state"])
    kinds = set()
    for key, n in sorted((await store.job_counts()).items()):
        kind, state = key.split(":", 1)
        kinds.add(kind)
        jobs.add_metric([kind, state], n)
    lag = GaugeMetricFamily("relay_queue_lag_seconds", "How long the oldest due job no worker holds has waited, "
                            "by kind (0: none waiting).", labels=["kind"])
    oldest = await store.oldest_due_jobs(now)
    for kind in sorted(kinds | set(oldest)):
        lag.add_metric([kind], max(0.0, now - oldest[kind]) if kind in oldest else 0.0)
    circuit = GaugeMetricFamily("relay_provider_circuit_state", "The provider's circuit breaker: 0 closed, "
                                "1 half-open (one probe submit admitted), 2 open (skipped).", labels=["provider"])
    circuits = await store.circuits()
    for name in sorted(set(providers) | set(circuits)):
        c = circuits.get(name)
        circuit.add_metric([name], CIRCUIT_STATE_VALUES.get(c.state, 0) if c is not None else 0)
    cost = GaugeMetricFamily("relay_cost_today", "Cost of the tasks that ended today (UTC), by provider and "
                             "currency (the configured prices; see GET /v1/providers).",
                             labels=["provider", "currency"])
    today = cost_day(now)
    for row in sorted(await store.cost_totals(today), key=lambda r: (r["provider"], r["currency"])):
        if row["day"] == today:
            cost.add_metric([row["provider"], row["currency"]], row["amount"])
    return [tasks, jobs, lag, circuit, cost]


async def exposition(store: Store, now: float, providers: Iterable[str] = ()) -> tuple[bytes, str]:
    """The /metrics body and its content type: this process's (or all children's) counters and the store's gauges
    (`providers`: the configured provider names, each with a circuit state even before its first submit)."""
    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry.register(_Delegate(REGISTRY))
    registry.register(_Families(await store_families(store, now, providers)))
    # 0.0.4: the text format every Prometheus (and other scraper) reads, and what generate_latest writes.
    return generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4
