"""The `/_sim` control and inspection API used by tests, the chaos suite and the demo.

GET/POST /_sim/faults, POST /_sim/reset, GET /_sim/tasks, GET /_sim/tasks/{dialect}/{id},
GET /_sim/stats, GET /_sim/callbacks. Never subject to injected faults or auth.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .respond import BodyError, read_json
from .sim import Simulator
from .tasks import SimTask


def _summary(task: SimTask, now: float) -> dict[str, Any]:
    return {"id": task.id, "dialect": task.dialect, "status": task.phase(now), "created": task.created,
            "done_at": task.done_at, "expires_at": task.expires_at, "n": task.n}


def routes(sim: Simulator) -> list[Route]:
    async def get_faults(request: Request) -> Response:
        return JSONResponse(sim.knobs.snapshot())

    async def set_faults(request: Request) -> Response:
        try:
            sim.knobs.update(await read_json(request))
        except (BodyError, ValueError) as exc:
            return JSONResponse({"error": str(exc)}, 400)
        return JSONResponse(sim.knobs.snapshot())

    async def reset(request: Request) -> Response:
        await sim.reset()
        return JSONResponse({"ok": True})

    async def list_tasks(request: Request) -> Response:
        now = sim.now()
        return JSONResponse({"tasks": [_summary(t, now) for t in sim.store.all()]})

    async def task_detail(request: Request) -> Response:
        task = sim.store.get(request.path_params["dialect"], request.path_params["task_id"])
        if task is None:
            return JSONResponse({"error": "no such task"}, 404)
        now = sim.now()
        images = []
        if task.phase(now) == "succeeded":
            for i in range(task.n):
                info = await sim.images.get(task, i)
                images.append({"url": None if task.dialect == "openai" else sim.file_url(task, i),
                               "sha256": info.sha256, "content_type": info.content_type,
                               "width": info.width, "height": info.height, "bytes": len(info.data)})
        return JSONResponse({**_summary(task, now), "link_expired": task.link_expired(now),
                             "request": task.request, "callback_url": task.callback_url,
                             "images": images, "callbacks": task.callbacks})

    async def stats(request: Request) -> Response:
        return JSONResponse({**sim.stats.snapshot(), "tasks": len(sim.store.all()),
                             "callbacks_pending": sim.callbacks.pending})

    async def callbacks(request: Request) -> Response:
        return JSONResponse({"callbacks": sim.callbacks.log})

    return [
        Route("/_sim/faults", get_faults, methods=["GET"]),
        Route("/_sim/faults", set_faults, methods=["POST"]),
        Route("/_sim/reset", reset, methods=["POST"]),
        Route("/_sim/tasks", list_tasks, methods=["GET"]),
        Route("/_sim/tasks/{dialect}/{task_id}", task_detail, methods=["GET"]),
        Route("/_sim/stats", stats, methods=["GET"]),
        Route("/_sim/callbacks", callbacks, methods=["GET"]),
    ]
