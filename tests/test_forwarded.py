"""server.forwarded_allow_ips: whose X-Forwarded-For relay serve believes (the client address the console's login
limit counts by). relay serve's own uvicorn settings, on a real socket."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from relay.cli import server_config
from relay.config import ConfigError
from tests.harness import settings_for
from tests.serving import QuickServer, running
from tests.test_corked import _listening


def _app() -> Starlette:
    async def client(request: Request) -> Response:
        return JSONResponse({"client": request.client.host if request.client else None})
    return Starlette(routes=[Route("/client", client)])


async def _client_seen(tmp_path: Path, **env: str) -> str:
    config = server_config(_app(), settings_for(tmp_path, **env), "warning")
    config.lifespan = "off"
    async with running(QuickServer(config), _listening()) as port:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            answer = await asyncio.wait_for(http.get("/client", headers={"x-forwarded-for": "203.0.113.7"}), 10)
    return str(answer.json()["client"])


async def test_a_forwarded_for_is_believed_only_from_the_peers_named(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)     # uvicorn's default reads it
    # By default the loopback is a trusted proxy (uvicorn's default): the header names the client.
    assert await _client_seen(tmp_path) == "203.0.113.7"
    # Named proxies only: this peer (127.0.0.1) is not one, so its header is ignored; it is the client.
    assert await _client_seen(tmp_path, RELAY_SERVER_FORWARDED_ALLOW_IPS="10.0.0.0/8") == "127.0.0.1"
    assert await _client_seen(tmp_path, RELAY_SERVER_FORWARDED_ALLOW_IPS="10.0.0.0/8,127.0.0.1") == "203.0.113.7"


def test_forwarded_allow_ips_must_be_addresses_networks_or_a_star(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server.forwarded_allow_ips\[1\]"):
        settings_for(tmp_path, RELAY_SERVER_FORWARDED_ALLOW_IPS="10.0.0.1,proxy.internal")
    assert settings_for(tmp_path, RELAY_SERVER_FORWARDED_ALLOW_IPS="*").server.forwarded_allow_ips == ("*",)


async def test_login_attempts_count_per_ipv4_address_and_per_ipv6_64(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The console's login limit (LOGIN_BURST tries, then one every 6 s) counts an IPv6 client by its /64: a host
    usually has a whole /64 and could take a fresh address for every guess. Another /64 has tries of its own; an
    IPv4 client counts the same by its plain or IPv4-mapped address. relay serve on a real socket, the client's
    address from X-Forwarded-For (the loopback is a trusted proxy by default)."""
    import re

    from relay.runtime import open_runtime
    from relay.web.app import create_app
    from relay.web.console.actions import LOGIN_BURST
    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    settings = settings_for(tmp_path)
    async with open_runtime(settings) as runtime:
        config = server_config(create_app(runtime, run_worker=False), settings, "warning")
        async with running(QuickServer(config), _listening()) as port:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
                form = await http.get("/console/login")
                nonce = re.search(r'name="nonce" value="([^"]+)"', form.text)
                assert nonce, form.text

                async def wrong_login(client: str) -> int:
                    answer = await http.post("/console/login", data={"credential": "wrong", "nonce": nonce.group(1)},
                                             headers={"x-forwarded-for": client, "origin": f"http://127.0.0.1:{port}"})
                    return answer.status_code
                for n in range(int(LOGIN_BURST)):
                    assert await wrong_login(f"2001:db8:1:2::{n + 1:x}") == 401
                assert await wrong_login("2001:db8:1:2:ffff:ffff:ffff:ffff") == 429, "a fresh address of the /64"
                assert await wrong_login("2001:db8:1:3::1") == 401, "another /64"
                for n in range(int(LOGIN_BURST)):
                    assert await wrong_login("203.0.113.9" if n % 2 else "::ffff:203.0.113.9") == 401
                assert await wrong_login("203.0.113.9") == 429
                assert await wrong_login("203.0.113.10") == 401
