"""The wrappers every console route goes through: a page needs a session; an action needs a session, a form and
its CSRF token; a relay error (not found, conflict, invalid input) becomes a page that says so."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, quote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from relay.errors import ApiError, InvalidRequest
from relay.validation import NUL
from relay.web.common import read_body, runtime_of
from relay.web.console.auth import CSRF_FIELD, Session, csrf_ok, csrf_token, session_of
from relay.web.console.render import render

FORM_LIMIT = 64 * 1024
NAV = (("tasks", "Tasks", "/console/"), ("archives", "Archives", "/console/archives"), ("subscriptions", "Subscriptions", "/console/subscriptions"),
       ("dead-letters", "Dead letters", "/console/dead-letters"), ("providers", "Providers", "/console/providers"),
       ("queue", "Queue", "/console/queue"))

Form = dict[str, list[str]]
Page = Callable[[Request, Session], Awaitable[Response]]
Action = Callable[[Request, Session, Form], Awaitable[Response]]


def is_fragment(request: Request) -> bool:
    """A live-refresh request from console.js: only the part of the page that changes."""
    return request.query_params.get("fragment") == "1"


def base_context(request: Request, session: Session, section: str) -> dict[str, Any]:
    return {"nav": NAV, "section": section, "session": session, "csrf": csrf_token(request, session),
            "csrf_field": CSRF_FIELD, "now": runtime_of(request).ctx.clock.now()}


def page(handler: Page) -> Callable[[Request], Awaitable[Response]]:
    @functools.wraps(handler)
    async def endpoint(request: Request) -> Response:
        session = session_of(request)
        if session is None:
            if is_fragment(request):
                return Response("log in again", status_code=401, media_type="text/plain")
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/console/login?next={quote(target, safe='')}", status_code=303)
        try:
            return await handler(request, session)
        except ApiError as exc:
            return error_page(request, session, exc.status, exc.message)
    return endpoint


def action(handler: Action) -> Callable[[Request], Awaitable[Response]]:
    @functools.wraps(handler)
    async def endpoint(request: Request) -> Response:
        session = session_of(request)
        if session is None:
            return error_page(request, None, 401, "Your session has ended: log in again.")
        try:
            form = await read_form(request)
            if not csrf_ok(request, session, first(form, CSRF_FIELD)):
                return error_page(request, session, 403, "This form is missing its CSRF token (or it is not this "
                                                         "session's): reload the page and try again.")
            return await handler(request, session, form)
        except ApiError as exc:
            return error_page(request, session, exc.status, exc.message)
    return endpoint


async def read_form(request: Request) -> Form:
    """An urlencoded form, at most FORM_LIMIT bytes (anything else reads as empty: its token is then missing)."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/x-www-form-urlencoded":
        return {}
    body = await read_body(request, FORM_LIMIT)
    try:
        form = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=1000)
    except (UnicodeDecodeError, ValueError):
        return {}
    if any(NUL in text for name, values in form.items() for text in (name, *values)):
        raise InvalidRequest("the form holds a NUL character (%00)")     # relay.validation.NUL
    return form


def first(form: Form, name: str) -> str | None:
    values = form.get(name)
    return values[0] if values else None


def local_path(target: str | None, default: str) -> str:
    """A redirect target that stays inside the console (never another site: `//host`, `/\\host`, a scheme)."""
    if target and target.startswith("/console/") and "//" not in target and "\\" not in target:
        return target
    return default


def anonymous_context(request: Request) -> dict[str, Any]:
    """What base.html needs on a page shown without a session (login, errors)."""
    return {"nav": NAV, "section": "", "session": None, "csrf": "", "csrf_field": CSRF_FIELD,
            "now": runtime_of(request).ctx.clock.now()}


def error_page(request: Request, session: Session | None, status: int, message: str) -> Response:
    context = anonymous_context(request) if session is None else base_context(request, session, "")
    return render(request, "console/error.html", {**context, "status": status, "message": message}, status=status)
