"""The chaos scenario: a load of tasks across all five dialects, provider faults, a failing subscriber,
and relay SIGKILLed and restarted on the same data dir, again and again; then every guarantee is checked.

    report = run_chaos(size=50, kills=3, seed=1234, workdir=Path("/tmp/chaos"))
    assert not report.problems, report.summary()
    run_chaos(size=400, kills=20, seed=1, workdir=…, database="postgresql", replicas=3)   # replicas mode

Replicas mode (`--database postgresql --replicas N`): a fresh PostgreSQL database (tests/pg.py, dropped
at the end) shared by N `relay serve` replicas, each on its own port and data dir, with one signing
secret and one images directory. Tasks are created through the replicas in turn; each kill hits a
random replica (the others carry on) and the restart brings that one back; the resends with the same
Idempotency-Key go to another replica than the first request. Every check below holds as in the
single-relay mode, and each archived image is fetched from every replica. SQLite is for one process:
it runs with one replica only.

Real processes over real sockets: `relay simulate` and `relay serve` are child processes
(tests/e2e/harness.py), the subscribers are tests/sink.py in a thread of this process. Every
random choice (task mix, prompt directives, injected faults, when to kill, how long relay stays
down, when the subscriber recovers) comes from one `random.Random(seed)`; the timing of the
processes themselves does not, so a seed reproduces the plan, not every interleaving.

What is planned up front, per task, from the directives it is given:
    ok        succeeded
    fail      [sim:fail]           failed, content_policy_violation
    cancel    [sim:cancel]         canceled (pixazo reports it as a failure: failed, provider_failed)
    client_cancel                  canceled (POST /v1/tasks/{id}/cancel while the provider still works)
    expired   [sim:ttl=0]          failed, source_gone | source_expired, "link" in the message
    drop      [sim:callback=drop]  evolink only: succeeded (the safety-net poll finds it)
One outcome is allowed on top, for a provider that does not dedupe submits (all but apimart): a
task whose submit was unanswered when relay was killed fails as `submit_outcome_unknown` (never
resent: no double billing). It is allowed only for a task created before some kill, and counted.

Failover: about a quarter of the tasks name a provider list (`"provider": ["evolink", "apimart"]`, mostly two or
three, a few of one) holding their dialect and others that can be given the same kind of task, with a shape every
member supports (relay.routing answers 422 otherwise; one such request is checked to be refused). The planned
outcome follows the provider the task ends at. 500s and 503s (with Retry-After) on submits move such a task on,
and bursts of six 503s on one provider's submits open its circuit (relay's breaker threshold is 5; the cooldown
is BREAKER_COOLDOWN), so tasks with another provider left skip it.

Besides, some tasks are canceled by the client right after creation (client_cancel: canceled), and
after every restart the last tasks sent before it are sent again with the same Idempotency-Key
(relay must answer 200 with the same task).

Faults injected besides the directives (none of them may change a task's outcome):
    provider: 429 (Retry-After) and 500 on submit, poll and download; 503 (Retry-After) on submit, some
    in bursts; held answers (timeouts) on apimart's submit (resent with the same Idempotency-Key) and on
    polls and downloads; truncated downloads; malformed poll answers (and a malformed apimart submit
    answer); every EvoLink callback sent twice plus a stale one after it; callbacks to a relay that is
    down (retried 1/2/4 s; one outage lasts longer than those retries, so only the safety-net poll can
    finish those tasks).
    subscribers: "/all" (task.*) answers 503 from the start until a random moment; "/final"
    (terminal events) answers 500, 429 with Retry-After and one answer slower than relay's delivery
    timeout before it behaves; "/task" (some tasks' own webhook_url) fails twice.

Checked at the end (every problem is collected; `report.problems` empty means all held):
    every task terminal, with its planned outcome;
    every archived image byte-identical (sha256 of GET /v1/images/{id}) to what the simulator served;
    no provider task created twice for one relay task;
    across all providers, each relay task made (at the simulator) by at most one, the one that is its final
    `provider`; its `providers` is its list, its `attempts` / `providers_tried` follow that list in order, each
    once, the ones left behind with a move outcome (refused, unavailable, rate_limited, skipped), the last one
    at its provider (accepted iff it has a provider task); a task with one provider never moves; per provider,
    the simulator got at least as many submits as relay's non-skipped moves plus accepted tasks there, and
    at least as many 5xx / 429 / 4xx answers as moves recorded as unavailable / rate_limited / refused;
    every event of GET /v1/events that a subscriber's filter takes reached it with a valid Standard
    Webhooks signature (the `standardwebhooks` library) and a payload matching the event; duplicates
    only with a repeated webhook-id; per task, every `sequence` value present; nothing extra;
    every delivery relay recorded ends succeeded (none pending, none dead-lettered); every callback
    that reached relay was answered 2xx; no job gave up; relay's output has no traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay.config import PROVIDER_KINDS
from relay.errors import Unsupported
from relay.models import GenerationRequest
from relay.providers import PROVIDER_KINDS as ADAPTERS
from relay.providers import check_supported
from tests.e2e.harness import (
    TERMINAL,
    Relay,
    Simulator,
    postgres_database,
    replica_env,
    start_all,
    wait_for,
)
from tests.sink import Received, Sink

TAG = re.compile(r"chaos-\d{5}\.")
DIALECTS = PROVIDER_KINDS                       # gmicloud, apimart, evolink, pixazo, openai
IDEMPOTENT_SUBMIT = ("apimart",)               # resends a submit with the same Idempotency-Key
FINAL_TYPES = ("task.succeeded", "task.failed", "task.canceled")
TASK_WEBHOOK_TYPES = ("task.succeeded", "task.failed")

# What each dialect may be asked for (all accepted by relay and the simulator).
SHAPES: dict[str, list[dict[str, Any]]] = {
    "gmicloud": [{"size": "1024x1024"}, {"size": "1024x1536", "output_format": "jpeg"}],
    "apimart": [{"size": "1024x1024"}, {"size": "1536x1024", "n": 2}, {"size": "1024x1536", "output_format": "jpeg"}],
    "evolink": [{"size": "1024x1024"}, {"size": "1536x1024"}],
    "pixazo": [{"size": "1024x1024"}, {"size": "1024x1536", "output_format": "webp"}],
    "openai": [{"size": "1024x1024"}, {"size": "1536x1024", "output_format": "webp", "n": 2}],
}
# Kinds of task each dialect can be given (see the module docstring); "ok" fills the rest.
KIND_SHARES: dict[str, float] = {"fail": 0.12, "cancel": 0.1, "expired": 0.12, "drop": 0.3, "client_cancel": 0.06}
KINDS_OF: dict[str, tuple[str, ...]] = {
    "gmicloud": ("fail", "cancel", "expired", "client_cancel"),
    "apimart": ("fail", "cancel", "expired", "client_cancel"),
    "evolink": ("fail", "cancel", "expired", "drop", "client_cancel"),
    "pixazo": ("fail", "cancel", "expired", "client_cancel"),
    "openai": ("fail",),
}
DIRECTIVE = {"ok": "", "fail": "[sim:fail]", "cancel": "[sim:cancel]", "expired": "[sim:ttl=0]",
             "drop": "[sim:callback=drop]", "client_cancel": ""}
CLIENT_CANCEL_DURATION = 4.0     # long enough to still be running when the client cancels it
# Failover: this share of the tasks names a list of providers (mostly 2 or 3, a few just one) instead of one.
LIST_SHARE = 0.25
# What relay records for a provider a task moved on from (relay.routing.moves_on, or its circuit open).
MOVE_OUTCOMES = ("refused", "unavailable", "rate_limited", "skipped")
BREAKER_COOLDOWN = 5.0          # seconds: an open circuit is probed again within the run

# Provider request timeouts (s) in relay, and how long the simulator holds a "timeout" answer.
# apimart's is short: its submits are held on purpose and resent safely. OpenAI answers only when
# the image is made (synchronous), so it gets room; no timeouts are injected on it.
PROVIDER_TIMEOUTS = {"gmicloud": 4, "apimart": 2, "evolink": 4, "pixazo": 4, "openai": 10}
SIM_HOLD_SECONDS = 6.0
# Delivery retry schedule: long enough (about 80 s of retries) to outlast the subscriber's outage.
DELIVERY_SCHEDULE = "0,0.3,0.6,1,1.5," + ",".join(["2"] * 38)
DATABASES = ("sqlite", "postgresql")


@dataclass
class TaskPlan:
    index: int
    provider: str
    kind: str
    body: dict[str, Any]
    webhook: bool
    id: str = ""
    created_at: float = 0.0       # time.monotonic() when relay accepted it
    sent: dict[str, Any] = field(default_factory=dict)   # the body as POSTed (with its Idempotency-Key)
    providers: tuple[str, ...] = ()   # a provider list in failover order (empty: a plain provider name)
    final: str = ""                   # the provider the task ended at (relay's `provider` at the end)

    @property
    def order(self) -> tuple[str, ...]:
        """The providers relay may try, in order (`providers` of the task)."""
        return self.providers or (self.provider,)

    @property
    def ended_at(self) -> str:
        return self.final or self.provider

    @property
    def tag(self) -> str:
        return f"chaos-{self.index:05d}."

    @property
    def n(self) -> int:
        return int(self.body.get("n", 1))

    def expected(self) -> tuple[str, tuple[str, ...]]:
        """(status, allowed error codes) planned from the directive."""
        if self.kind in ("ok", "drop"):
            return "succeeded", ()
        if self.kind == "client_cancel":
            return "canceled", ()
        if self.kind == "fail":
            return "failed", ("content_policy_violation",)
        if self.kind == "cancel":
            return ("failed", ("provider_failed",)) if self.ended_at == "pixazo" else ("canceled", ())
        return "failed", ("source_gone", "source_expired")          # expired


@dataclass
class ChaosReport:
    seed: int
    size: int
    kills: int
    database: str = "sqlite"
    replicas: int = 1
    tasks: int = 0
    planned: dict[str, int] = field(default_factory=dict)         # by kind
    outcomes: dict[str, int] = field(default_factory=dict)        # by final status
    submit_unknown_after_kill: int = 0
    faults: dict[str, int] = field(default_factory=dict)          # injected, by kind
    events: int = 0                                               # in GET /v1/events
    events_verified: int = 0                                      # (subscriber, event) pairs checked
    deliveries_received: int = 0                                  # every request the sink got
    deliveries_refused: int = 0                                   # answered non-2xx on purpose
    duplicate_deliveries: int = 0                                 # extra 2xx receipts of one event
    duplicate_webhook_ids: int = 0                                # events received more than once
    images_verified: int = 0
    idempotent_resends: int = 0                                   # same Idempotency-Key after a restart
    listed: int = 0                                               # tasks naming a provider list
    failed_over: int = 0                                          # of those, tasks that moved on at least once
    moves: dict[str, int] = field(default_factory=dict)           # recorded moves, by outcome
    ended_at: dict[str, int] = field(default_factory=dict)        # listed tasks by final provider
    jobs_left: dict[str, int] = field(default_factory=dict)       # relay's job table at the end
    seconds: float = 0.0
    workdir: str = ""
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            (f"chaos: seed={self.seed} size={self.size} kills={self.kills}{self.mode()} ({self.seconds:.1f} s, "
             f"workdir {self.workdir})"),
            f"  tasks: {self.tasks}  planned: {_fmt(self.planned)}",
            f"  outcomes: {_fmt(self.outcomes)}  (submit_outcome_unknown after a kill: "
            f"{self.submit_unknown_after_kill})",
            f"  faults injected: {_fmt(self.faults)}",
            f"  events: {self.events}  verified at subscribers: {self.events_verified}  images verified: "
            f"{self.images_verified}  idempotent resends after a restart: {self.idempotent_resends}",
            f"  deliveries received: {self.deliveries_received} (refused on purpose: {self.deliveries_refused})  "
            f"duplicates: {self.duplicate_deliveries} of {self.duplicate_webhook_ids} events, each with its "
            "repeated webhook-id",
            f"  jobs left in relay: {_fmt(self.jobs_left)}",
            f"  failover: {self.listed} tasks with a provider list, {self.failed_over} moved on; moves: "
            f"{_fmt(self.moves)}; ended at: {_fmt(self.ended_at)}",
        ]
        if self.problems:
            lines.append(f"  PROBLEMS ({len(self.problems)}), reproduce the plan with seed {self.seed}:")
            lines.extend(f"    - {p}" for p in self.problems[:60])
            if len(self.problems) > 60:
                lines.append(f"    … and {len(self.problems) - 60} more")
        else:
            lines.append("  every guarantee held")
        return "\n".join(lines)


    def mode(self) -> str:
        """"" for the classic single relay on SQLite; else the database and the number of replicas."""
        if (self.database, self.replicas) == ("sqlite", 1):
            return ""
        return f" database={self.database} replicas={self.replicas}"


def _fmt(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items()) if v) or "none"


# ---- the plan ---------------------------------------------------------------------------------------
def plan_tasks(size: int, rng: random.Random) -> list[TaskPlan]:
    """`size` tasks, round-robin over the dialects, each with its kind, shape, duration and maybe a webhook."""
    per_dialect: dict[str, int] = Counter(DIALECTS[i % len(DIALECTS)] for i in range(size))
    plans: list[TaskPlan] = []
    for provider, count in per_dialect.items():
        kinds: list[str] = []
        for kind in KINDS_OF[provider]:
            kinds += [kind] * max(1, round(KIND_SHARES[kind] * count)) if count >= 4 else []
        kinds = (kinds + ["ok"] * count)[:count]
        rng.shuffle(kinds)
        for kind in kinds:
            listed = provider_list(provider, kind, rng) if rng.random() < LIST_SHARE else ()
            members = listed or (provider,)
            # OpenAI answers the submit itself when the image is made (a held request): kept short, or most
            # of them would be in flight at a kill and end as submit_outcome_unknown.
            duration = round(rng.uniform(0.2, 0.6) if "openai" in members else rng.uniform(0.3, 2.0), 1)
            if kind == "client_cancel":
                duration = CLIENT_CANCEL_DURATION
            words = rng.choice(("lighthouse", "harbour", "comet", "orchard", "glacier", "tram"))
            prompt = f"chaos {words} {DIRECTIVE[kind]} [sim:duration={duration}]"   # + its tag, below
            shape = rng.choice(shapes_for(members)) if listed else rng.choice(SHAPES[provider])
            body: dict[str, Any] = {"provider": list(listed) if listed else provider, "prompt": prompt, **shape}
            plans.append(TaskPlan(index=0, provider=members[0], kind=kind, body=body, webhook=rng.random() < 0.25,
                                  providers=listed))
    rng.shuffle(plans)
    for i, plan in enumerate(plans):
        plan.index = i
        plan.body["prompt"] = f"{plan.tag} {plan.body['prompt']}"   # finds its provider task(s) at the simulator
        plan.body["metadata"] = {"chaos": i}
    return plans


def provider_list(provider: str, kind: str, rng: random.Random) -> tuple[str, ...]:
    """A failover list holding `provider` (at a random place) and 1 or 2 others (a few lists of one), each of
    which can be given this kind of task; () when no other provider can (e.g. `drop`: evolink only)."""
    others = [d for d in DIALECTS if d != provider and (kind == "ok" or kind in KINDS_OF[d])]
    length = rng.choice((1, 2, 2, 2, 3, 3, 3))
    if length > 1 and not others:
        return ()
    members = [provider, *rng.sample(others, min(length - 1, len(others)))]
    rng.shuffle(members)
    return tuple(members)


def shapes_for(members: tuple[str, ...]) -> list[dict[str, Any]]:
    """The shapes of SHAPES (any member's) that every member supports (relay.routing.plan: else a 422)."""
    found: list[dict[str, Any]] = []
    for shape in (s for m in members for s in SHAPES[m]):
        request = GenerationRequest.from_dict({"prompt": "x", **shape})
        try:
            for name in members:
                check_supported(ADAPTERS[name].caps, request, name)
        except Unsupported:
            supported = False
        else:
            supported = True
        if supported and shape not in found:
            found.append(shape)
    assert found, members           # 1024x1024 PNG: every dialect
    return found


def plan_faults(size: int, rng: random.Random) -> list[dict[str, Any]]:
    """One-shot provider faults (`next` rules of POST /_sim/faults), about one per task."""
    polled = ("gmicloud", "apimart", "pixazo", "evolink")          # evolink: the callback's confirmation
    menu: list[tuple[tuple[str, ...], str, str]] = [
        (DIALECTS, "submit", "429"), (DIALECTS, "submit", "500"), (DIALECTS, "submit", "503"),
        (("apimart",), "submit", "timeout"), (("apimart",), "submit", "malformed"),
        (polled, "poll", "429"), (polled, "poll", "500"), (polled, "poll", "timeout"), (polled, "poll", "malformed"),
        (polled, "download", "truncate"), (polled, "download", "timeout"), (polled, "download", "500"),
        (polled, "download", "429"),
    ]
    rules = []
    for _ in range(max(len(menu), size)):
        dialects, op, fault = rng.choice(menu)
        rule: dict[str, Any] = {"dialect": rng.choice(dialects), "op": op, "fault": fault,
                                "count": rng.choice((1, 1, 2))}
        if fault in ("429", "503"):
            rule["retry_after"] = rng.choice((0.5, 1))
        rules.append(rule)
    # A few bursts of 503 on one provider's submits (past relay's breaker threshold of 5): its circuit opens,
    # tasks with another provider left skip it until a probe after BREAKER_COOLDOWN.
    for _ in range(max(1, size // 100)):
        at = rng.randrange(len(rules) + 1)
        rules.insert(at, {"dialect": rng.choice(DIALECTS), "op": "submit", "fault": "503", "count": 6,
                          "retry_after": 0.5})
    return rules


# ---- the run ------------------------------------------------------------------------------------------
def relay_env(subscriber_timeout: float) -> dict[str, str]:
    env = {
        "RELAY_CALLBACKS_SAFETY_NET_SECONDS": "2",       # poll a callback task 2 s after submit if nothing came
        "RELAY_ARCHIVE_TIMEOUT": "2",
        "RELAY_WORKER_CONCURRENCY": "64",
        "RELAY_DELIVERIES_SCHEDULE": DELIVERY_SCHEDULE,
        "RELAY_DELIVERIES_TIMEOUT": str(subscriber_timeout),
        "RELAY_FAILOVER_BREAKER_COOLDOWN": str(BREAKER_COOLDOWN),
    }
    for kind in DIALECTS:
        env[f"RELAY_PROVIDERS_{kind.upper()}_TIMEOUT"] = str(PROVIDER_TIMEOUTS[kind])
        env[f"RELAY_PROVIDERS_{kind.upper()}_RATE_LIMIT"] = "100"
    return env


class _Run:
    def __init__(self, size: int, kills: int, seed: int, workdir: Path, database: str = "sqlite",
                 replicas: int = 1) -> None:
        self.rng = random.Random(seed)
        self.report = ChaosReport(seed=seed, size=size, kills=kills, workdir=str(workdir), database=database,
                                  replicas=replicas)
        self.workdir = workdir
        self.relays: list[Relay] = []
        self._turn = 0
        self.kill_times: list[float] = []
        self.plans = plan_tasks(size, self.rng)
        self.rules = plan_faults(size, self.rng)
        self.subscriber_timeout = 2.0

    def problem(self, text: str) -> None:
        self.report.problems.append(text)

    # ---- the replicas ----------------------------------------------------------------------------------
    def _via(self) -> Relay:
        """The next running replica, in turn (the only one in the single-relay mode)."""
        running = [r for r in self.relays if r.process.running] or self.relays
        self._turn += 1
        return running[self._turn % len(running)]

    def _check_alive(self) -> None:
        """Every replica that should be running is (a killed one is not checked until it is started again)."""
        for relay in self.relays:
            relay.process.check_alive()

    # ---- phases -----------------------------------------------------------------------------------
    def execute(self, sim: Simulator, relays: list[Relay], sink: Sink) -> None:
        rng, report = self.rng, self.report
        self.relays = relays
        relay = relays[0]
        sim.faults(timeout_seconds=SIM_HOLD_SECONDS, callbacks={"duplicate": 2, "reorder": True})
        subs = {
            "/all": self._subscribe(relay, sink.url("/all"), ["task.*"]),
            "/final": self._subscribe(relay, sink.url("/final"), list(FINAL_TYPES)),
        }
        secrets = {path: sub["secret"] for path, sub in subs.items()}
        response = relay.api.get("/v1/webhook-secret")
        assert response.status_code == 200, response.text
        secrets["/task"] = response.json()["secret"]
        self._check_unsupported_list(relay)

        # Subscribers: "/all" is down from the start until a random moment; the others misbehave a little.
        sink.default("/all", status=503)
        sink.script("/final", {"status": 500}, {"status": 500}, {"status": 429, "retry_after": 1},
                    {"delay": self.subscriber_timeout + 1.0}, {"status": 502})
        sink.script("/task", {"status": 500}, {"status": 503})
        outage = rng.uniform(3.0, 8.0)
        recover = threading.Timer(outage, lambda: sink.default("/all", status=200))
        recover.daemon = True
        recover.start()

        # Waves of tasks; after each, relay is SIGKILLed at a random moment and restarted on the same data dir.
        # One of the outages outlasts the simulator's callback retries (1 + 2 + 4 s): those callbacks are
        # lost for good, and only the safety-net poll can finish their tasks.
        waves = max(1, report.kills)
        long_down = rng.randrange(report.kills) if report.kills else -1
        bounds = [round(i * len(self.plans) / waves) for i in range(waves + 1)]
        rule_bounds = [round(i * len(self.rules) / waves) for i in range(waves + 1)]
        try:
            for wave in range(waves):
                # Each wave's share of the provider faults, so few are left for the last tasks alone (a job
                # hit by twelve in a row would rightly give up, and that would test nothing).
                sim.faults(next=self.rules[rule_bounds[wave]:rule_bounds[wave + 1]])
                if wave:
                    self._resend_after_restart(self.plans[bounds[wave - 1]:bounds[wave]])
                for plan in self.plans[bounds[wave]:bounds[wave + 1]]:
                    self._create(self._via(), sink, plan)
                if wave < report.kills:
                    time.sleep(rng.uniform(0.1, 1.5))      # chaos timing (a random moment), not a wait for a condition
                    # (one replica: no draw, so a seed plans the single-relay run as it always did)
                    victim = relays[rng.randrange(len(relays))] if len(relays) > 1 else relay
                    victim.kill()
                    self.kill_times.append(time.monotonic())
                    down = rng.uniform(7.5, 8.5) if wave == long_down else rng.uniform(0.1, 2.0)
                    time.sleep(down)                       # it stays down: callbacks to it hit a closed port
                    victim.start()
            relay = self._via()
            self._wait_terminal(relay)
        finally:
            recover.cancel()
        sink.default("/all", status=200)                   # (if the outage outlived the load)
        report.tasks = len(self.plans)

        tasks = {p.id: relay.task(p.id) for p in self.plans}
        for plan in self.plans:
            plan.final = tasks[plan.id]["provider"]
        self._check_tasks(tasks)
        self._check_images(sim, relay, tasks)
        self._check_failover(sim, tasks)
        events = self._all_events(relay)
        report.events = len(events)
        self._check_event_log(tasks, events)
        expected = self._expected_deliveries(events)
        self._wait_deliveries(relay, sink, expected)
        self._check_deliveries(sink, secrets, events, expected)
        self._check_delivery_records(relay)
        self._check_callbacks(sim)
        self._count_faults(sim, sink)
        self.report.jobs_left = relay.job_counts()
        dead = {k: n for k, n in self.report.jobs_left.items() if k.endswith(":dead")}
        if dead:
            self.problem(f"jobs gave up (dead): {dead}")

    def _create(self, relay: Relay, sink: Sink, plan: TaskPlan) -> None:
        body = dict(plan.body)
        if plan.webhook:
            body["webhook_url"] = sink.url("/task")
            body["webhook_events"] = list(TASK_WEBHOOK_TYPES)
        plan.sent = body
        plan.id = relay.create(body, headers={"Idempotency-Key": plan.tag})["id"]
        plan.created_at = time.monotonic()
        if plan.kind == "client_cancel":
            response = relay.api.post(f"/v1/tasks/{plan.id}/cancel")
            if response.status_code != 200 or response.json().get("status") != "canceled":
                self.problem(f"task {plan.id} ({plan.provider}): cancel → {response.status_code} {response.text}")

    def _resend_after_restart(self, previous_wave: list[TaskPlan]) -> None:
        """A client that did not see its answer sends again with the same Idempotency-Key: relay, restarted
        since, returns the task it made (200), never a second one (replicas: another one than the first time)."""
        for plan in previous_wave[-2:]:
            response = self._via().api.post("/v1/tasks", json=plan.sent, headers={"Idempotency-Key": plan.tag})
            if response.status_code != 200 or response.json().get("id") != plan.id:
                self.problem(f"task {plan.id}: the same Idempotency-Key after a restart → {response.status_code} "
                             f"{response.text[:300]}")
            else:
                self.report.idempotent_resends += 1

    def _subscribe(self, relay: Relay, url: str, events: list[str]) -> dict[str, Any]:
        response = relay.api.post("/v1/subscriptions", json={"url": url, "events": events,
                                                             "description": "chaos"})
        assert response.status_code == 201, f"POST /v1/subscriptions → {response.status_code} {response.text}"
        sub: dict[str, Any] = response.json()
        return sub

    def _wait_terminal(self, relay: Relay) -> None:
        pending = {p.id for p in self.plans}
        deadline = 45.0 + 0.5 * len(self.plans)

        def all_terminal() -> bool:
            self._check_alive()
            for task_id in sorted(pending):
                if relay.task(task_id)["status"] in TERMINAL:
                    pending.discard(task_id)
                else:
                    break                  # look again next round (one request per round while it works)
            return not pending

        try:
            wait_for(all_terminal, deadline, "every task to be terminal", interval=0.1)
        except AssertionError:
            for task_id in sorted(pending):
                task = relay.task(task_id)
                plan = next(p for p in self.plans if p.id == task_id)
                self.problem(f"task {task_id} ({plan.provider}, {plan.kind}) is stuck in {task['status']} "
                             f"after {deadline:.0f} s; jobs: {relay.job_counts()}")
            raise _Stop() from None

    # ---- tasks and images ------------------------------------------------------------------------------
    def _check_tasks(self, tasks: dict[str, dict[str, Any]]) -> None:
        report = self.report
        report.planned = dict(Counter(p.kind for p in self.plans))
        report.outcomes = dict(Counter(t["status"] for t in tasks.values()))
        for plan in self.plans:
            task = tasks[plan.id]
            status, codes = plan.expected()
            error = task.get("error") or {}
            got = f"{task['status']} {error.get('code', '')}".strip()
            if task["status"] == status and (not codes or error.get("code") in codes):
                if plan.kind == "expired" and "link" not in error.get("message", "").lower():
                    self.problem(f"task {plan.id} ({plan.provider}, expired) failed without naming the link: {error}")
                continue
            if (task["status"] == "failed" and error.get("code") == "submit_outcome_unknown"
                    and plan.ended_at not in IDEMPOTENT_SUBMIT and task["provider_task_id"] is None
                    and any(k > plan.created_at for k in self.kill_times)):
                report.submit_unknown_after_kill += 1   # its submit was unanswered at a kill: not resent
                continue
            want = f"{status} {'|'.join(codes)}".strip()
            self.problem(f"task {plan.id} ({plan.provider}, {plan.kind}, prompt {plan.body['prompt']!r}) ended "
                         f"{got} ({error.get('message', '')}), planned {want}")

    def _check_images(self, sim: Simulator, relay: Relay, tasks: dict[str, dict[str, Any]]) -> None:
        for plan in self.plans:
            task = tasks[plan.id]
            if task["status"] != "succeeded":
                continue
            at_sim = sim.task(plan.ended_at, task["provider_task_id"])
            served = at_sim["images"]
            if len(task["images"]) != plan.n or len(served) != plan.n:
                self.problem(f"task {plan.id}: {len(task['images'])} images archived, {len(served)} served, "
                             f"{plan.n} asked for")
                continue
            for image in task["images"]:
                expected = served[image["index"]]["sha256"]
                verified = True
                for replica in self.relays:                 # every replica serves every image
                    response = replica.api.get(f"/v1/images/{image['id']}")
                    digest = hashlib.sha256(response.content).hexdigest() if response.status_code == 200 else None
                    etag = response.headers.get("etag")
                    if response.status_code != 200 or not digest == image["sha256"] == expected \
                            or etag != f'"{expected}"':
                        verified = False
                        self.problem(f"image {image['id']} of task {plan.id} from {replica.process.name}: GET → "
                                     f"{response.status_code}, sha256 {digest}, ETag {etag}, recorded "
                                     f"{image['sha256']}, the simulator served {expected}")
                if verified:
                    self.report.images_verified += 1
        # No provider task created twice for one relay task (a blindly resent submit would show up here),
        # and a relay task's provider id is the provider task made for it.
        made: dict[str, list[str]] = defaultdict(list)          # plan tag → provider task ids
        for summary in sim.tasks():
            request = json.dumps(sim.task(summary["dialect"], summary["id"])["request"])
            found = TAG.search(request)
            if found:
                made[found.group(0)].append(summary["id"])
        for plan in self.plans:
            task = tasks[plan.id]
            at_sim = made.get(plan.tag, [])
            if len(at_sim) > 1:
                self.problem(f"task {plan.id} ({plan.provider}) was submitted twice: provider tasks {at_sim}")
            if task["provider_task_id"] and task["provider_task_id"] not in at_sim:
                self.problem(f"task {plan.id} ({plan.provider}) names provider task {task['provider_task_id']}, "
                             f"the simulator made {at_sim} for it")

    # ---- failover ----------------------------------------------------------------------------------------
    def _check_unsupported_list(self, relay: Relay) -> None:
        """A list with a provider that cannot honour an option is refused whole (422), never half-routed."""
        body = {"provider": ["apimart", "evolink"], "prompt": "chaos unsupported list", "size": "1024x1024", "n": 2}
        response = relay.api.post("/v1/tasks", json=body)
        if response.status_code != 422:
            self.problem(f"a provider list evolink cannot honour (n=2) → {response.status_code} {response.text[:300]}")

    def _check_failover(self, sim: Simulator, tasks: dict[str, dict[str, Any]]) -> None:
        """Across every provider: each relay task made by at most one, the one that is its final `provider`; its
        `providers`, `attempts` and `providers_tried` follow its list in order, and agree with the simulator."""
        report = self.report
        made: dict[str, list[tuple[str, str]]] = defaultdict(list)      # plan tag → (dialect, provider task id)
        for summary in sim.tasks():
            request = json.dumps(sim.task(summary["dialect"], summary["id"])["request"])
            found = TAG.search(request)
            if found:
                made[found.group(0)].append((summary["dialect"], summary["id"]))
        moved_from: Counter[tuple[str, str]] = Counter()                 # (provider, outcome) of every move
        accepted_at: Counter[str] = Counter()
        for plan in self.plans:
            task = tasks[plan.id]
            what = f"task {plan.id} ({'→'.join(plan.order)}, {plan.kind})"
            at_sim = made.get(plan.tag, [])
            if len({dialect for dialect, _ in at_sim}) > 1:
                self.problem(f"{what} was made by several providers: {at_sim}")
            for dialect, provider_task_id in at_sim:
                if dialect != task["provider"]:
                    self.problem(f"{what} was made by {dialect} ({provider_task_id}), its provider is "
                                 f"{task['provider']}")
            if task["provider_task_id"]:
                accepted_at[task["provider"]] += 1
            if task.get("providers") != list(plan.order):
                self.problem(f"{what}: providers {task.get('providers')}, asked {list(plan.order)}")
            attempts = task.get("attempts") or []
            tried = [a.get("provider") for a in attempts]
            if not attempts or tried != list(plan.order[:len(tried)]) or task.get("providers_tried") != tried:
                self.problem(f"{what}: attempts {tried}, providers_tried {task.get('providers_tried')}: not its "
                             f"list in order, each once")
                continue
            *earlier, current = attempts
            if current["provider"] != task["provider"]:
                self.problem(f"{what}: the last attempt is at {current['provider']}, the task at {task['provider']}")
            outcome = "accepted" if task["provider_task_id"] else task["status"]
            if current.get("outcome") != outcome:
                self.problem(f"{what}: the last attempt's outcome is {current.get('outcome')}, expected {outcome}")
            for attempt in earlier:
                if attempt.get("outcome") not in MOVE_OUTCOMES:
                    self.problem(f"{what}: moved on from {attempt['provider']} after {attempt.get('outcome')!r} "
                                 f"({attempt.get('reason')})")
                moved_from[(attempt["provider"], str(attempt.get("outcome")))] += 1
            if not plan.providers and earlier:
                self.problem(f"{what}: a task with one provider moved on: {attempts}")
            if plan.providers:
                report.listed += 1
                report.failed_over += bool(earlier)
                report.ended_at[task["provider"]] = report.ended_at.get(task["provider"], 0) + 1
        for (provider, outcome), n in moved_from.items():
            report.moves[outcome] = report.moves.get(outcome, 0) + n
        # A provider recorded as tried (not merely skipped) got a submit there: per provider, the simulator saw at
        # least as many submits as relay's moves plus its accepted tasks, and as many answers of each kind.
        stats = sim.stats()["dialects"]
        for provider in DIALECTS:
            row = stats[provider]
            faults = row["faults"]
            sent = sum(n for (p, o), n in moved_from.items() if p == provider and o != "skipped")
            if sent + accepted_at[provider] > row["submits"]:
                self.problem(f"{provider}: relay records {sent} moves after a submit and {accepted_at[provider]} "
                             f"accepted tasks, the simulator got {row['submits']} submits")
            bounds = {"unavailable": faults["500"] + faults["503"], "rate_limited": faults["429"],
                      "refused": row["rejected"] + row["unauthorized"]}
            for outcome, bound in bounds.items():
                if moved_from[(provider, outcome)] > bound:
                    self.problem(f"{provider}: relay moved on {moved_from[(provider, outcome)]} times as "
                                 f"{outcome}, the simulator answered so at most {bound} times")

    # ---- events and deliveries ------------------------------------------------------------------------
    @staticmethod
    def _all_events(relay: Relay) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 200}
            if after:
                params["after"] = after
            response = relay.api.get("/v1/events", params=params)
            assert response.status_code == 200, response.text
            page = response.json()
            events += page["data"]
            if len(page["data"]) < 200 or not page["next_cursor"]:
                return events
            after = page["next_cursor"]

    def _check_event_log(self, tasks: dict[str, dict[str, Any]], events: list[dict[str, Any]]) -> None:
        """Per task: one event per state change, sequences 2..final with none missing or repeated."""
        by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for event in events:
            by_task[event["data"]["id"]].append(event)
        for plan in self.plans:
            task = tasks[plan.id]
            got = by_task.get(plan.id, [])
            sequences = [e["sequence"] for e in got]
            if sorted(sequences) != list(range(2, task["sequence"] + 1)):
                self.problem(f"task {plan.id}: event sequences {sequences}, task sequence {task['sequence']}")
            types = [e["type"] for e in got if e["type"] != "task.progress"]
            if len(types) != len(set(types)):
                self.problem(f"task {plan.id}: a transition was recorded twice: {types}")
            final = f"task.{task['status']}"
            if task["status"] in TERMINAL and (not types or types[-1] != final):
                self.problem(f"task {plan.id}: ended {task['status']} but its events are {types}")

    def _expected_deliveries(self, events: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
        """Per sink path: event id → event, for every event that subscriber should get."""
        webhook_tasks = {p.id for p in self.plans if p.webhook}
        expected: dict[str, dict[str, dict[str, Any]]] = {"/all": {}, "/final": {}, "/task": {}}
        for event in events:
            expected["/all"][event["id"]] = event
            if event["type"] in FINAL_TYPES:
                expected["/final"][event["id"]] = event
            if event["type"] in TASK_WEBHOOK_TYPES and event["data"]["id"] in webhook_tasks:
                expected["/task"][event["id"]] = event
        return expected

    def _wait_deliveries(self, relay: Relay, sink: Sink, expected: dict[str, dict[str, dict[str, Any]]]) -> None:
        def missing() -> dict[str, int]:
            return {path: len(set(want) - {r.webhook_id for r in sink.delivered(path)})
                    for path, want in expected.items()}

        def landed() -> bool:
            self._check_alive()
            return not any(missing().values())

        try:
            wait_for(landed, 60.0, "every event at every subscriber", interval=0.1)
        except AssertionError:
            counts = relay.api.get("/v1/deliveries", params={"status": "failed", "limit": 5}).json()["data"]
            self.problem(f"events never delivered (per subscriber path): {missing()}; some failed deliveries: "
                         f"{[(d['id'], d['event_type'], d['attempts'], d['last_error']) for d in counts]}")

    def _check_deliveries(self, sink: Sink, secrets: dict[str, str], events: list[dict[str, Any]],
                          expected: dict[str, dict[str, dict[str, Any]]]) -> None:
        report = self.report
        with sink._lock:
            received: list[Received] = list(sink.received)
        report.deliveries_received = len(received)
        report.deliveries_refused = sum(1 for r in received if not 200 <= r.status < 300)
        for path, want in expected.items():
            got = [r for r in received if r.path == path]
            landed: Counter[str] = Counter()
            ids_of_event: dict[tuple[str, int, str], set[str]] = defaultdict(set)
            sequences_seen: dict[str, set[int]] = defaultdict(set)
            for r in got:
                try:
                    payload = r.verify(secrets[path])
                except Exception as exc:   # standardwebhooks.WebhookVerificationError, or no webhook-id at all
                    self.problem(f"{path}: a delivery does not verify ({type(exc).__name__}: {exc}): "
                                 f"{r.headers.get('webhook-id')}")
                    continue
                event = want.get(r.webhook_id)
                if event is None:
                    self.problem(f"{path}: got {payload.get('type')} {r.webhook_id}, which this subscriber "
                                 "should not get (not in the event log, or filtered out)")
                    continue
                data = payload.get("data") or {}
                if (payload.get("type"), data.get("id"), data.get("sequence")) != \
                        (event["type"], event["data"]["id"], event["sequence"]):
                    self.problem(f"{path}: webhook-id {r.webhook_id} carried {payload.get('type')} of "
                                 f"{data.get('id')} #{data.get('sequence')}, the event is {event['type']} of "
                                 f"{event['data']['id']} #{event['sequence']}")
                    continue
                ids_of_event[(data["id"], data["sequence"], payload["type"])].add(r.webhook_id)
                if 200 <= r.status < 300:
                    landed[r.webhook_id] += 1
                    sequences_seen[data["id"]].add(int(data["sequence"]))
            for key, webhook_ids in ids_of_event.items():
                if len(webhook_ids) > 1:
                    self.problem(f"{path}: one event {key} came with several webhook-ids {sorted(webhook_ids)}")
            lost = set(want) - set(landed)
            if lost:
                self.problem(f"{path}: {len(lost)} events never landed, e.g. "
                             f"{[(want[e]['type'], want[e]['data']['id']) for e in sorted(lost)[:5]]}")
            report.events_verified += len(set(want) & set(landed))
            report.duplicate_deliveries += sum(n - 1 for n in landed.values())
            report.duplicate_webhook_ids += sum(1 for n in landed.values() if n > 1)
            # Per task, the subscriber saw every sequence value its filter takes.
            wanted_sequences: dict[str, set[int]] = defaultdict(set)
            for event in want.values():
                wanted_sequences[event["data"]["id"]].add(int(event["sequence"]))
            for task_id, sequences in wanted_sequences.items():
                if sequences_seen.get(task_id, set()) != sequences:
                    self.problem(f"{path}: task {task_id} sequences seen {sorted(sequences_seen.get(task_id, []))}, "
                                 f"expected {sorted(sequences)}")

    def _check_delivery_records(self, relay: Relay) -> None:
        """Every delivery relay recorded ends succeeded: none left pending or failed (dead letter)."""
        def settled() -> bool:
            response = relay.api.get("/v1/deliveries", params={"status": "pending", "limit": 1})
            return response.status_code == 200 and not response.json()["data"]

        try:
            wait_for(settled, 30.0, "every delivery to be settled", interval=0.1)
        except AssertionError:
            pending = relay.api.get("/v1/deliveries", params={"status": "pending", "limit": 5}).json()["data"]
            self.problem(f"deliveries still pending after every event landed: "
                         f"{[(d['id'], d['event_type'], d['attempts'], d['next_attempt_at']) for d in pending]}")
        failed = relay.api.get("/v1/deliveries", params={"status": "failed", "limit": 5}).json()["data"]
        if failed:
            self.problem(f"deliveries ended failed: {[(d['id'], d['event_type'], d['last_error']) for d in failed]}")

    def _check_callbacks(self, sim: Simulator) -> None:
        """relay acknowledged every callback that reached it (2xx): none refused, no 5xx."""
        log = sim.http.get("/_sim/callbacks").json()["callbacks"]
        bad = [c for c in log if c["status_code"] is not None and not 200 <= c["status_code"] < 300]
        if bad:
            self.problem(f"{len(bad)} callbacks were answered non-2xx, e.g. "
                         f"{[(c['task_id'], c['status_code']) for c in bad[:5]]}")

    def _count_faults(self, sim: Simulator, sink: Sink) -> None:
        totals = sim.stats()["totals"]
        faults = {f"provider_{kind}": n for kind, n in totals["faults"].items()}
        faults["callbacks_sent"] = totals["callbacks"]
        faults["callbacks_failed"] = totals["callback_failures"]          # mostly: relay was down
        faults["callbacks_dropped"] = totals["callbacks_dropped"]
        for kind, count in Counter(p.kind for p in self.plans).items():
            if kind != "ok":
                faults["client_cancels" if kind == "client_cancel" else f"directive_{kind}"] = count
        faults["subscriber_refusals"] = self.report.deliveries_refused
        faults["relay_kills"] = len(self.kill_times)
        self.report.faults = faults


class _Stop(Exception):
    """The run cannot go on (the problem is recorded)."""


def run_chaos(size: int, kills: int, seed: int, workdir: Path, database: str = "sqlite",
              replicas: int = 1) -> ChaosReport:
    """Run the scenario in `workdir` (logs, relay's data dirs); returns the report (also printed).

    `database="postgresql"`: a fresh database, dropped at the end, shared by `replicas` relays."""
    if database not in DATABASES:
        raise ValueError(f"database must be one of {', '.join(DATABASES)} (got {database!r})")
    if replicas < 1 or (database == "sqlite" and replicas > 1):
        raise ValueError("SQLite is for one process: more than one replica needs database=\"postgresql\"")
    workdir.mkdir(parents=True, exist_ok=True)
    run = _Run(size, kills, seed, workdir, database, replicas)
    started = time.monotonic()
    print(f"chaos: seed={seed} size={size} kills={kills}{run.report.mode()} workdir={workdir}", flush=True)
    sim = Simulator(workdir)
    relays: list[Relay] = []
    try:
        with contextlib.ExitStack() as stack:
            env = relay_env(run.subscriber_timeout)
            if database == "postgresql":
                env.update(replica_env(stack.enter_context(postgres_database()), workdir / "images"))
            try:
                sim.start()
                for i in range(replicas):
                    name, data = ("relay", "data") if replicas == 1 else (f"relay{i}", f"data{i}")
                    relays.append(Relay(sim, workdir / data, workdir, name=name, extra_env=env))
                start_all(relays)
                with Sink(hang_limit=10).serving_in_thread() as sink:
                    try:
                        run.execute(sim, relays, sink)
                    except _Stop:
                        pass
                    except AssertionError as exc:            # a process died, or an API call failed outright
                        run.problem(f"the run stopped: {exc}"[:4000])
                for relay in relays:
                    if relay.process.running:
                        relay.process.check_alive()
                    for log in relay.process.logs:
                        text = log.read_text(errors="replace") if log.exists() else ""
                        if "Traceback" in text:
                            at = text.index("Traceback")
                            run.problem(f"{log.name} has a traceback:\n{text[max(0, at - 300):at + 3000]}")
            finally:
                for relay in relays:            # before the database is dropped
                    with contextlib.suppress(Exception):
                        relay.close()
    finally:
        sim.close()
    run.report.seconds = time.monotonic() - started
    summary = run.report.summary()
    (workdir / "report.txt").write_text(summary + "\n")
    print(summary, flush=True)
    return run.report


def main(argv: list[str] | None = None) -> int:
    """python -m tests.chaos.scenario [--size 400] [--kills 10] [--seed N] [--workdir DIR]
    [--database sqlite|postgresql] [--replicas N]"""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--size", type=int, default=50)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temporary directory (kept)")
    parser.add_argument("--database", choices=DATABASES, default="sqlite",
                        help="postgresql: a fresh database on the test server (tests/pg.py), dropped at the end")
    parser.add_argument("--replicas", type=int, default=1, help="relays sharing the database (PostgreSQL only)")
    args = parser.parse_args(argv)
    if args.replicas > 1 and args.database != "postgresql":
        parser.error("--replicas > 1 needs --database postgresql (SQLite is for one process)")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="relay-chaos-"))
    report = run_chaos(args.size, args.kills, seed, workdir, args.database, args.replicas)
    return 1 if report.problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
