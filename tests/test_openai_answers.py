"""The OpenAI-shaped endpoints when something goes wrong after the body is in: an answer in OpenAI's shape that the
SDKs do not retry on their own (a retry is a new, billed task), naming the relay task once there is one; and a
client sending its body slowly holds no place in the waiting room."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from relay.errors import ArchiveError
from relay.web.waiting import TaskWaiter
from tests.harness import harness

GENERATE = "/openai/v1/images/generations"


def assert_openai_error(answer: Any, status: int, code: str) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert {"message", "type", "param", "code"} <= set(error) and error["code"] == code, error
    assert answer.headers["x-should-retry"] == "false"
    return dict(error)


async def test_a_failure_once_the_task_exists_names_it_and_is_not_retried(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        store = h.runtime.ctx.image_store
        real_stat, real_open = store.stat, store.open

        async def unreadable(key: str) -> Any:
            raise ArchiveError("the bucket is unreachable", code="image_store_unavailable")
        store.stat = unreadable  # type: ignore[method-assign]
        answer = await h.api.post(GENERATE, json={"model": "gmicloud", "prompt": "p", "response_format": "b64_json"})
        error = assert_openai_error(answer, 503, "image_store_unavailable")
        assert (await h.task(error["task_id"]))["status"] == "succeeded"
        assert answer.headers["x-relay-task-id"] == error["task_id"]

        store.stat = real_stat  # type: ignore[method-assign]
        store.open = unreadable  # type: ignore[method-assign]   # found, then not readable: one image, one answer
        answer = await h.api.post(GENERATE, json={"model": "gmicloud", "prompt": "o", "response_format": "b64_json"})
        assert_openai_error(answer, 503, "image_store_unavailable")
        store.open = real_open  # type: ignore[method-assign]

        async def broken(key: str) -> Any:
            raise RuntimeError("a bug")
        store.stat = broken  # type: ignore[method-assign]
        answer = await h.api.post(GENERATE, json={"model": "gmicloud", "prompt": "q", "response_format": "b64_json"})
        error = assert_openai_error(answer, 500, "internal_error")
        assert error["type"] == "server_error" and error["task_id"].startswith("tsk_") and "a bug" not in answer.text


async def test_an_unexpected_error_before_any_task_is_openais_500_not_retried(tmp_path: Path) -> None:
    async with harness(tmp_path, run_worker=False) as h:
        async def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("the database is locked")
        h.runtime.tasks.create = broken  # type: ignore[method-assign]
        answer = await h.api.post(GENERATE, json={"model": "gmicloud", "prompt": "p"})
        error = assert_openai_error(answer, 500, "internal_error")
        assert "task_id" not in error and "locked" not in answer.text


async def test_a_body_sent_slowly_holds_no_place_in_the_waiting_room(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        h.api._transport.app.state.openai_waiter = TaskWaiter(limit=1)  # type: ignore[attr-defined]
        started, finish = asyncio.Event(), asyncio.Event()

        async def trickle() -> AsyncIterator[bytes]:
            yield b'{"model": "gmicloud", '
            started.set()
            await finish.wait()
            yield b'"prompt": "slow"}'
        slow = asyncio.create_task(h.api.post(GENERATE, content=trickle(),
                                              headers={"content-type": "application/json"}))
        await asyncio.wait_for(started.wait(), 10)
        quick = await asyncio.wait_for(h.api.post(GENERATE, json={"model": "gmicloud", "prompt": "quick"}), 30)
        assert quick.status_code == 200, quick.text
        finish.set()
        assert (await asyncio.wait_for(slow, 30)).status_code == 200


async def test_the_streamed_answer_is_one_json_document_with_every_images_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several images, base64 made a piece at a time from files read in many pieces (of sizes that are not whole
    base64 groups): the answer parses as one JSON document, each b64_json decodes to its archived file's bytes,
    and the other fields follow the data."""
    import base64
    import json

    from relay.images import store as image_store
    monkeypatch.setattr(image_store, "CHUNK", 1000)       # 1000 = 3 × 333 + 1: every piece leaves a byte over
    async with harness(tmp_path) as h:
        answer = await h.api.post(GENERATE, json={"model": "gmicloud", "prompt": "p", "n": 3, "quality": "low"})
        assert answer.status_code == 200, answer.text
        body = json.loads(answer.content)
        assert list(body) == ["created", "data", "output_format", "quality", "size"], list(body)
        task = await h.task(answer.headers["x-relay-task-id"])
        assert len(body["data"]) == len(task["images"]) == 3
        for item, image in zip(body["data"], sorted(task["images"], key=lambda i: i["index"])):
            assert list(item) == ["url", "b64_json"] and image["id"] in item["url"]
            stored = (await h.api.get(f"/v1/images/{image['id']}")).content
            assert len(stored) > 10 * 1000
            assert base64.b64decode(item["b64_json"], validate=True) == stored
        only = await h.api.post(GENERATE, json={"model": "gmicloud", "prompt": "q", "response_format": "b64_json"})
        [item] = json.loads(only.content)["data"]
        assert list(item) == ["b64_json"]


async def test_an_answer_cut_short_lets_go_of_every_image_it_opened(tmp_path: Path) -> None:
    """The second image's read fails mid-answer: the answer ends short, every image it opened is let go of (a
    bucket's open stream each), and the third is never opened (each is opened when its turn comes)."""
    from collections.abc import AsyncGenerator

    from relay.images.store import StoredImage
    closed: list[int] = []

    class Tracked(StoredImage):
        async def aclose(self) -> None:
            closed.append(self.size)
            await super().aclose()

    async def chunks(n: int) -> AsyncGenerator[bytes, None]:
        yield b"\x89PNG" + bytes(100)
        if n == 1:
            raise OSError("the disk went away")

    async with harness(tmp_path) as h:
        answer = await h.api.post(GENERATE, json={"model": "gmicloud", "prompt": "p", "n": 3,
                                                  "response_format": "b64_json"})
        assert answer.status_code == 200
        opened = iter(range(3))

        async def tracked_open(key: str) -> Any:
            n = next(opened)
            return Tracked(size=n, chunks=chunks(n))
        h.runtime.ctx.image_store.open = tracked_open  # type: ignore[method-assign]
        try:
            cut = await h.api.post(GENERATE, json={"model": "gmicloud", "prompt": "q", "n": 3,
                                                   "response_format": "b64_json"})
        except OSError:
            pass            # the in-process transport hands the server's error on
        else:
            assert cut.status_code == 200
            with pytest.raises(ValueError):
                cut.json()
        assert sorted(set(closed)) == [0, 1], closed
        assert next(opened) == 2, "the third image was opened before its turn"
