"""Delivery in process, to a real subscriber socket: fan-out, signing, retries, dead letters, replay, 410, caps.

Time is a ManualClock; the worker is drained by hand, so hours of retry
schedule pass in milliseconds. See tests/delivery_harness.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from relay import __version__
from relay.deliveries.lanes import url_lane
from relay.deliveries.schedule import DEFAULT_SCHEDULE
from relay.models import Job
from tests.delivery_harness import DeliveryHarness, delivery_harness
from tests.harness import database_env, wait_for


async def delivered_once(d: DeliveryHarness, path: str) -> None:
    await wait_for(lambda: _true(len(d.sink.delivered(path)) >= 1), 5, f"a delivery on {path}")


async def _true(value: bool) -> bool:
    return value


async def run_schedule(d: DeliveryHarness, attempts: int) -> None:
    """Advance through `attempts` retries of the default schedule (each past its +20 % jitter)."""
    for k in range(1, attempts + 1):
        await d.advance(DEFAULT_SCHEDULE[k] * 1.21 + 0.01)


# ---- fan-out --------------------------------------------------------------------------------------
async def test_event_fans_out_to_each_matching_enabled_subscription(tmp_path: Path) -> None:
    """One delivery per enabled subscription whose filter takes the event, written with the event."""
    async with delivery_harness(tmp_path) as d:
        wild = await d.subscribe("/wild", events=["task.*"])
        exact = await d.subscribe("/exact", events=["task.queued"])
        other = await d.subscribe("/other", events=["task.succeeded"])
        off = await d.subscribe("/off", events=["*"], enabled=False)
        task_id = await d.task()
        event_id = await d.emit(task_id, "task.queued")
        found = await d.deliveries(event_id=event_id)
        assert {x["subscription_id"] for x in found} == {wild["id"], exact["id"]}
        assert all(x["status"] == "pending" and x["event_type"] == "task.queued" for x in found)
        assert (await d.h.runtime.store.job_counts()) == {"deliver:queued": 2}
        assert other["id"] and off["id"]


async def test_task_webhook_url_gets_its_own_delivery_signed_with_the_task_secret(tmp_path: Path) -> None:
    """A task's webhook_url (filtered by webhook_events) gets deliveries signed with GET /v1/webhook-secret."""
    async with delivery_harness(tmp_path) as d:
        task_id = await d.task(webhook_url=d.sink.url("/task"), webhook_events=["task.failed"])
        queued = await d.emit(task_id, "task.queued")
        failed = await d.emit(task_id, "task.failed")
        assert await d.deliveries(event_id=queued) == []
        [delivery] = await d.deliveries(event_id=failed)
        assert delivery["subscription_id"] is None and delivery["url"] == d.sink.url("/task")
        await d.drain()
        secret = (await d.h.api.get("/v1/webhook-secret")).json()["secret"]
        [got] = d.sink.on("/task")
        assert got.verify(secret)["type"] == "task.failed" and got.webhook_id == failed


# ---- one attempt ----------------------------------------------------------------------------------
async def test_delivery_is_a_standard_webhook(tmp_path: Path) -> None:
    """Headers, signature and body follow API.md; the standardwebhooks library verifies it."""
    async with delivery_harness(tmp_path) as d:
        sub = await d.subscribe("/a", events=["task.*"])
        task_id = await d.task()
        event_id = await d.emit(task_id, "task.running")
        await d.drain()
        [got] = d.sink.on("/a")
        payload = got.verify(sub["secret"])
        assert got.webhook_id == event_id and got.headers["content-type"] == "application/json"
        assert got.headers["user-agent"] == f"relay/{__version__}"
        assert int(got.headers["webhook-timestamp"]) == int(d.clock.now())
        assert set(payload) == {"type", "timestamp", "data"} and payload["type"] == "task.running"
        assert payload["data"]["id"] == task_id and payload["data"]["sequence"] == 2
        assert payload["data"]["status"] == "running" and payload["timestamp"].endswith("Z")
        [delivery] = await d.deliveries(subscription_id=sub["id"])
        detail = await d.delivery(delivery["id"])
        assert detail["status"] == "succeeded" and detail["attempts"] == 1
        [attempt] = detail["attempt_history"]
        assert attempt["status_code"] == 200 and attempt["response"] == "ok" and attempt["latency_ms"] > 0
        assert attempt["error"] is None and attempt["origin"] == "auto"


async def test_same_webhook_id_for_every_subscriber(tmp_path: Path) -> None:
    """Every subscriber of one event gets the event id as webhook-id, each signed with its own secret."""
    async with delivery_harness(tmp_path) as d:
        subs = [await d.subscribe(f"/s{i}") for i in range(3)]
        event_id = await d.emit(await d.task(), "task.queued")
        await d.drain()
        for i, sub in enumerate(subs):
            [got] = d.sink.on(f"/s{i}")
            assert got.webhook_id == event_id
            got.verify(sub["secret"])


async def test_image_links_in_the_body_are_fresh_and_signed(tmp_path: Path) -> None:
    """The body carries the task with signed image URLs made at send time (they carry an expiry)."""
    async with delivery_harness(tmp_path) as d:
        await d.subscribe("/a")
        task = await d.h.create(provider="gmicloud", prompt="p")
        d.sink.default("/a")
        for _ in range(200):     # drive the pipeline by hand (manual clock): submit, poll, archive
            await d.advance(1)
            if (await d.h.task(task["id"]))["status"] == "succeeded":
                break
        await d.drain()
        bodies = [json.loads(r.body) for r in d.sink.on("/a")]
        succeeded = [b for b in bodies if b["type"] == "task.succeeded"]
        assert len(succeeded) == 1
        url = succeeded[0]["data"]["images"][0]["url"]
        assert url.startswith("http://relay.test/v1/images/img_") and "sig=" in url and "exp=" in url
        image = await d.h.api.get(url.removeprefix("http://relay.test"), headers={"authorization": ""})
        assert image.status_code == 200


# ---- retries, dead letters, replay ----------------------------------------------------------------
async def test_subscriber_down_for_three_attempts_gets_it_once_with_one_webhook_id(tmp_path: Path) -> None:
    """503, timeout-free failures retried on the schedule; one success; same webhook-id on every attempt."""
    async with delivery_harness(tmp_path) as d:
        sub = await d.subscribe("/down")
        d.sink.fail("/down", 3, status=503)
        event_id = await d.emit(await d.task())
        await d.drain()
        await run_schedule(d, 3)
        got = d.sink.on("/down")
        assert [r.status for r in got] == [503, 503, 503, 200]
        assert {r.webhook_id for r in got} == {event_id}
        assert all(r.signed_by(sub["secret"]) for r in got)
        [delivery] = await d.deliveries(subscription_id=sub["id"])
        assert delivery["status"] == "succeeded" and delivery["attempts"] == 4
        history = (await d.delivery(delivery["id"]))["attempt_history"]
        assert [a["status_code"] for a in history] == [200, 503, 503, 503]
        assert [a["number"] for a in history] == [4, 3, 2, 1]
        times = sorted(r.at for r in got)
        assert times == [r.at for r in got]
        # Each attempt names its subscription: the console's delivery health counts them (schema v23).
        health = await d.h.runtime.store.delivery_health(0.0)
        assert (health[sub["id"]].attempts, health[sub["id"]].succeeded) == (4, 1)


async def test_retries_follow_the_schedule_with_jitter(tmp_path: Path) -> None:
    """Each failed attempt's next attempt is its scheduled delay ±20 % later (5 s, 5 min, 30 min …)."""
    async with delivery_harness(tmp_path) as d:
        await d.subscribe("/down")
        d.sink.default("/down", status=500)
        await d.emit(await d.task())
        await d.drain()
        store = d.h.runtime.store
        for k in range(1, len(DEFAULT_SCHEDULE)):
            [delivery] = (await store.list_deliveries(subscription_id=None, status="pending", task_id=None,
                                                      event_id=None, limit=5, cursor=None))[0]
            assert delivery.next_attempt_at is not None and delivery.last_attempt_at is not None
            wait = delivery.next_attempt_at - delivery.last_attempt_at
            assert DEFAULT_SCHEDULE[k] * 0.8 - 0.01 <= wait <= DEFAULT_SCHEDULE[k] * 1.2 + 0.01
            assert await d.advance(wait * 0.5) == 0                  # not before its time
            await d.advance(wait)
            assert len(d.sink.on("/down")) == k + 1


async def test_exhausted_delivery_is_a_dead_letter_and_retry_delivers_it(tmp_path: Path) -> None:
    """After the 8th failed attempt the delivery is failed (listed as such); POST …/retry starts a new round."""
    async with delivery_harness(tmp_path) as d:
        sub = await d.subscribe("/dead")
        d.sink.default("/dead", status=500)
        event_id = await d.emit(await d.task())
        await d.drain()
        await run_schedule(d, len(DEFAULT_SCHEDULE) - 1)
        assert len(d.sink.on("/dead")) == 8
        [dead] = await d.deliveries(status="failed")
        assert dead["subscription_id"] == sub["id"] and dead["attempts"] == 8 and dead["last_status_code"] == 500
        assert dead["next_attempt_at"] is None and dead["completed_at"] is not None
        assert await d.advance(86400 * 3) == 0 and len(d.sink.on("/dead")) == 8      # no more attempts
        d.sink.default("/dead", status=200)
        retried = await d.h.api.post(f"/v1/deliveries/{dead['id']}/retry")
        assert retried.status_code == 202 and retried.json()["status"] == "pending"
        await d.drain()
        final = await d.delivery(dead["id"])
        assert final["status"] == "succeeded" and final["attempts"] == 9
        assert final["attempt_history"][0]["origin"] == "retry"
        assert {r.webhook_id for r in d.sink.on("/dead")} == {event_id}
        assert d.sink.on("/dead")[-1].signed_by(sub["secret"])


async def test_replay_redelivers_failed_deliveries_in_the_window(tmp_path: Path) -> None:
    """Bulk replay restarts the subscription's deliveries with the status asked for, created in the window."""
    async with delivery_harness(tmp_path, RELAY_DELIVERIES_SCHEDULE="0") as d:
        sub = await d.subscribe("/r")
        d.sink.default("/r", status=500)
        task_id = await d.task()
        before = d.clock.now()
        early = await d.emit(task_id, "task.queued")
        await d.advance(3600)
        middle = d.clock.now()
        late = await d.emit(task_id, "task.running")
        await d.drain()
        assert [x["status"] for x in await d.deliveries(subscription_id=sub["id"])] == ["failed", "failed"]
        d.sink.default("/r", status=200)
        from relay.clock import rfc3339
        response = await d.h.api.post(f"/v1/subscriptions/{sub['id']}/replay",
                                      json={"since": rfc3339(middle - 1), "status": "failed"})
        assert response.status_code == 202 and response.json()["replayed"] == 1, response.text
        await d.drain()
        assert [r.webhook_id for r in d.sink.delivered("/r")] == [late]
        response = await d.h.api.post(f"/v1/subscriptions/{sub['id']}/replay",
                                      json={"since": rfc3339(before - 1), "status": "all"})
        assert response.json()["replayed"] == 2
        await d.drain()
        assert sorted(r.webhook_id for r in d.sink.delivered("/r")) == sorted([late, early, late])


async def test_replay_and_retry_validation(tmp_path: Path) -> None:
    """Replay needs an RFC 3339 since and a known status; unknown ids are 404."""
    async with delivery_harness(tmp_path) as d:
        sub = await d.subscribe("/r")
        for body, field in (({}, "since"), ({"since": "yesterday"}, "since"),
                            ({"since": "2026-01-01T00:00:00Z", "status": "lost"}, "status"),
                            ({"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, "until")):
            response = await d.h.api.post(f"/v1/subscriptions/{sub['id']}/replay", json=body)
            assert response.status_code == 422 and response.json()["error"]["field"] == field, response.text
        assert (await d.h.api.post("/v1/subscriptions/sub_nope/replay",
                                   json={"since": "2026-01-01T00:00:00Z"})).status_code == 404
        assert (await d.h.api.post("/v1/deliveries/dlv_nope/retry")).status_code == 404
        assert (await d.h.api.get("/v1/deliveries/dlv_nope")).status_code == 404
        bad = await d.h.api.get("/v1/deliveries", params={"status": "lost"})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "status"


async def test_retry_after_is_honoured_within_bounds(tmp_path: Path) -> None:
    """A 429 with Retry-After: 8 on the first attempt (base 5 s) makes the next attempt 8 s later."""
    async with delivery_harness(tmp_path) as d:
        await d.subscribe("/busy")
        d.sink.script("/busy", {"status": 429, "retry_after": 8}, {"status": 503, "retry_after": 100000})
        await d.emit(await d.task())
        await d.drain()
        [delivery] = await d.deliveries(status="pending")
        assert delivery["last_status_code"] == 429
        pending = await d.h.runtime.store.get_delivery(delivery["id"])
        assert pending is not None and pending.next_attempt_at is not None and pending.last_attempt_at is not None
        assert abs(pending.next_attempt_at - pending.last_attempt_at - 8) < 0.01
        await d.advance(8.01)
        after = await d.h.runtime.store.get_delivery(delivery["id"])
        assert after is not None and after.next_attempt_at is not None and after.last_attempt_at is not None
        assert after.next_attempt_at - after.last_attempt_at <= 2 * 300 + 0.01     # clamped to 2x the 5 min base


async def test_redirects_are_not_followed(tmp_path: Path) -> None:
    """A 302 is a failed attempt (retried); its Location is never requested."""
    async with delivery_harness(tmp_path) as d:
        await d.subscribe("/moved")
        d.sink.script("/moved", {"status": 302, "location": d.sink.url("/elsewhere")})
        await d.emit(await d.task())
        await d.drain()
        assert d.sink.on("/elsewhere") == []
        [delivery] = await d.deliveries(status="pending")
        assert delivery["last_status_code"] == 302 and "redirect" in delivery["last_error"]
        assert "not followed" in delivery["last_error"]


async def test_response_is_kept_up_to_4_kib(tmp_path: Path) -> None:
    """Only the first 4096 bytes of a subscriber's answer are recorded."""
    async with delivery_harness(tmp_path) as d:
        await d.subscribe("/big")
        d.sink.default("/big", body="x" * 100_000, status=500)
        await d.emit(await d.task())
        await d.drain()
        [delivery] = await d.deliveries()
        [attempt] = (await d.delivery(delivery["id"]))["attempt_history"]
        assert attempt["response"] == "x" * 4096 and attempt["status_code"] == 500


async def test_a_subscriber_that_does_not_answer_in_time_is_a_failed_attempt(tmp_path: Path) -> None:
    """No answer within deliveries.timeout is recorded as a timeout and retried."""
    async with delivery_harness(tmp_path, RELAY_DELIVERIES_TIMEOUT="0.3") as d:
        await d.subscribe("/slow")
        d.sink.script("/slow", {"hang": True})
        d.sink.hang_limit = 2
        await d.emit(await d.task())
        await d.drain()
        [delivery] = await d.deliveries()
        assert delivery["status"] == "pending" and delivery["last_status_code"] is None
        assert delivery["last_error"].startswith("timeout")


# ---- disabling --------------------------------------------------------------------------------------
async def test_410_disables_the_subscription_and_cancels_what_is_pending(tmp_path: Path) -> None:
    """410 Gone: the delivery fails, the subscription is disabled (gone), later events skip it."""
    async with delivery_harness(tmp_path) as d:
        sub = await d.subscribe("/gone")
        d.sink.default("/gone", status=410)
        task_id = await d.task()
        await d.emit(task_id, "task.queued")
        await d.emit(task_id, "task.running")
        claimed = await d.h.runtime.store.claim(d.clock.now(), limit=1, lease_seconds=30, kinds=["deliver"])
        await d.h.runtime.worker.execute(claimed[0])
        state = (await d.h.api.get(f"/v1/subscriptions/{sub['id']}")).json()
        assert state["enabled"] is False and state["disabled_reason"] == "gone"
        statuses = sorted(x["status"] for x in await d.deliveries(subscription_id=sub["id"]))
        assert statuses == ["canceled", "failed"]
        await d.drain()
        assert len(d.sink.on("/gone")) == 1
        await d.emit(task_id, "task.failed")
        assert len(await d.deliveries(subscription_id=sub["id"])) == 2


async def test_continuous_failure_for_auto_disable_after_disables(tmp_path: Path) -> None:
    """Failing for longer than auto_disable_after disables the subscription (failing); a success resets the clock."""
    async with delivery_harness(tmp_path, RELAY_DELIVERIES_AUTO_DISABLE_AFTER="1000",
                                RELAY_DELIVERIES_SCHEDULE="0,400,400,400,400", RELAY_DELIVERIES_JITTER="0") as d:
        sub = await d.subscribe("/flaky")
        d.sink.script("/flaky", {"status": 500}, {"status": 500}, {"status": 200})
        task_id = await d.task()
        await d.emit(task_id, "task.queued")
        await d.drain()
        await d.advance(400)
        failing = await d.h.runtime.store.get_subscription(sub["id"])
        assert failing is not None and failing.failing_since is not None
        await d.advance(400)                                   # third attempt succeeds: clock reset
        state = await d.h.runtime.store.get_subscription(sub["id"])
        assert state is not None and state.enabled and state.failing_since is None
        d.sink.default("/flaky", status=500)
        await d.emit(task_id, "task.running")
        await d.drain()
        for _ in range(3):
            await d.advance(400)
        state = await d.h.runtime.store.get_subscription(sub["id"])
        assert state is not None and not state.enabled and state.disabled_reason == "failing"
        [last] = await d.deliveries(status="failed")
        assert "disabled" in last["last_error"] and last["attempts"] == 4


async def test_disabling_or_deleting_cancels_pending_deliveries(tmp_path: Path) -> None:
    """PATCH enabled=false and DELETE cancel the subscription's pending deliveries; nothing is sent."""
    async with delivery_harness(tmp_path) as d:
        off = await d.subscribe("/off")
        gone = await d.subscribe("/gone")
        await d.emit(await d.task())
        await d.h.api.patch(f"/v1/subscriptions/{off['id']}", json={"enabled": False})
        await d.h.api.delete(f"/v1/subscriptions/{gone['id']}")
        await d.drain()
        assert d.sink.received == []
        assert sorted(x["status"] for x in await d.deliveries()) == ["canceled", "canceled"]
        assert (await d.h.runtime.store.job_counts()) == {}


# ---- signing across rotation and schemes ---------------------------------------------------------------
async def test_during_rotation_old_and_new_secret_both_verify(tmp_path: Path) -> None:
    """After rotate-secret, deliveries carry both signatures for 24 h; then only the new one."""
    async with delivery_harness(tmp_path) as d:
        sub = await d.subscribe("/rot")
        new = (await d.h.api.post(f"/v1/subscriptions/{sub['id']}/rotate-secret")).json()
        task_id = await d.task()
        await d.emit(task_id, "task.queued")
        await d.drain()
        [during] = d.sink.on("/rot")
        assert during.verify(sub["secret"]) == during.verify(new["secret"])
        assert len(during.headers["webhook-signature"].split(" ")) == 2
        d.clock.advance(86401)
        await d.emit(task_id, "task.running")
        await d.drain()
        after = d.sink.on("/rot")[-1]
        assert after.signed_by(new["secret"]) and not after.signed_by(sub["secret"])


async def test_a_rotation_sent_twice_keeps_the_secret_the_receiver_holds(tmp_path: Path) -> None:
    """rotate-secret twice within the overlap (a client retrying after a timeout, a form sent again): the secret
    the receiver still holds keeps signing until its own overlap ends, not until the second rotation; each key
    stops at its own end."""
    async with delivery_harness(tmp_path) as d:
        sub = await d.subscribe("/rot2")
        first = (await d.h.api.post(f"/v1/subscriptions/{sub['id']}/rotate-secret")).json()
        d.clock.advance(3600)
        second = (await d.h.api.post(f"/v1/subscriptions/{sub['id']}/rotate-secret")).json()
        task_id = await d.task()

        async def delivered(event: str) -> Any:
            await d.emit(task_id, event)
            await d.drain()
            return d.sink.on("/rot2")[-1]

        got = await delivered("task.queued")
        assert all(got.signed_by(s) for s in (sub["secret"], first["secret"], second["secret"]))
        d.clock.advance(86400 - 3600 + 1)           # the first rotation's overlap is over, the second's is not
        got = await delivered("task.running")
        assert got.signed_by(first["secret"]) and got.signed_by(second["secret"]) and not got.signed_by(sub["secret"])
        d.clock.advance(3600)                       # and now the second's
        got = await delivered("task.failed")
        assert got.signed_by(second["secret"]) and not got.signed_by(first["secret"])


async def test_rotations_past_the_kept_secrets_are_refused_until_one_overlap_ends(tmp_path: Path) -> None:
    """Every secret rotated out signs until its own overlap ends; relay keeps at most EARLIER_KEYS_KEPT of them
    beside the current and previous ones. One rotation more within the overlaps is a 409 naming when the next may
    come (it silently stopped the oldest secret signing before its 24 h), and the oldest secret still signs; once
    the oldest overlap ends, a rotation goes through again."""
    from relay.deliveries.models import EARLIER_KEYS_KEPT
    async with delivery_harness(tmp_path) as d:
        sub = await d.subscribe("/many")
        rotate = f"/v1/subscriptions/{sub['id']}/rotate-secret"
        for _ in range(EARLIER_KEYS_KEPT + 1):
            assert (await d.h.api.post(rotate)).status_code == 200
            d.clock.advance(60)
        refused = await d.h.api.post(rotate)
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "conflict", refused.text
        assert "rotate again after" in refused.json()["error"]["message"]
        task_id = await d.task()
        await d.emit(task_id, "task.queued")
        await d.drain()
        assert d.sink.on("/many")[-1].signed_by(sub["secret"]), "the first secret still signs within its 24 h"
        d.clock.advance(86400 - 60 * EARLIER_KEYS_KEPT)      # the first rotation's overlap has ended
        assert (await d.h.api.post(rotate)).status_code == 200


async def test_ed25519_subscription_gets_v1_and_v1a(tmp_path: Path) -> None:
    """signing=ed25519: the library verifies v1 with the secret; v1a verifies with the whpk_ public key."""
    from relay import signing
    async with delivery_harness(tmp_path) as d:
        sub = await d.subscribe("/ed", signing="ed25519")
        await d.emit(await d.task())
        await d.drain()
        [got] = d.sink.on("/ed")
        got.verify(sub["secret"])
        signing.verify(got.body, got.headers, [sub["public_key"]], now=d.clock.now())
        assert [e.split(",")[0] for e in got.headers["webhook-signature"].split(" ")] == ["v1", "v1a"]


# ---- at-least-once, crashes, caps ---------------------------------------------------------------------
async def test_a_job_run_twice_delivers_once_and_records_once(tmp_path: Path) -> None:
    """Re-running a finished delivery's job sends nothing; the delivery stays succeeded with one attempt."""
    async with delivery_harness(tmp_path) as d:
        await d.subscribe("/once")
        await d.emit(await d.task())
        [job] = await d.h.runtime.store.claim(d.clock.now(), limit=5, lease_seconds=30, kinds=["deliver"])
        handler = d.h.runtime.worker.handlers["deliver"]
        for _ in range(3):
            assert await handler.run(job) is None
        assert len(d.sink.on("/once")) == 1
        [delivery] = await d.deliveries()
        assert delivery["status"] == "succeeded" and delivery["attempts"] == 1


async def test_two_runs_at_once_record_one_attempt_and_reuse_the_webhook_id(tmp_path: Path) -> None:
    """Two workers running the same delivery at once may both send (same webhook-id); one attempt counts."""
    async with delivery_harness(tmp_path) as d:
        await d.subscribe("/twice")
        event_id = await d.emit(await d.task())
        [job] = await d.h.runtime.store.claim(d.clock.now(), limit=5, lease_seconds=30, kinds=["deliver"])
        handler = d.h.runtime.worker.handlers["deliver"]
        other = Job(**{**job.__dict__, "lease_token": "someone-else"})
        await asyncio.gather(handler.run(job), handler.run(other))
        assert {r.webhook_id for r in d.sink.on("/twice")} == {event_id}
        [delivery] = await d.deliveries()
        assert delivery["status"] == "succeeded" and delivery["attempts"] == 1


async def test_a_worker_that_dies_mid_delivery_is_replaced_after_its_lease(tmp_path: Path) -> None:
    """A claimed job whose worker vanished runs again once its lease runs out: same webhook-id, delivered."""
    async with delivery_harness(tmp_path) as d:
        sub = await d.subscribe("/crash")
        event_id = await d.emit(await d.task())
        claimed = await d.h.runtime.store.claim(d.clock.now(), limit=5, lease_seconds=60, kinds=["deliver"])
        assert len(claimed) == 1              # ... and this worker "dies" here
        assert await d.drain() == 0
        await d.advance(61)
        [got] = d.sink.on("/crash")
        assert got.webhook_id == event_id and got.signed_by(sub["secret"])


async def test_pending_delivery_without_a_job_gets_one_at_start(tmp_path: Path) -> None:
    """The start-up safety net gives a job to a pending delivery that lost it."""
    async with delivery_harness(tmp_path) as d:
        await d.subscribe("/orphan")
        await d.emit(await d.task())
        [job] = await d.h.runtime.store.claim(d.clock.now(), limit=5, lease_seconds=30, kinds=["deliver"])
        await d.h.runtime.store.finish_job(job)                 # the job is gone, the delivery still pending
        await d.service.start()
        await d.drain()
        assert len(d.sink.delivered("/orphan")) == 1


async def test_per_subscription_cap_parks_the_excess(tmp_path: Path) -> None:
    """With a cap of 2, a subscriber that holds requests never has more than 2 in flight; the rest wait."""
    # The held requests must outlast the test however slow the machine: the delivery timeout is real time.
    async with delivery_harness(tmp_path, RELAY_DELIVERIES_CONCURRENCY_PER_SUBSCRIPTION="2",
                                RELAY_DELIVERIES_TIMEOUT="60") as d:
        await d.subscribe("/held")
        await d.subscribe("/free")
        d.sink.default("/held", hang=True)
        task_id = await d.task()
        for _ in range(5):
            await d.emit(task_id)
        draining = asyncio.create_task(d.drain())
        await wait_for(lambda: _true(d.sink.in_flight("/held") == 2), 5, "two held requests")
        # Events, not requests: the manual clock jumps 6 s a step, so a lease can run out under a delivery
        # still on its way and the delivery go out twice; at-least-once allows that, with the same webhook-id.
        def events(path: str) -> set[str]:
            return {received.webhook_id for received in d.sink.delivered(path)}
        for _ in range(20):                    # the held ones keep their 2 slots; the rest of the world moves on
            if len(events("/free")) == 5:
                break
            await d.advance(6)
        assert len(events("/free")) == 5
        assert d.sink.in_flight("/held") == 2 and d.sink.max_in_flight("/held") == 2
        d.sink.release()
        await draining
        for _ in range(20):
            await d.advance(6)
        assert len(events("/held")) == 5 and d.sink.max_in_flight("/held") == 2


async def test_deliveries_list_filters_and_pages(tmp_path: Path) -> None:
    """GET /v1/deliveries filters by subscription, status, task and event, newest first, with a cursor."""
    async with delivery_harness(tmp_path) as d:
        a = await d.subscribe("/a")
        b = await d.subscribe("/b")
        d.sink.default("/b", status=500)
        task_id = await d.task()
        events = [await d.emit(task_id) for _ in range(3)]
        await d.drain()
        assert len(await d.deliveries()) == 6
        assert {x["subscription_id"] for x in await d.deliveries(status="pending")} == {b["id"]}
        assert {x["subscription_id"] for x in await d.deliveries(status="succeeded")} == {a["id"]}
        assert len(await d.deliveries(subscription_id=a["id"], event_id=events[0])) == 1
        assert len(await d.deliveries(task_id=task_id)) == 6 and await d.deliveries(task_id="tsk_other") == []
        page = (await d.h.api.get("/v1/deliveries", params={"limit": 4})).json()
        rest = (await d.h.api.get("/v1/deliveries", params={"limit": 4, "cursor": page["next_cursor"]})).json()
        ids = [x["id"] for x in page["data"] + rest["data"]]
        assert ids == sorted(ids, reverse=True) and len(set(ids)) == 6 and rest["next_cursor"] is None


async def test_a_failing_subscription_gets_one_attempt_at_a_time(tmp_path: Path) -> None:
    """Once a subscription has failed, its cap drops to 1 until a success (a dead endpoint cannot hog workers)."""
    async with delivery_harness(tmp_path, RELAY_DELIVERIES_TIMEOUT="5") as d:
        await d.subscribe("/sick")
        d.sink.script("/sick", {"status": 500})
        task_id = await d.task()
        await d.emit(task_id)
        await d.drain()                                    # one failure: the subscription is now failing
        d.sink.default("/sick", hang=True)
        for _ in range(4):
            await d.emit(task_id)
        draining = asyncio.create_task(d.drain())
        await wait_for(lambda: _true(d.sink.in_flight("/sick") == 1), 5, "one held attempt")

        async def others_parked() -> bool:
            rows = await (await d.h.runtime.store._r.execute(   # type: ignore[attr-defined]
                "SELECT COUNT(*) FROM jobs WHERE kind = 'deliver' AND payload LIKE '%parked%'")).fetchone()
            return bool(rows[0] == 3)
        await wait_for(others_parked, 5, "the other three to be parked without waiting")
        assert d.sink.in_flight("/sick") == 1 and d.sink.max_in_flight("/sick") == 1
        d.sink.release()
        await draining


# ---- the SSRF guard at connect time ---------------------------------------------------------------
async def test_an_address_refused_at_connect_fails_at_once_and_a_dns_failure_keeps_retrying(tmp_path: Path) -> None:
    """Through the worker: a subscriber name that now resolves to cloud metadata (not allow-listed) fails its
    delivery on the first attempt as blocked_address, recorded in the attempt history, with no retry left;
    a name that no longer resolves at all is not a policy refusal and follows the retry schedule."""
    import socket

    async with delivery_harness(tmp_path) as d:
        guard = d.h.runtime.guard
        registered: set[str] = set()

        async def resolver(host: str, port: int) -> list[str]:
            if host not in registered:          # registration: both names are public
                registered.add(host)
                return ["93.184.216.34"]
            if host == "metadata.example":
                return ["169.254.169.254"]
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

        guard.resolver = resolver
        refused = await d.subscribe("/x", url="http://metadata.example/hook")
        unresolved = await d.subscribe("/y", url="http://vanished.example/hook")
        event_id = await d.emit(await d.task())
        await d.drain()

        [blocked] = await d.deliveries(subscription_id=refused["id"])
        assert blocked["status"] == "failed" and blocked["attempts"] == 1 and blocked["next_attempt_at"] is None
        assert blocked["last_error"].startswith("blocked_address:") and "169.254.169.254" not in blocked["last_error"]
        assert "link-local" in blocked["last_error"] and blocked["completed_at"] is not None
        [attempt] = (await d.delivery(blocked["id"]))["attempt_history"]
        assert attempt["status_code"] is None and attempt["error"] == blocked["last_error"]
        assert attempt["url"] == "http://metadata.example/hook"

        [waiting] = await d.deliveries(subscription_id=unresolved["id"])
        assert waiting["status"] == "pending" and waiting["next_attempt_at"] is not None
        assert waiting["last_error"].startswith("connection_error:") and "vanished.example" in waiting["last_error"]

        await run_schedule(d, 2)
        assert (await d.delivery(blocked["id"]))["attempts"] == 1          # never tried again
        again = await d.delivery(waiting["id"])
        assert again["status"] == "pending" and again["attempts"] == 3
        assert all(a["error"].startswith("connection_error:") for a in again["attempt_history"])
        assert d.sink.received == [] and event_id
        # Only the unresolved subscriber's job is left; the refused one is done.
        assert await d.h.runtime.store.job_counts() == {"deliver:queued": 1}


async def test_a_webhook_url_with_a_long_userinfo_is_delivered_and_its_lane_holds_no_credentials(
        tmp_path: Path, database: str) -> None:
    """A webhook_url may be 2,048 characters, userinfo included. Its lane (the per-server cap; lane_slots, which
    replicas share, on PostgreSQL) is the server alone: named by the whole netloc, 1,900 CJK characters here
    (5.7 kB of UTF-8), PostgreSQL refused the lane's index entry (over 2,704 bytes) and the webhook was never sent."""
    userinfo = "".join(chr(0x4E00 + (i * 7919) % 20_000) for i in range(1_900))     # varied: it does not compress
    async with delivery_harness(tmp_path, **database_env(database)) as d:
        url = d.sink.url("/task").replace("http://", f"http://{userinfo}:pw@", 1)
        created = await d.h.api.post("/v1/tasks", json={"provider": "evolink", "prompt": "p", "webhook_url": url,
                                                         "webhook_events": ["task.queued"]})
        assert created.status_code == 202, created.json().get("error")
        await d.drain()
        [got] = d.sink.on("/task")
        assert got.verify((await d.h.api.get("/v1/webhook-secret")).json()["secret"])["data"]["id"] == \
            created.json()["id"]
        # The userinfo is sent as Basic credentials in UTF-8 (aiohttp's Latin-1 failed before sending anything).
        assert got.headers["authorization"] == "Basic " + base64.b64encode(f"{userinfo}:pw".encode()).decode()
        # Credentials Latin-1 can say still go out in Latin-1, as they did (a subscriber that worked keeps working).
        latin = d.sink.url("/latin").replace("http://", "http://m%C3%BCller:p%C3%A9@", 1)
        created = await d.h.api.post("/v1/tasks", json={"provider": "evolink", "prompt": "p", "webhook_url": latin,
                                                         "webhook_events": ["task.queued"]})
        await d.drain()
        [got] = d.sink.on("/latin")
        assert got.headers["authorization"] == "Basic " + base64.b64encode("müller:pé".encode("latin-1")).decode()
        assert url_lane(url) == "url:" + d.sink.url("").rstrip("/") and userinfo not in url_lane(url)
        if database.startswith("postgresql"):
            conn = await asyncpg.connect(database)
            try:
                lanes = {row["lane"] for row in await conn.fetch("SELECT lane FROM lane_slots")}
            finally:
                await conn.close()
            assert lanes == {url_lane(url)}


@pytest.mark.parametrize(("url", "lane"), [
    ("https://user:pw@Example.COM/hook?x=1", "url:https://example.com:443"),
    ("http://[::1]:8080/h", "url:http://[::1]:8080"),
    ("http://bücher.de/a", "url:http://xn--bcher-kva.de:80"),
    ("https://a.b:443/", "url:https://a.b:443"),
    # Stored by a relay that checked URLs less strictly: a lane of its own, and the attempt fails as sent.
    ("http://ex.com:abc/", "url:sha256:" + hashlib.sha256(b"http://ex.com:abc/").hexdigest()),
])
def test_the_lane_of_a_webhook_url_is_the_server_it_reaches(url: str, lane: str) -> None:
    assert url_lane(url) == lane
