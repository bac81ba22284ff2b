"""create_simulator_app: mounts the five dialects, the image links and /_sim on one Starlette app."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from . import control, files
from .config import SimulatorConfig
from .dialects import apimart, evolink, gmicloud, openai, pixazo
from .sim import Simulator


def _not_found(error: Callable[..., Response]) -> Route:
    """Unknown paths under a dialect answer in that dialect's error shape, not Starlette's text."""

    async def endpoint(request: Request) -> Response:
        return error(404, "Endpoint not found")

    return Route("/{path:path}", endpoint, methods=["GET", "POST", "PUT", "PATCH", "DELETE"])


def create_simulator_app(config: SimulatorConfig | None = None) -> Starlette:
    """The simulator as an ASGI app; its state is at `app.state.sim` (a `Simulator`).

    Run its lifespan (uvicorn does; in-process tests enter `app.router.lifespan_context(app)`)
    so pending callback senders are cancelled and their HTTP client closed on shutdown.
    """
    sim = Simulator(config or SimulatorConfig())

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await sim.aclose()

    routes = []
    for module in (gmicloud, apimart, evolink, pixazo, openai):
        error = module.make_error(sim) if hasattr(module, "make_error") else module.error
        routes.append(Mount(f"/{module.NAME}", routes=[*module.routes(sim), _not_found(error)]))
    app = Starlette(routes=[*routes, *files.routes(sim), *control.routes(sim)], lifespan=lifespan)
    app.state.sim = sim
    return app
