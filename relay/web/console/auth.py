"""Who may use the console: login with an API key or the dashboard password, a signed session cookie, CSRF tokens.

The session is a cookie relay signs (HMAC-SHA256) and reads back; nothing about it is stored, so any
replica that shares `auth.signing_secret` accepts it. Its key is derived from that secret and from the
credentials that may log in, so changing the password or the API keys ends every session. The cookie is
HttpOnly and SameSite=Strict (a page of another site never sends it), Secure when the request came over
HTTPS. Every form and button carries a CSRF token bound to the session; a POST without it is refused
(403) even with a valid cookie. The login form, before there is a session, uses a double-submit nonce.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response

from relay.runtime import Runtime
from relay.web.common import runtime_of

SESSION_COOKIE = "relay_session"
LOGIN_COOKIE = "relay_login"       # the login form's double-submit nonce
CSRF_FIELD = "csrf"


@dataclass(frozen=True)
class Session:
    sid: str
    expires: int
    via: str            # "password" | "api_key": how the operator logged in (shown, never the credential)


def _key(runtime: Runtime) -> bytes:
    credentials = "\0".join([runtime.settings.dashboard.password, *runtime.api_keys])
    fingerprint = hashlib.sha256(credentials.encode()).hexdigest()
    return runtime.ctx.signer.derived_key(f"dashboard-session:{fingerprint}")


def _mac(key: bytes, purpose: str, message: str) -> str:
    return hmac.digest(key, f"{purpose}:{message}".encode(), "sha256").hex()


def check_credential(runtime: Runtime, given: str) -> str | None:
    """How `given` logs in ("password" | "api_key"), or None. Every comparison runs, in constant time each."""
    encoded = given.encode()
    via = None
    password = runtime.settings.dashboard.password
    if password and hmac.compare_digest(encoded, password.encode()):
        via = "password"
    for key in runtime.api_keys:
        if hmac.compare_digest(encoded, key.encode()) and via is None:
            via = "api_key"
    return via if given else None


def _secure(request: Request) -> bool:
    """HTTPS as the browser sees it: this connection's scheme, or the public URL's when a load balancer ends
    TLS in front of relay (the connection from it is plain HTTP)."""
    return request.url.scheme == "https" or runtime_of(request).settings.server.public_url.startswith("https://")


def start_session(request: Request, response: Response, via: str) -> None:
    runtime = runtime_of(request)
    expires = int(runtime.ctx.clock.now() + runtime.settings.dashboard.session_ttl)
    payload = base64.urlsafe_b64encode(json.dumps(
        {"sid": secrets.token_urlsafe(16), "exp": expires, "via": via}, separators=(",", ":")).encode()).decode()
    value = f"{payload}.{_mac(_key(runtime), 'session', payload)}"
    response.set_cookie(SESSION_COOKIE, value, max_age=int(runtime.settings.dashboard.session_ttl), path="/",
                        httponly=True, samesite="strict", secure=_secure(request))
    response.delete_cookie(LOGIN_COOKIE, path="/console")


def end_session(response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/")


def session_of(request: Request) -> Session | None:
    """The request's valid, unexpired session, or None."""
    value = request.cookies.get(SESSION_COOKIE)
    if not value or "." not in value or not value.isascii():
        return None
    runtime = runtime_of(request)
    payload, _, mac = value.rpartition(".")
    if not hmac.compare_digest(mac.encode(), _mac(_key(runtime), "session", payload).encode()):
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(payload))
        session = Session(sid=str(data["sid"]), expires=int(data["exp"]), via=str(data["via"]))
    except (ValueError, KeyError, TypeError):
        return None
    return session if session.expires > runtime.ctx.clock.now() else None


def csrf_token(request: Request, session: Session) -> str:
    return _mac(_key(runtime_of(request)), "csrf", session.sid)


def csrf_ok(request: Request, session: Session, token: str | None) -> bool:
    """The form's token is this session's, and the request did not come from another origin."""
    if not token or not token.isascii() or not same_origin(request):
        return False
    return hmac.compare_digest(token.encode(), csrf_token(request, session).encode())


def same_origin(request: Request) -> bool:
    """A browser names the page a POST came from in Origin: it must be relay's own host (absent: not a browser
    form, which the token alone then guards). Relay's own: the Host the request names, or server.public_url's,
    which a browser uses behind a proxy that hands relay another Host (its upstream's name)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    netloc = urlsplit(origin).netloc.lower()
    return netloc in (request.headers.get("host", "").lower(),
                      urlsplit(runtime_of(request).settings.server.public_url).netloc.lower())


def login_nonce(request: Request) -> str:
    """The login form's nonce (the one in the browser's cookie, or a new one): see set_login_nonce."""
    return request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(16)


def set_login_nonce(request: Request, response: Response, nonce: str) -> None:
    """Set the nonce cookie beside the form that carries it; the POST must bring both, equal."""
    response.set_cookie(LOGIN_COOKIE, nonce, max_age=3600, path="/console", httponly=True, samesite="strict",
                        secure=_secure(request))


def login_nonce_ok(request: Request, given: str | None) -> bool:
    cookie = request.cookies.get(LOGIN_COOKIE)
    if not cookie or not given or not cookie.isascii() or not given.isascii() or not same_origin(request):
        return False
    return hmac.compare_digest(cookie.encode(), given.encode())
