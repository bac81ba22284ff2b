"""Live progress of tasks in the terminal (rich): one bar per task, from pending to archived."""

from __future__ import annotations

import time
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from relay.tables import STATUS_STYLES

TERMINAL = ("succeeded", "failed", "canceled")


def percent(task: dict[str, Any]) -> float:
    """A task's place on the way to archived, 0..100, for a progress bar."""
    status = str(task.get("status"))
    if status in TERMINAL:
        return 100.0
    progress = task.get("progress") or 0
    return {"pending": 2.0, "queued": 10.0, "running": 15.0 + 0.7 * progress, "archiving": 90.0}.get(status, 0.0)


def describe(task: dict[str, Any]) -> str:
    colour = STATUS_STYLES.get(task.get("status", ""), "cyan")
    error = task.get("error") or {}
    detail = f" ({error.get('code')})" if error else ""
    return f"{task['provider']:<9} {task['id']} [{colour}]{task['status']}{detail}[/{colour}]"


def new_progress() -> Progress:
    """Bars on stderr: stdout carries the command's answer (`relay submit --wait | jq`), and rich prints a finished
    bar once to a stream that is not a terminal."""
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                    TimeElapsedColumn(), console=Console(stderr=True))


def wait_for_tasks(client: httpx.Client, task_ids: list[str], *, timeout: float,
                   interval: float = 0.5) -> dict[str, dict[str, Any]]:
    """Poll GET /v1/tasks/{id} until every task is terminal or `timeout` passes; shows rich bars."""
    latest: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    with new_progress() as progress:
        bars = {tid: progress.add_task(tid, total=100) for tid in task_ids}
        while True:
            for tid in task_ids:
                if tid in latest and latest[tid]["status"] in TERMINAL:
                    continue
                response = client.get(f"/v1/tasks/{tid}")
                if response.status_code == 200:
                    task = response.json()
                    latest[tid] = task
                    progress.update(bars[tid], completed=percent(task), description=describe(task))
            if all(t.get("status") in TERMINAL for t in latest.values()) and len(latest) == len(task_ids):
                return latest
            if time.monotonic() > deadline:
                return latest
            time.sleep(interval)
