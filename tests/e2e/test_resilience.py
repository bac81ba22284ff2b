"""relay's guarantees under crashes and provider faults, checked against real processes."""

from __future__ import annotations

import hashlib
from typing import Any

import httpx
import pytest

from .conftest import RelayFactory
from .harness import Relay, Simulator, wait_for

pytestmark = pytest.mark.e2e

POLLED = ("gmicloud", "apimart", "evolink", "pixazo")


def _assert_matches_provider(sim: Simulator, task: dict[str, Any]) -> None:
    """Every archived image is byte-identical to what the simulator generated."""
    at_sim = sim.task(task["provider"], task["provider_task_id"])
    assert len(task["images"]) == len(at_sim["images"]) >= 1
    for image in task["images"]:
        with httpx.Client(timeout=10) as anonymous:
            body = anonymous.get(image["url"]).content
        assert hashlib.sha256(body).hexdigest() == image["sha256"] == at_sim["images"][image["index"]]["sha256"]


def _assert_one_event_per_transition(relay: Relay, task_id: str) -> list[str]:
    events = relay.events(task_id)
    types = [e["type"] for e in events]
    status_events = [t for t in types if t != "task.progress"]
    assert len(status_events) == len(set(status_events)), f"a transition was recorded twice: {types}"
    sequences = [e["sequence"] for e in events]
    assert sequences == sorted(set(sequences)), f"event sequences not strictly increasing: {sequences}"
    return types


def test_worker_killed_mid_job_recovers(sim: Simulator, relay: Relay) -> None:
    """relay SIGKILLed with one task running and one archiving finishes both after restart, one success each."""
    # apimart's first download is held open far beyond the kill, so its archive job is mid-flight;
    # gmicloud's task takes long enough to be running (and polled) at the kill.
    sim.faults(timeout_seconds=30, next=[{"dialect": "apimart", "op": "download", "fault": "timeout"}])
    running = relay.create({"provider": "gmicloud", "prompt": "crash while running [sim:duration=6]"})
    archiving = relay.create({"provider": "apimart", "prompt": "crash while archiving"})
    relay.wait_status(archiving["id"], ("archiving",))
    wait_for(lambda: sim.stats("apimart")["faults"]["timeout"] == 1, 5, "the held download to start")
    relay.wait_status(running["id"], ("running",))

    relay.kill()
    relay.start()   # same data dir, same port; the lease (3 s) brings the jobs back

    for created in (running, archiving):
        task = relay.wait_succeeded(created["id"], timeout=20)
        _assert_matches_provider(sim, task)
        types = _assert_one_event_per_transition(relay, created["id"])
        assert types.count("task.succeeded") == 1, types
        assert sim.stats(task["provider"])["submits"] == 1
        assert len(sim.tasks(task["provider"])) == 1


def test_provider_faults_end_in_success(sim: Simulator, relay_factory: RelayFactory) -> None:
    """429s on submit, 500s on poll, a truncated and a stalled download: the task still succeeds."""
    relay = relay_factory(RELAY_ARCHIVE_TIMEOUT="1")
    sim.faults(timeout_seconds=3, next=[
        {"dialect": "evolink", "op": "submit", "fault": "429", "count": 2, "retry_after": 1},
        {"dialect": "evolink", "op": "poll", "fault": "500", "count": 2},
        {"dialect": "evolink", "op": "download", "fault": "truncate", "count": 1},
        {"dialect": "evolink", "op": "download", "fault": "timeout", "count": 1},
    ])
    created = relay.create({"provider": "evolink", "prompt": "through the storm"})
    task = relay.wait_succeeded(created["id"], timeout=30)
    _assert_matches_provider(sim, task)

    stats = sim.stats("evolink")
    assert stats["faults"] == {"429": 2, "500": 2, "timeout": 1, "truncate": 1, "malformed": 0, "503": 0}, stats
    assert stats["submits"] == 3 and stats["downloads"] >= 3, stats
    assert len(sim.tasks("evolink")) == 1, "a rate-limited submit must not create a second task"
    assert sim.faults()["next"] == [], "every injected fault was consumed"
    _assert_one_event_per_transition(relay, created["id"])


@pytest.mark.parametrize("blocked_downloads", [0, 2], ids=["dead-on-arrival", "dies-while-blocked"])
def test_expired_link_fails_with_clear_reason(sim: Simulator, relay_factory: RelayFactory,
                                              blocked_downloads: int) -> None:
    """An image link that dies before relay can save it fails the task with a reason naming the link."""
    relay = relay_factory(RELAY_ARCHIVE_TIMEOUT="1")
    if blocked_downloads:
        # Each held download costs relay its 1 s archive timeout: the 1 s link is dead before the third try.
        sim.faults(timeout_seconds=5, next=[{"dialect": "pixazo", "op": "download", "fault": "timeout",
                                             "count": blocked_downloads}])
        requests = [("pixazo", "dies while archiving is blocked [sim:ttl=1]")]
    else:
        # apimart reports each link's expiry (relay can tell before trying); evolink's link just answers 410.
        requests = [("evolink", "dead on arrival [sim:ttl=0]"), ("apimart", "dead on arrival [sim:ttl=0]")]
    ids = [relay.create({"provider": provider, "prompt": prompt})["id"] for provider, prompt in requests]
    for task_id in ids:
        task = relay.wait_terminal(task_id, timeout=20)
        assert task["status"] == "failed", task
        assert task["error"]["code"] in ("source_gone", "source_expired"), task["error"]
        assert "link" in task["error"]["message"].lower(), task["error"]
        assert task["images"] and all(img["status"] == "failed" for img in task["images"]), task["images"]
        types = _assert_one_event_per_transition(relay, task_id)
        assert types[-1] == "task.failed" and "task.succeeded" not in types
    assert sim.stats()["totals"]["faults"]["timeout"] == blocked_downloads


def test_malformed_provider_bodies_never_crash(sim: Simulator, relay: Relay) -> None:
    """Three malformed poll answers in a row, on every polled dialect: retried, tasks succeed, relay healthy."""
    sim.faults(next=[{"dialect": provider, "op": "poll", "fault": "malformed", "count": 3} for provider in POLLED])
    ids = [relay.create({"provider": provider, "prompt": "junk in, image out"})["id"] for provider in POLLED]
    for task_id in ids:
        task = relay.wait_succeeded(task_id, timeout=20)
        _assert_matches_provider(sim, task)
        assert sim.stats(task["provider"])["faults"]["malformed"] == 3, task["provider"]
    health = relay.api.get("/healthz")
    assert health.status_code == 200 and health.json()["ok"] is True
    assert relay.api.get("/readyz").status_code == 200
    relay.process.check_alive()


def test_submit_timeout_is_not_resent(sim: Simulator, relay_factory: RelayFactory) -> None:
    """A submit that times out is never blindly resent; with an Idempotency-Key provider it is resent safely."""
    relay = relay_factory(RELAY_PROVIDERS_GMICLOUD_TIMEOUT="1", RELAY_PROVIDERS_APIMART_TIMEOUT="1")
    sim.faults(timeout_seconds=3, next=[{"dialect": "gmicloud", "op": "submit", "fault": "timeout"},
                                        {"dialect": "apimart", "op": "submit", "fault": "timeout"}])
    gmi = relay.create({"provider": "gmicloud", "prompt": "bill me once"})
    apimart = relay.create({"provider": "apimart", "prompt": "bill me once too"})

    failed = relay.wait_terminal(gmi["id"], timeout=20)
    assert failed["status"] == "failed", failed
    assert failed["error"]["code"] == "submit_outcome_unknown", failed["error"]
    assert failed["provider_task_id"] is None

    succeeded = relay.wait_succeeded(apimart["id"], timeout=20)
    _assert_matches_provider(sim, succeeded)

    # No submit job is left that could still send a second request.
    wait_for(lambda: not any(k.startswith("submit:") for k in relay.job_counts()), 10,
             "relay's submit jobs to be finished")
    gmi_stats, apimart_stats = sim.stats("gmicloud"), sim.stats("apimart")
    assert gmi_stats["submits"] == 1, f"gmicloud got {gmi_stats['submits']} submits: double billing"
    assert len(sim.tasks("gmicloud")) == 1
    assert apimart_stats["submits"] == 2, "apimart's submit is resent with the same Idempotency-Key"
    assert len(sim.tasks("apimart")) == 1, "the resent apimart submit must not create a second task"
    assert sim.tasks("apimart")[0]["id"] == succeeded["provider_task_id"]


def test_crash_during_submit_is_not_resent(sim: Simulator, relay: Relay) -> None:
    """relay killed while submits are unanswered: after restart none is resent blindly (apimart: same key)."""
    sim.faults(timeout_seconds=30, next=[{"dialect": provider, "op": "submit", "fault": "timeout"}
                                         for provider in ("gmicloud", "apimart")])
    gmi = relay.create({"provider": "gmicloud", "prompt": "crash while submitting"})
    apimart = relay.create({"provider": "apimart", "prompt": "crash while submitting"})
    wait_for(lambda: all(sim.stats(p)["submits"] == 1 and len(sim.tasks(p)) == 1 for p in ("gmicloud", "apimart")),
             5, "both submits to reach the simulator")
    for created in (gmi, apimart):
        assert relay.task(created["id"])["provider_task_id"] is None, "the answers are still held"
    relay.kill()
    relay.start()

    failed = relay.wait_terminal(gmi["id"], timeout=20)
    assert failed["status"] == "failed", failed
    assert failed["error"]["code"] == "submit_outcome_unknown", failed["error"]
    succeeded = relay.wait_succeeded(apimart["id"], timeout=20)
    assert succeeded["provider_task_id"] == sim.tasks("apimart")[0]["id"]
    _assert_matches_provider(sim, succeeded)
    wait_for(lambda: not any(k.startswith("submit:") for k in relay.job_counts()), 10,
             "relay's submit jobs to be finished")
    assert sim.stats("gmicloud")["submits"] == 1, "gmicloud's submit was resent: double billing"
    for provider in ("gmicloud", "apimart"):
        assert len(sim.tasks(provider)) == 1, f"a second {provider} task was created: double billing"


def test_signed_links_survive_restart(sim: Simulator, relay: Relay) -> None:
    """Signed image links handed out before a restart (same data dir) still work after it."""
    task = relay.wait_succeeded(relay.create({"provider": "pixazo", "prompt": "keep my link"})["id"])
    url, sha = task["images"][0]["url"], task["images"][0]["sha256"]
    relay.restart()
    with httpx.Client(timeout=10) as anonymous:
        response = anonymous.get(url)
    assert response.status_code == 200, response.text
    assert hashlib.sha256(response.content).hexdigest() == sha
    assert relay.task(task["id"])["status"] == "succeeded"


def test_repeated_and_reordered_callbacks_change_state_once(sim: Simulator, relay: Relay) -> None:
    """EvoLink callbacks sent five times plus a stale one cause one event per transition."""
    sim.faults(callbacks={"duplicate": 5, "reorder": True})
    created = relay.create({"provider": "evolink", "prompt": "say it five times"})
    task = relay.wait_succeeded(created["id"])
    _assert_matches_provider(sim, task)
    wait_for(lambda: len(sim.task("evolink", task["provider_task_id"])["callbacks"]) >= 6, 10,
             "all six callbacks to be delivered")
    at_sim = sim.task("evolink", task["provider_task_id"])
    assert all(200 <= c["status_code"] < 300 for c in at_sim["callbacks"]), at_sim["callbacks"]
    relay.process.check_alive()
    assert relay.task(task["id"])["status"] == "succeeded", "a stale callback moved the task back"
    types = _assert_one_event_per_transition(relay, created["id"])
    assert types.count("task.succeeded") == 1, types


def test_cancel_is_final(sim: Simulator, relay: Relay) -> None:
    """A canceled task stays canceled when the provider finishes later; canceling again is 409."""
    created = relay.create({"provider": "gmicloud", "prompt": "never mind [sim:duration=1.5]"})
    relay.wait_status(created["id"], ("queued", "running"))
    response = relay.api.post(f"/v1/tasks/{created['id']}/cancel")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "canceled"
    again = relay.api.post(f"/v1/tasks/{created['id']}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "conflict", again.text
    provider_task_id = relay.task(created["id"])["provider_task_id"]
    wait_for(lambda: sim.task("gmicloud", provider_task_id)["status"] == "succeeded", 5,
             "the provider to finish the task anyway")
    wait_for(lambda: not any(k.split(":")[0] in ("submit", "poll", "archive") for k in relay.job_counts()), 5,
             "relay to have no task jobs left for the canceled task")
    task = relay.task(created["id"])
    assert task["status"] == "canceled" and task["images"] == [], task
    types = [e["type"] for e in relay.events(created["id"])]
    assert types[-1] == "task.canceled" and "task.succeeded" not in types, types


def test_jobs_ending_while_their_lease_is_extended_keep_relay_working(sim: Simulator,
                                                                      relay_factory: RelayFactory) -> None:
    """Archive jobs that end (download timeout) just as their lease heartbeat writes leave relay usable."""
    # Lease 3 s → a heartbeat every 1 s; the archive timeout is 1 s: each job ends as its heartbeat writes.
    relay = relay_factory(RELAY_ARCHIVE_TIMEOUT="1")
    providers = ("pixazo", "gmicloud", "apimart") * 3
    sim.faults(timeout_seconds=3, next=[{"dialect": None, "op": "download", "fault": "timeout",
                                         "count": len(providers)}])
    ids = [relay.create({"provider": p, "prompt": f"race {i}"})["id"] for i, p in enumerate(providers)]
    for task_id in ids:
        relay.wait_succeeded(task_id, timeout=10)
    assert sim.stats()["totals"]["faults"]["timeout"] == len(providers)
    after = relay.api.post("/v1/tasks", json={"provider": "openai", "prompt": "still writable?"})
    assert after.status_code == 202, f"relay can no longer write: {after.status_code} {after.text}"
    relay.wait_succeeded(after.json()["id"])
    assert "cannot start a transaction" not in relay.process.output()


def test_callback_behind_the_provider_still_advances_the_task(sim: Simulator, relay: Relay) -> None:
    """A "processing" callback for a task the provider already finished: relay applies the provider's answer."""
    created = relay.create({"provider": "evolink", "prompt": "late news [sim:callback=drop]"})
    queued = relay.wait_status(created["id"], ("queued", "running"))
    at_sim = wait_for(lambda: (t := sim.task("evolink", queued["provider_task_id"]))["status"] == "succeeded"
                      and t, 5, "the provider to finish the task")
    assert at_sim["callback_url"] and at_sim["callbacks"] == [], "the simulator sent no callback itself"
    progress_report = {"id": at_sim["id"], "object": "image.generation.task", "model": "gpt-image-1.5",
                       "type": "image", "created": int(at_sim["created"]), "status": "processing", "progress": 90}
    with httpx.Client(timeout=10) as provider:
        answer = provider.post(at_sim["callback_url"], json=progress_report)
    assert answer.status_code == 200 and answer.json() == {"ok": True}, answer.text
    # relay confirms every callback with the provider, which says "completed": that answer must be applied
    # now, not ignored until the safety-net poll (at least 10 s after submit).
    task = relay.wait_succeeded(created["id"], timeout=4)
    _assert_matches_provider(sim, task)


def test_lost_submit_answer_is_recovered_from_the_providers_callback(sim: Simulator,
                                                                      relay_factory: RelayFactory) -> None:
    """An EvoLink submit that times out after reaching the provider (outcome unknown) is not resent and not
    failed at once: the submit carried the task's callback URL, and the callback (sent after relay's 1 s
    timeout: the task takes 2.5 s) completes it."""
    relay = relay_factory(RELAY_PROVIDERS_EVOLINK_TIMEOUT="1", RELAY_CALLBACKS_SAFETY_NET_SECONDS="30")
    sim.faults(timeout_seconds=3, next=[{"dialect": "evolink", "op": "submit", "fault": "timeout"}])
    created = relay.create({"provider": "evolink", "prompt": "answer lost, callback comes [sim:duration=2.5]"})
    task = relay.wait_succeeded(created["id"], timeout=20)
    _assert_matches_provider(sim, task)
    assert sim.stats("evolink")["submits"] == 1 and len(sim.tasks("evolink")) == 1, "resent: double billing"


def test_lost_submit_answer_without_callback_fails_after_the_window(sim: Simulator,
                                                                     relay_factory: RelayFactory) -> None:
    """Outcome unknown and the callback never comes: submit_outcome_unknown once the safety-net window is over,
    still with one submit at the provider."""
    relay = relay_factory(RELAY_PROVIDERS_EVOLINK_TIMEOUT="1", RELAY_CALLBACKS_SAFETY_NET_SECONDS="2")
    sim.faults(timeout_seconds=3, next=[{"dialect": "evolink", "op": "submit", "fault": "timeout"}])
    created = relay.create({"provider": "evolink", "prompt": "answer lost, no callback [sim:callback=drop]"})
    failed = relay.wait_terminal(created["id"], timeout=20)
    assert failed["status"] == "failed" and failed["error"]["code"] == "submit_outcome_unknown", failed
    assert sim.stats("evolink")["submits"] == 1, "resent: double billing"
