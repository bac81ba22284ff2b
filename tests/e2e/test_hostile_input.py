"""Issue 8's reproductions over real sockets: each hostile input gets a 4xx in API.md's shape or the right task
outcome, and nothing it sends breaks a later read for anyone else.

relay and the simulator run as processes; reference images come from a small HTTP server in this test
that can answer 503 before it answers, or 404 for good.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from PIL import Image

from relay.validation import MAX_JSON_DEPTH

from .harness import Relay, Simulator, wait_for
from .test_api_errors import _error

pytestmark = pytest.mark.e2e


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


class ImageHost:
    """Reference images on 127.0.0.1: `/flaky-N.png` answers 503 N times, then the PNG; `/gone.png` is 404."""

    def __init__(self) -> None:
        self.png = _png()
        self.hits: dict[str, int] = {}
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                count = host.hits[self.path] = host.hits.get(self.path, 0) + 1
                failures = int(self.path.split("-")[1].split(".")[0]) if self.path.startswith("/flaky-") else 0
                if self.path == "/gone.png":
                    self.send_response(404)
                    self.send_header("content-length", "0")
                    self.end_headers()
                elif count <= failures:
                    self.send_response(503)
                    self.send_header("content-length", "0")
                    self.end_headers()
                else:
                    self.send_response(200)
                    self.send_header("content-type", "image/png")
                    self.send_header("content-length", str(len(host.png)))
                    self.end_headers()
                    self.wfile.write(host.png)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def image_host() -> Iterator[ImageHost]:
    host = ImageHost()
    try:
        yield host
    finally:
        host.close()


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


def test_deep_metadata_is_refused_and_breaks_no_read(relay: Relay) -> None:
    """Metadata nested ~970 levels is a 422 naming metadata; the deepest accepted task reads back everywhere."""
    api = relay.api
    # Written by hand: Python's own encoder cannot go that deep inside pytest's stack.
    deep = '{"provider": "apimart", "prompt": "x", "metadata": ' + '{"a": ' * 970 + "1" + "}" * 971
    _error(api.post("/v1/tasks", content=deep, headers={"content-type": "application/json"}),
           422, "invalid_request", "metadata")
    # The body object is level 1 and metadata's own object level 2: this is the deepest body accepted.
    deepest = relay.create({"provider": "apimart", "prompt": "x", "metadata": _nested(MAX_JSON_DEPTH - 1)})
    _error(api.post("/v1/tasks", json={"provider": "apimart", "prompt": "x", "metadata": _nested(MAX_JSON_DEPTH)}),
           422, "invalid_request", "metadata")
    assert relay.task(deepest["id"])["metadata"] == _nested(MAX_JSON_DEPTH - 1)
    listed = api.get("/v1/tasks")
    assert listed.status_code == 200 and [t["id"] for t in listed.json()["data"]] == [deepest["id"]]
    relay.wait_succeeded(deepest["id"])
    events = api.get("/v1/events")
    assert events.status_code == 200, events.text
    assert {e["data"]["metadata"] == _nested(MAX_JSON_DEPTH - 1) for e in events.json()["data"]} == {True}


@pytest.mark.parametrize("url", ["http://[::1/x", "http://a..b/x", "http://[fe80::1%25eth0]/x", "http://h:99999/x",
                                 "http://☃.net/x", "http://exa mple.com/x", "ftp://example.com/x"])
def test_malformed_urls_are_422_in_every_url_field(relay: Relay, url: str) -> None:
    """A URL that does not parse, whose host is no DNS name, or with a bad port is a 422 naming its field."""
    api = relay.api
    base = {"provider": "gmicloud", "prompt": "x"}
    _error(api.post("/v1/tasks", json={**base, "webhook_url": url}), 422, "invalid_request", "webhook_url")
    _error(api.post("/v1/tasks", json={**base, "images": [url]}), 422, "invalid_request", "images")
    _error(api.post("/v1/tasks", json={**base, "images": ["https://example.com/a.png"], "mask": url}),
           422, "invalid_request", "mask")
    _error(api.post("/v1/subscriptions", json={"url": url}), 422, "invalid_request", "url")
    assert api.get("/v1/tasks").json()["data"] == [], "no refused request made a task"


def test_reference_urls_pass_the_ssrf_guard_at_creation(relay: Relay) -> None:
    """A reference image on a cloud-metadata address is refused when the task is created, not failed later."""
    _error(relay.api.post("/v1/tasks", json={"provider": "gmicloud", "prompt": "x",
                                             "images": ["http://169.254.169.254/latest/meta-data/x.png"]}),
           422, "invalid_request", "images")


@pytest.mark.parametrize("since", ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59", "2026-13-01T00:00:00Z",
                                   "2026-11-22T10:00:60Z"])
def test_replay_times_out_of_range_are_422(relay: Relay, since: str) -> None:
    """Replay times that parse as strings but name no instant relay can hold are a 422 naming the field."""
    sub = relay.api.post("/v1/subscriptions", json={"url": "http://127.0.0.1:9/hook"})
    assert sub.status_code == 201, sub.text
    _error(relay.api.post(f"/v1/subscriptions/{sub.json()['id']}/replay", json={"since": since}),
           422, "invalid_request", "since")
    _error(relay.api.post(f"/v1/subscriptions/{sub.json()['id']}/replay",
                          json={"since": "2026-01-01T00:00:00Z", "until": since}), 422, "invalid_request", "until")


def test_bodies_must_be_json_by_content_type(relay: Relay) -> None:
    """text/plain and form posts are 415; JSON without a Content-Type header is still accepted."""
    body = json.dumps({"provider": "apimart", "prompt": "x"}).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        _error(relay.api.post("/v1/tasks", content=body, headers={"content-type": content_type}),
               415, "unsupported_media_type")
        _error(relay.api.post("/v1/subscriptions", content=b'{"url": "https://example.com/h"}',
                              headers={"content-type": content_type}), 415, "unsupported_media_type")
    bare = httpx.Request("POST", f"{relay.url}/v1/tasks", content=body,
                         headers={"authorization": relay.api.headers["authorization"]})
    assert "content-type" not in bare.headers
    assert relay.api.send(bare).status_code == 202
    assert relay.api.post("/v1/tasks", content=body,
                          headers={"content-type": "application/json; charset=utf-8"}).status_code == 202


def test_foreign_cursors_are_422_not_the_first_page(relay: Relay) -> None:
    """`after`/`cursor` values relay never gave out are refused instead of silently restarting the list."""
    api = relay.api
    task = relay.create({"provider": "apimart", "prompt": "x"})
    relay.wait_succeeded(task["id"])
    _error(api.get("/v1/events", params={"after": "garbage"}), 422, "invalid_request", "after")
    _error(api.get("/v1/events", params={"after": "evt_01JD0000000000000000000000"}), 422, "invalid_request", "after")
    _error(api.get("/v1/events", params={"after": task["id"]}), 422, "invalid_request", "after")
    for path in ("/v1/tasks", "/v1/subscriptions", "/v1/deliveries"):
        _error(api.get(path, params={"cursor": "garbage"}), 422, "invalid_request", "cursor")
    # A real cursor still pages, and the last event is a cursor with nothing after it (not an error).
    events = api.get("/v1/events").json()["data"]
    assert events
    tail = api.get("/v1/events", params={"after": events[-1]["id"]})
    assert tail.status_code == 200 and tail.json()["data"] == []


def _gmi_submits(sim: Simulator) -> int:
    return int(sim.stats("gmicloud")["submits"])


def test_reference_host_503_then_200_is_retried_and_submitted_once(relay: Relay, sim: Simulator,
                                                                   image_host: ImageHost) -> None:
    """A reference image host that answers 503 twice is retried with backoff; the provider sees one submit."""
    url = f"{image_host.url}/flaky-2.png"
    task = relay.create({"provider": "gmicloud", "prompt": "edit me", "images": [url]})
    final = relay.wait_succeeded(task["id"], timeout=30)
    assert final["provider_task_id"]
    assert image_host.hits["/flaky-2.png"] == 3
    assert _gmi_submits(sim) == 1
    sent = sim.task("gmicloud", final["provider_task_id"])["request"]
    assert sent["payload"]["image"], "the reference image travelled to the provider as base64"


def test_dead_reference_image_fails_as_reference_unavailable(relay: Relay, sim: Simulator,
                                                             image_host: ImageHost) -> None:
    """A reference image that is gone (404) fails the task at once, naming the URL; nothing reaches the provider."""
    url = f"{image_host.url}/gone.png"
    task = relay.create({"provider": "openai", "prompt": "edit me", "images": [url]})
    final = relay.wait_terminal(task["id"])
    assert final["status"] == "failed"
    assert final["error"]["code"] == "reference_unavailable", final["error"]
    assert url in final["error"]["message"] and "404" in final["error"]["message"]
    assert image_host.hits["/gone.png"] == 1, "a 404 is final: not retried"
    assert sim.stats("openai")["submits"] == 0


def test_unreachable_reference_host_is_retried_then_fails_with_its_reason(relay_factory: Any, sim: Simulator) -> None:
    """Nothing listens at the reference URL: retried, then failed as reference_unavailable, never sent to GMI."""
    relay = relay_factory(RELAY_WORKER_MAX_ATTEMPTS="3")
    url = "http://127.0.0.1:1/x.png"
    task = relay.create({"provider": "gmicloud", "prompt": "x", "images": [url]})
    final = relay.wait_terminal(task["id"], timeout=30)
    assert final["status"] == "failed"
    assert final["error"]["code"] == "reference_unavailable", final["error"]
    assert url in final["error"]["message"]
    assert "reached the provider" not in final["error"]["message"]
    assert _gmi_submits(sim) == 0
    wait_for(lambda: relay.job_counts().get("submit:dead", 0) >= 1, 10, "the submit job to be kept as dead")


def test_an_endless_header_is_431_and_the_wrong_token_is_answered_before_its_body(relay: Relay) -> None:
    """`relay serve` itself (uvicorn on httptools caps neither): a header that never ends is cut at HEAD_BYTES
    with a 431 in the error shape; a callback with a wrong token is answered 404 before its body has ended."""
    import socket

    from relay.web.httplimits import HEAD_BYTES

    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-long: ")
        answer = b""
        try:
            for _ in range(HEAD_BYTES * 4 // 4096):
                sock.sendall(b"a" * 4096)
        except OSError:      # the server closed its side while we were still sending: read what it answered
            pass
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431"), answer[:200]
    assert json.loads(body)["error"]["code"] == "payload_too_large"

    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        sock.sendall(b"POST /callbacks/evolink/tsk_x/not-the-token HTTP/1.1\r\nhost: x\r\n"
                     b"transfer-encoding: chunked\r\n\r\n" + b"1000\r\n" + b"b" * 4096 + b"\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):      # the body never ends; the answer does
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 404") and b'"not_found"' in answer
