"""The console's pages (GET): Tasks, Task, Archives, Archive, Subscriptions, Dead letters, Providers, Queue, and the
login form.

Each reads through the store and renders a template; pages that change by themselves (the task list, a task,
the archive list, an archive, the queue) also answer `?fragment=1` with just the part console.js swaps in, so they stay live without a reload.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from relay import ids
from relay.circuit import Circuit
from relay.costs import cost_day
from relay.deliveries.models import Subscription
from relay.errors import InvalidRequest, NotFound
from relay.models import ImageRecord, TaskStatus
from relay.runtime import Runtime
from relay.web.common import runtime_of, small_int
from relay.web.console.auth import Session, login_nonce, session_of, set_login_nonce
from relay.web.console.guard import anonymous_context, base_context, is_fragment, local_path, page
from relay.web.console.render import render

HOUR, DAY = 3600.0, 86400.0
PAGE_SIZE = 50
NOTES = {
    "canceled": "The task was canceled.",
    "delivery-retried": "The delivery was queued for a new attempt.",
    "retried": "{n} dead letter(s) queued for a new attempt.",
    "disabled": "The subscription was disabled: its pending deliveries were canceled.",
    "enabled": "The subscription was enabled.",
    "replayed": "{n} deliveries queued again.",
    "job-retried": "The job was queued again.",
}


def _cursor(request: Request, prefix: str) -> str | None:
    value = request.query_params.get("cursor") or None
    return value if value is not None and ids.is_id(value, prefix) else None


def _note(request: Request) -> str | None:
    """The outcome of the action that redirected here (a fixed text: nothing from the URL is echoed)."""
    text = NOTES.get(request.query_params.get("done", ""))
    if text is None:
        return None
    count = small_int(request.query_params.get("n"), 6)       # "²".isdigit() is true, and int() refuses it
    return text.format(n=count if count is not None else "Some")


def _refresh_url(request: Request) -> str:
    """This page's URL (its filters and cursor) asking for the live fragment only."""
    kept = [(k, v) for k, v in request.query_params.multi_items() if k not in ("fragment", "done", "n")]
    return f"{request.url.path}?{urlencode([*kept, ('fragment', '1')])}"


async def login_form(request: Request) -> Response:
    if session_of(request) is not None:
        return _redirect_after_login(request)
    nonce = login_nonce(request)
    response = render(request, "console/login.html", {**anonymous_context(request), "nonce": nonce, "error": None,
                                                      "next": local_path(request.query_params.get("next"), "")})
    set_login_nonce(request, response, nonce)
    return response


def _redirect_after_login(request: Request) -> Response:
    return RedirectResponse(local_path(request.query_params.get("next"), "/console/"), status_code=303)


@page
async def tasks(request: Request, session: Session) -> Response:
    runtime = runtime_of(request)
    params = request.query_params
    status = params.get("status") or None
    if status is not None and status not in {s.value for s in TaskStatus}:
        raise InvalidRequest(f"status must be one of {', '.join(s.value for s in TaskStatus)}", field="status")
    provider = params.get("provider") or None
    search = (params.get("q") or "").strip()[:200] or None
    found, next_cursor = await runtime.store.search_tasks(status=status, provider=provider, search=search,
                                                          limit=PAGE_SIZE, cursor=_cursor(request, "tsk"))
    context = {**base_context(request, session, "tasks"), "tasks": found, "next_cursor": next_cursor,
               "status": status, "provider": provider, "search": search, "statuses": [s.value for s in TaskStatus],
               "providers": sorted(runtime.settings.providers), "refresh": _refresh_url(request),
               "paged": bool(params.get("cursor")), "note": _note(request)}
    return render(request, "console/_tasks.html" if is_fragment(request) else "console/tasks.html", context)


@page
async def task(request: Request, session: Session) -> Response:
    runtime = runtime_of(request)
    found = await runtime.tasks.get(request.path_params["task_id"])
    timeline = await runtime.store.task_timeline(found.id)
    context = {**base_context(request, session, "tasks"), "task": found, "timeline": timeline,
               "thumbs": _thumbs(runtime, found.images),
               "refresh": _refresh_url(request), "note": _note(request)}
    return render(request, "console/_task.html" if is_fragment(request) else "console/task.html", context)


def subscription_state(sub: Subscription) -> str:
    """active | failing (attempts failing, not yet disabled) | disabled."""
    if not sub.enabled:
        return "disabled"
    return "failing" if sub.failing_since is not None else "active"


@page
async def subscriptions(request: Request, session: Session) -> Response:
    runtime = runtime_of(request)
    store = runtime.store
    subs, next_cursor = await store.list_subscriptions(limit=PAGE_SIZE, cursor=_cursor(request, "sub"))
    now = runtime.ctx.clock.now()
    shown = [sub.id for sub in subs]
    hour, day = await store.delivery_health(now - HOUR, shown), await store.delivery_health(now - DAY, shown)
    rows: list[dict[str, Any]] = []
    for sub in subs:
        rows.append({"sub": sub, "state": subscription_state(sub), "hour": hour.get(sub.id),
                     "day": day.get(sub.id), "last_error": await store.last_delivery_error(sub.id, now - DAY)})
    context = {**base_context(request, session, "subscriptions"), "rows": rows, "next_cursor": next_cursor,
               "note": _note(request), "replay_default": _datetime_local(now - HOUR)}
    return render(request, "console/subscriptions.html", context)


def _datetime_local(ts: float) -> str:
    """The value of an <input type=datetime-local> (the page labels it UTC)."""
    return time.strftime("%Y-%m-%dT%H:%M", time.gmtime(ts))


@page
async def dead_letters(request: Request, session: Session) -> Response:
    store = runtime_of(request).store
    found, next_cursor = await store.list_deliveries(subscription_id=None, status="failed", task_id=None,
                                                     event_id=None, limit=PAGE_SIZE, cursor=_cursor(request, "dlv"))
    context = {**base_context(request, session, "dead-letters"), "deliveries": found, "next_cursor": next_cursor,
               "note": _note(request)}
    return render(request, "console/dead_letters.html", context)


@page
async def providers(request: Request, session: Session) -> Response:
    runtime = runtime_of(request)
    store = runtime.store
    window = DAY if request.query_params.get("window") == "24h" else HOUR
    now = runtime.ctx.clock.now()
    stats = await store.provider_stats(now - window)
    in_flight = await store.in_flight_by_provider()
    callbacks = await store.callbacks_by_provider(now - window)
    circuits = await store.circuits()
    today = cost_day(now)
    costs: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(await store.cost_totals(today), key=lambda r: r["currency"]):
        if row["day"] == today:
            costs.setdefault(row["provider"], []).append(row)
    rows = []
    for name, conf in sorted(runtime.settings.providers.items()):
        s = stats.get(name)
        received = callbacks.get(name, {})
        rows.append({"name": name, "kind": conf.kind, "stats": s,
                     "error_rate": (s.errors / s.requests) if s is not None and s.requests else None,
                     "in_flight": in_flight.get(name, 0), "max_in_flight": conf.max_in_flight,
                     "callbacks": sum(received.values()), "confirmed": received.get("applied", 0),
                     "ignored": received.get("ignored", 0), "rejected": received.get("rejected", 0),
                     "circuit": circuits.get(name, Circuit(name)), "costs": costs.get(name, [])})
    context = {**base_context(request, session, "providers"), "rows": rows,
               "window": "24h" if window == DAY else "1h"}
    return render(request, "console/providers.html", context)


@page
async def queue(request: Request, session: Session) -> Response:
    runtime = runtime_of(request)
    store = runtime.store
    now = runtime.ctx.clock.now()
    kinds = await store.queue_by_kind(now)
    dead, next_cursor = await store.list_jobs(state="dead", kind=None, limit=PAGE_SIZE, cursor=_cursor(request, "job"))
    context = {**base_context(request, session, "queue"), "kinds": kinds, "dead": dead, "next_cursor": next_cursor,
               "refresh": _refresh_url(request), "note": _note(request)}
    return render(request, "console/_queue.html" if is_fragment(request) else "console/queue.html", context)


def _thumbs(runtime: Runtime, images: list[ImageRecord]) -> dict[str, str]:
    """Thumbnails through relay's own signed image links, relative so they load from the page's own origin."""
    now = runtime.ctx.clock.now()
    return {img.id: runtime.ctx.signer.image_url("", img.id, now=now, ttl=HOUR)
            for img in images if img.status == "archived"}


ARCHIVE_STATUSES = (TaskStatus.PENDING.value, TaskStatus.ARCHIVING.value, TaskStatus.SUCCEEDED.value,
                    TaskStatus.FAILED.value)


@page
async def archives(request: Request, session: Session) -> Response:
    runtime = runtime_of(request)
    status = request.query_params.get("status") or None
    if status is not None and status not in ARCHIVE_STATUSES:
        raise InvalidRequest(f"status must be one of {', '.join(ARCHIVE_STATUSES)}", field="status")
    found, next_cursor = await runtime.store.list_archives(status=status, limit=PAGE_SIZE,
                                                           cursor=_cursor(request, "arc"))
    context = {**base_context(request, session, "archives"), "archives": found, "next_cursor": next_cursor,
               "status": status, "statuses": ARCHIVE_STATUSES, "refresh": _refresh_url(request),
               "paged": bool(request.query_params.get("cursor")), "note": _note(request)}
    return render(request, "console/_archives.html" if is_fragment(request) else "console/archives.html", context)


@page
async def archive(request: Request, session: Session) -> Response:
    runtime = runtime_of(request)
    archive_id = request.path_params["archive_id"]
    found = await runtime.store.get_archive(archive_id)
    if found is None:
        raise NotFound(f"no archive {archive_id!r}")
    timeline = await runtime.store.task_timeline(found.id)     # events, deliveries, attempts: by owner id
    context = {**base_context(request, session, "archives"), "archive": found, "timeline": timeline,
               "thumbs": _thumbs(runtime, found.images), "refresh": _refresh_url(request), "note": _note(request)}
    return render(request, "console/_archive.html" if is_fragment(request) else "console/archive.html", context)
