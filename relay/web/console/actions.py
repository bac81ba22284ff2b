"""The console's buttons and forms (POST): log in and out, cancel a task, retry deliveries and dead jobs, create,
disable, enable, rotate and replay subscriptions.

Each calls the same use case as its /v1 endpoint (relay.service, relay.deliveries.service, relay.web.jobs), so
the rules live in one place. Success redirects back to a page (post/redirect/get) with a fixed note; the two
that make a secret (create, rotate) answer with the page that shows it, once: it is in no URL, no cookie
and no later page.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from relay.deliveries.service import DeliveryService
from relay.errors import InvalidRequest
from relay.validation import parse_replay_input, parse_subscription_input
from relay.web.common import runtime_of
from relay.web.console.auth import (Session, check_credential, end_session, login_nonce, login_nonce_ok,
                                    set_login_nonce, start_session)
from relay.web.console.guard import Form, action, anonymous_context, base_context, first, local_path, read_form
from relay.web.console.render import owner_path, render
from relay.web.jobs import retry_job

RETRY_MAX = 200         # dead letters retried by one press
# Password guessing: each client address gets LOGIN_BURST tries, then one every 1/LOGIN_RATE seconds. The
# bucket is the store's (Store.take_token), so the limit holds across replicas, whichever one a try lands on.
LOGIN_BURST = 10.0
LOGIN_RATE = 1 / 6.0
LOGIN_BODY_SECONDS = 20.0     # for the login form's body to arrive, once its head has


def _deliveries(request: Request) -> DeliveryService:
    service = runtime_of(request).deliveries
    assert service is not None, "deliveries are not wired into this runtime"
    return service


def _back(path: str, done: str, n: int | None = None) -> Response:
    return RedirectResponse(f"{path}?done={done}" + (f"&n={n}" if n is not None else ""), status_code=303)


async def login(request: Request) -> Response:
    """A wrong credential is a 401 with the form again; the nonce guards against a login forged by another site."""
    try:
        # The one form anyone may post: a body sent a byte now and then must not hold the connection for ever.
        async with asyncio.timeout(LOGIN_BODY_SECONDS):
            form = await read_form(request)
    except TimeoutError:
        return _login_again(request, "The login form took too long to arrive: try again.", 408, "/console/")
    target = local_path(first(form, "next"), "/console/")
    if not login_nonce_ok(request, first(form, "nonce")):
        return _login_again(request, "The login form expired or came from another site: try again.", 403, target)
    runtime = runtime_of(request)
    client = login_bucket(request.client.host if request.client else "unknown")
    wait = await runtime.store.take_token(f"login:{client}", LOGIN_RATE, LOGIN_BURST, runtime.ctx.clock.now())
    if wait > 0:
        response = _login_again(request, f"Too many login attempts: try again in {math.ceil(wait)} s.", 429, target)
        response.headers["retry-after"] = str(math.ceil(wait))
        return response
    via = check_credential(runtime, first(form, "credential") or "")
    if via is None:
        return _login_again(request, "Wrong API key or password.", 401, target)
    response = RedirectResponse(target, status_code=303)
    start_session(request, response, via)
    return response


def login_bucket(client: str) -> str:
    """Whose login attempts count together: an IPv4 address, or an IPv6 client's /64 (one host usually has a whole
    /64 to itself and could take a new address, and a new allowance, for every guess)."""
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return client
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def _login_again(request: Request, error: str, status: int, target: str) -> Response:
    nonce = login_nonce(request)
    context = {**anonymous_context(request), "nonce": nonce, "error": error,
               "next": "" if target == "/console/" else target}
    response = render(request, "console/login.html", context, status=status)
    set_login_nonce(request, response, nonce)
    return response


@action
async def logout(request: Request, session: Session, form: Form) -> Response:
    response = RedirectResponse("/console/login", status_code=303)
    end_session(response)
    return response


@action
async def cancel_task(request: Request, session: Session, form: Form) -> Response:
    task = await runtime_of(request).tasks.cancel(request.path_params["task_id"])
    return _back(f"/console/tasks/{quote(task.id)}", "canceled")


@action
async def retry_delivery(request: Request, session: Session, form: Form) -> Response:
    delivery = await _deliveries(request).retry_delivery(request.path_params["delivery_id"])
    return _back(local_path(first(form, "back"), owner_path(quote(delivery.task_id))), "delivery-retried")


@action
async def retry_dead_letters(request: Request, session: Session, form: Form) -> Response:
    chosen = list(dict.fromkeys(form.get("delivery_id", [])))
    if not chosen:
        raise InvalidRequest("select at least one dead letter to retry", field="delivery_id")
    if len(chosen) > RETRY_MAX:
        raise InvalidRequest(f"retry at most {RETRY_MAX} at once", field="delivery_id")
    service = _deliveries(request)
    for delivery_id in chosen:
        await service.retry_delivery(delivery_id)
    return _back("/console/dead-letters", "retried", len(chosen))


@action
async def create_subscription(request: Request, session: Session, form: Form) -> Response:
    events = [e.strip() for e in (first(form, "events") or "").replace(",", " ").split() if e.strip()]
    data: dict[str, object] = {"url": (first(form, "url") or "").strip(), "events": events or ["*"]}
    description = (first(form, "description") or "").strip()
    if description:
        data["description"] = description
    sub, keys = await _deliveries(request).create_subscription(parse_subscription_input(data, partial=False))
    return _secret_page(request, session, sub.id, keys.secret, created=True)


@action
async def disable_subscription(request: Request, session: Session, form: Form) -> Response:
    return await _set_enabled(request, False)


@action
async def enable_subscription(request: Request, session: Session, form: Form) -> Response:
    return await _set_enabled(request, True)


async def _set_enabled(request: Request, enabled: bool) -> Response:
    given = parse_subscription_input({"enabled": enabled}, partial=True)
    await _deliveries(request).update_subscription(request.path_params["subscription_id"], given)
    return _back("/console/subscriptions", "enabled" if enabled else "disabled")


@action
async def rotate_secret(request: Request, session: Session, form: Form) -> Response:
    sub, keys = await _deliveries(request).rotate_secret(request.path_params["subscription_id"])
    return _secret_page(request, session, sub.id, keys.secret, created=False)


def _secret_page(request: Request, session: Session, sub_id: str, secret: str, *, created: bool) -> Response:
    overlap = _deliveries(request).options.rotation_overlap
    context = {**base_context(request, session, "subscriptions"), "subscription_id": sub_id, "secret": secret,
               "created": created, "overlap_hours": overlap / 3600}
    return render(request, "console/secret.html", context, status=201 if created else 200)


@action
async def replay(request: Request, session: Session, form: Form) -> Response:
    since = (first(form, "since") or "").strip()
    if len(since) == 16:          # <input type=datetime-local>: 2026-11-28T20:00, read as UTC (the page says so)
        since += ":00Z"
    given = parse_replay_input({"since": since, "status": first(form, "status") or "failed"})
    result = await _deliveries(request).replay(request.path_params["subscription_id"], given)
    return _back("/console/subscriptions", "replayed", int(result["replayed"]))


@action
async def retry_dead_job(request: Request, session: Session, form: Form) -> Response:
    await retry_job(runtime_of(request), request.path_params["job_id"])
    return _back("/console/queue", "job-retried")
