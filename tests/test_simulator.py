"""The provider simulator speaks each dialect of PROVIDERS.md: flows, variants, images, 401s, 400s.

Faults, link expiry and EvoLink callbacks are in test_simulator_faults.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from PIL import Image

from relay import multipart
from relay.simulator import SimulatorConfig, create_simulator_app
from relay.simulator import tasks as sim_tasks
from relay.simulator.imaging import render

BASE = "http://sim.test"
AUTH = {"Authorization": "Bearer test-key"}
APIM = {"Ocp-Apim-Subscription-Key": "test-key"}
GMI = "/gmicloud/api/v1/ie/requestqueue/apikey/requests"
APIMART = "/apimart/v1/images/generations"
EVOLINK = "/evolink/v1/images/generations"
PIXAZO = "/pixazo/gpt-image-1-5-api-923/v1/gpt-image-1-5-api-request"
PIXAZO_RESULT = PIXAZO + "-result"
OPENAI = "/openai/v1/images/generations"
OPENAI_EDITS = "/openai/v1/images/edits"


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = create_simulator_app(SimulatorConfig(public_url=BASE, duration=0.1, seed=7))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c:
            yield c


async def until(check: Callable[[], Awaitable[Any]], timeout: float = 5.0) -> Any:
    """Poll `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result:
            return result
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def knobs(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await client.post("/_sim/faults", json=body)
    assert response.status_code == 200, response.text
    return response.json()


async def check_image(client: httpx.AsyncClient, url: str, dialect: str, task_id: str, index: int,
                      size: tuple[int, int], fmt: str) -> bytes:
    """Download a link: real image of the right size and format, sha256 as /_sim reports it."""
    assert url.startswith(BASE + "/files/")
    response = await client.get(url)
    assert response.status_code == 200
    image = Image.open(io.BytesIO(response.content))
    assert image.size == size and image.format == fmt
    detail = (await client.get(f"/_sim/tasks/{dialect}/{task_id}")).json()
    assert detail["images"][index]["sha256"] == hashlib.sha256(response.content).hexdigest()
    assert detail["images"][index]["bytes"] == len(response.content)
    return response.content


async def poll_until(fetch: Callable[[], Awaitable[dict[str, Any]]], done: Callable[[dict[str, Any]], bool],
                     seen: list[dict[str, Any]]) -> dict[str, Any]:
    async def step() -> dict[str, Any] | None:
        body = await fetch()
        seen.append(body)
        return body if done(body) else None

    return await until(step)


# --- gmicloud ---------------------------------------------------------------

async def test_gmicloud_queue_flow(client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    # The simulator's clock moves 10 ms per poll: on the wall clock a pause of a loaded machine could step over
    # the whole processing phase (105 ms of it) and the poll would never see it.
    clock = [time.time()]
    monkeypatch.setattr(sim_tasks, "now", lambda: clock[0])
    body = {"model": "gpt-image-1.5", "payload": {"prompt": "a fox [sim:duration=0.15]", "n": 2,
                                                  "size": "1536x1024", "output_format": "jpeg"}}
    submitted = (await client.post(GMI, json=body, headers=AUTH)).json()
    assert submitted["status"] == "queued" and "outcome" not in submitted
    rid = submitted["request_id"]
    seen: list[dict[str, Any]] = []

    async def fetch() -> dict[str, Any]:
        clock[0] += 0.01
        return (await client.get(f"{GMI}/{rid}", headers=AUTH)).json()

    final = await poll_until(fetch, lambda b: b["status"] == "success", seen)
    statuses = [b["status"] for b in seen]
    assert set(statuses) <= {"queued", "dispatched", "processing", "success"} and "processing" in statuses
    urls = [m["url"] for m in final["outcome"]["media_urls"]]
    assert len(urls) == 2
    for i, url in enumerate(urls):
        await check_image(client, url, "gmicloud", rid, i, (1536, 1024), "JPEG")
    detail = (await client.get(f"/_sim/tasks/gmicloud/{rid}")).json()
    assert detail["request"] == body and detail["status"] == "succeeded"


async def test_gmicloud_sync_variant_answers_final(client: httpx.AsyncClient) -> None:
    await knobs(client, variants={"gmicloud_sync": True})
    body = {"model": "gpt-image-1.5", "payload": {"prompt": "sync", "output_format": "webp"}}
    final = (await client.post(GMI, json=body, headers=AUTH)).json()
    assert final["status"] == "success"
    url = final["outcome"]["media_urls"][0]["url"]
    await check_image(client, url, "gmicloud", final["request_id"], 0, (1024, 1024), "WEBP")
    # The directive forces the other way for one task.
    body["payload"]["prompt"] = "queued anyway [sim:async]"
    assert (await client.post(GMI, json=body, headers=AUTH)).json()["status"] == "queued"


async def test_gmicloud_failure(client: httpx.AsyncClient) -> None:
    body = {"model": "gpt-image-1.5", "payload": {"prompt": "bad [sim:fail] [sim:sync]"}}
    final = (await client.post(GMI, json=body, headers=AUTH)).json()
    assert final["status"] == "failed" and isinstance(final["error"], str) and "outcome" not in final


@pytest.mark.parametrize("payload", [
    {"prompt": "x", "size": "512x512"}, {"prompt": "x", "n": 11}, {"prompt": "x", "n": "2"},
    {"prompt": ""}, {"size": "1024x1024"}, {"prompt": "x", "quality": "ultra"},
    {"prompt": "x", "mask": "aGVsbG8="},
])
async def test_gmicloud_validation(client: httpx.AsyncClient, payload: dict[str, Any]) -> None:
    response = await client.post(GMI, json={"model": "gpt-image-1.5", "payload": payload}, headers=AUTH)
    assert response.status_code == 400 and isinstance(response.json()["error"], str)


# --- apimart ----------------------------------------------------------------

async def _apimart_submit(client: httpx.AsyncClient, prompt: str, **extra: Any) -> str:
    body = {"model": "gpt-image-1.5-official", "prompt": prompt, **extra}
    response = await client.post(APIMART, json=body, headers=AUTH)
    envelope = response.json()
    assert response.status_code == 200 and envelope["code"] == 200, envelope
    assert envelope["data"][0]["status"] == "submitted"
    task_id = envelope["data"][0]["task_id"]
    assert re.fullmatch(r"task_[0-9A-Z]{26}", task_id)
    return task_id


async def _apimart_final(client: httpx.AsyncClient, task_id: str, seen: list[dict[str, Any]]) -> dict[str, Any]:
    async def fetch() -> dict[str, Any]:
        return (await client.get(f"/apimart/v1/tasks/{task_id}", headers=AUTH)).json()

    final = await poll_until(fetch, lambda b: b["data"]["status"] in ("completed", "failed"), seen)
    assert final["code"] == 200
    return final["data"]


async def test_apimart_flow_and_alternating_url_shapes(client: httpx.AsyncClient) -> None:
    first = await _apimart_submit(client, "one [sim:duration=0.15]", size="2:3", n=2)
    second = await _apimart_submit(client, "two", size="3:2", output_format="jpeg")
    seen: list[dict[str, Any]] = []
    data = await _apimart_final(client, first, seen)
    assert {b["data"]["status"] for b in seen} <= {"submitted", "pending", "processing", "completed"}
    progress = [b["data"]["progress"] for b in seen]
    assert progress == sorted(progress) and progress[-1] == 100
    assert data["completed"] >= data["created"] and "estimated_time" in data and "actual_time" in data
    other = await _apimart_final(client, second, [])
    shapes = {type(d["result"]["images"][0]["url"]) for d in (data, other)}
    assert shapes == {str, list}  # default: alternate per task
    for i, image in enumerate(data["result"]["images"]):
        assert abs(image["expires_at"] - data["completed"] - 86400) <= 1
        url = image["url"] if isinstance(image["url"], str) else image["url"][0]
        await check_image(client, url, "apimart", first, i, (1024, 1536), "PNG")


@pytest.mark.parametrize("as_string", [True, False])
async def test_apimart_url_shape_knob(client: httpx.AsyncClient, as_string: bool) -> None:
    await knobs(client, variants={"apimart_url_as_string": as_string})
    for prompt in ("a", "b"):
        data = await _apimart_final(client, await _apimart_submit(client, prompt), [])
        assert isinstance(data["result"]["images"][0]["url"], str if as_string else list)


async def test_apimart_idempotency_key(client: httpx.AsyncClient) -> None:
    headers = {**AUTH, "Idempotency-Key": "k-1"}
    body = {"model": "gpt-image-1.5-official", "prompt": "once"}
    ids = [(await client.post(APIMART, json=body, headers=headers)).json()["data"][0]["task_id"] for _ in range(3)]
    assert len(set(ids)) == 1
    other = (await client.post(APIMART, json=body, headers={**AUTH, "Idempotency-Key": "k-2"})).json()
    assert other["data"][0]["task_id"] != ids[0]
    assert len((await client.get("/_sim/tasks")).json()["tasks"]) == 2


@pytest.mark.parametrize("extra", [
    {"output_format": "webp"}, {"n": "2"}, {"size": "1024x1024"}, {"prompt": None},
    {"mask_url": "https://x.test/m.png"}, {"model": "gpt-image-1.5"}, {"image_urls": "https://x.test/a.png"},
])
async def test_apimart_validation(client: httpx.AsyncClient, extra: dict[str, Any]) -> None:
    body = {"model": "gpt-image-1.5-official", "prompt": "x", **extra}
    response = await client.post(APIMART, json={k: v for k, v in body.items() if v is not None}, headers=AUTH)
    assert response.status_code == 400
    assert response.json()["code"] == 400 and response.json()["error"]["message"]


async def test_apimart_n_is_clamped_and_error_variant(client: httpx.AsyncClient) -> None:
    task_id = await _apimart_submit(client, "many", n=9)
    assert (await client.get(f"/_sim/tasks/apimart/{task_id}")).json()["n"] == 4
    await knobs(client, variants={"apimart_error_as_200": True})
    response = await client.post(APIMART, json={"model": "gpt-image-1.5-official", "prompt": "x", "n": "1"},
                                 headers=AUTH)
    assert response.status_code == 200 and response.json()["code"] == 400


async def test_apimart_failure(client: httpx.AsyncClient) -> None:
    data = await _apimart_final(client, await _apimart_submit(client, "no [sim:fail]"), [])
    assert data["status"] == "failed" and data["error"]["message"] and "result" not in data
    missing = await client.get("/apimart/v1/tasks/task_nope", headers=AUTH)
    assert missing.status_code == 404 and missing.json()["code"] == 404


# --- evolink ----------------------------------------------------------------

TASK_KEYS = {"id", "object", "status", "progress", "created", "model", "type", "task_info"}


async def _evolink_final(client: httpx.AsyncClient, task_id: str, seen: list[dict[str, Any]]) -> dict[str, Any]:
    async def fetch() -> dict[str, Any]:
        return (await client.get(f"/evolink/v1/tasks/{task_id}", headers=AUTH)).json()

    return await poll_until(fetch, lambda b: b["status"] in ("completed", "failed", "cancelled"), seen)


async def test_evolink_flow(client: httpx.AsyncClient) -> None:
    created = (await client.post(EVOLINK, json={"model": "gpt-image-1.5", "prompt": "p [sim:duration=0.15]",
                                                "size": "2:3"}, headers=AUTH)).json()
    assert TASK_KEYS <= set(created) and created["status"] == "pending" and created["progress"] == 0
    assert created["object"] == "image.generation.task" and created["type"] == "image"
    assert re.fullmatch(r"task-unified-\d+-[a-z0-9]{8}", created["id"])
    assert created["task_info"]["can_cancel"] is True and "results" not in created
    seen: list[dict[str, Any]] = []
    final = await _evolink_final(client, created["id"], seen)
    assert {b["status"] for b in seen} <= {"pending", "processing", "completed"}
    assert final["status"] == "completed" and final["progress"] == 100 and len(final["results"]) == 1
    await check_image(client, final["results"][0], "evolink", created["id"], 0, (1024, 1536), "PNG")


@pytest.mark.parametrize("extra", [
    {"n": 2}, {"size": "512x512"}, {"quality": "ultra"}, {"callback_url": "ftp://x.test/cb"},
    {"callback_url": "https://x.test/" + "a" * 2050}, {"prompt": "x" * 2001}, {"image_urls": [1]},
])
async def test_evolink_validation(client: httpx.AsyncClient, extra: dict[str, Any]) -> None:
    response = await client.post(EVOLINK, json={"model": "gpt-image-1.5", "prompt": "x", **extra}, headers=AUTH)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("prompt", "status", "code"), [
    ("[sim:fail]", "failed", "content_policy_violation"),
    ("[sim:fail=quota_exceeded]", "failed", "quota_exceeded"),
    ("[sim:cancel]", "cancelled", "request_cancelled"),
])
async def test_evolink_failure_shapes(client: httpx.AsyncClient, prompt: str, status: str, code: str) -> None:
    created = (await client.post(EVOLINK, json={"model": "gpt-image-1.5", "prompt": prompt}, headers=AUTH)).json()
    final = await _evolink_final(client, created["id"], [])
    assert final["status"] == status and final["error"]["code"] == code and "results" not in final


# --- pixazo -----------------------------------------------------------------

async def test_pixazo_flow(client: httpx.AsyncClient) -> None:
    body = {"prompt": "px [sim:duration=0.15]", "image_size": "1024x1536", "num_images": 2,
            "output_format": "webp", "quality": "high", "background": "auto"}
    ticket = (await client.post(PIXAZO, json=body, headers={**APIM, "Cache-Control": "no-cache"})).json()
    assert ticket["status"] == "IN_QUEUE" and ticket["response_url"].startswith("https://")
    seen: list[dict[str, Any]] = []

    async def fetch() -> dict[str, Any]:
        return (await client.post(PIXAZO_RESULT, json={"request_id": ticket["request_id"]}, headers=APIM)).json()

    final = await poll_until(fetch, lambda b: b["status"] == "COMPLETED", seen)
    assert {b["status"] for b in seen} <= {"IN_QUEUE", "IN_PROGRESS", "COMPLETED"}
    queued = [b for b in seen if b["status"] == "IN_QUEUE"]
    assert all("queue_position" in b and "estimated_wait_minutes" in b for b in queued)
    assert len(final["images"]) == 2
    for i, image in enumerate(final["images"]):
        assert (image["width"], image["height"], image["content_type"]) == (1024, 1536, "image/webp")
        data = await check_image(client, image["url"], "pixazo", ticket["request_id"], i, (1024, 1536), "WEBP")
        assert image["size_bytes"] == len(data)


async def test_pixazo_sync_variant_failure_and_unknown(client: httpx.AsyncClient) -> None:
    await knobs(client, variants={"pixazo_sync": True})
    final = (await client.post(PIXAZO, json={"prompt": "now"}, headers=APIM)).json()
    assert final["status"] == "COMPLETED" and final["images"][0]["url"].startswith(BASE)
    failed = (await client.post(PIXAZO, json={"prompt": "no [sim:fail]"}, headers=APIM)).json()
    assert failed["status"] == "FAILED" and isinstance(failed["error"], str)
    unknown = await client.post(PIXAZO_RESULT, json={"request_id": "nope"}, headers=APIM)
    assert unknown.status_code == 404 and isinstance(unknown.json()["error"], str)
    empty = await client.post(PIXAZO_RESULT, json={}, headers=APIM)
    assert empty.status_code == 400 and isinstance(empty.json()["error"], str)


@pytest.mark.parametrize("extra", [{"num_images": 5}, {"image_size": "999x999"}, {"output_format": "gif"},
                                   {"prompt": 3}])
async def test_pixazo_validation(client: httpx.AsyncClient, extra: dict[str, Any]) -> None:
    response = await client.post(PIXAZO, json={"prompt": "x", **extra}, headers=APIM)
    assert response.status_code == 400 and isinstance(response.json()["error"], str)


# --- openai -----------------------------------------------------------------

async def _openai_sha(client: httpx.AsyncClient, response: httpx.Response) -> list[str]:
    detail = (await client.get(f"/_sim/tasks/openai/{response.headers['x-request-id']}")).json()
    return [image["sha256"] for image in detail["images"]]


async def test_openai_generations(client: httpx.AsyncClient) -> None:
    body = {"model": "gpt-image-1.5", "prompt": "o", "n": 2, "size": "1024x1536", "output_format": "webp"}
    response = await client.post(OPENAI, json=body, headers=AUTH)
    assert response.status_code == 200
    result = response.json()
    assert result["usage"]["total_tokens"] > 0 and len(result["data"]) == 2
    decoded = [base64.b64decode(item["b64_json"]) for item in result["data"]]
    for data in decoded:
        image = Image.open(io.BytesIO(data))
        assert image.size == (1024, 1536) and image.format == "WEBP"
    assert await _openai_sha(client, response) == [hashlib.sha256(d).hexdigest() for d in decoded]


def _png(size: tuple[int, int] = (8, 8), mode: str = "RGBA") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size).save(out, "PNG")
    return out.getvalue()


async def test_openai_edits_multipart(client: httpx.AsyncClient) -> None:
    files = [("image[]", ("a.png", _png(), "image/png")), ("image[]", ("b.png", _png((4, 4)), "image/png")),
             ("mask", ("m.png", _png(), "image/png"))]
    data = {"model": "gpt-image-1.5", "prompt": "edit me", "n": "1", "size": "1536x1024"}
    response = await client.post(OPENAI_EDITS, files=files, data=data, headers=AUTH)
    assert response.status_code == 200, response.text
    decoded = base64.b64decode(response.json()["data"][0]["b64_json"])
    assert Image.open(io.BytesIO(decoded)).size == (1536, 1024)
    detail = (await client.get(f"/_sim/tasks/openai/{response.headers['x-request-id']}")).json()
    assert [p["filename"] for p in detail["request"]["image"]] == ["a.png", "b.png"]
    assert detail["request"]["mask"]["filename"] == "m.png"
    bad = await client.post(OPENAI_EDITS, files=[("image[]", ("a.txt", b"text", "text/plain"))], data=data,
                            headers=AUTH)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "image"
    none = await client.post(OPENAI_EDITS, files=[("other", ("x", b"1", "text/plain"))], data=data, headers=AUTH)
    assert none.status_code == 400
    junk = await client.post(OPENAI_EDITS, content=b"--x\r\nnot multipart", headers={**AUTH,
                             "Content-Type": "multipart/form-data; boundary=x"})
    assert junk.status_code == 400 and junk.json()["error"]["type"] == "invalid_request_error"


async def test_openai_failure_and_validation(client: httpx.AsyncClient) -> None:
    blocked = await client.post(OPENAI, json={"model": "gpt-image-1.5", "prompt": "no [sim:fail]"}, headers=AUTH)
    assert blocked.status_code == 400 and blocked.json()["error"]["code"] == "moderation_blocked"
    for extra in ({"n": 11}, {"size": "1024x1792"}, {"background": "transparent", "output_format": "jpeg"},
                  {"model": None}, {"response_format": "url"}, {"stream": True}):
        body = {k: v for k, v in {"model": "gpt-image-1.5", "prompt": "x", **extra}.items() if v is not None}
        response = await client.post(OPENAI, json=body, headers=AUTH)
        assert response.status_code == 400, extra
        assert response.json()["error"]["type"] == "invalid_request_error"


# --- auth and junk, every dialect ---------------------------------------------

def _error_text(dialect: str, body: Any) -> str:
    """The message from each dialect's error shape (fails if the shape is wrong)."""
    if dialect in ("gmicloud", "pixazo"):
        return body["error"]
    if dialect == "apimart":
        assert body["code"] != 200
    return body["error"]["message"]


SUBMITS = [("gmicloud", GMI, AUTH), ("apimart", APIMART, AUTH), ("evolink", EVOLINK, AUTH),
           ("pixazo", PIXAZO, APIM), ("openai", OPENAI, AUTH)]


@pytest.mark.parametrize(("dialect", "path", "headers"), SUBMITS)
@pytest.mark.parametrize("bad_auth", [{}, {"Authorization": "Bearer "}, {"Ocp-Apim-Subscription-Key": ""},
                                      {"Authorization": "Basic abc"}])
async def test_auth_is_required(client: httpx.AsyncClient, dialect: str, path: str, headers: dict[str, str],
                                bad_auth: dict[str, str]) -> None:
    response = await client.post(path, json={"prompt": "x"}, headers=bad_auth)
    assert response.status_code == 401
    assert _error_text(dialect, response.json())


@pytest.mark.parametrize(("dialect", "path", "headers"), SUBMITS)
@pytest.mark.parametrize("junk", [b"not json", b"[1, 2]", b"null", b"", b'{"prompt": 5, "payload": 7}',
                                  b'{"prompt": ["x"], "n": {"a": 1}}', b"\xff\xfe"])
async def test_junk_bodies_get_the_dialects_400(client: httpx.AsyncClient, dialect: str, path: str,
                                                headers: dict[str, str], junk: bytes) -> None:
    response = await client.post(path, content=junk, headers={**headers, "Content-Type": "application/json"})
    assert response.status_code == 400
    assert _error_text(dialect, response.json())


async def test_unknown_paths_and_tasks(client: httpx.AsyncClient) -> None:
    assert (await client.get("/gmicloud/api/v1/ie/requestqueue/apikey/requests/nope", headers=AUTH)).status_code == 404
    assert (await client.get("/evolink/v1/tasks/nope", headers=AUTH)).json()["error"]["code"] == 404
    assert (await client.get("/pixazo/elsewhere", headers=APIM)).json() == {"error": "Endpoint not found"}
    assert (await client.get("/files/0123.png")).status_code == 404
    assert (await client.get("/_sim/tasks/evolink/nope")).status_code == 404


# --- held answers and the clock ----------------------------------------------------

@pytest.fixture
def slow_clock(monkeypatch: pytest.MonkeyPatch) -> Callable[[], float]:
    """The simulator's wall clock at half the pace of asyncio's timers, from a start with a fraction.

    Every sleep then ends early by the simulator's clock, as a timer firing a little ahead of the
    wall clock does: a held answer built right after one sleep would still describe a running task.
    """
    started = time.monotonic()

    def now() -> float:
        return 1_790_000_000.25 + (time.monotonic() - started) / 2

    monkeypatch.setattr(sim_tasks, "now", now)
    return now


async def _status_now(client: httpx.AsyncClient, dialect: str, task_id: str) -> dict[str, Any]:
    return (await client.get(f"/_sim/tasks/{dialect}/{task_id}")).json()


async def test_held_gmicloud_and_pixazo_answers_are_final_when_sent(client: httpx.AsyncClient,
                                                                     slow_clock: Callable[[], float]) -> None:
    """A sync answer says success, and at that moment the task is done: its links download, /_sim agrees."""
    gmi = (await client.post(GMI, json={"model": "gpt-image-1.5", "payload": {"prompt": "s [sim:sync]"}},
                             headers=AUTH)).json()
    assert gmi["status"] == "success", gmi
    detail = await _status_now(client, "gmicloud", gmi["request_id"])
    assert detail["status"] == "succeeded" and slow_clock() >= detail["done_at"]
    assert gmi["updated_at"] == int(detail["done_at"])
    assert (await client.get(gmi["outcome"]["media_urls"][0]["url"])).status_code == 200
    pix = (await client.post(PIXAZO, json={"prompt": "s [sim:sync]"}, headers=APIM)).json()
    assert pix["status"] == "COMPLETED", pix
    assert (await _status_now(client, "pixazo", pix["request_id"]))["status"] == "succeeded"
    assert (await client.get(pix["images"][0]["url"])).status_code == 200


async def test_held_openai_answer_is_sent_once_the_task_is_done(client: httpx.AsyncClient,
                                                                slow_clock: Callable[[], float]) -> None:
    """Right after the answer, /_sim shows the task done with its images (not still running, image-less)."""
    # Long enough that drawing the image after the hold does not by itself carry the clock past done_at.
    response = await client.post(OPENAI, json={"model": "gpt-image-1.5", "prompt": "o [sim:duration=0.4]"},
                                 headers=AUTH)
    assert response.status_code == 200
    detail = await _status_now(client, "openai", response.headers["x-request-id"])
    assert detail["status"] == "succeeded" and len(detail["images"]) == 1


async def test_callback_is_sent_once_the_task_is_done(slow_clock: Callable[[], float]) -> None:
    """The final callback says completed and arrives at done_at or later by the simulator's clock."""
    received: list[tuple[dict[str, Any], float]] = []

    async def receiver(request: httpx.Request) -> httpx.Response:
        received.append((json.loads(request.content), slow_clock()))
        return httpx.Response(200)

    app = create_simulator_app(SimulatorConfig(public_url=BASE, duration=0.1, seed=7,
                                               callback_transport=httpx.MockTransport(receiver)))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c:
            created = await c.post(EVOLINK, json={"model": "gpt-image-1.5", "prompt": "cb",
                                                  "callback_url": "http://relay.test/callbacks/evolink/t"},
                                   headers=AUTH)
            task_id = created.json()["id"]

            async def arrived() -> bool:
                return bool(received)

            await until(arrived)
            done_at = (await _status_now(c, "evolink", task_id))["done_at"]
            body, at = received[0]
            assert body["status"] == "completed" and body["progress"] == 100, body
            assert at >= done_at
            # A confirmation poll right then agrees with the callback.
            assert (await c.get(f"/evolink/v1/tasks/{task_id}", headers=AUTH)).json()["status"] == "completed"


async def test_apimart_expiry_is_rounded_up(client: httpx.AsyncClient, slow_clock: Callable[[], float]) -> None:
    """A whole-second expires_at never claims the link dies before it does (the clock starts at .25 s)."""
    task_id = await _apimart_submit(client, "exp [sim:ttl=100]")
    data = await _apimart_final(client, task_id, [])
    real = (await _status_now(client, "apimart", task_id))["expires_at"]
    claimed = data["result"]["images"][0]["expires_at"]
    assert isinstance(claimed, int) and real <= claimed < real + 1


# --- building blocks -----------------------------------------------------------

def test_images_are_deterministic() -> None:
    one = render("task-1", 0, 1024, 1024, "png", "hello")
    assert one == render("task-1", 0, 1024, 1024, "png", "hello")
    assert one != render("task-1", 1, 1024, 1024, "png", "hello")
    assert Image.open(io.BytesIO(render("t", 0, 1024, 1024, "webp", "x", True))).mode == "RGBA"


def test_multipart_parser_keeps_bytes_exact() -> None:
    payload = b"\x89PNG\r\n\x1a\n\r\n--not-the-boundary\r\n\x00\xff"
    request = httpx.Request("POST", "http://x.test", data={"prompt": "héllo"},
                            files=[("image[]", ("a.png", payload, "image/png"))])
    parts = multipart.parse(multipart.boundary_of(request.headers["content-type"]), request.read())
    assert [(p.name, p.filename) for p in parts] == [("prompt", None), ("image[]", "a.png")]
    assert parts[0].text() == "héllo" and parts[1].data == payload and parts[1].content_type == "image/png"
