"""The operator's console: a server-rendered dashboard at GET / (Starlette + Jinja2, no build step).

Pages (relay.web.console.pages): Tasks, Task, Archives, Archive, Subscriptions, Dead letters, Providers, Queue. Buttons
(relay.web.console.actions) call the same use cases as the /v1 API. Who may use it and how forms are
protected: relay.web.console.auth. Templates live in relay/templates/console, CSS and the small live-refresh
script in relay/static; everything a page loads comes from relay itself (see render.CSP).
"""

from __future__ import annotations

from importlib import resources

from starlette.responses import RedirectResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from relay.web.console import actions, pages


async def _home(request: object) -> RedirectResponse:
    return RedirectResponse("/console/", status_code=303)


def routes() -> list[BaseRoute]:
    static = StaticFiles(directory=str(resources.files("relay") / "static"))
    return [
        Route("/", _home, methods=["GET"]),
        Mount("/console", routes=[
            Mount("/static", app=static, name="static"),
            Route("/", pages.tasks, methods=["GET"]),
            Route("/login", pages.login_form, methods=["GET"]),
            Route("/login", actions.login, methods=["POST"]),
            Route("/logout", actions.logout, methods=["POST"]),
            Route("/tasks/{task_id}", pages.task, methods=["GET"]),
            Route("/tasks/{task_id}/cancel", actions.cancel_task, methods=["POST"]),
            Route("/archives", pages.archives, methods=["GET"]),
            Route("/archives/{archive_id}", pages.archive, methods=["GET"]),
            Route("/deliveries/{delivery_id}/retry", actions.retry_delivery, methods=["POST"]),
            Route("/subscriptions", pages.subscriptions, methods=["GET"]),
            Route("/subscriptions", actions.create_subscription, methods=["POST"]),
            Route("/subscriptions/{subscription_id}/disable", actions.disable_subscription, methods=["POST"]),
            Route("/subscriptions/{subscription_id}/enable", actions.enable_subscription, methods=["POST"]),
            Route("/subscriptions/{subscription_id}/rotate", actions.rotate_secret, methods=["POST"]),
            Route("/subscriptions/{subscription_id}/replay", actions.replay, methods=["POST"]),
            Route("/dead-letters", pages.dead_letters, methods=["GET"]),
            Route("/dead-letters/retry", actions.retry_dead_letters, methods=["POST"]),
            Route("/providers", pages.providers, methods=["GET"]),
            Route("/queue", pages.queue, methods=["GET"]),
            Route("/jobs/{job_id}/retry", actions.retry_dead_job, methods=["POST"]),
        ]),
    ]
