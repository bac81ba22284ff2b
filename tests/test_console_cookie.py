"""The console's session cookie is Secure whenever browsers reach relay over HTTPS, also when a load balancer
ends TLS in front of it and the request relay sees is plain HTTP (then server.public_url says https)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from tests.harness import API_KEY, Harness, harness


async def _log_in(h: Harness, origin: str) -> httpx.Response:
    """The login form read, then posted from `origin` with the form's nonce and cookie."""
    form = await h.api.get("/console/login", headers={"authorization": ""})
    nonce = re.search(r'name="nonce" value="([^"]+)"', form.text)
    assert nonce, form.text
    # Sent back by hand: a cookie jar keeps a Secure cookie away from http://, as browsers do.
    sent = "; ".join(v.split(";", 1)[0] for k, v in form.headers.multi_items() if k == "set-cookie")
    h.api.cookies.clear()
    return await h.api.post("/console/login", data={"credential": API_KEY, "nonce": nonce.group(1)},
                            headers={"authorization": "", "origin": origin, "cookie": sent})


async def _login_cookie(tmp_path: Path, **env: str) -> str:
    async with harness(tmp_path, run_worker=False, **env) as h:
        answer = await _log_in(h, "http://relay.test")
        assert answer.status_code == 303, answer.text
        [cookie] = [v for k, v in answer.headers.multi_items() if k == "set-cookie" and "relay_session=" in v]
        return cookie.lower()


@pytest.mark.parametrize(("public_url", "secure"), [("https://relay.example", True), ("", False)])
async def test_session_cookie_is_secure_behind_a_tls_terminating_proxy(tmp_path: Path, public_url: str,
                                                                       secure: bool) -> None:
    env = {"RELAY_SERVER_PUBLIC_URL": public_url} if public_url else {}
    cookie = await _login_cookie(tmp_path, **env)
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert ("; secure" in cookie) is secure, cookie


@pytest.mark.parametrize(("origin", "accepted"), [("https://relay.example", True), ("https://RELAY.example", True),
                                                  ("http://relay.test", True), ("https://evil.example", False),
                                                  ("null", False)])
async def test_a_proxy_that_hands_relay_another_host_keeps_the_console_forms_working(
        tmp_path: Path, origin: str, accepted: bool) -> None:
    """Behind a proxy that passes its upstream's name as Host (here relay.test), a browser's form posts name
    server.public_url's origin: the login is accepted from it and from the Host's, refused from anyone else's."""
    async with harness(tmp_path, run_worker=False, RELAY_SERVER_PUBLIC_URL="https://relay.example") as h:
        answer = await _log_in(h, origin)
        assert (answer.status_code == 303) is accepted, (answer.status_code, answer.text[:200])
