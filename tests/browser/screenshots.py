"""Screenshots of every console page for docs/screenshots/: `python -m tests.browser.screenshots [OUT_DIR]`.

Starts the simulator and relay (SQLite) as processes, makes some history through the API (tasks on several
providers, a subscriber that was down: dead letters, a retried delivery, a dead job, a rotated secret, archives
of links, an open circuit) and photographs each page in headless Chromium at 1280 px wide.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from tests.e2e.harness import Simulator, wait_for
from tests.sink import Sink

from .harness import WAIT, Console, bury_a_job, launch, open_a_circuit, relay_on, wait_status

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, Sink().serving_in_thread() as sink:
        work = Path(tmp)
        sim = Simulator(work)
        sim.start()
        try:
            with relay_on("sqlite", sim, work) as relay, sync_playwright() as playwright:
                sink.default("/orders", status=503)        # the order service is down: its deliveries die
                relay.api.post("/v1/subscriptions", json={"url": sink.url("/orders"), "events": ["task.succeeded"],
                                                          "description": "order service"})
                relay.api.post("/v1/subscriptions", json={"url": sink.url("/analytics"), "events": ["task.*"],
                                                          "description": "analytics"})
                tasks = [relay.create({"provider": provider, "prompt": f"a lighthouse at dusk, take {i}",
                                       "metadata": {"order": 1040 + i}})
                         for i, provider in enumerate(["gmicloud", "evolink", "apimart", "openai", "pixazo",
                                                       "gmicloud"])]
                for task in tasks:
                    relay.wait_terminal(task["id"], timeout=60)
                wait_status(relay, {"status": "failed"}, "failed", count=len(tasks))
                sink.default("/orders", status=200)        # and back up: a retry from the page goes through
                bury_a_job(relay, tasks[0]["id"], "provider_unavailable: provider error 500: internal server error")
                open_a_circuit(relay, "pixazo", "provider error 503: service unavailable")
                archives = [relay.api.post("/v1/archives", json={"url": relay.task(t["id"])["images"][0]["url"],
                                                                 "metadata": {"order": 1040 + i}}).json()
                            for i, t in enumerate(tasks[:3])]
                for archive in archives:
                    wait_for(lambda a=archive: relay.api.get(f"/v1/archives/{a['id']}").json()["status"]
                             in ("succeeded", "failed"), WAIT, "the archives")
                sim.faults(duration=120)             # one task still in flight in the pictures
                running = relay.create({"provider": "gmicloud", "prompt": "a slow one", "metadata": {"order": 1099}})
                relay.wait_status(running["id"], ("queued", "running"))

                browser = launch(playwright)
                console = Console.open(browser, relay)
                console.page.set_viewport_size({"width": 1280, "height": 900})
                shots = []

                def shoot(name: str, path: str | None = None) -> None:
                    if path is not None:
                        console.goto(path)
                    console.page.wait_for_load_state("networkidle")
                    file = out / f"{name}.png"
                    console.page.screenshot(path=str(file), full_page=True)
                    shots.append(file.name)

                console.goto("/console/login")
                shoot("login")
                console.login()
                shoot("tasks", "/console/")
                console.goto(f"/console/tasks/{tasks[0]['id']}")
                failed = console.page.locator(".delivery:has(button)").first     # retry it from the timeline
                delivery = f".delivery[data-delivery='{failed.get_attribute('data-delivery')}'] .status"
                failed.locator("button").click()
                wait_for(lambda: console.page.locator(delivery).inner_text() == "succeeded", WAIT, "the retry")
                wait_for(lambda: console.page.evaluate(
                    "[...document.querySelectorAll('.thumb img')].every(i => i.naturalWidth > 0)"), WAIT, "thumbnails")
                shoot("task")
                shoot("archives", "/console/archives")
                console.goto(f"/console/archives/{archives[0]['id']}")
                wait_for(lambda: console.page.evaluate(
                    "[...document.querySelectorAll('.thumb img')].every(i => i.naturalWidth > 0)"), WAIT, "thumbnails")
                shoot("archive")
                shoot("subscriptions", "/console/subscriptions")
                shoot("dead-letters", "/console/dead-letters")
                def counted() -> bool:       # each process adds its provider stats every few seconds
                    console.goto("/console/providers")
                    return console.page.locator("tr[data-provider='gmicloud'] td").nth(1).inner_text() != "0"
                wait_for(counted, 3 * WAIT, "provider stats", interval=1.0)
                shoot("providers")
                shoot("queue", "/console/queue")
                console.goto("/console/subscriptions")
                console.page.locator("tr[data-subscription] form[action$='/rotate'] button").first.click()
                shoot("secret-rotated")
                console.close()
                browser.close()
                assert console.outside_requests() == [], console.outside_requests()
        finally:
            sim.close()
    print("\n".join(str(out / name) for name in shots))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
