"""`relay demo`: the simulator and relay in one process, over real sockets, with live progress.

Submits a few tasks to every provider dialect through relay's HTTP API, shows
them move from pending to archived, then prints where the images are. Exits 0
once every task succeeded; `--keep-running` leaves both servers up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from rich.console import Console
from rich.table import Table

from relay.config import PROVIDER_KINDS, load_settings
from relay.progress import TERMINAL, describe, new_progress, percent
from relay.runtime import open_runtime
from relay.simulator import SimulatorConfig, create_simulator_app
from relay.web.app import create_app

# A varied request per dialect, within what each provider supports.
DEMO_REQUESTS: dict[str, list[dict[str, Any]]] = {
    "gmicloud": [{"size": "1024x1024", "output_format": "png"}, {"size": "1536x1024", "output_format": "webp"}],
    "apimart": [{"size": "1:1", "output_format": "png"}, {"size": "2:3", "output_format": "jpeg", "n": 2}],
    "evolink": [{"size": "1024x1024"}, {"size": "3:2", "quality": "medium"}],
    "pixazo": [{"size": "1024x1024", "output_format": "png"}, {"size": "1024x1536", "output_format": "jpeg"}],
    "openai": [{"size": "1024x1024", "output_format": "png"}, {"size": "1536x1024", "output_format": "webp"}],
}
PROMPTS = ["a lighthouse at dusk", "a red fox in fresh snow", "a paper boat on a puddle", "a neon city in rain"]


def free_port(preferred: int = 0, host: str = "127.0.0.1") -> int:
    """`preferred` if it is free, else any free port."""
    for candidate in ([preferred] if preferred else []) + [0]:
        with socket.socket() as sock:
            try:
                sock.bind((host, candidate))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise RuntimeError("no free port")


class _OwnSignals(uvicorn.Server):
    """A uvicorn server that leaves SIGINT/SIGTERM alone: the demo handles Ctrl-C itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def running_server(app: Any, port: int, host: str = "127.0.0.1") -> AsyncIterator[uvicorn.Server]:
    """Serve `app` on host:port in this event loop until the block ends."""
    server = _OwnSignals(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                        lifespan="on"))
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(15):
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError(f"server on port {port} stopped at start")
            await asyncio.sleep(0.02)
    try:
        yield server
    finally:
        server.should_exit = True
        await task


async def run_demo(*, per_provider: int, keep_running: bool, data_dir: Path, port: int, timeout: float) -> int:
    console = Console(stderr=True)
    sim_port = free_port()
    relay_port = free_port(port)
    sim_url = f"http://127.0.0.1:{sim_port}"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    environ.update({"RELAY_STORAGE_DATA_DIR": str(data_dir), "RELAY_SERVER_PORT": str(relay_port),
                    "RELAY_POLLING_INITIAL_DELAY": "0.3", "RELAY_POLLING_MAX_DELAY": "1.0",
                    "RELAY_WORKER_IDLE_POLL_SECONDS": "0.2"})
    for kind in PROVIDER_KINDS:
        environ[f"RELAY_PROVIDERS_{kind.upper()}_BASE_URL"] = f"{sim_url}/{kind}"
    settings = load_settings(None, environ)
    sim_app = create_simulator_app(SimulatorConfig(public_url=sim_url, duration=1.5))
    async with running_server(sim_app, sim_port), open_runtime(settings) as runtime:
        app = create_app(runtime)
        async with running_server(app, relay_port):
            base = settings.server.public_url
            console.print(f"[bold]relay[/bold] on {base}   simulator on {sim_url}   data in {data_dir.resolve()}")
            headers = {"authorization": f"Bearer {runtime.api_keys[0]}"}
            async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as client:
                tasks = await _submit_all(client, per_provider)
                final = await _watch(client, tasks, timeout)
            ok = _report(console, final, runtime.ctx.image_store.location)
            if keep_running:
                console.print(f"\nrelay stays up at {base} (API key in {data_dir.resolve() / 'api-key'}); "
                              "Ctrl-C to stop.")
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.Event().wait()
            return 0 if ok else 1


async def _submit_all(client: httpx.AsyncClient, per_provider: int) -> list[str]:
    ids: list[str] = []
    for kind in PROVIDER_KINDS:
        for i in range(per_provider):
            extra = DEMO_REQUESTS[kind][i % len(DEMO_REQUESTS[kind])]
            body = {"provider": kind, "prompt": PROMPTS[(i + len(ids)) % len(PROMPTS)], **extra,
                    "metadata": {"demo": True}}
            response = await client.post("/v1/tasks", json=body)
            if response.status_code != 202:
                raise RuntimeError(f"submit to {kind} failed: {response.status_code} {response.text}")
            ids.append(response.json()["id"])
    return ids


async def _watch(client: httpx.AsyncClient, task_ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    latest: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    with new_progress() as progress:
        bars = {tid: progress.add_task(tid, total=100) for tid in task_ids}
        while time.monotonic() < deadline:
            pending = [tid for tid in task_ids if latest.get(tid, {}).get("status") not in TERMINAL]
            if not pending:
                break
            responses = await asyncio.gather(*(client.get(f"/v1/tasks/{tid}") for tid in pending))
            for tid, response in zip(pending, responses):
                if response.status_code == 200:
                    latest[tid] = response.json()
                    progress.update(bars[tid], completed=percent(latest[tid]), description=describe(latest[tid]))
            await asyncio.sleep(0.25)
    return latest


def _report(console: Console, final: dict[str, dict[str, Any]], location: Callable[[str], str]) -> bool:
    table = Table(title="archived images")
    for column in ("provider", "task", "status", "type", "size", "bytes", "sha256"):
        table.add_column(column, overflow="fold")
    ok = True
    files = []
    for task in final.values():
        if task["status"] != "succeeded":
            ok = False
            error = task.get("error") or {}
            table.add_row(task["provider"], task["id"], task["status"], "", "", "",
                          f"{error.get('code', '')}: {error.get('message', '')}")
            continue
        for image in task["images"]:
            table.add_row(task["provider"], task["id"], task["status"], image["content_type"],
                          f"{image['width']}x{image['height']}", str(image["bytes"]), image["sha256"][:16])
            files.append(location(image_path(image)))   # a file path, or s3://… for a bucket
    Console().print(table)
    if files:
        print("\narchived files:")
        for path in files:
            print(f"  {path}")
    done = sum(1 for t in final.values() if t["status"] == "succeeded")
    console.print(f"{done}/{len(final)} tasks archived" + ("" if ok else " — some did not succeed"),
                  style="green" if ok else "red")
    return ok


def image_path(image: dict[str, Any]) -> str:
    """The image store key of an archived image (content-addressed by sha256)."""
    ext = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}.get(image["content_type"], "bin")
    sha = image["sha256"]
    return f"{sha[:2]}/{sha[2:4]}/{sha}.{ext}"
