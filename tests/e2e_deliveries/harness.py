"""Processes for the delivery end-to-end tests: `relay simulate` and `relay serve`, killable and restartable.

Built on tests/e2e's process primitives (every wait is on a condition with a
deadline, every process is reaped), with the settings delivery tests want:
fast delivery retries, short leases.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import httpx

from relay.config import PROVIDER_KINDS
from tests.e2e.harness import Process, free_port, wait_for
from tests.e2e.harness import clean_environ as _env

__all__ = ["API_KEY", "Relay", "Simulator", "free_port", "wait_for"]

API_KEY = "rk_e2e_deliveries_0123456789abcdef"


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


class Simulator:
    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = Process("simulator", [sys.executable, "-m", "relay", "simulate", "--port", str(self.port),
                                             "--duration", "0.2"], _env(), log_dir)

    def start(self) -> None:
        self.process.start()
        wait_for(lambda: self.process.check_alive() or _up(f"{self.url}/_sim/stats"), 15, "the simulator")


class Relay:
    """`relay serve` on a fixed data dir and port: kill -9 and start again keep both."""

    def __init__(self, sim: Simulator, data_dir: Path, log_dir: Path, **extra_env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {"RELAY_STORAGE_DATA_DIR": str(data_dir), "RELAY_SERVER_PORT": str(self.port),
               "RELAY_AUTH_API_KEYS": API_KEY, "RELAY_POLLING_INITIAL_DELAY": "0.1", "RELAY_POLLING_MAX_DELAY": "0.3",
               "RELAY_WORKER_IDLE_POLL_SECONDS": "0.1", "RELAY_WORKER_LEASE_SECONDS": "2",
               "RELAY_DELIVERIES_SCHEDULE": "0,0.3,0.3,0.3,0.3", "RELAY_DELIVERIES_JITTER": "0",
               "RELAY_DELIVERIES_TIMEOUT": "5"}
        for kind in PROVIDER_KINDS:
            env[f"RELAY_PROVIDERS_{kind.upper()}_BASE_URL"] = f"{sim.url}/{kind}"
        env.update(extra_env)
        self.process = Process(f"relay-{self.port}", [sys.executable, "-m", "relay", "serve", "--log-level", "info"],
                               _env(**env), log_dir)
        self.api = httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {API_KEY}"}, timeout=10)

    def start(self) -> None:
        self.process.start()
        wait_for(lambda: self.process.check_alive() or _up(f"{self.url}/healthz"), 15, "relay to answer /healthz")

    def kill(self) -> None:
        self.process.kill()
        self.api.close()
        self.api = httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {API_KEY}"}, timeout=10)

    def close(self) -> None:
        try:
            self.process.stop()
        finally:
            self.api.close()

    # ---- API ----------------------------------------------------------------------------------------
    def post(self, path: str, body: dict[str, Any] | None = None, status: int = 200) -> dict[str, Any]:
        response = self.api.post(path, json=body if body is not None else {})
        assert response.status_code == status, f"POST {path} → {response.status_code} {response.text}"
        result: dict[str, Any] = response.json()
        return result

    def get(self, path: str, **params: Any) -> Any:
        response = self.api.get(path, params=params)
        assert response.status_code == 200, f"GET {path} → {response.status_code} {response.text}"
        return response.json()

    def subscribe(self, url: str, **body: Any) -> dict[str, Any]:
        return self.post("/v1/subscriptions", {"url": url, **body}, status=201)

    def create_task(self, **body: Any) -> dict[str, Any]:
        # gmicloud is polled: these tests are about deliveries, not about how fast relay learns of completion.
        return self.post("/v1/tasks", {"provider": "gmicloud", "prompt": "a lighthouse", **body}, status=202)

    def wait_task(self, task_id: str, timeout: float = 20) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            self.process.check_alive()
            task: dict[str, Any] = self.get(f"/v1/tasks/{task_id}")
            return task if task["status"] in ("succeeded", "failed", "canceled") else None
        return wait_for(done, timeout, f"task {task_id} to finish")

    def event_id(self, task_id: str, type_: str) -> str:
        events = self.get("/v1/events", task_id=task_id, type=type_)["data"]
        assert len(events) == 1, events
        return str(events[0]["id"])

    def deliveries(self, **params: Any) -> list[dict[str, Any]]:
        return list(self.get("/v1/deliveries", limit=200, **params)["data"])
