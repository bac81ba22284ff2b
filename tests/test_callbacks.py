"""Provider callbacks: durable receipt, confirmation, idempotency, ordering, and the safety-net poll."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay.runtime import open_runtime
from tests.harness import Harness, database_env, harness, settings_for, wait_for

NO_SAFETY_NET = {"RELAY_CALLBACKS_SAFETY_NET_SECONDS": "3600"}


async def events_of(h: Harness, task_id: str) -> list[str]:
    data = (await h.api.get("/v1/events", params={"task_id": task_id})).json()["data"]
    return [e["type"] for e in data]


async def sim_callbacks(h: Harness, provider_task_id: str) -> list[dict[str, Any]]:
    return list((await h.sim.get(f"/_sim/tasks/evolink/{provider_task_id}")).json()["callbacks"])


async def submitted(h: Harness, task_id: str) -> dict[str, Any]:
    async def has_id() -> bool:
        return (await h.task(task_id))["provider_task_id"] is not None
    await wait_for(has_id, 10, "the submit")
    return await h.task(task_id)


def callback_url(h: Harness, task_id: str) -> str:
    return h.runtime.ctx.callback_url("evolink", task_id).replace(h.runtime.settings.server.public_url, "")


async def test_task_completes_by_callback_alone(tmp_path: Path) -> None:
    """With the safety-net poll an hour away, the EvoLink callback alone brings the task to succeeded."""
    async with harness(tmp_path, **NO_SAFETY_NET) as h:
        task = await h.create(provider="evolink", prompt="p")
        final = await h.wait_status(task["id"])
        assert final["status"] == "succeeded"
        calls = await sim_callbacks(h, final["provider_task_id"])
        assert [c["status_code"] for c in calls] == [200]
        stats = (await h.sim.get("/_sim/stats")).json()["dialects"]["evolink"]
        assert stats["polls"] == 1      # the one confirmation of the callback, no polling


async def test_task_completes_by_safety_net_when_callbacks_are_lost(tmp_path: Path) -> None:
    """Callbacks dropped: the safety-net poll still finishes the task."""
    async with harness(tmp_path, RELAY_CALLBACKS_SAFETY_NET_SECONDS="0.3") as h:
        await h.faults(callbacks={"drop": True})
        task = await h.create(provider="evolink", prompt="p")
        final = await h.wait_status(task["id"])
        assert final["status"] == "succeeded"
        assert await sim_callbacks(h, final["provider_task_id"]) == []


async def test_duplicated_callbacks_cause_one_transition(tmp_path: Path) -> None:
    """Three copies of the completion callback: one task.generated, one task.succeeded."""
    async with harness(tmp_path, **NO_SAFETY_NET) as h:
        await h.faults(callbacks={"duplicate": 3})
        task = await h.create(provider="evolink", prompt="p")
        final = await h.wait_status(task["id"])

        async def all_acked() -> bool:
            return len(await sim_callbacks(h, final["provider_task_id"])) == 3
        await wait_for(all_acked, 10, "three callbacks")
        await wait_for(lambda: _inbox_settled(h), 10, "the inbox to be processed")
        types = await events_of(h, task["id"])
        assert types.count("task.generated") == 1 and types.count("task.succeeded") == 1


async def _inbox_settled(h: Harness) -> bool:
    counts = await h.runtime.store.job_counts()
    return not any(k.startswith(("callback:", "callback_body:")) for k in counts)


async def test_completed_before_processing_leaves_task_succeeded(tmp_path: Path) -> None:
    """A stale 'processing' callback after 'completed' changes nothing."""
    async with harness(tmp_path, **NO_SAFETY_NET) as h:
        await h.faults(callbacks={"reorder": True})
        task = await h.create(provider="evolink", prompt="p")
        final = await h.wait_status(task["id"])

        async def both_sent() -> bool:
            return len(await sim_callbacks(h, final["provider_task_id"])) == 2
        await wait_for(both_sent, 10, "the stale callback")
        await wait_for(lambda: _inbox_settled(h), 10, "the inbox to be processed")
        assert (await h.task(task["id"]))["status"] == "succeeded"
        assert "task.running" not in (await events_of(h, task["id"]))[-2:]


async def test_relay_failing_twice_gets_the_third_callback(tmp_path: Path) -> None:
    """relay answering 500 to the first two tries: EvoLink's retry (1/2/4 s) lands the third; one transition."""
    answered: list[int] = []

    class FailTwice(httpx.AsyncBaseTransport):
        def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
            self.inner = inner

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            if request.url.path.startswith("/callbacks/") and len(answered) < 2:
                answered.append(500)
                return httpx.Response(500, json={"error": {"code": "internal", "message": "down"}})
            response = await self.inner.handle_async_request(request)
            answered.append(response.status_code)
            return response

    async with harness(tmp_path, callback_path=FailTwice, **NO_SAFETY_NET) as h:
        task = await h.create(provider="evolink", prompt="p")
        final = await h.wait_status(task["id"])
        assert final["status"] == "succeeded" and answered == [500, 500, 200]
        types = await events_of(h, task["id"])
        assert types.count("task.succeeded") == 1


async def test_wrong_token_is_404_and_changes_nothing(tmp_path: Path) -> None:
    """A callback to a wrong token (or unknown/non-callback provider) is 404 with no hint; nothing recorded."""
    async with harness(tmp_path, run_worker=False) as h:
        task = await h.create(provider="evolink", prompt="p")
        url = callback_url(h, task["id"])
        body = {"id": "x", "status": "completed", "results": ["http://sim.test/files/x.png"]}
        for bad in (url[:-1] + ("0" if url[-1] != "0" else "1"), url.replace("/evolink/", "/gmicloud/"),
                    url.replace("/evolink/", "/nope/"), url.replace(task["id"], "tsk_other")):
            response = await h.api.post(bad, json=body, headers={"authorization": ""})
            assert response.status_code == 404 and response.json() == {
                "error": {"code": "not_found", "message": "not found"}}
        assert await h.runtime.store.job_counts() == {"submit:queued": 1}


async def test_callback_body_limits(tmp_path: Path) -> None:
    """Over 1 MiB is 413; non-JSON is 400; a good body is acknowledged with {"ok": true}."""
    async with harness(tmp_path, run_worker=False) as h:
        task = await h.create(provider="evolink", prompt="p")
        url = callback_url(h, task["id"])
        big = await h.api.post(url, content=b'{"a":"' + b"x" * (1024 * 1024) + b'"}')
        assert big.status_code == 413 and big.json()["error"]["code"] == "payload_too_large"
        junk = await h.api.post(url, content=b"<xml/>")
        assert junk.status_code == 400 and junk.json()["error"]["code"] == "invalid_request"
        ok = await h.api.post(url, json={"id": "x", "status": "processing"})
        assert ok.status_code == 200 and ok.json() == {"ok": True}


async def test_forged_body_not_confirmed_changes_nothing(tmp_path: Path) -> None:
    """A body claiming 'completed' while the provider says it is still running is recorded and ignored."""
    async with harness(tmp_path, sim_duration=30, **NO_SAFETY_NET) as h:
        task = await submitted(h, (await h.create(provider="evolink", prompt="p"))["id"])
        before = await h.task(task["id"])
        forged = {"id": task["provider_task_id"], "status": "completed", "results": ["https://evil.example/x.png"]}
        response = await h.api.post(callback_url(h, task["id"]), json=forged)
        assert response.status_code == 200
        await wait_for(lambda: _inbox_settled(h), 10, "the forged callback to be processed")
        after = await h.task(task["id"])
        assert after["status"] == before["status"] and after["sequence"] == before["sequence"]
        assert after["images"] == []


async def test_malformed_callbacks_never_crash_or_change_state(tmp_path: Path) -> None:
    """JSON that is not a task (lists, nulls, wrong types, another task's id) is rejected; the task is untouched."""
    async with harness(tmp_path, sim_duration=30, **NO_SAFETY_NET) as h:
        task = await submitted(h, (await h.create(provider="evolink", prompt="p"))["id"])
        before = await h.task(task["id"])
        url = callback_url(h, task["id"])
        for body in ([], None, 5, "x", {"status": 5}, {"id": None}, {"id": "task-other", "status": "completed",
                                                                     "results": ["https://x/y.png"]},
                     {"id": task["provider_task_id"], "status": "exploded"}):
            assert (await h.api.post(url, content=json.dumps(body).encode())).status_code == 200
        await wait_for(lambda: _inbox_settled(h), 10, "the callbacks to be processed")
        after = await h.task(task["id"])
        assert after["sequence"] == before["sequence"] and after["status"] == before["status"]
        assert (await h.api.get("/healthz")).status_code == 200
        # Each one was read, judged and recorded as rejected, none left half-processed.
        assert await h.runtime.store.callbacks_by_provider(0.0) == {"evolink": {"rejected": 8}}


async def finished_task(h: Harness) -> tuple[dict[str, Any], dict[str, Any]]:
    """An EvoLink task the provider has finished (submitted by the worker drained by hand, which must not be
    running), and the callback body EvoLink sends for it."""
    task = await h.create(provider="evolink", prompt="p")
    await h.runtime.worker.drain()     # the submit only
    await wait_for(lambda: _sim_done(h, task["id"]), 10, "the provider to finish")
    provider_task_id = (await h.task(task["id"]))["provider_task_id"]
    served = (await h.sim.get(f"/_sim/tasks/evolink/{provider_task_id}")).json()
    return task, {"id": provider_task_id, "status": "completed", "results": [i["url"] for i in served["images"]]}


async def test_acknowledged_callback_survives_a_restart(tmp_path: Path) -> None:
    """A callback acknowledged by a relay whose worker never ran is processed by the next relay on the same data."""
    async with harness(tmp_path, run_worker=False, **NO_SAFETY_NET) as h:
        task, body = await finished_task(h)
        assert (await h.api.post(callback_url(h, task["id"]), json=body)).status_code == 200
        assert (await h.task(task["id"]))["status"] == "queued"
        # This relay "dies" now without processing anything; a new one opens the same data directory.
        async with open_runtime(settings_for(tmp_path, **NO_SAFETY_NET)) as second:
            assert (await second.store.job_counts()).get("callback_body:queued", 0) >= 1   # ours (and the simulator's own)
            await second.worker.drain()
            await second.worker.drain()     # the archive jobs the callback caused
            final = await second.store.get_task(task["id"])
            assert final is not None and final.status.value == "succeeded"


async def _sim_done(h: Harness, task_id: str) -> bool:
    provider_task_id = (await h.task(task_id))["provider_task_id"]
    if provider_task_id is None:
        return False
    return bool((await h.sim.get(f"/_sim/tasks/evolink/{provider_task_id}")).json()["status"] == "succeeded")



async def test_the_callback_door_answers_like_the_router(tmp_path: Path) -> None:
    """The raw ASGI front of POST /callbacks keeps API.md's error shape for what it refuses, and what is not its
    shape (another method, another number of segments) gets the router's answers."""
    async with harness(tmp_path, run_worker=False) as h:
        task = await h.create(provider="evolink", prompt="p")
        url = callback_url(h, task["id"])
        wrong_method = await h.api.get(url)
        assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
        assert wrong_method.json() == {"error": {"code": "invalid_request", "message": "method GET is not allowed here"}}
        for path in ("/callbacks/evolink/" + task["id"], url + "/extra", "/callbacks/evolink//x"):
            missing = await h.api.post(path, json={})
            assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found", path

        async def chunks() -> Any:          # no Content-Length: the limit is counted as the body streams in
            for _ in range(17):
                yield b"x" * 65536
        streamed = await h.api.post(url, content=chunks())
        assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "payload_too_large"
        assert await h.runtime.store.job_counts() == {"submit:queued": 1}


async def test_one_row_per_callback_until_it_is_processed(tmp_path: Path) -> None:
    """Acknowledging writes one row (the job, carrying the raw body); processing writes the inbox row with its
    outcome, once, whatever order the callbacks are processed in."""
    async with harness(tmp_path, sim_duration=30, **NO_SAFETY_NET) as h:
        task = await submitted(h, (await h.create(provider="evolink", prompt="p"))["id"])
        store = h.runtime.store
        await h.runtime.worker.stop()
        body = {"id": task["provider_task_id"], "status": "processing", "progress": 10}
        for _ in range(3):
            assert (await h.api.post(callback_url(h, task["id"]), json=body)).status_code == 200
        jobs = await store._read_all("SELECT payload FROM jobs WHERE kind = 'callback_body' AND task_id = ?",
                                     (task["id"],))
        assert [json.loads(json.loads(r["payload"])["body"]) for r in jobs] == [body] * 3
        assert await store._read_all("SELECT id FROM inbox WHERE task_id = ?", (task["id"],)) == []
        listed = (await h.api.get("/v1/jobs", params={"state": "queued", "kind": "callback_body"})).json()["data"]
        assert len(listed) == 3 and all("not shown" in j["payload"]["body"] for j in listed)   # may hold signed links
        await h.runtime.worker.drain()
        settled = await store._read_all("SELECT * FROM inbox WHERE task_id = ? ORDER BY id", (task["id"],))
        assert len(settled) == 3 and {r["status"] for r in settled} <= {"applied", "ignored"}
        assert all(json.loads(r["body"]) == body for r in settled)
        # A job run again after settling (a crash before it finished) keeps the first outcome.
        from relay import ids
        from relay.models import Job
        now = h.runtime.ctx.clock.now()
        await store.enqueue([Job(id=ids.new_id("job", now), kind="callback_body", task_id=task["id"],
                                 payload=json.loads(jobs[0]["payload"]), run_at=now)])
        await h.runtime.worker.drain()
        again = await store._read_all("SELECT * FROM inbox WHERE task_id = ? ORDER BY id", (task["id"],))
        assert [dict(r) for r in again] == [dict(r) for r in settled]


async def test_a_callback_received_by_an_earlier_relay_is_processed(tmp_path: Path) -> None:
    """A callback an earlier relay recorded as an inbox row with a job naming it (the layout before one row per
    callback) is still confirmed, applied and settled after an upgrade; a second run of its job changes nothing."""
    async with harness(tmp_path, sim_duration=30, **NO_SAFETY_NET) as h:
        task = await submitted(h, (await h.create(provider="evolink", prompt="p"))["id"])
        await h.runtime.worker.stop()
        store, now = h.runtime.store, h.runtime.ctx.clock.now()
        body = json.dumps({"id": task["provider_task_id"], "status": "processing", "progress": 10})
        await store.transact(lambda tx: tx.run(
            "INSERT INTO inbox (id, provider, task_id, body, received_at, status) VALUES (?, ?, ?, ?, ?, 'received')",
            ("cbk_old", "evolink", task["id"], body, now)))
        from relay import ids
        from relay.models import Job
        old = Job(id=ids.new_id("job", now), kind="callback", task_id=task["id"], payload={"inbox_id": "cbk_old"},
                  run_at=now)
        await store.enqueue([old])
        await h.runtime.worker.drain()
        row = await store.get_callback("cbk_old")
        assert row is not None and row["status"] in ("applied", "ignored") and row["body"] == body
        assert row["note"] and row["processed_at"] is not None
        await store.enqueue([Job(id=ids.new_id("job", now), kind="callback", task_id=task["id"],
                                 payload={"inbox_id": "cbk_old"}, run_at=now)])
        await h.runtime.worker.drain()
        again = await store.get_callback("cbk_old")
        assert again == row


async def queued_task(h: Harness) -> dict[str, Any]:
    """An EvoLink task the provider has queued (for the harness's 30 s), submitted, with relay's worker stopped:
    the callbacks posted for it wait as a backlog."""
    task = await submitted(h, (await h.create(provider="evolink", prompt="p"))["id"])
    await h.runtime.worker.stop()
    return task


def repeat(task: dict[str, Any]) -> dict[str, Any]:
    """What EvoLink sends (again and again) for a task it has queued."""
    return {"id": task["provider_task_id"], "status": "pending", "progress": 0}


async def post_callbacks(task: dict[str, Any], body: dict[str, Any], count: int, *via: Harness) -> None:
    """Post `body` to the task's callback URL `count` times, through the harnesses `via` in turn (all acked)."""
    for n in range(count):
        h = via[n % len(via)]
        assert (await h.api.post(callback_url(h, task["id"]), json=body)).status_code == 200


async def test_a_backlog_of_callbacks_is_settled_together(tmp_path: Path, database: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Two hundred repeats of a callback queued while no worker ran (an outage): the first runs share one
    confirmation, and the callbacks still waiting are settled with it, each with its own inbox row, a page at
    a time, instead of two hundred runs and two hundred status requests. One callback in the backlog claims
    more than the shared answer says: it is never settled with that answer, but asks the provider on its own."""
    monkeypatch.setattr("relay.jobs.callback.GATHER_PAGE", 40)     # several pages
    async with harness(tmp_path, sim_duration=30, **database_env(database), **NO_SAFETY_NET) as h:
        task = await queued_task(h)
        body, ahead = repeat(task), {"id": task["provider_task_id"], "status": "processing", "progress": 5}
        await post_callbacks(task, body, 100, h)
        await post_callbacks(task, ahead, 1, h)
        await post_callbacks(task, body, 100, h)
        polls_before = (await h.sim.get("/_sim/stats")).json()["dialects"]["evolink"]["polls"]
        ran = await h.runtime.worker.drain()
        polls = (await h.sim.get("/_sim/stats")).json()["dialects"]["evolink"]["polls"] - polls_before
        store = h.runtime.store
        settled = await store._read_all("SELECT * FROM inbox WHERE task_id = ?", (task["id"],))
        assert len(settled) == 201 and {r["status"] for r in settled} == {"ignored"}
        assert all(r["processed_at"] is not None for r in settled)
        repeats = [r for r in settled if json.loads(r["body"]) == body]
        together = [r for r in repeats if "confirmed together with" in r["note"]]
        assert len(repeats) == 200 and len(together) >= 150, [r["note"] for r in settled][:5]
        [unconfirmed] = [r for r in settled if json.loads(r["body"]) == ahead]
        assert unconfirmed["note"] == "provider reports queued, callback said running"
        assert ran < 60 and polls == 2, (ran, polls)      # the shared answer, and one of its own
        assert await _inbox_settled(h)


async def test_a_shared_answer_that_does_not_confirm_a_callback_is_asked_again(tmp_path: Path) -> None:
    """A callback joins the newest status request of its task only if that was sent after the callback arrived
    by the worker's clock; a replica whose clock runs behind could let an older answer through. So an answer
    shared with a callback that it does not confirm is asked again: the completion is applied at once."""
    async with harness(tmp_path, run_worker=False, **NO_SAFETY_NET) as h:
        task = await h.create(provider="evolink", prompt="p")
        await h.runtime.worker.drain()     # the submit only
        await wait_for(lambda: _sim_done(h, task["id"]), 10, "the provider to finish")
        provider_task_id = (await h.task(task["id"]))["provider_task_id"]
        confirmations = h.runtime.worker.handlers["callback_body"].confirmations     # type: ignore[attr-defined]
        from relay.clock import ManualClock
        from relay.models import ProviderStatus, TaskUpdate

        async def stale() -> TaskUpdate:    # an answer "sent" an hour from now that still says running
            return TaskUpdate(status=ProviderStatus.RUNNING, provider_task_id=provider_task_id)
        workers_clock, confirmations._clock = confirmations._clock, ManualClock(h.runtime.ctx.clock.now() + 3600)
        planted = confirmations.ask(task["id"], provider_task_id, 0.0, stale)
        await planted.answer()
        confirmations._clock = workers_clock
        served = (await h.sim.get(f"/_sim/tasks/evolink/{provider_task_id}")).json()
        body = {"id": provider_task_id, "status": "completed", "results": [i["url"] for i in served["images"]]}
        assert (await h.api.post(callback_url(h, task["id"]), json=body)).status_code == 200
        joined = confirmations.ask(task["id"], provider_task_id, h.runtime.ctx.clock.now(), stale)
        assert joined.shared and joined.sent_at == planted.sent_at      # what the callback's run joins first
        polls_before = (await h.sim.get("/_sim/stats")).json()["dialects"]["evolink"]["polls"]
        await h.runtime.worker.drain()
        assert (await h.sim.get("/_sim/stats")).json()["dialects"]["evolink"]["polls"] == polls_before + 1
        assert (await h.task(task["id"]))["status"] in ("archiving", "succeeded")


async def test_a_failing_gathering_leaves_every_callback_to_its_own_run(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Settling the waiting callbacks together is only an optimisation: when it fails, the run that tried still
    ends well (its own callback is settled), and every other callback is settled by a run of its own."""
    async with harness(tmp_path, sim_duration=30, **NO_SAFETY_NET) as h:
        task = await queued_task(h)
        await post_callbacks(task, repeat(task), 60, h)
        store = h.runtime.store
        tried = 0

        async def broken(*args: Any, **kwargs: Any) -> list[str]:
            nonlocal tried
            tried += 1
            raise RuntimeError("the database went away")
        monkeypatch.setattr(store, "settle_waiting_callbacks", broken)
        ran = await h.runtime.worker.drain()
        settled = await store._read_all("SELECT * FROM inbox WHERE task_id = ?", (task["id"],))
        assert tried >= 1 and ran == 60 and len(settled) == 60
        assert {r["status"] for r in settled} == {"ignored"} and await _inbox_settled(h)
        assert (await store.job_counts()).get("callback_body:dead", 0) == 0
        assert [r for r in caplog.records if "settling the waiting callbacks" in r.getMessage()]      # and said so


async def test_callbacks_received_after_the_shared_request_are_not_gathered_with_it(tmp_path: Path) -> None:
    """A run gathers only the callbacks received before both its task read and the shared request: the ones
    that arrived after the request was sent may bring news its answer predates, so they keep their own runs."""
    async with harness(tmp_path, sim_duration=30, **NO_SAFETY_NET) as h:
        task = await queued_task(h)
        await post_callbacks(task, repeat(task), 20, h)
        from relay.models import ProviderStatus, TaskUpdate

        async def queued() -> TaskUpdate:
            return TaskUpdate(status=ProviderStatus.QUEUED, provider_task_id=task["provider_task_id"])
        confirmations = h.runtime.worker.handlers["callback_body"].confirmations     # type: ignore[attr-defined]
        sent = confirmations.ask(task["id"], task["provider_task_id"], 0.0, queued)
        await sent.answer()
        await post_callbacks(task, repeat(task), 20, h)
        store = h.runtime.store
        [first] = await store.claim(h.runtime.ctx.clock.now(), limit=1, lease_seconds=60, kinds=["callback_body"])
        assert first.payload["received_at"] <= sent.sent_at
        await h.runtime.worker.execute(first)           # joins the request and gathers
        settled = await store._read_all("SELECT received_at FROM inbox WHERE task_id = ?", (task["id"],))
        assert len(settled) == 20 and max(r["received_at"] for r in settled) <= sent.sent_at
        assert (await store.job_counts()).get("callback_body:queued") == 20


async def test_replicas_gathering_one_backlog_settle_each_callback_once(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Two relays on one PostgreSQL database drain one task's backlog at once: each shares its own answers and
    gathers pages of the same waiting callbacks (locked in id order, deleted only while still waiting), so every
    callback ends with exactly one inbox row, no job is left and none dies."""
    from tests.pg import fresh_database
    async with fresh_database() as database, \
            harness(tmp_path / "a", sim_duration=30, **database_env(database), **NO_SAFETY_NET) as a:
        task = await queued_task(a)
        sim_url = str(a.sim.base_url).rstrip("/")
        async with harness(tmp_path / "b", run_worker=False, RELAY_PROVIDERS_EVOLINK_BASE_URL=f"{sim_url}/evolink",
                           **database_env(database), **NO_SAFETY_NET) as b:
            await post_callbacks(task, repeat(task), 300, a, b)
            ran = await asyncio.gather(a.runtime.worker.drain(), b.runtime.worker.drain())
            assert sum(ran) < 150, ran          # most were gathered, by both replicas' runs
            store = a.runtime.store
            settled = await store._read_all("SELECT id, status FROM inbox WHERE task_id = ?", (task["id"],))
            assert len(settled) == 300 and len({r["id"] for r in settled}) == 300, ran
            assert {r["status"] for r in settled} == {"ignored"}
            counts = await store.job_counts()
            assert not any(k.startswith("callback_body:") for k in counts), counts
            assert not [r for r in caplog.records if "settling the waiting callbacks" in r.getMessage()]


async def test_callbacks_of_one_task_claimed_together_run_as_one(tmp_path: Path, database: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The callbacks of one task claimed together (a burst) run as one: the task is read once, the provider is
    asked once, its answer (no change) opens no transaction, and their inbox rows are written in one go; each
    still gets its own row and its job ends. The
    callback that claims more than the answer says is judged with that same answer: asked during the run, it
    was asked after every callback of the run had arrived, so it is that callback's own."""
    async with harness(tmp_path, sim_duration=30, **database_env(database), **NO_SAFETY_NET) as h:
        task = await queued_task(h)
        ahead = {"id": task["provider_task_id"], "status": "processing", "progress": 5}
        await post_callbacks(task, repeat(task), 10, h)
        await post_callbacks(task, ahead, 1, h)
        await post_callbacks(task, repeat(task), 9, h)
        store = h.runtime.store
        reads: list[str] = []
        writes: list[int] = []
        get_task, settle_callbacks = store.get_task, store.settle_callbacks

        async def counted_get_task(task_id: str, **kwargs: Any) -> Any:
            reads.append(task_id)
            return await get_task(task_id, **kwargs)

        async def counted_settle(settled: list[Any], now: float) -> None:
            writes.append(len(settled))
            await settle_callbacks(settled, now)
        applied: list[str] = []
        apply = store.apply

        async def counted_apply(task_id: str, decide: Any, now: float, **kwargs: Any) -> Any:
            """The transactions apply opens: none when the update changes nothing on the task the run read."""
            seen = kwargs.get("seen")
            if seen is None or decide(seen) is not None:
                applied.append(task_id)
            return await apply(task_id, decide, now, **kwargs)
        monkeypatch.setattr(store, "get_task", counted_get_task)
        monkeypatch.setattr(store, "settle_callbacks", counted_settle)
        monkeypatch.setattr(store, "apply", counted_apply)
        polls_before = (await h.sim.get("/_sim/stats")).json()["dialects"]["evolink"]["polls"]
        assert await h.runtime.worker.drain() == 20         # all twenty claimed in one batch (claim_batch 32)
        polls = (await h.sim.get("/_sim/stats")).json()["dialects"]["evolink"]["polls"] - polls_before
        assert reads == [task["id"]] and writes == [20]
        assert applied == []        # the provider's answer changes nothing: no write transaction for it either
        assert polls == 1
        settled = await store._read_all("SELECT * FROM inbox WHERE task_id = ?", (task["id"],))
        assert len(settled) == 20 and {r["status"] for r in settled} == {"ignored"}
        [unconfirmed] = [r for r in settled if json.loads(r["body"]) == ahead]
        assert unconfirmed["note"] == "provider reports queued, callback said running"
        assert await _inbox_settled(h)


async def processed_total(h: Harness) -> float:
    """relay_callbacks_processed_total, summed over its labels."""
    lines = (await h.api.get("/metrics")).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("relay_callbacks_processed_total{"))


async def test_a_group_of_callbacks_failing_midway_loses_none(tmp_path: Path, database: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The provider fails while a task's callbacks run as one: the callbacks that need its answer fail with it
    (retried by the worker, an attempt each) without asking it again one after another; those judged without
    it, before and after the failure, are settled. Once the provider answers, the next runs settle the rest.
    None is lost, none is settled (or counted) twice."""
    async with harness(tmp_path, sim_duration=30, **database_env(database), **NO_SAFETY_NET) as h:
        task = await queued_task(h)
        elsewhere = {"id": "task-of-someone-else", "status": "completed"}      # rejected unread
        await post_callbacks(task, elsewhere, 2, h)
        await post_callbacks(task, repeat(task), 5, h)
        await post_callbacks(task, elsewhere, 2, h)
        provider = h.runtime.ctx.provider("evolink")
        fetch = provider.fetch
        from relay.errors import ProviderUnavailable
        asked = 0

        async def failing_first(ticket: str) -> Any:
            nonlocal asked
            asked += 1
            if asked == 1:
                raise ProviderUnavailable("the provider is down", code="provider_unavailable")
            return await fetch(ticket)
        monkeypatch.setattr(provider, "fetch", failing_first)
        store = h.runtime.store
        counted = await processed_total(h)
        assert await h.runtime.worker.drain() == 9
        assert asked == 1
        settled = await store._read_all("SELECT body, status FROM inbox WHERE task_id = ?", (task["id"],))
        assert len(settled) == 4 and all(json.loads(r["body"]) == elsewhere for r in settled)
        left = await store._read_all("SELECT attempts, last_error FROM jobs WHERE kind = 'callback_body'", ())
        assert len(left) == 5 and {r["attempts"] for r in left} == {1}
        assert all("the provider is down" in r["last_error"] for r in left)
        await store._change("UPDATE jobs SET run_at = 0 WHERE kind = 'callback_body'", ())     # due now
        await h.runtime.worker.drain()
        settled = await store._read_all("SELECT body, status FROM inbox WHERE task_id = ?", (task["id"],))
        assert sorted(r["status"] for r in settled) == ["ignored"] * 5 + ["rejected"] * 4
        assert await processed_total(h) - counted == 9
        assert await _inbox_settled(h)


async def test_an_applied_callback_in_a_group_is_written_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a group, the callback whose update is applied gets its inbox row at once, before the others are judged:
    were the run stopped in between (shutdown), its next run would find the update applied and record a repeat."""
    async with harness(tmp_path, run_worker=False, **NO_SAFETY_NET) as h:
        task, body = await finished_task(h)
        for _ in range(3):
            assert (await h.api.post(callback_url(h, task["id"]), json=body)).status_code == 200
        store = h.runtime.store
        writes: list[list[str]] = []
        settle_callbacks = store.settle_callbacks

        async def counted_settle(settled: list[Any], now: float) -> None:
            writes.append([status for _, status, _ in settled])
            await settle_callbacks(settled, now)
        monkeypatch.setattr(store, "settle_callbacks", counted_settle)
        jobs = await store.claim(h.runtime.ctx.clock.now(), limit=32, lease_seconds=60, kinds=["callback_body"])
        assert len(jobs) >= 3       # ours, and those the provider sent
        await h.runtime.worker._execute_unit(jobs)
        assert writes == [["applied"], ["ignored"] * (len(jobs) - 1)]
        assert (await h.task(task["id"]))["status"] in ("archiving", "succeeded")
        assert await _inbox_settled(h)


async def test_a_callback_given_up_is_settled_rejected_and_counted(tmp_path: Path) -> None:
    """A callback whose confirmation never succeeded (its job out of attempts) gets its inbox row, rejected with
    the reason, and is counted among the processed ones like any other (the safety-net poll still watches the
    task)."""
    async with harness(tmp_path, sim_duration=30, **NO_SAFETY_NET) as h:
        task = await queued_task(h)
        await post_callbacks(task, repeat(task), 1, h)
        store = h.runtime.store
        counted = await processed_total(h)
        [job] = await store.claim(h.runtime.ctx.clock.now(), limit=1, lease_seconds=60, kinds=["callback_body"])
        await h.runtime.worker.handlers["callback_body"].give_up(job, "the provider kept failing")
        [row] = await store._read_all("SELECT status, note FROM inbox WHERE task_id = ?", (task["id"],))
        assert (row["status"], row["note"]) == ("rejected", "could not be confirmed: the provider kept failing")
        assert await processed_total(h) - counted == 1
