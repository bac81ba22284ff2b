"""The baseline: a bare Starlette endpoint answering 200 {"ok": true} to a POST (same server stack as relay)."""

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


async def ok(request: Request) -> Response:
    await request.body()
    return Response(b'{"ok":true}', media_type="application/json")


app = Starlette(routes=[Route("/{rest:path}", ok, methods=["POST"])])
