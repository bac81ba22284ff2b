"""Archive any link, adopt a provider task, bulk import: relay and the simulator as real processes.

Links come from the simulator's CDN (`/files/…`), some already dead (a short `[sim:ttl=…]`), some signed
with their expiry (`variants.signed_links`: `?Expires=<unix seconds>`, read by relay from the link).
Images are fetched back through relay's signed links and compared by sha256 with what the simulator served.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.sink import Sink

from .conftest import RelayFactory
from .harness import API_KEY, Relay, Simulator, clean_environ, wait_for

pytestmark = pytest.mark.e2e

CLI_TIMEOUT = 120.0
AUTH = {"authorization": "Bearer sim-key"}


def sim_task(sim: Simulator, prompt: str) -> str:
    """An EvoLink task created directly against the simulator (not through relay): its id."""
    response = sim.http.post("/evolink/v1/images/generations", headers=AUTH,
                             json={"model": "gpt-image-1.5", "prompt": prompt, "size": "1:1"})
    assert response.status_code == 200, response.text
    task_id: str = response.json()["id"]
    return task_id


def finished(sim: Simulator, task_id: str) -> dict[str, Any]:
    """The simulator's view of a finished task: its image URL and sha256 (waits for it to finish)."""
    def done() -> dict[str, Any] | None:
        task = sim.task("evolink", task_id)
        return task if task["status"] == "succeeded" else None
    return wait_for(done, 10, f"simulator task {task_id} to finish")


def cli(relay: Relay, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "relay", *args, "--url", relay.url, "--api-key", API_KEY]
    return subprocess.run(argv, env=clean_environ(COLUMNS="120"), capture_output=True, text=True,
                          timeout=CLI_TIMEOUT, stdin=subprocess.DEVNULL, check=False)


def all_archives(relay: Relay) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    cursor = ""
    while True:
        page = relay.api.get("/v1/archives", params={"limit": 200, "cursor": cursor}).json()
        found += page["data"]
        if not page["next_cursor"]:
            return found
        cursor = page["next_cursor"]


def fetched_sha256(url: str) -> str:
    """The sha256 of an archived image fetched through its signed link (no API key)."""
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    return hashlib.sha256(response.content).hexdigest()


def test_cdn_links_are_archived_dead_ones_fail_and_a_rerun_changes_nothing(
        sim: Simulator, relay_factory: RelayFactory, tmp_path: Path) -> None:
    """A file of simulator CDN links (plain, CSV with expiry, JSON lines; signed and unsigned; some dead) is
    imported with one command: live links are archived and verified byte for byte, dead ones fail with a clear
    reason (an expiry read from the link fails before any download), and a rerun creates nothing."""
    relay = relay_factory()
    sim.faults(variants={"signed_links": True})
    signed_live = [sim_task(sim, f"signed live {i}") for i in range(3)]
    signed_dead = [sim_task(sim, f"signed dead {i} [sim:ttl=0.3]") for i in range(2)]
    signed = {t: finished(sim, t) for t in signed_live + signed_dead}
    sim.faults(variants={"signed_links": False})
    plain_live = [sim_task(sim, f"plain live {i}") for i in range(3)]
    plain_dead = [sim_task(sim, f"plain dead {i} [sim:ttl=0.3]") for i in range(2)]
    plain = {t: finished(sim, t) for t in plain_live + plain_dead}
    dead = signed_dead + plain_dead
    wait_for(lambda: all(sim.task("evolink", t)["link_expired"] for t in dead), 10, "the short links to die")
    url = {t: info["images"][0]["url"] for t, info in {**signed, **plain}.items()}
    assert all("?Expires=" in url[t] for t in signed) and not any("?" in url[t] for t in plain)
    # Expires= is whole unix seconds, rounded up from the link's real death: relay trusts what the link says,
    # so the dead signed links are "expired" to relay only once that second has passed.
    stated = max(int(url[t].rsplit("Expires=", 1)[1]) for t in signed_dead)
    wait_for(lambda: time.time() > stated, 5, "the dead signed links' stated expiry to pass")
    lines = ["# links from the simulator's CDN",
             *(url[t] for t in signed_live + signed_dead),
             f"{url[plain_live[0]]},2099-01-01T00:00:00Z",                        # CSV with an expiry
             *(json.dumps({"url": url[t], "metadata": {"from": "jsonl"}}) for t in plain_live[1:]),
             *(url[t] for t in plain_dead),
             url[signed_live[0]],                                                  # the same link again
             "not a link at all"]
    path = tmp_path / "links.txt"
    path.write_text("\n".join(lines) + "\n")
    downloads_before = sim.stats("evolink")["downloads"]

    first = cli(relay, "archive", str(path), "--wait", "--json")
    assert first.returncode == 1, first.stderr            # failures: the dead links and the unreadable line
    outcome = {row["line"]: row for row in json.loads(first.stdout)}
    assert "summary" in first.stderr and "failures" in first.stderr and "not a link at all" in first.stderr

    archives = {a["url"]: a for a in all_archives(relay)}
    assert len(archives) == 10                             # one per distinct link
    for t in signed_live + plain_live:
        archive = archives[url[t]]
        assert archive["status"] == "succeeded", archive
        [image] = archive["images"]
        expected = (signed if t in signed else plain)[t]["images"][0]
        assert image["sha256"] == expected["sha256"] and image["width"] == expected["width"]
        assert fetched_sha256(image["url"]) == expected["sha256"]
    for t in signed_dead:
        archive = archives[url[t]]
        assert archive["status"] == "failed" and archive["error"]["code"] == "source_expired", archive
        assert "expired at" in archive["error"]["message"]
    for t in plain_dead:
        archive = archives[url[t]]
        assert archive["status"] == "failed" and archive["error"]["code"] == "source_gone", archive
        assert "410" in archive["error"]["message"]
    # The expiry was read from the signed links: relay never tried to download the dead signed ones.
    assert sim.stats("evolink")["downloads"] - downloads_before == 3 + 3 + 2
    assert archives[url[signed_live[0]]]["expires_at"] != archives[url[plain_live[1]]]["expires_at"]
    assert archives[url[plain_live[1]]]["metadata"] == {"from": "jsonl"}
    # 2099 as asked, believed for seven days at most (a dead host is not retried until 2099).
    stated = datetime.fromisoformat(archives[url[plain_live[0]]]["expires_at"].replace("Z", "+00:00")).timestamp()
    assert 6.9 * 86400 < stated - time.time() <= 7 * 86400
    duplicate = [row for row in outcome.values() if row["id"] == archives[url[signed_live[0]]]["id"]]
    assert len(duplicate) == 2 and sum(row["created"] for row in duplicate) == 1

    events = relay.api.get("/v1/events", params={"type": "archive.succeeded", "limit": 200}).json()["data"]
    assert sorted(e["data"]["id"] for e in events) == sorted(archives[url[t]]["id"] for t in signed_live + plain_live)
    assert len(relay.api.get("/v1/events", params={"type": "archive.failed"}).json()["data"]) == 4

    again = cli(relay, "archive", str(path), "--wait", "--json")
    assert again.returncode == 1
    rows = json.loads(again.stdout)
    assert not any(row["created"] for row in rows)
    assert {row["id"] for row in rows if row["id"]} == {row["id"] for row in outcome.values() if row["id"]}
    assert len(all_archives(relay)) == 10
    assert sim.stats("evolink")["downloads"] - downloads_before == 3 + 3 + 2     # nothing fetched again


def test_archive_api_single_link_idempotency_events_and_listing(sim: Simulator, relay_factory: RelayFactory) -> None:
    """POST /v1/archives: 202 then 200 for the same link; an Idempotency-Key with another body is 409; a
    private address is refused; archive.succeeded reaches an `archive.*` subscriber and the archive's own
    webhook_url, signed; a `task.*` subscriber gets nothing; the list filters by status."""
    relay = relay_factory()
    with Sink().serving_in_thread() as sink:
        archive_sub = relay.api.post("/v1/subscriptions", json={"url": sink.url("/archives"), "events": ["archive.*"]})
        task_sub = relay.api.post("/v1/subscriptions", json={"url": sink.url("/tasks"), "events": ["task.*"]})
        assert archive_sub.status_code == 201 and task_sub.status_code == 201, archive_sub.text
        link = finished(sim, sim_task(sim, "one link"))["images"][0]["url"]
        created = relay.api.post("/v1/archives", json={"url": link, "webhook_url": sink.url("/own")},
                                 headers={"idempotency-key": "k1"})
        assert created.status_code == 202 and created.json()["id"].startswith("arc_"), created.text
        assert created.json()["status"] == "pending"
        same = relay.api.post("/v1/archives", json={"url": link + "#frag"})
        assert same.status_code == 200 and same.json()["id"] == created.json()["id"]
        conflict = relay.api.post("/v1/archives", json={"url": link + "?x=1"}, headers={"idempotency-key": "k1"})
        assert conflict.status_code == 409
        refused = relay.api.post("/v1/archives", json={"urls": [link, "http://169.254.169.254/latest/meta-data"]})
        assert refused.status_code == 422 and refused.json()["error"]["field"] == "urls"
        assert relay.api.post("/v1/archives", json={"urls": [link] * 101}).status_code == 422
        def succeeded() -> dict[str, Any] | None:
            archive: dict[str, Any] = relay.api.get(f"/v1/archives/{created.json()['id']}").json()
            return archive if archive["status"] == "succeeded" else None
        done = wait_for(succeeded, 20, "the archive to succeed")
        assert done["images"][0]["status"] == "archived"
        [received] = wait_for(lambda: sink.delivered("/archives"), 20, "archive.succeeded at the subscriber")
        assert received.verify(archive_sub.json()["secret"])["type"] == "archive.succeeded"
        [own] = wait_for(lambda: sink.delivered("/own"), 20, "archive.succeeded at the archive's webhook_url")
        secret = relay.api.get("/v1/webhook-secret").json()["secret"]
        body = own.verify(secret)
        assert body["data"]["id"] == done["id"] and body["data"]["images"][0]["url"].startswith(relay.url)
        assert sink.on("/tasks") == []
    listed = relay.api.get("/v1/archives", params={"status": "succeeded"}).json()["data"]
    assert [a["id"] for a in listed] == [done["id"]]
    assert relay.api.get("/v1/archives", params={"status": "failed"}).json()["data"] == []
    assert relay.api.get("/v1/archives/arc_nope").status_code == 404
    assert relay.api.get("/v1/archives", params={"cursor": "tsk_x"}).status_code == 422


def test_a_provider_task_made_elsewhere_is_adopted_polled_and_archived(
        sim: Simulator, relay_factory: RelayFactory, tmp_path: Path) -> None:
    """An EvoLink task created directly against the simulator (no callback URL) is adopted: relay never submits
    it, polls it, archives its image with the usual events; adopting it again (API or CLI) is the same task."""
    relay = relay_factory()
    provider_task_id = sim_task(sim, "made elsewhere")
    submits = sim.stats("evolink")["submits"]
    response = relay.api.post("/v1/tasks", json={"provider": "evolink", "provider_task_id": provider_task_id,
                                                 "metadata": {"adopted": "yes"}})
    assert response.status_code == 202, response.text
    task = relay.wait_succeeded(response.json()["id"])
    assert task["provider_task_id"] == provider_task_id and task["request"] == {"adopted": True}
    expected = sim.task("evolink", provider_task_id)["images"][0]
    assert fetched_sha256(task["images"][0]["url"]) == expected["sha256"]
    types = [e["type"] for e in relay.events(task["id"])]
    assert types[-2:] == ["task.generated", "task.succeeded"]
    assert sim.stats("evolink")["submits"] == submits            # never submitted by relay
    again = relay.api.post("/v1/tasks", json={"provider": "evolink", "provider_task_id": provider_task_id})
    assert again.status_code == 200 and again.json()["id"] == task["id"]
    bad = relay.api.post("/v1/tasks", json={"provider": "evolink", "provider_task_id": "../admin"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "provider_task_id"
    mixed = relay.api.post("/v1/tasks", json={"provider": "evolink", "provider_task_id": "x", "prompt": "p"})
    assert mixed.status_code == 422 and mixed.json()["error"]["field"] == "prompt"

    other = sim_task(sim, "made elsewhere too")
    path = tmp_path / "tasks.csv"
    path.write_text(f"provider,provider_task_id\nevolink,{provider_task_id}\nevolink,{other}\n")
    result = cli(relay, "archive", str(path), "--wait", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(r["kind"], r["created"], r["status"]) for r in rows] == [("adopt", False, "succeeded"),
                                                                      ("adopt", True, "succeeded")]
    assert rows[0]["id"] == task["id"]


def test_an_interrupted_import_is_finished_by_a_rerun_without_duplicates(
        sim: Simulator, relay_factory: RelayFactory, tmp_path: Path) -> None:
    """Ctrl-C in the middle of a 200-line import, then the same command again: 200 archives, none twice."""
    relay = relay_factory()
    path = tmp_path / "many.txt"
    path.write_text("".join(f"{sim.url}/files/{i:032x}.png\n" for i in range(200)))
    argv = [sys.executable, "-m", "relay", "archive", str(path), "--concurrency", "1", "--url", relay.url,
            "--api-key", API_KEY]
    proc = subprocess.Popen(argv, env=clean_environ(COLUMNS="120"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: relay.api.get("/v1/archives", params={"limit": 1}).json()["data"], 30,
                 "the import to start")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=CLI_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in (130, 1), err        # 1: it had finished (the links are dead) before the signal
    if proc.returncode == 130:
        assert "interrupted" in err and "again" in err
    before = len(all_archives(relay))
    rerun = cli(relay, "archive", str(path), "--json")
    rows = json.loads(rerun.stdout)
    assert len(rows) == 200 and sum(r["created"] for r in rows) == 200 - before
    archives = all_archives(relay)
    assert len(archives) == 200 and len({a["url"] for a in archives}) == 200
