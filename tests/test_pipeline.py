"""The pipeline in process: submit → poll → archive for every dialect, and each guarantee tried on purpose."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from relay.models import Job
from tests.harness import Harness, harness, wait_for


async def sim_task(h: Harness, kind: str, provider_task_id: str) -> dict:  # type: ignore[type-arg]
    response = await h.sim.get(f"/_sim/tasks/{kind}/{provider_task_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def assert_archived_matches_simulator(h: Harness, task: dict) -> None:  # type: ignore[type-arg]
    """Every archived image's bytes hash to what the simulator served."""
    assert task["status"] == "succeeded", task
    served = await sim_task(h, task["provider"], task["provider_task_id"])
    assert len(task["images"]) == len(served["images"]) == task["request"]["n"]
    for image, original in zip(task["images"], served["images"]):
        response = await h.api.get(image["url"])
        assert response.status_code == 200
        assert hashlib.sha256(response.content).hexdigest() == image["sha256"] == original["sha256"]
        assert response.headers["content-type"] == image["content_type"]


@pytest.mark.parametrize("provider,extra", [
    ("gmicloud", {"size": "1536x1024", "output_format": "webp"}),
    ("apimart", {"size": "2:3", "n": 2, "output_format": "jpeg"}),
    ("evolink", {"size": "1:1"}),
    ("pixazo", {"size": "1024x1536", "n": 2}),
    ("openai", {"size": "1024x1024"}),
])
async def test_each_dialect_reaches_succeeded_with_verified_bytes(tmp_path: Path, provider: str,
                                                                  extra: dict) -> None:  # type: ignore[type-arg]
    """A task on each dialect ends succeeded; archived sha256 equals the simulator's; size as requested."""
    async with harness(tmp_path) as h:
        task = await h.create(provider=provider, prompt="a lighthouse", **extra)
        final = await h.wait_status(task["id"])
        await assert_archived_matches_simulator(h, final)
        size = final["request"].get("size", "1024x1024")
        assert all(f"{i['width']}x{i['height']}" == size for i in final["images"])
        events = (await h.api.get("/v1/events", params={"task_id": task["id"]})).json()["data"]
        types = [e["type"] for e in events]
        assert types[-2:] == ["task.generated", "task.succeeded"] and types.count("task.succeeded") == 1
        assert [e["sequence"] for e in events] == sorted({e["sequence"] for e in events})


@pytest.mark.parametrize("variant", [{"gmicloud_sync": True}, {"pixazo_sync": True},
                                     {"apimart_url_as_string": True}, {"apimart_url_as_string": False}])
async def test_documented_variants(tmp_path: Path, variant: dict) -> None:  # type: ignore[type-arg]
    """GMI final-at-POST, Pixazo final-at-submit, APIMart url as string and as list all archive."""
    provider = next(iter(variant)).split("_")[0]
    async with harness(tmp_path) as h:
        await h.faults(variants=variant)
        task = await h.create(provider=provider, prompt="p")
        final = await h.wait_status(task["id"])
        assert final["status"] == "succeeded", final


async def test_provider_failure_is_reported(tmp_path: Path) -> None:
    """A task the provider fails ends failed with the provider's code."""
    async with harness(tmp_path) as h:
        task = await h.create(provider="evolink", prompt="[sim:fail] p")
        final = await h.wait_status(task["id"])
        assert final["status"] == "failed" and final["error"]["code"] == "content_policy_violation"


async def test_faults_end_in_success(tmp_path: Path) -> None:
    """429s on submit, 500s and junk on poll, a truncated download: retried to success."""
    async with harness(tmp_path) as h:
        await h.faults(next=[
            {"dialect": "apimart", "op": "submit", "fault": "429", "count": 2, "retry_after": 0},
            {"dialect": "apimart", "op": "poll", "fault": "500", "count": 2},
            {"dialect": "apimart", "op": "poll", "fault": "malformed", "count": 2},
            {"dialect": "apimart", "op": "download", "fault": "truncate", "count": 1}])
        task = await h.create(provider="apimart", prompt="p")
        final = await h.wait_status(task["id"], timeout=30)
        await assert_archived_matches_simulator(h, final)
        faults = (await h.sim.get("/_sim/stats")).json()["dialects"]["apimart"]["faults"]
        assert faults["429"] == 2 and faults["500"] == 2 and faults["malformed"] == 2 and faults["truncate"] == 1


async def test_submit_with_unknown_outcome_is_not_resent(tmp_path: Path) -> None:
    """A submit marked as sent with no answer (crash after sending) fails the task; nothing is resent."""
    async with harness(tmp_path, run_worker=False) as h:
        task = await h.create(provider="gmicloud", prompt="p")
        store, clock = h.runtime.store, h.runtime.ctx.clock
        await store.mark_submit_started(task["id"], clock.now())    # as if the previous worker died mid-submit
        await h.runtime.worker.drain()
        final = await h.task(task["id"])
        assert final["status"] == "failed" and final["error"]["code"] == "submit_outcome_unknown"
        stats = (await h.sim.get("/_sim/stats")).json()
        assert stats["dialects"]["gmicloud"]["submits"] == 0 and stats["tasks"] == 0


async def test_idempotent_provider_resubmits_safely(tmp_path: Path) -> None:
    """APIMart dedupes by Idempotency-Key, so a submit with unknown outcome is resent and succeeds once."""
    async with harness(tmp_path, run_worker=False) as h:
        task = await h.create(provider="apimart", prompt="p")
        # Marked before any worker reads the task (a running worker's submit may have read it unmarked: its
        # reservation then finds the mark and stands back, rightly, for a provider timeout).
        await h.runtime.store.mark_submit_started(task["id"], h.runtime.ctx.clock.now())

        async def finished() -> bool:
            await h.runtime.worker.drain()
            return (await h.task(task["id"]))["status"] in ("succeeded", "failed", "canceled")
        await wait_for(finished, 15, "the task to finish")
        final = await h.task(task["id"])
        assert final["status"] == "succeeded"
        assert (await h.sim.get("/_sim/stats")).json()["tasks"] == 1


async def test_deadline_fails_task_as_timeout(tmp_path: Path) -> None:
    """A task the provider never finishes fails as timeout at its deadline."""
    async with harness(tmp_path, RELAY_POLLING_TASK_TIMEOUT="0.5") as h:
        task = await h.create(provider="pixazo", prompt="[sim:duration=60] p")
        final = await h.wait_status(task["id"])
        assert final["status"] == "failed" and final["error"]["code"] == "timeout"


async def test_expired_source_link_fails_with_clear_reason(tmp_path: Path) -> None:
    """A link that dies before it is archived fails the task, saying the link expired."""
    async with harness(tmp_path, run_worker=False) as h:
        task = await h.create(provider="pixazo", prompt="[sim:ttl=0.01] p")
        worker = h.runtime.worker
        await worker.drain()       # submit

        async def generated() -> bool:
            # Poll only (no archive yet): run poll jobs until the task reaches archiving.
            jobs = await h.runtime.store.claim(h.runtime.ctx.clock.now(), limit=10, lease_seconds=30,
                                               kinds=["poll"])
            for job in jobs:
                await worker.execute(job)
            return (await h.task(task["id"]))["status"] == "archiving"
        await wait_for(generated, 10, "the provider to finish")
        served = await h.sim.get(f"/_sim/tasks/pixazo/{(await h.task(task['id']))['provider_task_id']}")
        link = served.json()["images"][0]["url"]

        async def dead() -> bool:
            return (await h.sim.get(link)).status_code in (404, 410)
        await wait_for(dead, 5, "the source link to expire")
        await worker.drain()
        final = await h.task(task["id"])
        assert final["status"] == "failed" and final["error"]["code"] == "source_gone"
        assert "410" in final["error"]["message"] or "gone" in final["error"]["message"]


async def test_stale_and_repeated_poll_results_change_nothing(tmp_path: Path) -> None:
    """Re-running a finished task's poll and archive jobs adds no event and keeps the state."""
    async with harness(tmp_path) as h:
        task = await h.create(provider="gmicloud", prompt="p")
        final = await h.wait_status(task["id"])
        before = (await h.api.get("/v1/events", params={"task_id": task["id"]})).json()["data"]
        now = h.runtime.ctx.clock.now()
        image_id = final["images"][0]["id"]
        for handler, job in ((h.runtime.worker.handlers["poll"], Job(id="job_x", kind="poll", task_id=task["id"])),
                             (h.runtime.worker.handlers["archive"],
                              Job(id="job_y", kind="archive", task_id=task["id"], payload={"image_id": image_id})),
                             (h.runtime.worker.handlers["submit"], Job(id="job_z", kind="submit", task_id=task["id"]))):
            for _ in range(2):
                await handler.run(job)
        after = (await h.api.get("/v1/events", params={"task_id": task["id"]})).json()["data"]
        assert after == before and (await h.task(task["id"]))["sequence"] == final["sequence"]
        assert now <= h.runtime.ctx.clock.now()


async def test_a_poll_answer_that_changes_nothing_writes_nothing(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Polling a task the provider is still working on, answered as before: not even a transaction is opened."""
    async with harness(tmp_path, sim_duration=3600) as h:
        task = await h.create(provider="gmicloud", prompt="p")

        async def seen_by_a_poll() -> bool:
            return (await h.task(task["id"]))["status"] in ("queued", "running")
        await wait_for(seen_by_a_poll, 10, "the first poll")
        store = h.runtime.store
        opened: list[Any] = []
        shared = store.transact_shared

        async def counted(body: Any) -> Any:      # what apply runs its transaction with
            opened.append(body)
            return await shared(body)
        monkeypatch.setattr(store, "transact_shared", counted)
        poll = h.runtime.worker.handlers["poll"]
        for _ in range(3):
            await poll.run(Job(id="job_x", kind="poll", task_id=task["id"]))
        assert opened == []
        assert (await h.task(task["id"]))["status"] in ("queued", "running")


async def test_max_in_flight_holds_the_backlog_until_the_provider_has_room(tmp_path: Path) -> None:
    """With max_in_flight = 2, the provider never holds more than two unfinished tasks; the rest wait, then run."""
    async with harness(tmp_path, RELAY_PROVIDERS_GMICLOUD_MAX_IN_FLIGHT="2") as h:
        # 5 s: the held submit is re-checked a second later, and the assertions below must come before the slow
        # tasks end however slow the machine (at 1.5 s a loaded one let the held task through first).
        slow = [await h.create(provider="gmicloud", prompt="[sim:duration=5] slow") for _ in range(2)]
        for task in slow:
            await h.wait_status(task["id"], ("queued", "running"))
        held = await h.create(provider="gmicloud", prompt="waits its turn")
        await wait_for(lambda: _submit_job_ran_again(h, held["id"]), 10, "the held submit to be re-checked")
        assert (await h.task(held["id"]))["status"] == "pending"
        assert (await h.sim.get("/_sim/stats")).json()["tasks"] == 2
        for task in (*slow, held):
            assert (await h.wait_status(task["id"]))["status"] == "succeeded"
        assert (await h.sim.get("/_sim/stats")).json()["tasks"] == 3


async def _submit_job_ran_again(h: Harness, task_id: str) -> bool:
    """The held task's submit job was run and put back for a later re-check (not leased, due later)."""
    db = h.runtime.store._r   # white-box: the job row itself is the evidence that the cap was applied
    row = await (await db.execute(
        "SELECT created_at, run_at, lease_token FROM jobs WHERE task_id = ? AND kind = 'submit'",
        (task_id,))).fetchone()
    return row is not None and row[2] is None and row[1] > row[0] + 0.5


async def test_a_source_failing_more_often_than_max_attempts_is_still_archived(tmp_path: Path) -> None:
    """Transient download failures are retried while the link lives, not a fixed number of times (chaos found
    an image given up after 11 answers of 500 whose link had hours left)."""
    async with harness(tmp_path, RELAY_WORKER_MAX_ATTEMPTS="2") as h:
        await h.faults(next=[{"dialect": "apimart", "op": "download", "fault": "500", "count": 5}])
        task = await h.create(provider="apimart", prompt="p")
        final = await h.wait_status(task["id"], timeout=30)
        assert final["status"] == "succeeded", final
        await assert_archived_matches_simulator(h, final)
        faults = (await h.sim.get("/_sim/stats")).json()["dialects"]["apimart"]["faults"]
        assert faults["500"] == 5


async def test_a_provider_refusing_submits_more_often_than_max_attempts_still_gets_the_task(tmp_path: Path) -> None:
    """Submits the provider answers 500 are retried until the task's deadline, not max_attempts times."""
    async with harness(tmp_path, RELAY_WORKER_MAX_ATTEMPTS="2") as h:
        await h.faults(next=[{"dialect": "gmicloud", "op": "submit", "fault": "500", "count": 5}])
        task = await h.create(provider="gmicloud", prompt="p")
        final = await h.wait_status(task["id"], timeout=30)
        assert final["status"] == "succeeded", final
        stats = (await h.sim.get("/_sim/stats")).json()["dialects"]["gmicloud"]
        assert stats["faults"]["500"] == 5 and stats["submits"] == 6


@pytest.mark.parametrize("fault", [{"fault": "500"}, {"fault": "429", "retry_after": 0}, {"fault": "malformed"}])
async def test_a_provider_failing_polls_more_often_than_max_attempts_still_finishes_the_task(
        tmp_path: Path, fault: dict[str, Any]) -> None:
    """Polls the provider does not answer are asked again until the task's deadline, not max_attempts times (chaos:
    a finished task failed as provider_unavailable after ten one-shot poll faults in a row, 429s among them)."""
    async with harness(tmp_path, RELAY_WORKER_MAX_ATTEMPTS="2") as h:
        await h.faults(next=[{"dialect": "apimart", "op": "poll", "count": 6, **fault}])
        task = await h.create(provider="apimart", prompt="p")
        final = await h.wait_status(task["id"], timeout=30)
        assert final["status"] == "succeeded", final
        await assert_archived_matches_simulator(h, final)
        stats = (await h.sim.get("/_sim/stats")).json()["dialects"]["apimart"]
        assert stats["faults"][fault["fault"]] == 6


@pytest.mark.parametrize("dialect,op,prompt", [("gmicloud", "submit", "p"), ("pixazo", "poll", "[sim:duration=0.1] p")])
async def test_a_provider_that_never_answers_fails_the_task_at_its_deadline_with_the_last_reason(
        tmp_path: Path, dialect: str, op: str, prompt: str) -> None:
    """A provider that never accepts the task, or never answers its polls: the task fails at its deadline as
    provider_unavailable, saying why."""
    async with harness(tmp_path, RELAY_POLLING_TASK_TIMEOUT="2") as h:
        await h.faults(next=[{"dialect": dialect, "op": op, "fault": "500", "count": 10_000}])
        task = await h.create(provider=dialect, prompt=prompt)
        final = await h.wait_status(task["id"], timeout=30)
        assert final["status"] == "failed" and final["error"]["code"] == "provider_unavailable", final
        assert "deadline" in final["error"]["message"] and "500" in final["error"]["message"], final


async def test_an_image_file_deleted_while_it_is_being_served_is_a_404_not_a_500(tmp_path: Path) -> None:
    """Retention deletes an expired image's file between GET /v1/images/{id} finding it and reading it: the answer
    is a 404 in relay's error shape (Starlette's file response raised a 500). Served normally otherwise."""
    async with harness(tmp_path) as h:
        task = await h.create(provider="gmicloud", prompt="p")
        final = await h.wait_status(task["id"])
        image_id = final["images"][0]["id"]
        served = await h.api.get(f"/v1/images/{image_id}")
        assert served.status_code == 200 and served.content[:8] == b"\x89PNG\r\n\x1a\n"
        store = h.runtime.ctx.image_store
        real_open = store.open

        async def open_then_deleted(key: str) -> Any:
            found = await real_open(key)
            assert found is not None and found.path is not None
            found.path.unlink()       # retention, right after the handler found the file
            return found
        store.open = open_then_deleted  # type: ignore[method-assign]
        gone = await h.api.get(f"/v1/images/{image_id}")
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found", gone.text


async def test_an_uploaded_inputs_head_reads_only_its_size_and_a_store_down_is_a_503(tmp_path: Path) -> None:
    """GET and HEAD of an edit input's signed link (what providers fetch) go the way archived images do: HEAD asks
    the store for the size only (on S3 it streamed the whole object), and a store that cannot be read answers 503
    with Retry-After (it was a 500)."""
    import hashlib as _hashlib

    from relay.errors import ArchiveError
    from relay.web.openai_compat import input_url
    async with harness(tmp_path, run_worker=False) as h:
        store = h.runtime.ctx.image_store
        data = b"\x89PNG\r\n\x1a\n" + b"input bytes" * 100
        sha = _hashlib.sha256(data).hexdigest()
        tmp = store.tmp_dir() / "upload.part"
        tmp.write_bytes(data)
        await store.put_file(tmp, sha, "png")
        link = input_url(h.runtime, f"{sha}.png").split("/openai/", 1)[1]
        opened: list[str] = []
        real_open = store.open

        async def counting_open(key: str) -> Any:
            opened.append(key)
            return await real_open(key)
        store.open = counting_open  # type: ignore[method-assign]
        head = await h.api.head(f"/openai/{link}")
        assert head.status_code == 200 and head.headers["content-length"] == str(len(data)) and opened == []
        got = await h.api.get(f"/openai/{link}")
        assert got.status_code == 200 and got.content == data and len(opened) == 1

        async def down(key: str) -> Any:
            raise ArchiveError("the bucket is unreachable", code="image_store_unavailable")
        store.open = down  # type: ignore[method-assign]
        unavailable = await h.api.get(f"/openai/{link}")
        assert unavailable.status_code == 503 and unavailable.headers["retry-after"] == "5"
        assert unavailable.json()["error"]["code"] == "image_store_unavailable"
