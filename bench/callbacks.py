"""Callback acknowledgement: relay's POST /callbacks vs a bare Starlette 200 endpoint, same stack, same run.

    python -m bench.callbacks [--seconds 10] [--connections 32] [--quick]

Starts a bare Starlette app, the simulator and relay as processes, drives each with wrk (POST of an
EvoLink-shaped body, keep-alive, N connections) and prints requests/s and latency percentiles. relay
is measured twice: API role only (acknowledging = durably recording, nothing else running) and with
its workers processing every callback (confirm with the provider, apply) at the same time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import (KEY, PYTHON, SIGNING_SECRET, Figure, Section, add_database_argument, drop_section_databases,
                          free_port, postgres, ratio, spawn, start_relay, start_simulator, stop, timed, use_database,
                          wait_http, wrk)
from relay.links import Signer

CONNECTIONS = 32


def callback_path(base: str, data: Path, submitted: bool = True) -> tuple[str, str]:
    """Create an EvoLink task and return its callback path and a body for it. `submitted`: wait until relay
    has submitted it (a relay with workers), so the body can name the provider's task id."""
    headers = {"authorization": f"Bearer {KEY}"}
    task = httpx.post(f"{base}/v1/tasks", json={"provider": "evolink", "prompt": "bench"}, headers=headers).json()
    # The body names the provider's own task id, as EvoLink's would: relay confirms it with the provider
    # (a body naming another task is rejected unread, which is not what a provider sends).
    deadline = time.monotonic() + 30
    while submitted and task["provider_task_id"] is None:
        if time.monotonic() > deadline:
            raise SystemExit(f"relay did not submit the bench task in 30 s: {task}")
        time.sleep(0.05)
        task = httpx.get(f"{base}/v1/tasks/{task['id']}", headers=headers).json()
    # On PostgreSQL relay signs with the explicit secret the bench gave it; on SQLite with the one it generated.
    secret = SIGNING_SECRET if postgres() else (data / "signing-secret").read_text().strip()
    token = Signer(secret).callback_token("evolink", task["id"])
    # What EvoLink sends for a task it has queued (the simulator keeps the task queued for the whole run):
    # every callback is a repeat, which relay confirms and finds changes nothing.
    ticket = task["provider_task_id"] or "task-unified-0000000000-00000000"    # API role: never submitted
    body = json.dumps({"id": ticket, "object": "image.generation.task", "status": "pending", "progress": 0})
    return f"/callbacks/evolink/{task['id']}/{token}", body


def processed(base: str) -> float:
    """Callbacks relay has processed so far (settled in its inbox), from its /metrics."""
    total = 0.0
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith("relay_callbacks_processed_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def measure(seconds: int, connections: int, warmup: int) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bare_port = free_port()
        bare = spawn([PYTHON, "-m", "uvicorn", "bench.bare_app:app", "--port", str(bare_port), "--log-level",
                      "warning", "--no-access-log"], log=root / "bare.log")
        sim, sim_url = start_simulator(root, 3600)
        try:
            wait_http(f"http://127.0.0.1:{bare_port}/")
            body = json.dumps({"status": "processing"})
            wrk(f"http://127.0.0.1:{bare_port}/x", body=body, connections=connections, seconds=warmup)
            results["bare Starlette 200"] = wrk(f"http://127.0.0.1:{bare_port}/x", body=body,
                                                connections=connections, seconds=seconds)
            for role in ("api", "all"):
                relay, base, data = start_relay(root, sim_url, name=f"relay-{role}", role=role,
                                                callbacks_safety_net_seconds="3600")
                try:
                    path, cb_body = callback_path(base, data, submitted=role != "api")
                    wrk(base + path, body=cb_body, connections=connections, seconds=warmup)
                    label = "relay callback ack (API only)" if role == "api" else "relay callback ack (+ workers)"
                    settled_before = processed(base)
                    results[label] = wrk(base + path, body=cb_body, connections=connections, seconds=seconds)
                    if role == "all":     # acks outrunning the workers would only grow a backlog
                        results[label]["settled_rps"] = (processed(base) - settled_before) / seconds
                finally:
                    stop(relay)
        finally:
            stop(bare)
            stop(sim)
    return results


def table(results: dict[str, dict[str, float]]) -> list[str]:
    baseline = results["bare Starlette 200"]["rps"]
    lines = ["| endpoint | requests/s | vs bare | p50 ms | p90 ms | p99 ms | non-2xx | processed/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in results.items():
        settled = f"{r['settled_rps']:.0f}" if "settled_rps" in r else "n/a"
        lines.append(f"| {label} | {r['rps']:.0f} | {r['rps'] / baseline:.0%} | {r.get('p50', 0):.2f} | "
                     f"{r.get('p90', 0):.2f} | {r.get('p99', 0):.2f} | {r['non2xx']:.0f} | {settled} |")
    return lines


@timed
def run(quick: bool) -> Section:
    seconds, warmup = (3, 1) if quick else (8, 2)
    results = measure(seconds, CONNECTIONS, warmup)
    bare, api, full = (results["bare Starlette 200"], results["relay callback ack (API only)"],
                       results["relay callback ack (+ workers)"])
    body = "\n".join([
        f"wrk, 1 thread, {CONNECTIONS} keep-alive connections, {seconds} s per run after {warmup} s of warm-up, "
        "POST of an EvoLink-shaped callback body. Baseline: a bare Starlette app answering 200 to any POST "
        "(`bench/bare_app.py`, same uvicorn stack). relay runs as `relay serve`; \"API only\" is "
        "`server.role = api` (acknowledging = verifying the token and durably recording the callback with "
        "its job, group-committed), \"+ workers\" also processes every callback at the same time. The body is "
        "what EvoLink sends for the task (its id, status pending): every callback is a repeat that relay "
        "confirms with the provider (the simulator) and finds changes nothing. processed/s: callbacks relay "
        "settled (inbox row written, job done) during the measured run, from its /metrics: below the acks/s, "
        "the workers fall behind and a backlog grows.", "", *table(results)])
    notes = [
        "Acknowledging a callback is a durable write: relay answers 200 only after the callback's job, which "
        "carries its raw body, is committed (one row; the inbox row is written when the job has processed "
        "it). Concurrent callbacks share one transaction (group commit), so the cost per callback falls as "
        "load rises. The endpoint is raw ASGI ahead of Starlette's router and middleware "
        "(relay.web.callbacks.CallbackDoor); the gap to the bare endpoint is the token check, the JSON check, "
        "the metrics and that write.",
        "\"+ workers\" shares the 2 cores with processing: the callbacks of one task share the provider's "
        "answer (one status request for all received before it was sent, relay.jobs.confirmations), and "
        "those still waiting for a worker are settled together with it; those claimed together run as one "
        "(relay.queue.GroupHandler: one task read, their inbox rows and job ends written together). Until 2026-11-29 the bench's body named another provider task, so "
        "every callback was rejected unread and this row measured that shortcut.",
    ]
    figures = {"bare_rps": bare["rps"], "api_rps": api["rps"], "api_p50_ms": api.get("p50", 0),
               "api_p99_ms": api.get("p99", 0), "all_rps": full["rps"], "all_p99_ms": full.get("p99", 0),
               "all_processed_rps": full.get("settled_rps", 0)}
    summary = [
        Figure("callback ack, API only (32 conn.)",
               f"{api['rps']:.0f} req/s, p50 {api.get('p50', 0):.1f} / p99 {api.get('p99', 0):.1f} ms",
               f"bare Starlette 200: {bare['rps']:.0f} req/s", ratio(api["rps"], bare["rps"])),
        Figure("callback ack, + workers (32 conn.)",
               f"{full['rps']:.0f} req/s ({full.get('settled_rps', 0):.0f} processed/s), p50 {full.get('p50', 0):.1f} "
               f"/ p99 {full.get('p99', 0):.1f} ms",
               f"bare Starlette 200: {bare['rps']:.0f} req/s", ratio(full["rps"], bare["rps"])),
    ]
    return Section("callbacks", "Callback acknowledgement", body, notes, figures, summary)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=CONNECTIONS)
    parser.add_argument("--quick", action="store_true", help="the short run of `python -m bench --quick`")
    add_database_argument(parser)
    args = parser.parse_args()
    use_database(args.database)
    if args.quick:
        print(run(True).markdown())
        return
    try:
        print("\n".join(table(measure(args.seconds, args.connections, 2))))
    finally:
        drop_section_databases()


if __name__ == "__main__":
    main()
