"""Delivery guarantees against real processes and sockets; every delivery verified by `standardwebhooks`.

relay runs as `relay serve` (killed with SIGKILL where a test says so), the
provider is `relay simulate`, the subscriber is tests/sink.py on 127.0.0.1.
Retries use a short schedule (0, 0.3 s, 0.3 s, 0.3 s, 0.3 s) so a test takes seconds.
"""

from __future__ import annotations

import time

import pytest

from relay.clock import parse_rfc3339, rfc3339
from tests.sink import Sink

from .conftest import RelayFactory
from .harness import wait_for

pytestmark = pytest.mark.e2e


def test_subscriber_down_for_three_attempts_gets_the_event_once_after_recovery(relays: RelayFactory,
                                                                              sink: Sink) -> None:
    """503 three times, then 200: one successful receipt, the same webhook-id on all four, all verified."""
    relay = relays()
    sub = relay.subscribe(sink.url("/down"), events=["task.succeeded"])
    sink.fail("/down", 3, status=503)
    task = relay.create_task()
    relay.wait_task(task["id"])
    event_id = relay.event_id(task["id"], "task.succeeded")
    wait_for(lambda: sink.delivered("/down"), 15, "the event to land")
    [delivery] = wait_for(lambda: [d for d in relay.deliveries(subscription_id=sub["id"])
                                   if d["status"] == "succeeded"], 10, "the delivery to be recorded")
    got = sink.on("/down")
    assert [r.status for r in got] == [503, 503, 503, 200]
    assert {r.webhook_id for r in got} == {event_id}
    for received in got:
        assert received.verify(sub["secret"])["data"]["id"] == task["id"]
    assert delivery["attempts"] == 4 and len(sink.delivered("/down")) == 1


def test_a_subscriber_that_never_recovers_ends_in_dead_letter_and_replay_delivers(relays: RelayFactory,
                                                                                  sink: Sink) -> None:
    """Every attempt fails: the delivery is listed as failed; after a bulk replay it lands, same webhook-id."""
    relay = relays()
    sub = relay.subscribe(sink.url("/dead"), events=["task.succeeded"])
    sink.default("/dead", status=500)
    since = rfc3339(time.time() - 1)
    task = relay.create_task()
    relay.wait_task(task["id"])
    [dead] = wait_for(lambda: relay.deliveries(status="failed"), 15, "a dead letter")
    assert dead["subscription_id"] == sub["id"] and dead["attempts"] == 5 and dead["last_status_code"] == 500
    assert len(sink.on("/dead")) == 5
    sink.default("/dead", status=200)
    replay = relay.post(f"/v1/subscriptions/{sub['id']}/replay", {"since": since, "status": "failed"}, status=202)
    assert replay["replayed"] == 1
    [landed] = wait_for(lambda: sink.delivered("/dead"), 10, "the replayed delivery")
    assert landed.webhook_id == relay.event_id(task["id"], "task.succeeded") == dead["event_id"]
    landed.verify(sub["secret"])
    wait_for(lambda: relay.get(f"/v1/deliveries/{dead['id']}")["status"] == "succeeded", 10, "succeeded")


def test_a_slow_subscriber_does_not_delay_a_fast_one(relays: RelayFactory, sink: Sink) -> None:
    """One subscriber holds every request (≤ cap in flight); the other gets every event without delay."""
    relay = relays(RELAY_DELIVERIES_CONCURRENCY_PER_SUBSCRIPTION="2", RELAY_DELIVERIES_TIMEOUT="60")
    slow = relay.subscribe(sink.url("/slow"), events=["task.*"])
    fast = relay.subscribe(sink.url("/fast"), events=["task.*"])
    sink.default("/slow", hang=True)
    tasks = [relay.create_task(prompt=f"lighthouse {i}") for i in range(8)]
    for task in tasks:
        relay.wait_task(task["id"])
    expected = {e["id"] for t in tasks for e in relay.get("/v1/events", task_id=t["id"], limit=200)["data"]}
    wait_for(lambda: {r.webhook_id for r in sink.delivered("/fast")} >= expected, 10, "every event at the fast one")
    for received in sink.delivered("/fast"):
        payload = received.verify(fast["secret"])
        lag = received.at - parse_rfc3339(payload["timestamp"])
        # held behind the slow one, an event would wait for its 60 s timeout; the bound leaves a loaded machine room
        assert lag < 10.0, f"{payload['type']} reached the fast subscriber {lag:.2f} s after it happened"
    assert sink.max_in_flight("/slow") <= 2
    assert len(relay.deliveries(subscription_id=slow["id"], status="succeeded")) == 0
    sink.release()
    wait_for(lambda: len(relay.deliveries(subscription_id=slow["id"], status="succeeded")) == len(expected), 30,
             "the slow subscriber to catch up once it answers")
    assert sink.max_in_flight("/slow") <= 2


def test_410_disables_the_subscription(relays: RelayFactory, sink: Sink) -> None:
    """A 410 answer disables the subscription (gone); later events are not sent to it."""
    relay = relays()
    sub = relay.subscribe(sink.url("/gone"), events=["task.succeeded"])
    sink.default("/gone", status=410)
    first = relay.create_task()
    relay.wait_task(first["id"])
    wait_for(lambda: relay.get(f"/v1/subscriptions/{sub['id']}")["enabled"] is False, 10, "the subscription off")
    state = relay.get(f"/v1/subscriptions/{sub['id']}")
    assert state["disabled_reason"] == "gone"
    second = relay.create_task()
    relay.wait_task(second["id"])
    assert relay.deliveries(task_id=second["id"]) == []
    assert len(sink.on("/gone")) == 1


def test_private_subscription_urls_are_refused_unless_allow_listed(relays: RelayFactory, sink: Sink) -> None:
    """With only 127.0.0.1/32 allow-listed, other loopback, private, metadata and IPv6 loopback URLs are 422."""
    relay = relays(RELAY_NETWORK_ALLOW="127.0.0.1/32")
    for url in (f"http://127.0.0.2:{sink.port}/h", "http://10.1.2.3/h", "http://169.254.169.254/latest/meta-data",
                f"http://[::1]:{sink.port}/h", f"http://0.0.0.0:{sink.port}/h", "http://[::ffff:10.0.0.1]/h"):
        response = relay.api.post("/v1/subscriptions", json={"url": url})
        assert response.status_code == 422, (url, response.text)
        assert response.json()["error"]["field"] == "url" and "refused" in response.json()["error"]["message"]
    assert relay.api.post("/v1/subscriptions", json={"url": sink.url("/ok")}).status_code == 201


def test_relay_killed_mid_delivery_redelivers_after_restart_with_the_same_webhook_id(relays: RelayFactory,
                                                                                   sink: Sink) -> None:
    """SIGKILL while the subscriber holds the request: after restart the event is sent again, same webhook-id."""
    relay = relays()
    sub = relay.subscribe(sink.url("/crash"), events=["task.succeeded"])
    sink.script("/crash", {"hang": True})
    task = relay.create_task()
    wait_for(lambda: sink.in_flight("/crash") == 1, 20, "the delivery to be in flight")
    relay.kill()
    relay.start()
    [landed] = wait_for(lambda: sink.delivered("/crash")[-1:] if len(sink.on("/crash")) >= 2 else None, 20,
                        "the redelivery after restart")
    first = sink.on("/crash")[0]
    assert landed.webhook_id == first.webhook_id == relay.event_id(task["id"], "task.succeeded")
    landed.verify(sub["secret"])
    wait_for(lambda: relay.deliveries(subscription_id=sub["id"])[0]["status"] == "succeeded", 10, "succeeded")


def test_deliveries_verify_across_a_secret_rotation_and_for_task_webhooks(relays: RelayFactory, sink: Sink) -> None:
    """After rotate-secret both secrets verify every delivery; a task's webhook_url verifies with the webhook secret."""
    relay = relays()
    sub = relay.subscribe(sink.url("/rot"), events=["task.*"], signing="ed25519")
    rotated = relay.post(f"/v1/subscriptions/{sub['id']}/rotate-secret")
    task_secret = relay.get("/v1/webhook-secret")["secret"]
    task = relay.create_task(webhook_url=sink.url("/task"), webhook_events=["task.succeeded"])
    relay.wait_task(task["id"])
    expected = {e["id"] for e in relay.get("/v1/events", task_id=task["id"])["data"]}
    wait_for(lambda: {r.webhook_id for r in sink.delivered("/rot")} == expected, 10, "every event")
    for received in sink.delivered("/rot"):
        assert received.verify(sub["secret"]) == received.verify(rotated["secret"])
        assert len([e for e in received.headers["webhook-signature"].split(" ") if e.startswith("v1a,")]) == 2
    [own] = wait_for(lambda: sink.delivered("/task"), 10, "the task's own webhook")
    assert own.verify(task_secret)["type"] == "task.succeeded"
