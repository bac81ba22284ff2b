"""A NUL character (U+0000) from outside never reaches a database: PostgreSQL's text cannot hold one, so there it
was a 500 for the client (or a write failing over and over for a worker) where SQLite stored it. Refused where a
client sends it (JSON bodies, paths, query strings, console forms: 404/422), replaced by U+FFFD where a provider
or a subscriber sends it (their bodies are not ours to refuse). Both backends, over relay's HTTP app."""

from __future__ import annotations

import json
import re
from pathlib import Path

from relay.providers.parsing import parse_json
from tests.delivery_harness import delivery_harness
from tests.harness import API_KEY, database_env


async def test_a_nul_in_a_path_query_body_or_form_is_refused_not_a_500(tmp_path: Path, database: str) -> None:
    async with delivery_harness(tmp_path, **database_env(database)) as d:
        api = d.h.api
        for path in ("/v1/tasks/%00", "/v1/tasks/tsk_%00x", "/v1/subscriptions/sub_%00", "/v1/deliveries/%00",
                     "/v1/archives/%00", "/v1/jobs/%00", "/console/tasks/%00"):
            answer = await api.get(path)
            assert answer.status_code == 404, (path, answer.status_code, answer.text[:200])
            assert answer.json()["error"]["code"] == "not_found"
        for path, params in (("/v1/tasks", "provider=%00"), ("/v1/events", "task_id=evt%00"),
                             ("/v1/jobs", "kind=%00"), ("/v1/deliveries", "subscription_id=sub_%00"),
                             ("/v1/tasks", "cursor=%00")):
            answer = await api.get(f"{path}?{params}")
            assert answer.status_code == 422, (path, params, answer.status_code, answer.text[:200])
            assert answer.json()["error"]["code"] == "invalid_request"
            assert answer.json()["error"]["field"] == params.split("=")[0]
        for path, body, field in (
                ("/v1/subscriptions", {"url": d.sink.url("/a"), "description": "a\u0000b"}, "description"),
                ("/v1/tasks", {"provider": "evolink", "prompt": "a lighthouse\u0000"}, "prompt"),
                ("/v1/tasks", {"provider": "evolink", "prompt": "p", "metadata": {"k\u0000": "v"}}, "metadata")):
            answer = await api.post(path, json=body)
            assert answer.status_code == 422, (path, answer.status_code, answer.text[:200])
            assert answer.json()["error"]["field"] == field
        # OpenAI's edits endpoint takes its fields as a multipart form, not JSON: the same rule, OpenAI's shape.
        answer = await api.post("/openai/v1/images/edits", data={"prompt": "make it blue\x00", "model": "evolink"},
                                files={"image": ("a.png", b"\x89PNG", "image/png")})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "prompt", answer.text
        # The console's forms: a delivery id with a NUL, as a logged-in operator's form would post it.
        api.headers.pop("authorization")
        nonce = re.search(r'name="nonce" value="([^"]+)"', (await api.get("/console/login")).text)
        assert nonce is not None
        logged = await api.post("/console/login", data={"credential": API_KEY, "nonce": nonce.group(1)},
                                headers={"origin": "http://relay.test"})
        assert logged.status_code == 303
        csrf = re.search(r'name="csrf" value="([^"]+)"', (await api.get("/console/dead-letters")).text)
        assert csrf is not None
        answer = await api.post("/console/dead-letters/retry", data={"csrf": csrf.group(1), "delivery_id": "\x00"},
                                headers={"origin": "http://relay.test"})
        assert answer.status_code == 422 and "NUL" in answer.text


async def test_a_subscriber_answering_binary_has_its_attempt_recorded(tmp_path: Path, database: str) -> None:
    """A subscriber whose answer is binary (an image, protobuf, a gzip it did not label): the attempt keeps the
    answer as text with U+FFFD for its NULs, and the delivery ends as its status says, on both backends.
    Before, PostgreSQL refused the attempt's row, and the delivery was retried until it died."""
    async with delivery_harness(tmp_path, **database_env(database)) as d:
        d.sink.default("/bin", status=200, body=b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00")
        await d.subscribe("/bin", events=["*"])
        event_id = await d.emit(await d.task())
        await d.drain()
        [delivery] = await d.deliveries(event_id=event_id)
        assert delivery["status"] == "succeeded", delivery
        [attempt] = (await d.delivery(delivery["id"]))["attempt_history"]
        assert attempt["status_code"] == 200 and "\x00" not in attempt["response"]
        assert attempt["response"].startswith("\ufffdPNG") and "\ufffd\ufffd\ufffd\rIHDR" in attempt["response"]


def test_provider_bodies_have_their_nuls_replaced() -> None:
    parsed = parse_json(json.dumps({"error": {"message": "bad\u0000input", "k\u0000": ["x\u0000"]}}).encode())
    assert parsed == {"error": {"message": "bad\ufffdinput", "k\ufffd": ["x\ufffd"]}}


async def test_a_redirect_to_a_location_that_is_not_utf8_has_its_attempt_recorded(tmp_path: Path,
                                                                                    database: str) -> None:
    """A subscriber answering 302 with a Location that is not UTF-8: aiohttp decodes it with surrogateescape, and
    the attempt's error names it. Its lone surrogates are replaced, so the attempt is stored (a failed attempt,
    retried by the schedule) instead of the write failing on either database."""
    async with delivery_harness(tmp_path, **database_env(database)) as d:
        d.sink.default("/moved", status=302, location="http://elsewhere.test/\xff\xfe")
        await d.subscribe("/moved", events=["*"])
        event_id = await d.emit(await d.task())
        await d.drain()
        [delivery] = await d.deliveries(event_id=event_id)
        [attempt] = (await d.delivery(delivery["id"]))["attempt_history"]
        assert attempt["status_code"] == 302 and "redirect to http://elsewhere.test/\ufffd\ufffd" in attempt["error"]
