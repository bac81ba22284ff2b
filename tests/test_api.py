"""The HTTP contract of /v1 (API.md): auth, validation per provider, errors in one shape, idempotency."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import API_KEY, Harness, harness


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    # No worker: these tests are about the API surface only.
    async with harness(tmp_path, run_worker=False) as value:
        yield value


def assert_error(response: httpx.Response, status: int, code: str, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"]
    if field is not None:
        assert body["error"].get("field") == field, body
    return dict(body["error"])


async def test_missing_or_wrong_api_key_is_401(h: Harness) -> None:
    """No key, a wrong key, or another scheme: 401 unauthorized on every /v1 route."""
    for headers in ({}, {"authorization": "Bearer nope-nope-nope-nope"}, {"authorization": f"Basic {API_KEY}"}):
        for method, url in (("GET", "/v1/tasks"), ("POST", "/v1/tasks"), ("GET", "/v1/tasks/tsk_x"),
                            ("GET", "/v1/events"), ("GET", "/v1/images/img_x")):
            response = await h.api.request(method, url, headers={"authorization": "", **headers})
            assert_error(response, 401, "unauthorized")


async def test_create_returns_202_with_task_object(h: Harness) -> None:
    """A valid request is accepted as pending with the normalized request and metadata echoed."""
    response = await h.api.post("/v1/tasks", json={"provider": "apimart", "prompt": "p", "size": "2:3",
                                                   "metadata": {"order": 42}})
    assert response.status_code == 202
    task = response.json()
    assert task["id"].startswith("tsk_") and task["status"] == "pending" and task["sequence"] == 1
    assert task["request"]["size"] == "1024x1536" and task["metadata"] == {"order": 42}
    assert task["images"] == [] and task["error"] is None and task["created_at"].endswith("Z")


@pytest.mark.parametrize("body,field", [
    ({"prompt": "p"}, "provider"),
    ({"provider": "nope", "prompt": "p"}, "provider"),
    ({"provider": "gmicloud"}, "prompt"),
    ({"provider": "gmicloud", "prompt": "  "}, "prompt"),
    ({"provider": "gmicloud", "prompt": 5}, "prompt"),
    ({"provider": "gmicloud", "prompt": "p", "size": "800x600"}, "size"),
    ({"provider": "gmicloud", "prompt": "p", "quality": "ultra"}, "quality"),
    ({"provider": "gmicloud", "prompt": "p", "n": 0}, "n"),
    ({"provider": "gmicloud", "prompt": "p", "n": 11}, "n"),
    ({"provider": "gmicloud", "prompt": "p", "n": "2"}, "n"),
    ({"provider": "gmicloud", "prompt": "p", "n": True}, "n"),
    ({"provider": "gmicloud", "prompt": "p", "output_compression": 101}, "output_compression"),
    ({"provider": "gmicloud", "prompt": "p", "output_format": "gif"}, "output_format"),
    ({"provider": "gmicloud", "prompt": "p", "background": "green"}, "background"),
    ({"provider": "gmicloud", "prompt": "p", "images": "https://x/a.png"}, "images"),
    ({"provider": "gmicloud", "prompt": "p", "images": ["ftp://x/a.png"]}, "images"),
    ({"provider": "gmicloud", "prompt": "p", "mask": "not a url"}, "mask"),
    ({"provider": "gmicloud", "prompt": "p", "webhook_url": "nope"}, "webhook_url"),
    ({"provider": "gmicloud", "prompt": "p", "webhook_events": ["task.succeeded"]}, "webhook_events"),
    ({"provider": "gmicloud", "prompt": "p", "webhook_url": "https://x/h", "webhook_events": ["task.nope"]},
     "webhook_events"),
    ({"provider": "gmicloud", "prompt": "p", "metadata": [1]}, "metadata"),
    ({"provider": "gmicloud", "prompt": "p", "metadata": {"blob": "x" * 17000}}, "metadata"),
    ({"provider": "gmicloud", "prompt": "p", "colour": "red"}, "colour"),
])
async def test_invalid_fields_are_422_naming_the_field(h: Harness, body: dict[str, Any], field: str) -> None:
    """Each malformed field is refused with invalid_request naming it."""
    assert_error(await h.api.post("/v1/tasks", json=body), 422, "invalid_request", field)


@pytest.mark.parametrize("provider,extra,field", [
    ("apimart", {"output_format": "webp"}, "output_format"),
    ("apimart", {"n": 5}, "n"),
    ("apimart", {"size": "auto"}, "size"),
    ("evolink", {"n": 2}, "n"),
    ("evolink", {"images": ["https://x/a.png"], "mask": "https://x/m.png"}, "mask"),
    ("evolink", {"background": "transparent"}, "background"),
    ("evolink", {"output_format": "jpeg"}, "output_format"),
    ("evolink", {"quality": "auto"}, "quality"),
    ("gmicloud", {"size": "auto"}, "size"),
    ("gmicloud", {"images": ["https://x/a.png", "https://x/b.png"]}, "images"),
    ("gmicloud", {"moderation": "low"}, "moderation"),
    ("pixazo", {"images": ["https://x/a.png"]}, "images"),
    ("pixazo", {"n": 5}, "n"),
    ("apimart", {"mask": "https://x/m.png"}, "mask"),
])
async def test_options_a_provider_cannot_do_are_unsupported(h: Harness, provider: str, extra: dict[str, Any],
                                                            field: str) -> None:
    """A valid option the chosen provider cannot honour is 422 unsupported, naming the field and what it accepts."""
    error = assert_error(await h.api.post("/v1/tasks", json={"provider": provider, "prompt": "p", **extra}),
                         422, "unsupported", field)
    assert provider in error["message"] or "mask" in error["message"]


async def test_body_that_is_not_a_json_object_is_refused(h: Harness) -> None:
    """Non-JSON, JSON arrays and empty bodies are invalid_request, not 500."""
    for content in (b"{not json", b"[1,2]", b"", b"\xff\xfe"):
        response = await h.api.post("/v1/tasks", content=content, headers={"content-type": "application/json"})
        assert_error(response, 422, "invalid_request")


async def test_body_over_one_mebibyte_is_413(h: Harness) -> None:
    """A body over 1 MiB is payload_too_large."""
    big = b'{"provider":"gmicloud","prompt":"' + b"x" * (1024 * 1024) + b'"}'
    assert_error(await h.api.post("/v1/tasks", content=big), 413, "payload_too_large")


async def test_idempotency_key_replays_and_conflicts(h: Harness) -> None:
    """Same key + same body → the original task (200); same key + other body → 409; key too long → 422."""
    body = {"provider": "gmicloud", "prompt": "p", "n": 2}
    first = await h.api.post("/v1/tasks", json=body, headers={"idempotency-key": "k-1"})
    reordered = {"n": 2, "prompt": "p", "provider": "gmicloud"}
    again = await h.api.post("/v1/tasks", json=reordered, headers={"idempotency-key": "k-1"})
    assert first.status_code == 202 and again.status_code == 200 and again.json()["id"] == first.json()["id"]
    other = await h.api.post("/v1/tasks", json={**body, "n": 3}, headers={"idempotency-key": "k-1"})
    assert_error(other, 409, "conflict")
    assert_error(await h.api.post("/v1/tasks", json=body, headers={"idempotency-key": "k" * 256}),
                 422, "invalid_request", "Idempotency-Key")
    listed = (await h.api.get("/v1/tasks")).json()["data"]
    assert len(listed) == 1


async def test_get_list_and_cursor(h: Harness) -> None:
    """GET one, list newest first with a cursor, filter by provider and status; bad filters are 422."""
    ids = [(await h.create(provider="gmicloud", prompt=f"p{i}"))["id"] for i in range(3)]
    page = (await h.api.get("/v1/tasks", params={"limit": 2})).json()
    rest = (await h.api.get("/v1/tasks", params={"limit": 2, "cursor": page["next_cursor"]})).json()
    assert [t["id"] for t in page["data"] + rest["data"]] == list(reversed(ids)) and rest["next_cursor"] is None
    assert (await h.api.get("/v1/tasks", params={"provider": "apimart"})).json()["data"] == []
    assert (await h.api.get("/v1/tasks", params={"status": "pending"})).json()["data"][0]["id"] == ids[-1]
    assert_error(await h.api.get("/v1/tasks", params={"status": "done"}), 422, "invalid_request", "status")
    assert_error(await h.api.get("/v1/tasks", params={"limit": 0}), 422, "invalid_request", "limit")
    assert_error(await h.api.get("/v1/tasks/tsk_missing"), 404, "not_found")


async def test_cancel_then_409(h: Harness) -> None:
    """Cancel moves a live task to canceled with one event; canceling again is 409."""
    task = await h.create(provider="pixazo", prompt="p")
    response = await h.api.post(f"/v1/tasks/{task['id']}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "canceled"
    assert_error(await h.api.post(f"/v1/tasks/{task['id']}/cancel"), 409, "conflict")
    events = (await h.api.get("/v1/events", params={"task_id": task["id"]})).json()["data"]
    assert [e["type"] for e in events] == ["task.canceled"]
    assert_error(await h.api.post("/v1/tasks/tsk_nope/cancel"), 404, "not_found")


async def test_images_need_key_or_valid_signature(h: Harness) -> None:
    """An image link with a bad or expired signature is 401; an unknown image is 404."""
    assert_error(await h.api.get("/v1/images/img_x", params={"exp": "9999999999", "sig": "00"}), 401, "unauthorized")
    assert_error(await h.api.get("/v1/images/img_x", params={"exp": "1", "sig": "00"}), 401, "unauthorized")
    assert_error(await h.api.get("/v1/images/img_x"), 404, "not_found")


async def test_unknown_route_and_method_use_the_error_shape(h: Harness) -> None:
    """404 and 405 from routing come in the one error shape."""
    assert_error(await h.api.get("/v1/nope"), 404, "not_found")
    response = await h.api.delete("/v1/tasks")
    assert response.status_code == 405 and response.json()["error"]["code"] == "invalid_request"


async def test_operations_endpoints(h: Harness) -> None:
    """healthz, readyz, metrics and openapi.json answer without a key."""
    plain = httpx.AsyncClient(transport=h.api._transport, base_url="http://relay.test")
    async with plain:
        assert (await plain.get("/healthz")).json()["ok"] is True
        assert (await plain.get("/readyz")).json() == {"ok": True}
        doc = (await plain.get("/openapi.json")).json()
        assert doc["openapi"].startswith("3.") and "/v1/tasks" in doc["paths"]
        metrics = await plain.get("/metrics")
        assert metrics.status_code == 200 and "relay_jobs" in metrics.text


async def test_events_type_filter_is_validated(h: Harness) -> None:
    """GET /v1/events?type= accepts only known event types."""
    assert_error(await h.api.get("/v1/events", params={"type": "task.nope"}), 422, "invalid_request", "type")
    assert (await h.api.get("/v1/events")).json() == {"data": [], "next_cursor": None}


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/hook", "http://10.1.2.3/hook", "http://169.254.169.254/latest",
                                 "http://[::1]/hook", "http://[::ffff:127.0.0.1]/hook", "http://localhost/hook"])
async def test_task_webhook_url_on_a_private_address_is_refused(tmp_path: Path, url: str) -> None:
    """The SSRF guard checks a task's webhook_url when the task is created: 422 naming the field, no task stored.

    network.allow is emptied here: the embedded profile allows loopback for its local simulator.
    """
    async with harness(tmp_path, run_worker=False, RELAY_NETWORK_ALLOW="") as h:
        response = await h.api.post("/v1/tasks", json={"provider": "gmicloud", "prompt": "p", "webhook_url": url})
        error = assert_error(response, 422, "invalid_request", "webhook_url")
        assert "refused" in error["message"]
        assert (await h.api.get("/v1/tasks")).json()["data"] == []


async def test_the_links_of_one_archive_request_are_checked_at_once_and_the_first_refusal_answers(
        tmp_path: Path) -> None:
    """POST /v1/archives resolves its links' hosts at once (each lookup may take the resolver's 10 s), each host
    once, at most HOST_CHECKS_AT_ONCE at a time (one request must not hold every thread of the resolver's pool);
    a refused link is named as the first refused one in the body's order, whichever lookup ended first."""
    import asyncio

    from relay.archives import HOST_CHECKS_AT_ONCE
    in_flight, most, asked = 0, 0, []
    all_asked = asyncio.Event()

    async def resolver(host: str, port: int) -> list[str]:
        nonlocal in_flight, most
        asked.append(host)
        in_flight += 1
        most = max(most, in_flight)
        if most >= 5:
            all_asked.set()
        try:
            await asyncio.wait_for(all_asked.wait(), 5.0)
        except TimeoutError:
            pass
        finally:
            in_flight -= 1
        if host.startswith("private"):
            await asyncio.sleep(0 if host == "private-second.example" else 0.05)     # the first refused ends last
            return ["10.0.0.5"]
        await asyncio.sleep(0.01)
        return ["93.184.216.34"]

    async with harness(tmp_path, run_worker=False) as h:
        h.runtime.guard.resolver = resolver
        urls = [f"https://cdn{n}.example/a.png" for n in range(5)]
        created = await h.api.post("/v1/archives", json={"urls": urls})
        assert created.status_code in (200, 201, 202), created.text
        assert most == 5, f"{most} lookups at once"
        refused = await h.api.post("/v1/archives", json={"urls": [
            urls[0], "https://private-first.example/x.png", urls[1], "https://private-second.example/y.png", urls[2]]})
        error = assert_error(refused, 422, "invalid_request", "urls")
        assert "private-first.example" in error["message"], error
        asked.clear()
        most = 0
        many = [f"https://shard{n % 20}.example/{n}.png" for n in range(100)]
        assert (await h.api.post("/v1/archives", json={"urls": many})).status_code in (200, 201, 202)
        assert sorted(asked) == sorted({f"shard{n}.example" for n in range(20)}), "each host once"
        assert 1 < most <= HOST_CHECKS_AT_ONCE, most
