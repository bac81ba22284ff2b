"""Processes for the delivery end-to-end tests: `relay simulate` and `relay serve`, killable and restartable.

The same shape as tests/e2e (kept separate on purpose): every wait is on a
condition with a deadline, and every process is reaped.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

from relay.config import PROVIDER_KINDS

API_KEY = "rk_e2e_deliveries_0123456789abcdef"
T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Call `predicate` until it returns something truthy (returned); AssertionError naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {value!r})")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Process:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name, self.argv, self.env, self.log_dir = name, argv, env, log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []

    def start(self) -> None:
        log = self.log_dir / f"{self.name}.{len(self.logs) + 1}.log"
        self.logs.append(log)
        with log.open("wb") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}\n{self.output()}")

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
            self.proc = None

    def output(self) -> str:
        return "\n".join(f"----- {log.name} -----\n{log.read_text(errors='replace')[-20000:]}"
                         for log in self.logs if log.exists())


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


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
               # Kept above any burst in these tests: a saturated Worker spins (see the report on relay/queue.py).
               "RELAY_WORKER_CONCURRENCY": "128",
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
