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
from rich.text import Text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from relay.config import PROVIDER_KINDS, load_settings
from relay.progress import TERMINAL, describe, new_progress, percent
from relay.runtime import open_runtime
from relay.simulator import SimulatorConfig, create_simulator_app
from relay.tables import Column, fit_table, styled
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
                    "RELAY_WORKER_IDLE_POLL_SECONDS": "0.2",
                    # Seconds, not hours: a delivery to a stopped subscriber lands in dead letters while you watch.
                    "RELAY_DELIVERIES_SCHEDULE": DEMO_DELIVERY_SCHEDULE})
    for kind in PROVIDER_KINDS:
        environ[f"RELAY_PROVIDERS_{kind.upper()}_BASE_URL"] = f"{sim_url}/{kind}"
    settings = load_settings(None, environ)
    sim_app = create_simulator_app(SimulatorConfig(public_url=sim_url, duration=1.5))
    subscriber = DemoSubscriber()
    subscriber_url = f"http://127.0.0.1:{free_port()}"
    async with running_server(sim_app, sim_port), open_runtime(settings) as runtime, \
            running_server(subscriber.app(), int(subscriber_url.rsplit(":", 1)[1])):
        app = create_app(runtime)
        async with running_server(app, relay_port):
            base = settings.server.public_url
            console.print(f"[bold]relay[/bold] on {base}   simulator on {sim_url}   data in {data_dir.resolve()}")
            headers = {"authorization": f"Bearer {runtime.api_keys[0]}"}
            async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as client:
                await _subscribe(client, f"{subscriber_url}/hooks")
                tasks = await _submit_all(client, per_provider)
                final = await _watch(client, tasks, timeout)
                providers = (await client.get("/v1/providers", params={"days": 1})).json()["data"]
            _report_costs(providers)     # first: the list of archived files stays the output's last part
            ok = _report(console, final, runtime.ctx.image_store.location)
            if keep_running:
                key_file = data_dir.resolve() / "api-key"
                console.print(
                    f"\nrelay stays up at {base}; Ctrl-C to stop.\n"
                    f"  dashboard:  [bold]{base}/[/bold]  (log in with the API key in {key_file})\n"
                    f"  subscriber: {subscriber_url}/hooks receives every event ({subscriber.received} so far);\n"
                    f"              stop it:   curl -X POST {subscriber_url}/stop   (it answers 503: watch attempts "
                    "fail, then land in Dead letters)\n"
                    f"              start it:  curl -X POST {subscriber_url}/start  (then retry them from the page)\n"
                    f"  more tasks: relay submit --url {base} --api-key \"$(cat {key_file})\" "
                    "--provider gmicloud 'a cat'", soft_wrap=True)     # URLs and commands unbroken, to copy
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.Event().wait()
            return 0 if ok else 1


DEMO_DELIVERY_SCHEDULE = "0,2,5,10"     # four attempts over ~17 s, then the delivery is a dead letter


class DemoSubscriber:
    """The demo's own webhook receiver: answers 200 to every event, or 503 while stopped (POST /stop, /start),
    so a new user can watch deliveries fail, land in dead letters and be retried from the dashboard."""

    def __init__(self) -> None:
        self.received = 0
        self.down = False

    def app(self) -> Starlette:
        async def hooks(request: Request) -> Response:
            await request.body()
            if self.down:
                return PlainTextResponse("stopped (POST /start to take events again)", status_code=503)
            self.received += 1
            return PlainTextResponse("ok")

        async def switch(request: Request) -> Response:
            self.down = request.url.path.endswith("/stop")
            return JSONResponse({"down": self.down, "received": self.received})

        return Starlette(routes=[Route("/hooks", hooks, methods=["POST"]),
                                 Route("/stop", switch, methods=["POST"]), Route("/start", switch, methods=["POST"])])


async def _subscribe(client: httpx.AsyncClient, url: str) -> None:
    response = await client.post("/v1/subscriptions", json={"url": url, "events": ["task.*", "archive.*"],
                                                            "description": "relay demo subscriber"})
    if response.status_code != 201:
        raise RuntimeError(f"subscribing the demo subscriber failed: {response.status_code} {response.text}")


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


REPORT_COLUMNS = (Column("provider"), Column("task", "id"), Column("status"), Column("type", drop=1),
                  Column("size"), Column("bytes", drop=2, justify="right"), Column("sha256", "ref", drop=3))


def _report(console: Console, final: dict[str, dict[str, Any]], location: Callable[[str], str]) -> bool:
    ok = True
    rows: list[list[str | Text]] = []
    files = []
    failures = []
    for task in final.values():
        if task["status"] != "succeeded":
            ok = False
            error = task.get("error") or {}
            rows.append([task["provider"], task["id"], styled(task["status"]), "", "", "", ""])
            failures.append(f"  {task['id']}: {error.get('code', '')}: {error.get('message', '')}")
            continue
        for image in task["images"]:
            kind = str(image["content_type"]).removeprefix("image/")
            rows.append([task["provider"], task["id"], styled(task["status"]), kind,
                         f"{image['width']}x{image['height']}", str(image["bytes"]), image["sha256"][:16]])
            files.append(location(image_path(image)))   # a file path, or s3://… for a bucket
    out = Console()
    out.print(fit_table("archived images", REPORT_COLUMNS, rows, out.width))
    if failures:
        print("\nnot archived:\n" + "\n".join(failures))
    if files:
        print("\narchived files:")
        for path in files:
            print(f"  {path}")
    done = sum(1 for t in final.values() if t["status"] == "succeeded")
    console.print(f"{done}/{len(final)} tasks archived" + ("" if ok else " — some did not succeed"),
                  style="green" if ok else "red")
    return ok


COST_COLUMNS = (Column("provider"), Column("day"), Column("tasks", justify="right"),
                Column("cost", justify="right"), Column("circuit", drop=1))


def _report_costs(providers: list[dict[str, Any]]) -> None:
    """Today's cost per provider, as GET /v1/providers sums it (illustrative prices without a config file)."""
    rows: list[list[str | Text]] = []
    for provider in providers:
        for day in provider.get("costs") or []:
            rows.append([provider["name"], day["day"], str(day["tasks"]), f"{day['amount']:.4f} {day['currency']}",
                         provider["circuit"]["state"]])
    if rows:
        out = Console()
        out.print(fit_table("cost per provider (GET /v1/providers)", COST_COLUMNS, rows, out.width))


def image_path(image: dict[str, Any]) -> str:
    """The image store key of an archived image (content-addressed by sha256)."""
    ext = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}.get(image["content_type"], "bin")
    sha = image["sha256"]
    return f"{sha[:2]}/{sha[2:4]}/{sha}.{ext}"
