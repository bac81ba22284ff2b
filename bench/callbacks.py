"""Callback acknowledgement: relay's POST /callbacks vs a bare Starlette 200 endpoint, same stack, same run.

    python -m bench.callbacks [--seconds 10] [--connections 32]

Starts a bare Starlette app, the simulator and relay as processes, drives each with wrk (POST of an
EvoLink-shaped body, keep-alive, N connections) and prints requests/s and latency percentiles. relay
is measured twice: API role only (acknowledging = durably recording, nothing else running) and with
its workers processing every callback (confirm with the provider, apply) at the same time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import httpx

from bench.common import PYTHON, free_port, machine, spawn, stop, wait_http, wrk
from relay.links import Signer

KEY = "rk_bench_0123456789abcdefghij"


def relay_env(data: Path, port: int, sim: int, role: str) -> dict[str, str]:
    env = {"RELAY_STORAGE_DATA_DIR": str(data), "RELAY_SERVER_PORT": str(port), "RELAY_AUTH_API_KEYS": KEY,
           "RELAY_SERVER_ROLE": role, "RELAY_CALLBACKS_SAFETY_NET_SECONDS": "3600"}
    for kind in ("gmicloud", "apimart", "evolink", "pixazo", "openai"):
        env[f"RELAY_PROVIDERS_{kind.upper()}_BASE_URL"] = f"http://127.0.0.1:{sim}/{kind}"
        env[f"RELAY_PROVIDERS_{kind.upper()}_RATE_LIMIT"] = "100000"
    return env


def callback_path(base: str, data: Path) -> tuple[str, str]:
    """Create an EvoLink task and return its callback path and a body for it."""
    task = httpx.post(f"{base}/v1/tasks", json={"provider": "evolink", "prompt": "bench"},
                      headers={"authorization": f"Bearer {KEY}"}).json()
    token = Signer((data / "signing-secret").read_text().strip()).callback_token("evolink", task["id"])
    body = json.dumps({"id": "task-unified-bench", "object": "image.generation.task", "status": "processing",
                       "progress": 50})
    return f"/callbacks/evolink/{task['id']}/{token}", body


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bare_port, sim_port = free_port(), free_port()
        bare = spawn([PYTHON, "-m", "uvicorn", "bench.bare_app:app", "--port", str(bare_port), "--log-level",
                      "warning", "--no-access-log"], log=root / "bare.log")
        sim = spawn([PYTHON, "-m", "relay", "simulate", "--port", str(sim_port), "--duration", "3600"],
                    log=root / "sim.log")
        try:
            wait_http(f"http://127.0.0.1:{bare_port}/")
            wait_http(f"http://127.0.0.1:{sim_port}/_sim/stats")
            body = json.dumps({"status": "processing"})
            wrk(f"http://127.0.0.1:{bare_port}/x", body=body, connections=args.connections, seconds=2)  # warm-up
            results["bare Starlette 200"] = wrk(f"http://127.0.0.1:{bare_port}/x", body=body,
                                                connections=args.connections, seconds=args.seconds)
            for role in ("api", "all"):
                data, port = root / f"data-{role}", free_port()
                relay = spawn([PYTHON, "-m", "relay", "serve", "--log-level", "warning"],
                              env=relay_env(data, port, sim_port, role), log=root / f"relay-{role}.log")
                try:
                    base = f"http://127.0.0.1:{port}"
                    wait_http(f"{base}/healthz")
                    path, cb_body = callback_path(base, data)
                    wrk(base + path, body=cb_body, connections=args.connections, seconds=2)
                    label = "relay callback ack (API only)" if role == "api" else "relay callback ack (+ workers)"
                    results[label] = wrk(base + path, body=cb_body, connections=args.connections,
                                         seconds=args.seconds)
                finally:
                    stop(relay)
        finally:
            stop(bare)
            stop(sim)
    baseline = results["bare Starlette 200"]["rps"]
    lines = [f"Machine: {machine()}. wrk, 1 thread, {args.connections} connections, {args.seconds} s per run.", "",
             "| endpoint | requests/s | vs bare | p50 ms | p90 ms | p99 ms | non-2xx |",
             "|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        lines.append(f"| {label} | {r['rps']:.0f} | {r['rps'] / baseline:.0%} | {r.get('p50', 0):.2f} | "
                     f"{r.get('p90', 0):.2f} | {r.get('p99', 0):.2f} | {r['non2xx']:.0f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
