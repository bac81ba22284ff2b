"""Issue 10's "done when", as a new user does it: `relay demo --keep-running`, open the dashboard URL it prints,
log in with the key it names, see the demo's tasks, images and deliveries; stop the demo subscriber, watch a
task's deliveries fail into Dead letters, start the subscriber again and retry them from the page."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, expect

from relay.config import PROVIDER_KINDS
from tests.e2e.harness import clean_environ, wait_for

from .harness import WAIT, Console

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]
MS = WAIT * 1000


@dataclass
class Demo:
    url: str                 # relay's base URL, as printed
    subscriber: str          # the demo subscriber's base URL
    key: str                 # the API key from the file the demo names
    process: subprocess.Popen[str]
    log: Path

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {self.key}"}, timeout=10)


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    log = tmp_path / "demo.log"
    argv = [sys.executable, "-m", "relay", "demo", "--keep-running", "--port", "0", "--per-provider", "1",
            "--data-dir", "demo-data"]
    env = {**clean_environ(), "COLUMNS": "100"}
    with log.open("w") as out:
        process = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        def printed() -> re.Match[str] | None:
            if process.poll() is not None:
                raise AssertionError(f"relay demo exited {process.returncode}:\n{log.read_text()}")
            return re.search(r"dashboard:\s+(\S+)/\s+\(log in with the API key in (\S+)\)", log.read_text())
        found = wait_for(printed, 150, "the demo to print its dashboard URL", interval=0.2)
        subscriber = re.search(r"subscriber: (\S+)/hooks", log.read_text())
        assert subscriber, log.read_text()
        key = Path(found.group(2)).read_text().strip()
        yield Demo(found.group(1), subscriber.group(1), key, process, log)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


def _deliveries(demo: Demo, task_id: str) -> list[dict[str, Any]]:
    with demo.api() as api:
        found = api.get("/v1/deliveries", params={"limit": 100}).json()["data"]
    return [d for d in found if d.get("task_id") == task_id]


def test_the_demo_dashboard_as_a_new_user(browser: Browser, demo: Demo) -> None:
    console = Console.open(browser, demo)         # type: ignore[arg-type]  # only .url is used
    try:
        console.login(demo.key)
        expect(console.page.locator("h1")).to_have_text("Tasks", timeout=MS)
        rows = console.page.locator("tr[data-task]")
        expect(rows).to_have_count(len(PROVIDER_KINDS), timeout=MS)
        # One of the demo's tasks: its image from the archive and its deliveries to the demo subscriber.
        with demo.api() as api:
            task = api.get("/v1/tasks", params={"limit": 1}).json()["data"][0]
        console.goto(f"/console/tasks/{task['id']}")
        expect(console.page.locator(".thumb img")).to_have_count(len(task["images"]), timeout=MS)
        wait_for(lambda: console.page.evaluate("document.querySelector('.thumb img').naturalWidth") > 0, WAIT,
                 "the thumbnail to load")
        expect(console.page.locator("li.event").first).to_contain_text("task.", timeout=MS)
        assert "/hooks" in console.page.content()         # the timeline names the subscriber of each delivery

        # Stop the subscriber; a new task's deliveries fail (four attempts over ~17 s) into dead letters.
        httpx.post(f"{demo.subscriber}/stop", timeout=5).raise_for_status()
        with demo.api() as api:
            made = api.post("/v1/tasks", json={"provider": "gmicloud", "prompt": "while the subscriber is down"})
            assert made.status_code == 202, made.text
        task_id = made.json()["id"]
        wait_for(lambda: (lambda ds: len(ds) >= 4 and all(d["status"] == "failed" for d in ds))(
            _deliveries(demo, task_id)), 90, "the new task's deliveries to fail for good", interval=0.5)
        console.goto("/console/dead-letters")
        dead = console.page.locator("tr[data-delivery]")
        expect(dead).to_have_count(len(_deliveries(demo, task_id)), timeout=MS)

        # Start it again and retry them all from the page: they succeed.
        httpx.post(f"{demo.subscriber}/start", timeout=5).raise_for_status()
        console.page.check("input[data-select-all]")
        console.page.click("#dead-letters button[type=submit]")
        expect(console.page.locator(".note")).to_contain_text("queued for a new attempt", timeout=MS)
        wait_for(lambda: all(d["status"] == "succeeded" for d in _deliveries(demo, task_id)), 60,
                 "the retried deliveries to succeed", interval=0.3)
        console.goto("/console/dead-letters")
        expect(console.page.locator("tr[data-delivery]")).to_have_count(0, timeout=MS)
        assert console.outside_requests() == [] and console.console_errors == [], \
            (console.outside_requests(), console.console_errors)
    finally:
        console.close()
    started = time.monotonic()
    os.killpg(demo.process.pid, signal.SIGINT)            # Ctrl-C: the demo stops cleanly
    assert demo.process.wait(timeout=30) == 0, demo.log.read_text()
    assert time.monotonic() - started < 30
