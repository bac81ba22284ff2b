"""The OpenAI-shaped endpoints when something goes wrong after the body is in: an answer in OpenAI's shape that the
SDKs do not retry on their own (a retry is a new, billed task), naming the relay task once there is one; and a
client sending its body slowly holds no place in the waiting room."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

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

        async def unreadable(key: str) -> Any:
            raise ArchiveError("the bucket is unreachable", code="image_store_unavailable")
        store.open = unreadable  # type: ignore[method-assign]
        answer = await h.api.post(GENERATE, json={"model": "gmicloud", "prompt": "p", "response_format": "b64_json"})
        error = assert_openai_error(answer, 503, "image_store_unavailable")
        assert (await h.task(error["task_id"]))["status"] == "succeeded"
        assert answer.headers["x-relay-task-id"] == error["task_id"]

        async def broken(key: str) -> Any:
            raise RuntimeError("a bug")
        store.open = broken  # type: ignore[method-assign]
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
