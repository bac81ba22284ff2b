"""The e2e harness: `relay simulate` and `relay serve` as child processes, and a condition waiter.

Every wait is on a condition with a deadline; every process is reaped by `stop`/`kill`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx

from relay.config import PROVIDER_KINDS

API_KEY = "rk_e2e_0123456789abcdefghijklmnop"   # 24+ characters, as config requires 16+
START_DEADLINE = 15.0
STOP_GRACE = 10.0
TERMINAL = ("succeeded", "failed", "canceled")
SIM_DURATION = 0.3

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Call `predicate` until it returns something truthy (returned); AssertionError naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last value: {last!r})")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_environ(**extra: str) -> dict[str, str]:
    """os.environ without any inherited RELAY_* variable, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Process:
    """A child process whose stdout/stderr go to files; always reaped by `stop` or `kill`."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.logs: list[Path] = []

    def start(self) -> None:
        assert self.proc is None, f"{self.name} is already running"
        self.runs += 1
        log = self.log_dir / f"{self.name}.{self.runs}.log"
        self.logs.append(log)
        with log.open("wb") as out:   # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with code {self.proc.returncode}\n{self.output()}")

    def exited_with(self, text: str) -> bool:
        """True if the process has exited and its latest output contains `text`."""
        if self.proc is None or self.proc.poll() is None or not self.logs:
            return False
        return text in self.logs[-1].read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (a crash)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=STOP_GRACE)
        self.proc = None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit within the grace period."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_GRACE)
        self.proc = None

    def output(self, tail: int = 20000) -> str:
        parts = []
        for log in self.logs:
            text = log.read_text(errors="replace") if log.exists() else "(no log)"
            parts.append(f"----- {self.name} output ({log.name}) -----\n{text[-tail:]}")
        return "\n".join(parts)


def _http_ok(client: httpx.Client, path: str) -> bool:
    try:
        return client.get(path).status_code == 200
    except httpx.TransportError:
        return False


class Simulator:
    """`relay simulate` in a child process, with helpers for its /_sim control API."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "relay", "simulate", "--port", str(self.port),
                "--duration", str(SIM_DURATION)]
        self.process = Process("simulator", argv, clean_environ(), log_dir)
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def start(self) -> None:
        self.process.start()

        def up() -> bool:
            self.process.check_alive()
            return _http_ok(self.http, "/_sim/stats")

        wait_for(up, START_DEADLINE, "the simulator to answer GET /_sim/stats")

    def close(self) -> None:
        try:
            self.process.stop()
        finally:
            self.http.close()

    def reset(self) -> None:
        response = self.http.post("/_sim/reset")
        assert response.status_code == 200, response.text

    def faults(self, **body: Any) -> dict[str, Any]:
        response = self.http.post("/_sim/faults", json=body)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def stats(self, dialect: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = self.http.get("/_sim/stats").json()
        return body["dialects"][dialect] if dialect else body

    def tasks(self, dialect: str | None = None) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.http.get("/_sim/tasks").json()["tasks"]
        return [t for t in found if dialect is None or t["dialect"] == dialect]

    def task(self, dialect: str, provider_task_id: str) -> dict[str, Any]:
        response = self.http.get(f"/_sim/tasks/{dialect}/{provider_task_id}")
        assert response.status_code == 200, f"simulator has no {dialect} task {provider_task_id}: {response.text}"
        body: dict[str, Any] = response.json()
        return body


class Relay:
    """`relay serve` in a child process: per-test data dir, env overrides only, restartable on the same port."""

    def __init__(self, sim: Simulator, data_dir: Path, log_dir: Path, name: str = "relay",
                 extra_env: dict[str, str] | None = None, extra_args: list[str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        env = {
            "RELAY_STORAGE_DATA_DIR": str(data_dir),
            "RELAY_SERVER_PORT": str(self.port),
            "RELAY_AUTH_API_KEYS": API_KEY,
            "RELAY_POLLING_INITIAL_DELAY": "0.2",
            "RELAY_POLLING_MAX_DELAY": "0.5",
            "RELAY_WORKER_IDLE_POLL_SECONDS": "0.2",
            "RELAY_WORKER_RETRY_BASE": "0.2",
            "RELAY_WORKER_RETRY_CAP": "1",
            "RELAY_WORKER_LEASE_SECONDS": "3",
        }
        for kind in PROVIDER_KINDS:
            env[f"RELAY_PROVIDERS_{kind.upper()}_BASE_URL"] = f"{sim.url}/{kind}"
        env.update(extra_env or {})
        argv = [sys.executable, "-m", "relay", "serve", "--log-level", "info", *(extra_args or [])]
        self.process = Process(name, argv, clean_environ(**env), log_dir)
        self.api = self._client()

    def _client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {API_KEY}"}, timeout=10)

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start and wait for /healthz. A first start whose free port was taken meanwhile moves to another."""
        for attempt in range(3):
            self.process.start()
            try:
                self._wait_healthy()
                return
            except AssertionError:
                lost_port = self.process.runs == attempt + 1 and self.process.exited_with("address already in use")
                if not lost_port or attempt == 2:
                    raise
                self.process.proc = None
                self._move_to(free_port())

    def _wait_healthy(self) -> None:
        probe = httpx.Client(base_url=self.url, timeout=2)
        try:
            def up() -> bool:
                self.process.check_alive()
                return _http_ok(probe, "/healthz")

            wait_for(up, START_DEADLINE, f"relay to answer GET /healthz on {self.url}")
        finally:
            probe.close()

    def _move_to(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.process.env["RELAY_SERVER_PORT"] = str(port)
        self.api.close()
        self.api = self._client()

    def kill(self) -> None:
        self.process.kill()
        # Pooled connections point at the dead process: start over with a fresh client.
        self.api.close()
        self.api = self._client()

    def restart(self) -> None:
        self.kill()
        self.start()

    def close(self) -> None:
        try:
            self.process.stop()
        finally:
            self.api.close()

    # ---- API helpers ----------------------------------------------------------------------------
    def create(self, body: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
        response = self.api.post("/v1/tasks", json=body, headers=headers)
        assert response.status_code == 202, f"POST /v1/tasks → {response.status_code} {response.text}"
        task: dict[str, Any] = response.json()
        return task

    def task(self, task_id: str) -> dict[str, Any]:
        response = self.api.get(f"/v1/tasks/{task_id}")
        assert response.status_code == 200, response.text
        task: dict[str, Any] = response.json()
        return task

    def wait_status(self, task_id: str, statuses: tuple[str, ...], timeout: float = 20.0) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            self.process.check_alive()
            task = self.task(task_id)
            return task if task["status"] in statuses else None

        return wait_for(reached, timeout, f"task {task_id} to be {' or '.join(statuses)}")

    def wait_terminal(self, task_id: str, timeout: float = 20.0) -> dict[str, Any]:
        return self.wait_status(task_id, TERMINAL, timeout)

    def wait_succeeded(self, task_id: str, timeout: float = 20.0) -> dict[str, Any]:
        task = self.wait_terminal(task_id, timeout)
        assert task["status"] == "succeeded", f"task ended {task['status']}: {task['error']}"
        return task

    def events(self, task_id: str) -> list[dict[str, Any]]:
        response = self.api.get("/v1/events", params={"task_id": task_id, "limit": 200})
        assert response.status_code == 200, response.text
        events: list[dict[str, Any]] = response.json()["data"]
        return events

    def job_counts(self) -> dict[str, int]:
        """relay_jobs{kind,state} from /metrics, as {"kind:state": n}."""
        text = self.api.get("/metrics").text
        counts: dict[str, int] = {}
        for line in text.splitlines():
            if line.startswith("relay_jobs{"):
                labels, _, value = line.partition("} ")
                kind = labels.split('kind="', 1)[1].split('"', 1)[0]
                state = labels.split('state="', 1)[1].split('"', 1)[0]
                counts[f"{kind}:{state}"] = int(float(value))
        return counts


# ---- several replicas on one PostgreSQL database (test_replicas.py, tests/chaos) -----------------------
REPLICA_SIGNING_SECRET = "e2e-replicas-signing-secret-0123456789abcdef"   # the same on every replica


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """tests/pg.py's fresh database for processes to share: yields its DSN, drops it afterwards."""
    from tests.pg import fresh_database

    loop = asyncio.new_event_loop()
    manager = fresh_database()
    try:
        dsn = loop.run_until_complete(manager.__aenter__())
        try:
            yield dsn
        except BaseException as exc:
            loop.run_until_complete(manager.__aexit__(type(exc), exc, exc.__traceback__))
            raise
        loop.run_until_complete(manager.__aexit__(None, None, None))
    finally:
        loop.close()


def replica_env(dsn: str, images_dir: Path) -> dict[str, str]:
    """RELAY_* settings every replica shares: the database, the signing secret, the images."""
    return {"RELAY_STORAGE_DATABASE": dsn, "RELAY_AUTH_SIGNING_SECRET": REPLICA_SIGNING_SECRET,
            "RELAY_STORAGE_IMAGES_DIR": str(images_dir)}


def start_all(relays: list[Relay]) -> None:
    """Start several relays at once (they boot in parallel) and wait until each answers /healthz."""
    for relay in relays:
        relay.process.start()
    for relay in relays:
        relay._wait_healthy()


def child_pids(pid: int) -> list[int]:
    """The live children of `pid` (Linux /proc), e.g. the processes of `relay serve --processes N`."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue              # exited meanwhile
        # pid (comm) state ppid …: comm may hold spaces and parentheses, so split after the last ")".
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            children.append(int(entry.name))
    return sorted(children)


def pid_alive(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"
