"""Sustained task throughput end to end: submit → subscriber receipt of task.succeeded, vs the simulator alone.

    python -m bench.throughput [--quick]

relay: `relay serve` and `relay simulate --duration 0.2` as processes; a subscriber (a small Starlette
app served by uvicorn inside this process) subscribed to the terminal events. A closed loop keeps
IN_FLIGHT tasks outstanding: each lane POSTs /v1/tasks, waits until the subscriber receives that task's
task.succeeded (relay submitted it, learned it finished by polling or callback, archived every image,
and delivered the signed webhook), then starts the next. The mix rotates over gmicloud, apimart,
pixazo (polled), openai (synchronous, inline base64) and evolink (calls back).

Baseline: the same mix, the same IN_FLIGHT and the same simulator, driven by a plain httpx loop with
nothing durable: submit, poll every POLL_EVERY s (evolink is polled too), download each image into
memory (openai: decode the base64). Its rate is what the simulator can give on this machine, so
relay / baseline says what relay's durability (SQLite writes, jobs, archive with fsync, webhooks)
costs when it shares the CPU with the provider.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import random
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from bench import common
from bench.common import (KEY, CpuPids, Figure, Section, add_database_argument, closed_loop, free_port, percentile,
                          postgres, profile_breakdown, ratio, read_round_trips, read_round_trips_by_statement, run_loop, start_profile, start_relay,
                          start_simulator, stop, timed, use_database)

MIX = ("gmicloud", "apimart", "pixazo", "openai", "evolink")
IN_FLIGHT = 64
SIM_DURATION = 0.2
POLL_EVERY = 0.25
WORKER_CONCURRENCY = 128
TERMINAL = ("task.succeeded", "task.failed", "task.canceled")
# After the closed loop: tasks arriving at this share of the rate relay just reached (an open loop, Poisson
# arrivals), to time provider completion → subscriber receipt below saturation too.
OPEN_LOAD = 0.7


# ---- baseline: a plain httpx client against the simulator --------------------------------------------
def _state(status: str, done: str) -> str | bool:
    """A poll answer's status → "failed", True (done) or False (not yet)."""
    return "failed" if status in ("failed", "cancelled") else status == done


class PlainClient:
    """submit + poll + download per dialect, with nothing but httpx."""

    def __init__(self, http: httpx.AsyncClient, sim: str) -> None:
        self.http, self.sim = http, sim
        self.auth = {"authorization": "Bearer sim"}

    async def _json(self, method: str, url: str, **kw: Any) -> Any:
        response = await self.http.request(method, url, headers=kw.pop("headers", self.auth), **kw)
        response.raise_for_status()
        return response.json()

    async def _poll(self, method: str, url: str, done: Any, **kw: Any) -> Any:
        while True:
            await asyncio.sleep(POLL_EVERY)
            body = await self._json(method, url, **kw)
            state = done(body)
            if state == "failed":
                raise RuntimeError(f"simulated task failed: {str(body)[:200]}")
            if state:
                return body

    async def _download(self, urls: list[str]) -> int:
        size = 0
        for url in urls:
            response = await self.http.get(url)
            response.raise_for_status()
            size += len(response.content)
        return size

    async def cycle(self, provider: str, prompt: str) -> int:
        return await getattr(self, provider)(prompt)

    async def gmicloud(self, prompt: str) -> int:
        base = f"{self.sim}/gmicloud/api/v1/ie/requestqueue/apikey/requests"
        task = await self._json("POST", base, json={"model": "gpt-image-1.5",
                                                     "payload": {"prompt": prompt, "size": "1024x1024"}})
        body = await self._poll("GET", f"{base}/{task['request_id']}",
                                lambda b: _state(b["status"], "success"))
        return await self._download([m["url"] for m in body["outcome"]["media_urls"]])

    async def apimart(self, prompt: str) -> int:
        task = await self._json("POST", f"{self.sim}/apimart/v1/images/generations",
                                json={"model": "gpt-image-1.5-official", "prompt": prompt, "size": "1:1"})
        task_id = task["data"][0]["task_id"]
        body = await self._poll("GET", f"{self.sim}/apimart/v1/tasks/{task_id}",
                                lambda b: _state(b["data"]["status"], "completed"))
        urls: list[str] = []
        for image in body["data"]["result"]["images"]:
            urls += image["url"] if isinstance(image["url"], list) else [image["url"]]
        return await self._download(urls)

    async def pixazo(self, prompt: str) -> int:
        base = f"{self.sim}/pixazo/gpt-image-1-5-api-923/v1"
        headers = {"ocp-apim-subscription-key": "sim"}
        task = await self._json("POST", f"{base}/gpt-image-1-5-api-request", headers=headers,
                                json={"prompt": prompt, "image_size": "1024x1024"})
        body = await self._poll("POST", f"{base}/gpt-image-1-5-api-request-result",
                                lambda b: "failed" if b["status"] == "FAILED" else b["status"] == "COMPLETED",
                                headers=headers, json={"request_id": task["request_id"]})
        return await self._download([image["url"] for image in body["images"]])

    async def openai(self, prompt: str) -> int:
        body = await self._json("POST", f"{self.sim}/openai/v1/images/generations",
                                json={"model": "gpt-image-1.5", "prompt": prompt, "size": "1024x1024"})
        return sum(len(base64.b64decode(item["b64_json"])) for item in body["data"])

    async def evolink(self, prompt: str) -> int:
        task = await self._json("POST", f"{self.sim}/evolink/v1/images/generations",
                                json={"model": "gpt-image-1.5", "prompt": prompt, "size": "1024x1024"})
        body = await self._poll("GET", f"{self.sim}/evolink/v1/tasks/{task['id']}",
                                lambda b: _state(b["status"], "completed"))
        return await self._download(body["results"])


def lane_client(**kw: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=2, max_keepalive_connections=2), **kw)


async def baseline(sim: str, sim_pid: int, warmup: float, seconds: float) -> dict[str, Any]:
    # One small client per lane: a single httpx client with a big pool scans every pooled connection
    # (a getpeername() syscall each) on every request, which would make the bench the bottleneck.
    async with contextlib.AsyncExitStack() as stack:
        lanes = [PlainClient(await stack.enter_async_context(lane_client()), sim) for _ in range(IN_FLIGHT)]
        by_provider: dict[str, list[tuple[float, float]]] = defaultdict(list)

        async def one(i: int) -> None:
            provider = MIX[i % len(MIX)]
            began = time.monotonic()
            await lanes[i % IN_FLIGHT].cycle(provider, f"bench {i}")
            by_provider[provider].append((began, time.monotonic()))

        stats = await closed_loop(one, in_flight=IN_FLIGHT, warmup=warmup, measure=seconds,
                                  cpu={"simulator": sim_pid, "driver": None})
        stats["by_provider"] = _by_provider(by_provider, stats["window"])
        stats["sim"] = (await lanes[0].http.get(f"{sim}/_sim/stats")).json()["totals"]
        return stats


def _by_provider(found: dict[str, list[tuple[float, float]]], window: tuple[float, float]) -> dict[str, Any]:
    out = {}
    for provider in MIX:
        inside = [(end - began) * 1000 for began, end in found.get(provider, []) if began >= window[0]
                  and end <= window[1]]
        out[provider] = {"n": len(inside), "p50": percentile(inside, 50), "p99": percentile(inside, 99)}
    return out


# ---- relay: submit through the API, wait for the webhook ----------------------------------------------
def sink_app(waiters: dict[str, asyncio.Future[str]], counts: dict[str, int],
             arrivals: list[float] | None = None, generated: dict[str, tuple[float, float]] | None = None) -> Any:
    """/hook: a terminal event resolves its task's waiter; /fan/{k}: fan-out subscriptions, only counted.
    `arrivals`: the monotonic time of every delivery received (both routes). `generated`: the wall-clock
    receipt of each task.generated and the event's own time (relay decided the transition then), by the
    provider's task id (to set against the provider's completion)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def hook(request: Request) -> Response:
        payload = json.loads(await request.body())
        if arrivals is not None:
            arrivals.append(time.monotonic())
        counts[payload["type"]] = counts.get(payload["type"], 0) + 1
        if payload["type"] not in TERMINAL:
            if generated is not None and payload["type"] == "task.generated":
                generated[f"{payload['data']['provider']}/{payload['data']['provider_task_id']}"] = (
                    time.time(), datetime.fromisoformat(payload["timestamp"]).timestamp())
            return Response(b"ok")
        future = waiters.setdefault(payload["data"]["id"], asyncio.get_running_loop().create_future())
        if not future.done():
            future.set_result(payload["type"])
        return Response(b"ok")

    async def fan(request: Request) -> Response:
        await request.body()
        if arrivals is not None:
            arrivals.append(time.monotonic())
        return Response(b"ok")

    return Starlette(routes=[Route("/hook", hook, methods=["POST"]), Route("/fan/{k}", fan, methods=["POST"])])


async def through_relay(base: str, relay_pid: int, sim: str, sim_pid: int, warmup: float, seconds: float, *,
                        fanout: int = 0, more_cpu: Callable[[], CpuPids] | None = None,
                        round_trips: Path | None = None, below_saturation: bool = False) -> dict[str, Any]:
    """The closed loop through relay. `fanout`: that many more subscriptions on every task event (task.*),
    delivered to the same sink and only counted; "deliveries" in the result counts every delivery received
    inside the window. `more_cpu`: more processes whose CPU to read over the window (called when it opens).
    `round_trips`: the probe's file (bench/probes) whose count over the window goes in "round_trips".
    `below_saturation`: then an open loop at OPEN_LOAD of the rate reached ("open_loop")."""
    import uvicorn

    waiters: dict[str, asyncio.Future[str]] = {}
    received: dict[str, int] = {}
    arrivals: list[float] = []
    generated: dict[str, tuple[float, float]] = {}
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(sink_app(waiters, received, arrivals, generated), host="127.0.0.1",
                                           port=port,
                                           log_level="warning", access_log=False, lifespan="off"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(lane_client(base_url=base, headers={
                "authorization": f"Bearer {KEY}"})) for _ in range(IN_FLIGHT)]
            api = clients[0]
            created = await api.post("/v1/subscriptions", json={"url": f"http://127.0.0.1:{port}/hook",
                                                                "events": [*TERMINAL, "task.generated"]})
            created.raise_for_status()
            for k in range(fanout):
                (await api.post("/v1/subscriptions", json={"url": f"http://127.0.0.1:{port}/fan/{k}",
                                                           "events": ["task.*"]})).raise_for_status()
            by_provider: dict[str, list[tuple[float, float]]] = defaultdict(list)

            async def one(i: int) -> None:
                provider = MIX[i % len(MIX)]
                began = time.monotonic()
                response = await clients[i % IN_FLIGHT].post(
                    "/v1/tasks", json={"provider": provider, "prompt": f"bench {i}", "size": "1024x1024"})
                response.raise_for_status()
                task_id = response.json()["id"]
                future = waiters.setdefault(task_id, asyncio.get_running_loop().create_future())
                try:
                    outcome = await future
                finally:
                    waiters.pop(task_id, None)
                if outcome != "task.succeeded":
                    raise RuntimeError(f"{provider} task ended with {outcome}")
                by_provider[provider].append((began, time.monotonic()))

            fixed: CpuPids = {"relay": relay_pid, "simulator": sim_pid, "driver": None}
            counted: dict[str, int | None] = {}
            tallied: dict[str, dict[str, int] | None] = {}

            acks: dict[str, dict[float, float]] = {}

            def at_window(mark: str) -> None:
                acks[mark] = ack_histogram(base)
                if round_trips is not None:
                    counted[mark] = read_round_trips(round_trips)
                    tallied[mark] = read_round_trips_by_statement(round_trips)
            stats = await closed_loop(one, in_flight=IN_FLIGHT, warmup=warmup, measure=seconds,
                                      cpu=(lambda: {**fixed, **more_cpu()}) if more_cpu else fixed,
                                      at_window=at_window)
            opened, closed = counted.get("open"), counted.get("close")
            stats["round_trips"] = closed - opened if opened is not None and closed is not None else None
            # (With several processes each scrape reads one of them: bench.scaling does not report these.)
            stats["relay_acks"] = {bound: n - acks.get("open", {}).get(bound, 0.0)
                                   for bound, n in acks.get("close", {}).items()}
            first, last = tallied.get("open"), tallied.get("close")
            stats["round_trips_by_statement"] = ({sql: n - first.get(sql, 0) for sql, n in last.items()}
                                                 if first is not None and last is not None else None)
            stats["by_provider"] = _by_provider(by_provider, stats["window"])
            stats["received"] = dict(received)
            stats["deliveries"] = sum(stats["window"][0] <= at <= stats["window"][1] for at in arrivals)
            stats["sim"] = (await api.get(f"{sim}/_sim/stats")).json()["totals"]
            stats["completion_to_receipt"] = await _completion_to_receipt(api, sim, generated, stats["window"])
            if below_saturation and stats["per_second"] > 0:
                rate = OPEN_LOAD * stats["per_second"]
                opened = await open_loop(one, rate=rate, warmup=min(warmup, 3.0), measure=seconds * 0.6)
                stats["open_loop"] = {**opened, "rate": rate, "completion_to_receipt": await _completion_to_receipt(
                    api, sim, generated, opened["window"])}
    finally:
        server.should_exit = True
        await serving
    return stats


async def open_loop(one: Callable[[int], Any], *, rate: float, warmup: float, measure: float,
                    settle: float = 30.0) -> dict[str, Any]:
    """Start `one(i)` at Poisson arrivals of `rate` per second, whatever is still running (an open loop: the load
    does not ease when relay slows down), for `warmup` + `measure` seconds; then wait up to `settle` for the
    calls still running. Returns the measuring window (monotonic) and how many calls started, failed or
    were still running after `settle`."""
    rng = random.Random(12)
    start = time.monotonic()
    window = (start + warmup, start + warmup + measure)
    running: set[asyncio.Task[Any]] = set()
    counts = {"started": 0, "failed": 0, "unfinished": 0}

    def ended(task: asyncio.Task[Any]) -> None:
        running.discard(task)
        if not task.cancelled() and task.exception() is not None:      # read here, so none goes unretrieved
            counts["failed"] += 1
    i = 10_000_000          # task numbers of their own (the closed loop's prompts stay unique)
    next_at = start
    try:
        while next_at < window[1]:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            task = asyncio.create_task(one(i))
            running.add(task)
            task.add_done_callback(ended)
            counts["started"], i = counts["started"] + 1, i + 1
            next_at += rng.expovariate(rate)
        if running:
            _, pending = await asyncio.wait(set(running), timeout=settle)
            counts["unfinished"] = len(pending)
    finally:
        left = set(running)
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
    return {"window": window, **counts}


def measure(quick: bool, profile: bool = False, profile_out: Path | None = None) -> dict[str, Any]:
    base_warm, base_secs = (2.0, 6.0) if quick else (3.0, 15.0)
    relay_warm, relay_secs = (3.0, 10.0) if quick else (5.0, 25.0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sim, sim_url = start_simulator(root, SIM_DURATION)
        try:
            plain = run_loop(baseline(sim_url, sim.pid, base_warm, base_secs))
            httpx.post(f"{sim_url}/_sim/reset").raise_for_status()
            round_trips = root / "round-trips" if postgres() else None
            relay, base, _ = start_relay(
                root, sim_url, round_trips=round_trips, worker_concurrency=str(WORKER_CONCURRENCY),
                polling_initial_delay=str(POLL_EVERY), polling_max_delay="0.5", callbacks_safety_net_seconds="5")
            raw = profile_out or root / "relay.profile"
            spy = start_profile(relay.pid, relay_warm + relay_secs, raw) if profile else None
            try:
                through = run_loop(through_relay(base, relay.pid, sim_url, sim.pid, relay_warm, relay_secs,
                                                 round_trips=round_trips, below_saturation=True))
            finally:
                if spy is not None:
                    spy.wait()
                stop(relay)
            breakdown = profile_breakdown(raw) if spy is not None else []
        finally:
            stop(sim)
    return {"baseline": plain, "relay": through, "seconds": {"baseline": base_secs, "relay": relay_secs},
            "profile": breakdown}


async def _completion_to_receipt(api: httpx.AsyncClient, sim: str, generated: dict[str, tuple[float, float]],
                                 window: tuple[float, float]) -> dict[str, float]:
    """For the callback provider (evolink): the simulator's completion of each task (its done_at) → the bench
    subscriber's receipt of task.generated, over tasks whose receipt fell inside the measured window
    (read after the window, so the simulator lookups do not load the run)."""
    offset = time.time() - time.monotonic()
    start, end = window[0] + offset, window[1] + offset
    latencies: list[float] = []
    legs: dict[str, list[float]] = {"sent": [], "ack": [], "after": [], "apply": [], "deliver": []}
    for key, (at, committed) in list(generated.items()):
        provider, _, ticket = key.partition("/")
        if provider != "evolink" or not start <= at <= end:
            continue
        found = (await api.get(f"{sim}/_sim/tasks/{provider}/{ticket}")).json()
        done_at = found.get("done_at")
        if done_at is None:
            continue
        latencies.append((at - float(done_at)) * 1000)
        first = (found.get("callbacks") or [None])[0]
        if first is not None and first.get("elapsed") is not None:
            # Its legs: the simulator sending the callback, relay acknowledging it (a durable write),
            # and from the 200 to the subscriber's receipt (confirm, apply, deliver); that last one split at the
            # event's own time (when relay decided the transition, before its transaction waited for the writer
            # and committed; the two processes share the machine's clock).
            legs["sent"].append((first["at"] - done_at) * 1000)
            legs["ack"].append(first["elapsed"] * 1000)
            legs["after"].append((at - first["at"] - first["elapsed"]) * 1000)
            legs["apply"].append((committed - first["at"] - first["elapsed"]) * 1000)
            legs["deliver"].append((at - committed) * 1000)
    out = {"n": float(len(latencies)), "p50": percentile(latencies, 50) if latencies else 0.0,
           "p99": percentile(latencies, 99) if latencies else 0.0}
    for leg, values in legs.items():
        out[f"{leg}_p50"] = percentile(values, 50) if values else 0.0
        out[f"{leg}_p99"] = percentile(values, 99) if values else 0.0
    return out


TALLY_ROWS = 12     # statements shown in the round-trip tally (PostgreSQL)


def ack_histogram(base: str) -> dict[float, float]:
    """relay's own callback acknowledgements so far, from its /metrics: how many took at most each bucket's bound
    (seconds; inf for all), the providers summed. Read as the window opens and closes (a blocking GET: once each)."""
    counts: dict[float, float] = {}
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith("relay_callback_ack_seconds_bucket{"):
            bound = float(line.split('le="', 1)[1].split('"', 1)[0])
            counts[bound] = counts.get(bound, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def share_within(histogram: dict[float, float], seconds: float) -> float | None:
    """The share of the histogram's acknowledgements that took at most `seconds` (a bucket bound)."""
    total = histogram.get(float("inf"), 0.0)
    return histogram.get(seconds, 0.0) / total if total else None


def _leg(found: dict[str, float], leg: str) -> str:
    """One leg of completion → receipt (see _completion_to_receipt) as "p50 / p99" in whole ms."""
    return f"{found[leg + '_p50']:.0f} / {found[leg + '_p99']:.0f}"


def _per_task(stats: dict[str, Any], counter: str) -> float:
    done = stats["sim"]["submits"] or 1
    return stats["sim"][counter] / done


@timed
def run(quick: bool, profile: bool = False, profile_out: Path | None = None) -> Section:
    found = measure(quick, profile, profile_out)
    plain, through, secs = found["baseline"], found["relay"], found["seconds"]
    r = ratio(through["per_second"], plain["per_second"])
    lines = [
        f"A closed loop keeps {IN_FLIGHT} tasks in flight; the mix rotates over gmicloud, apimart, pixazo "
        f"(polled), openai (synchronous, inline base64) and evolink (callbacks); simulated generation "
        f"{SIM_DURATION} s (`relay simulate --duration {SIM_DURATION}"
        f"{' --prerendered' if common.PRERENDERED else ''}`), one 1024x1024 PNG per task"
        f"{' (pre-rendered: one drawn picture, a unique PNG chunk per task, no Pillow drawing)' if common.PRERENDERED else ''}. relay: "
        f"`relay serve` ({WORKER_CONCURRENCY} worker slots, polls from {POLL_EVERY} s up to 0.5 s), latency = "
        "POST /v1/tasks → a subscriber (in the bench process) receives that task's signed `task.succeeded` "
        "webhook, so every task was submitted, confirmed, archived (fsync) and delivered. Baseline: the same "
        f"mix and concurrency against the same simulator with a plain httpx loop (submit, poll every "
        f"{POLL_EVERY} s, evolink polled too, download into memory), nothing stored. Throughput counts tasks "
        f"finishing in a {secs['relay']:.0f} s window (baseline {secs['baseline']:.0f} s) after warm-up.", "",
        "| path | tasks/s | p50 ms | p99 ms | failed / timed out | CPU ms per task: relay | simulator | bench |",
        "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, s, relay_cpu in (("plain httpx → simulator (baseline)", plain, None),
                                ("relay end to end", through, through["cpu"].get("relay"))):
        # CPU used during the window / tasks finished in it.
        per = lambda cpu: f"{cpu / s['completed'] * 1000:.1f}" if s["completed"] else "-"  # noqa: E731
        lines.append(f"| {label} | {s['per_second']:.1f} | {s['p50']:.0f} | {s['p99']:.0f} | "
                     f"{s['failures']} / {s['timeouts']} | {per(relay_cpu) if relay_cpu is not None else '-'} | "
                     f"{per(s['cpu']['simulator'])} | {per(s['cpu']['driver'])} |")
    relay_cpu, loop_cpu = through["cpu"].get("relay"), through["loop_cpu"].get("relay")
    if relay_cpu is not None and loop_cpu is not None:
        window = secs["relay"]
        lines += ["", f"relay's process used {relay_cpu / window:.2f} cores during the window: its event loop's thread "
                  f"{loop_cpu / window:.2f}, its other threads ("
                  f"{'file and image work' if postgres() else 'SQLite connections, file and image work'}) "
                  f"{(relay_cpu - loop_cpu) / window:.2f}."]
    if through.get("round_trips") is not None and through["completed"]:
        lines += ["", f"relay's round trips to PostgreSQL during the window: {through['round_trips']:,}, "
                  f"**{through['round_trips'] / through['completed']:.1f} per task** (counted in the relay process by "
                  "bench/probes: each statement, BEGIN, COMMIT or pipelined executemany is one; a statement's "
                  "first use on each pooled connection also prepares it, one more round trip not counted)."]
        tally = through.get("round_trips_by_statement")
        if tally:
            lines += ["", "The most frequent of them, per task (a statement named by its first characters):", "",
                      "| statement | round trips per task |", "|---|---:|"]
            lines += [f"| `{sql.replace('|', '/')}` | {n / through['completed']:.2f} |"
                      for sql, n in sorted(tally.items(), key=lambda kv: -kv[1])[:TALLY_ROWS] if n > 0]
    lines += ["", f"Throughput ratio relay / baseline: **{r:.2f}**." if r is not None else "", "",
              "Per dialect (tasks finishing inside the window):", "",
              "| dialect | baseline n | baseline p50 ms | relay n | relay p50 ms | relay p99 ms |",
              "|---|---:|---:|---:|---:|---:|"]
    for provider in MIX:
        b, t = plain["by_provider"][provider], through["by_provider"][provider]
        lines.append(f"| {provider} | {b['n']} | {b['p50']:.0f} | {t['n']} | {t['p50']:.0f} | {t['p99']:.0f} |")
    lines += ["", f"Simulator requests per submitted task — baseline: {_per_task(plain, 'polls'):.2f} polls, "
              f"{_per_task(plain, 'downloads'):.2f} downloads; relay: {_per_task(through, 'polls'):.2f} polls, "
              f"{_per_task(through, 'downloads'):.2f} downloads, {through['sim']['callbacks']} callbacks sent."]
    done = through.get("completion_to_receipt")
    if done and done["n"]:
        lines += ["", f"Provider completion → subscriber receipt of task.generated under this load (evolink, which "
                  f"calls back; the simulator's done_at → the bench sink's receipt, {done['n']:.0f} tasks in the "
                  f"window): p50 {done['p50']:.0f} ms, p99 {done['p99']:.0f} ms. Its legs (p50 / p99): the simulator "
                  f"sending the callback {_leg(done, 'sent')} ms, relay acknowledging it {_leg(done, 'ack')} ms, from "
                  f"the 200 to the receipt (confirm with the provider, apply, deliver) {_leg(done, 'after')} ms: to "
                  f"the event's time (relay deciding the transition) {_leg(done, 'apply')} ms, from it to the receipt "
                  f"(its commit, the delivery) {_leg(done, 'deliver')} ms."]
        below = through.get("open_loop")
        light = below["completion_to_receipt"] if below else None
        if light and light["n"]:
            lines += ["", f"Below saturation: tasks arriving at {OPEN_LOAD:.0%} of that rate ({below['rate']:.1f} "
                      f"tasks/s, an open loop with Poisson arrivals; {below['started']} started, {below['failed']} "
                      f"failed, {below['unfinished']} unfinished), completion → receipt p50 {light['p50']:.0f} ms, "
                      f"**p99 {light['p99']:.0f} ms** ({light['n']:.0f} tasks; legs p50 / p99: sending "
                      f"{_leg(light, 'sent')}, acknowledging {_leg(light, 'ack')}, to the event's time "
                      f"{_leg(light, 'apply')}, to the receipt {_leg(light, 'deliver')} ms)."]
        own = through.get("relay_acks") or {}
        shares = [(ms, share_within(own, ms / 1000)) for ms in (10, 25, 50, 100)]
        if all(share is not None for _, share in shares):
            lines += ["", "The acknowledgement as relay itself timed it (relay_callback_ack_seconds, from the request "
                      "reaching its handler to the 200; the leg above adds the simulator's client and both event "
                      "loops' waits): " + ", ".join(f"{share:.1%} within {ms} ms" for ms, share in shares) + "."]
    if found["profile"]:
        lines += ["", "py-spy on the relay process during the run (100 Hz, samples holding the GIL):",
                  "", "| where | share of samples |", "|---|---:|"]
        lines += [f"| {name} | {share:.0%} |" for name, share in found["profile"]]
    errors = {**plain["errors"], **through["errors"]}
    if errors:
        lines += ["", "Errors seen: " + "; ".join(f"{k} ×{v}" for k, v in errors.items())]
    simulator_ms = plain["cpu"]["simulator"] / plain["completed"] * 1000 if plain["completed"] else 0.0
    notes = [
        "Both paths are CPU-bound on 2 cores when the machine is quiet: the simulator draws every image with "
        f"Pillow ({simulator_ms:.0f} ms of CPU per 1024x1024 PNG in this run, the simulator column), and relay, the "
        "simulator and "
        "the bench share the cores. relay's CPU per task is what its durability costs; the ratio is about how "
        "much of the simulator's rate is left once relay takes its share of the same cores.",
        ("On PostgreSQL relay's event loop's thread is the limit (the cores line above: it is nearly all of relay's "
         "CPU), and asyncpg's statements are about two fifths of its time holding the GIL, mostly the socket "
         "write of each round trip (py-spy --native: a third of the loop's samples are in write(), HTTP's "
         "included); a loopback round trip costs relay's process 20 µs to 170 µs of CPU depending on the machine "
         "(docs/benchmarks.md, thirteenth and fourteenth rounds), and where the database is on another host each "
         "is also a wait. Where the "
         if postgres() else
         "relay is serialized, not short of cores: its Python runs on one GIL and its writes on one SQLite writer "
         "(the cores line above: the loop's thread and the others add up to about one core while the machine has "
         "some left), so its latency under this load is queueing on those two and its cost per task on them sets "
         "its throughput. Where the ") +
        "GIL goes: `python -m bench.throughput --profile` (py-spy --gil on the relay process; the table above "
        "when run with it). Provider calls through httpx's own transport were about a fifth of it until they "
        "went through aiohttp (relay.fastclient.AiohttpTransport); see the issue-12 sections.",
        "The latency of the closed loop is mostly queueing: with 64 tasks in flight and the CPU saturated, "
        "p50 ≈ 64 / (tasks/s). Compare per-dialect p50s for relative cost, not absolute delay.",
        "The bench's own clients are one small httpx client per lane. One shared AsyncClient with a 128-connection "
        "pool made the baseline driver the bottleneck (16.6 ms of CPU per task instead of 2.6 ms, half the "
        "baseline rate): on every request and every response close httpcore walks all pooled connections and "
        "asks each whether it has expired (`is_socket_readable`, a getpeername() and a poll per connection). "
        "relay's own provider calls, downloads and webhooks go through aiohttp (relay.fastclient), whose pool does "
        "no such walk.",
    ]
    figures = {"relay_tasks_per_s": through["per_second"], "relay_p50_ms": through["p50"],
               "relay_p99_ms": through["p99"], "baseline_tasks_per_s": plain["per_second"],
               "baseline_p50_ms": plain["p50"], "ratio": r or 0.0,
               "relay_failures": through["failures"] + through["timeouts"]}
    if done and done["n"]:
        figures["completion_to_receipt_p99_ms"] = done["p99"]
        light = (through.get("open_loop") or {}).get("completion_to_receipt")
        if light and light["n"]:
            figures["completion_to_receipt_p99_ms_below_saturation"] = light["p99"]
    if through.get("round_trips") is not None and through["completed"]:
        figures["round_trips_per_task"] = through["round_trips"] / through["completed"]
    summary = [Figure(f"task throughput end to end ({IN_FLIGHT} in flight)",
                      f"{through['per_second']:.1f} tasks/s, p50 {through['p50']:.0f} / p99 {through['p99']:.0f} ms",
                      f"plain httpx → simulator: {plain['per_second']:.1f} tasks/s", r)]
    title = "Task throughput end to end" + (", pre-rendered images" if common.PRERENDERED else "")
    if common.PRERENDERED:
        notes = notes[1:]     # the first note is about the simulator drawing every image with Pillow
        notes.insert(0, "With pre-rendered images the simulator spends next to no CPU per image (a unique chunk "
                        "added to one picture drawn once), so the baseline is bounded by HTTP and the bench "
                        "driver, and relay / baseline says what relay's own work costs on these 2 cores.")
        for figure in summary:
            figure.name += ", pre-rendered images"
    return Section("throughput", title, "\n".join(lines), notes, figures, summary)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--profile", action="store_true", help="sample the relay process with py-spy meanwhile")
    parser.add_argument("--profile-out", type=Path, default=None,
                        help="keep py-spy's raw profile in this file (with --profile), to read stack by stack")
    parser.add_argument("--prerendered", action="store_true", help="the simulator serves pre-rendered images")
    add_database_argument(parser)
    args = parser.parse_args()
    use_database(args.database)
    common.PRERENDERED = args.prerendered
    section = run(args.quick, args.profile, args.profile_out)
    print(section.markdown())
    print(json.dumps(section.figures, indent=2))


if __name__ == "__main__":
    main()
