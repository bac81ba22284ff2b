"""Rendering console pages: the Jinja2 environment (relay/templates), display filters, and the headers every page
carries (a strict Content-Security-Policy: everything from relay itself, no inline script or style)."""

from __future__ import annotations

import json
import time
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse

from relay.logs import redact_text, redact_url

# Everything from relay's own origin; no inline script or style, no frames, forms post only back to relay.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Image links carry a signature in their query: no page URL leaves relay in a Referer. (Not no-referrer: with
    # it, Chromium sends `Origin: null` on the console's own form posts, which the CSRF check must refuse.)
    "Referrer-Policy": "same-origin",
    # Pages show operational data and, once, a new secret: never kept by a browser or proxy cache.
    "Cache-Control": "no-store",
}


def when(ts: float | None) -> str:
    """A time as UTC to the second (`2026-11-28 21:30:05Z`), or — ."""
    if ts is None:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))


def duration(seconds: float | None) -> str:
    """A short human duration: 4s, 3m, 2h 5m, 3d 4h."""
    if seconds is None:
        return "—"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s" if s < 600 else f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.0f} ms" if value >= 10 else f"{value:.1f} ms"


def percent(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value * 100:.1f} %"


def pretty(value: Any) -> str:
    """JSON for a <pre>, with URLs and keys in it redacted."""
    return redact_text(json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True))


def snippet(text: str | None, limit: int = 300) -> str:
    if not text:
        return ""
    text = redact_text(text)
    return text if len(text) <= limit else text[:limit] + " …"


def owner_path(owner_id: str) -> str:
    """The console page of what an event, delivery or job belongs to: a task, or an archive of a link (arc_…)."""
    return f"/console/archives/{owner_id}" if owner_id.startswith("arc_") else f"/console/tasks/{owner_id}"


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("relay", "templates"), autoescape=select_autoescape(default=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(when=when, duration=duration, ms=ms, percent=percent, pretty=pretty, snippet=snippet,
                       url=redact_url, text=redact_text, owner_path=owner_path)
    return env


_ENV = _environment()


def render(request: Request, template: str, context: dict[str, Any], status: int = 200) -> HTMLResponse:
    body = _ENV.get_template(template).render(request=request, **context)
    return HTMLResponse(body, status_code=status, headers=HEADERS)
