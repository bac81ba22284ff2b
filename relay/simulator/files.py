"""Image links: `GET /files/{token}.{ext}` serves a task's real image bytes until the link dies.

A link answers 404 before its task completes, the bytes while alive, and 410
once `link_ttl` (or the prompt's `[sim:ttl=…]`) has passed since completion.
Download faults are injected here under the owning task's dialect. Errors are
plain text, like the object stores that real links point at.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from .imaging import EXTENSIONS
from .sim import Simulator

_MESSAGES = {404: "Not Found", 410: "Gone: this link has expired", 429: "Too Many Requests",
             500: "Internal Server Error"}


def error(status: int, message: str | None = None, *, code: str | None = None,
          param: str | None = None, headers: dict[str, str] | None = None) -> Response:
    return PlainTextResponse(message or _MESSAGES.get(status, "Error"), status, headers)


def routes(sim: Simulator) -> list[Route]:
    async def download(request: Request) -> Response:
        token, _, ext = request.path_params["name"].partition(".")
        found = sim.store.by_token(token)
        if found is None or EXTENSIONS[found[0].fmt] != ext:
            return error(404)
        task, index = found

        async def handle() -> Response:
            now = sim.now()
            if task.phase(now) != "succeeded":
                return error(404)
            if task.link_expired(now):
                return error(410)
            info = await sim.images.get(task, index)
            return Response(info.data, media_type=info.content_type,
                            headers={"ETag": f'"{info.sha256}"',
                                     "Cache-Control": f"private, max-age={int(task.expires_at - now)}"})

        return await sim.serve(request, dialect=task.dialect, op="download", error=error, handler=handle,
                               auth=None)

    return [Route("/files/{name}", download, methods=["GET", "HEAD"])]
