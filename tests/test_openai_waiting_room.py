"""The OpenAI-shaped endpoints hold a request open until its task ends: a process lets only so many wait at
once, and the next gets OpenAI's 429 before its body is read (while the room is full) or any task is made."""

from __future__ import annotations

import asyncio

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from relay.web.openai_compat import openai_errors, waiting_room
from relay.web.waiting import TaskWaiter


async def test_past_the_limit_a_request_gets_a_429_and_its_place_comes_back() -> None:
    release = asyncio.Event()
    entered: list[int] = []

    async def slow(request: Request) -> Response:        # stands for run_task: a place, the task, the wait
        with request.app.state.openai_waiter.admitted() as room:
            assert room
            entered.append(1)
            await release.wait()
            return JSONResponse({"created": 1, "data": []})

    app = Starlette(routes=[Route("/images", openai_errors(waiting_room(slow)), methods=["POST"])])
    app.state.openai_waiter = TaskWaiter(limit=1)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://relay.test") as client:
        first = asyncio.create_task(client.post("/images", json={}))
        async with asyncio.timeout(5):
            while not entered:
                await asyncio.sleep(0.01)
        refused = await client.post("/images", json={})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "2"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert len(entered) == 1                          # the refused request never reached the handler
        release.set()
        assert (await asyncio.wait_for(first, 5)).status_code == 200
        assert app.state.openai_waiter.count == 0
        assert (await client.post("/images", json={})).status_code == 200     # its place came back
