"""The SSRF guard: the address policy, URL checks, and connect-time enforcement over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay.errors import BlockedAddress
from relay.fastclient import guarded_client
from relay.netguard import NetGuard

# ---------------------------------------------------------------- helpers


async def hello_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"5")]})
    await send({"type": "http.response.body", "body": b"hello"})


@contextlib.asynccontextmanager
async def serve(app: Any, **config: Any) -> AsyncIterator[int]:
    """Run `app` under uvicorn on 127.0.0.1 (a free port) for the block; yields the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, http="h11", ws="none", lifespan="off", log_config=None,
                                           log_level="critical", **config))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(5):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.005)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        async with asyncio.timeout(5):
            await task
        sock.close()


def fixed_resolver(*answers: list[str]) -> Any:
    """A resolver that answers each call with the next list (the last one repeats); records calls."""
    calls: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        return answers[min(len(calls), len(answers)) - 1]

    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve


# ---------------------------------------------------------------- check_ip

BLOCKED = [
    "10.0.0.1", "172.16.5.4", "172.31.255.255", "192.168.1.1",        # private
    "127.0.0.1", "127.255.255.254", "::1",                            # loopback
    "169.254.169.254", "169.254.0.1", "fe80::1", "fe80::1%1",          # link-local, metadata
    "100.64.0.1", "100.127.255.254",                                  # CGNAT
    "224.0.0.1", "239.255.255.250", "ff02::1",                        # multicast
    "0.0.0.0", "0.1.2.3", "::",                                       # unspecified, "this network"
    "255.255.255.255", "240.0.0.1",                                   # broadcast, reserved
    "fc00::1", "fd00:ec2::254",                                       # unique-local (AWS metadata v6)
    "fec0::1",                                                        # site-local
    "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:10.0.0.1",  # IPv4-mapped
    "::127.0.0.1",                                                    # IPv4-compatible
    "2002:7f00:1::1", "2002:a9fe:a9fe::1",                            # 6to4 of loopback, metadata
    "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b:1::1",          # NAT64
    "2001::1",                                                        # Teredo
    "198.18.0.1", "192.0.0.8", "192.88.99.1", "100::1",               # benchmarking, IETF, relay, discard
    "192.0.2.1", "198.51.100.1", "203.0.113.1", "2001:db8::1",        # documentation
]
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.215.14", "2606:4700:4700::1111", "2a00:1450:4001::200e",
          "::ffff:8.8.8.8", "2002:808:808::1", "64:ff9b::808:808"]


@pytest.mark.parametrize("ip", BLOCKED)
def test_non_public_addresses_are_blocked(ip: str) -> None:
    """Every special-purpose range named in the policy is refused."""
    with pytest.raises(BlockedAddress, match="refusing to connect"):
        NetGuard().check_ip(ip)


@pytest.mark.parametrize("ip", PUBLIC)
def test_public_addresses_pass(ip: str) -> None:
    """Public v4/v6 addresses (also when embedded in v6) pass."""
    NetGuard().check_ip(ip)


def test_block_message_names_the_reason() -> None:
    """The error says what kind of address it was, so operators know what to allow-list."""
    with pytest.raises(BlockedAddress, match="link-local"):
        NetGuard().check_ip("169.254.169.254")
    with pytest.raises(BlockedAddress, match=r"loopback \(embedded in IPv6\)"):
        NetGuard().check_ip("::ffff:127.0.0.1")


def test_garbage_is_not_an_ip() -> None:
    """A string that is not an IP address is refused, not crashed on."""
    with pytest.raises(BlockedAddress, match="not an IP"):
        NetGuard().check_ip("localhost")


def test_allow_list_cidr_opens_only_its_range() -> None:
    """An allow-listed CIDR lets its addresses (and their v4-mapped forms) through; nothing else."""
    guard = NetGuard(["127.0.0.0/8", "fd00::/8"])
    guard.check_ip("127.0.0.1")
    guard.check_ip("::ffff:127.0.0.2")
    guard.check_ip("fd12::1")
    with pytest.raises(BlockedAddress):
        guard.check_ip("10.0.0.1")
    with pytest.raises(BlockedAddress):
        guard.check_ip("::1")


# ---------------------------------------------------------------- check_url


@pytest.mark.parametrize("url", [
    "http://localhost/", "http://127.0.0.1:8080/x", "http://[::1]/", "http://0.0.0.0/",
    "http://169.254.169.254/latest/meta-data/", "https://[::ffff:127.0.0.1]/", "http://2130706433/",
])
async def test_check_url_refuses_local_targets(url: str) -> None:
    """URLs naming or resolving to local addresses are refused (system resolver for names)."""
    with pytest.raises(BlockedAddress):
        await NetGuard().check_url(url)


@pytest.mark.parametrize("url", ["http://127.1/", "http://2130706433/", "http://1.2.3.4.5/", "http://8.8.8.8.8/x"])
async def test_check_url_refuses_hosts_that_look_like_addresses_but_are_not(url: str) -> None:
    """Numeric hosts that are not an IP in standard form are refused even when DNS (here: allow-everything) would
    answer public addresses: the webhook client connects to such a host without resolving it."""
    with pytest.raises(BlockedAddress, match="standard form"):
        await NetGuard(resolver=fixed_resolver(["8.8.8.8"])).check_url(url)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/x", "gopher://example.com/", "http:///x",
                                 "not a url", ""])
async def test_check_url_refuses_other_schemes_and_hostless(url: str) -> None:
    """Only http(s) URLs with a host are acceptable."""
    with pytest.raises(BlockedAddress):
        await NetGuard(resolver=fixed_resolver(["8.8.8.8"])).check_url(url)


async def test_check_url_localhost_allowed_by_name() -> None:
    """Allow-listing "localhost" by name admits it (trailing dot too); the IP stays blocked."""
    guard = NetGuard(["localhost"])
    await guard.check_url("http://localhost:8080/hook")
    await guard.check_url("http://LOCALHOST.:8080/hook")
    with pytest.raises(BlockedAddress):
        await guard.check_url("http://127.0.0.1:8080/hook")


async def test_check_url_refuses_a_name_with_any_private_address() -> None:
    """A name resolving to public and private addresses is refused as a whole."""
    guard = NetGuard(resolver=fixed_resolver(["8.8.8.8", "10.1.2.3"]))
    with pytest.raises(BlockedAddress, match="mixed.example resolves to a private address") as refused:
        await guard.check_url("https://mixed.example/")
    # What kind of address, not which: the message reaches API clients, who could map internal names by asking.
    assert "10.1.2.3" not in str(refused.value)


async def test_a_name_server_that_never_answers_holds_no_shared_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lookups of names whose server never answers (more of them than libuv's four threads) fail after the DNS
    deadline as a name that does not resolve, and meanwhile other names still resolve."""
    import threading

    from relay import netguard

    monkeypatch.setattr(netguard, "DNS_TIMEOUT", 0.5)
    hold = threading.Event()
    real = socket.getaddrinfo

    def slow_or_real(host: str, *args: Any, **kwargs: Any) -> Any:
        if host.endswith(".slow.test"):
            hold.wait(30)
            raise socket.gaierror(socket.EAI_AGAIN, "held")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow_or_real)
    try:
        slow = [asyncio.ensure_future(netguard.system_resolver(f"n{i}.slow.test", 443)) for i in range(8)]
        assert "127.0.0.1" in await asyncio.wait_for(netguard.system_resolver("localhost", 80), 5)
        for lookup in slow:
            with pytest.raises(socket.gaierror, match="no answer from DNS"):
                await asyncio.wait_for(lookup, 5)
    finally:
        hold.set()


async def test_check_url_passes_public_name() -> None:
    """A name whose every address is public passes."""
    guard = NetGuard(resolver=fixed_resolver(["8.8.8.8", "2606:4700:4700::1111"]))
    await guard.check_url("https://cdn.example/img.png")


async def test_check_url_unresolvable_is_refused_clearly() -> None:
    """A host that does not resolve is refused with a message saying so."""
    async def fail(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(BlockedAddress, match="cannot resolve"):
        await NetGuard(resolver=fail).check_url("https://nowhere.invalid/")


# ---------------------------------------------------------------- connect time, real sockets


async def test_guarded_client_refuses_loopback_at_connect() -> None:
    """Without an allow-list the guarded client never connects to 127.0.0.1, by IP or by name."""
    async with serve(hello_app) as port, guarded_client(NetGuard()) as http:
        with pytest.raises(BlockedAddress):
            await http.get(f"http://127.0.0.1:{port}/")
        with pytest.raises(BlockedAddress):
            await http.get(f"http://localhost:{port}/")


async def test_guarded_client_connects_when_allow_listed() -> None:
    """With 127.0.0.0/8 (or the name localhost) allow-listed, the same requests succeed."""
    async with serve(hello_app) as port:
        async with guarded_client(NetGuard(["127.0.0.0/8"])) as http:
            response = await http.get(f"http://127.0.0.1:{port}/")
            assert response.status_code == 200 and response.text == "hello"
        async with guarded_client(NetGuard(["localhost"])) as http:
            assert (await http.get(f"http://localhost:{port}/")).text == "hello"


async def test_dns_rebinding_is_refused_at_connect() -> None:
    """A name that is public when checked and loopback at connect time is refused at connect."""
    resolver = fixed_resolver(["93.184.215.14"], ["127.0.0.1"])
    guard = NetGuard(resolver=resolver)
    async with serve(hello_app) as port, guarded_client(guard) as http:
        url = f"http://rebind.example:{port}/"
        await guard.check_url(url)  # the early check sees the public address
        with pytest.raises(BlockedAddress, match="rebind.example resolves to a loopback address"):
            await http.get(url)
    assert resolver.calls == ["rebind.example", "rebind.example"]


async def test_connects_to_the_address_it_checked() -> None:
    """The socket goes to the vetted IP: a name only our resolver knows still connects."""
    guard = NetGuard(["127.0.0.0/8"], resolver=fixed_resolver(["127.0.0.1"]))
    async with serve(hello_app) as port, guarded_client(guard) as http:
        assert (await http.get(f"http://pinned.invalid:{port}/")).text == "hello"


async def test_redirect_hops_are_checked() -> None:
    """A redirect from an allowed host to a blocked address is refused at the second connect."""
    async def redirect_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 302,
                    "headers": [(b"location", b"http://10.255.255.1:9/"), (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    async with serve(redirect_app) as port, guarded_client(NetGuard(["localhost"]),
                                                             follow_redirects=True) as http:
        with pytest.raises(BlockedAddress, match="10.255.255.1"):
            await http.get(f"http://localhost:{port}/")


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_tls_verifies_the_hostname_while_connecting_by_ip(tmp_path: Path) -> None:
    """HTTPS through the guard verifies the certificate against the hostname, not the IP it dialed."""
    cert_path, key_path = _self_signed(tmp_path)
    ctx = ssl.create_default_context(cafile=str(cert_path))
    async with (serve(hello_app, ssl_certfile=str(cert_path), ssl_keyfile=str(key_path)) as port,
                guarded_client(NetGuard(["localhost", "127.0.0.0/8"]), verify=ctx) as http):
        assert (await http.get(f"https://localhost:{port}/")).text == "hello"
        # The certificate names only "localhost": asking for the IP must fail verification.
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED|IP address mismatch"):
            await http.get(f"https://127.0.0.1:{port}/")


@pytest.mark.parametrize("kwargs", [{"proxy": "http://127.0.0.1:3128"}, {"mounts": {}},
                                    {"transport": httpx.AsyncHTTPTransport()}])
def test_guarded_client_refuses_bypasses(kwargs: dict[str, Any]) -> None:
    """Options that would open connections the guard never sees are refused."""
    with pytest.raises(ValueError, match="bypass"):
        guarded_client(NetGuard(), **kwargs)


async def test_environment_proxies_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTP(S)_PROXY in the environment cannot route requests around the guard: the client connects directly."""
    monkeypatch.setenv("HTTP_PROXY", "http://10.9.9.9:3128")
    monkeypatch.setenv("ALL_PROXY", "http://10.9.9.9:3128")
    async with serve(hello_app) as port, guarded_client(NetGuard(["127.0.0.0/8"])) as http:
        assert (await http.get(f"http://127.0.0.1:{port}/")).text == "hello"


@pytest.mark.parametrize("host", ["a..b", "x" * 64 + ".example", ".a"])
async def test_an_invalid_host_name_is_a_resolution_failure_not_a_crash(host: str) -> None:
    """Hosts the IDNA codec refuses (empty or over-long labels) fail like names that do not resolve."""
    guard = NetGuard()
    with pytest.raises(OSError):
        await guard.resolve_checked(host, 80)
    with pytest.raises(BlockedAddress, match="cannot resolve"):
        await guard.check_url(f"http://{host}/x")
    async with guarded_client(guard) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://{host}/x")


async def test_provider_names_are_looked_up_apart_from_the_names_clients_give(tmp_path: Path) -> None:
    """relay's runtime: the provider clients resolve on the providers' own DNS threads, webhooks, downloads and
    the API's checks on the clients' (a client's silent name server cannot hold up a provider call)."""
    from relay import netguard
    from relay.fastclient import GuardedClient
    from relay.runtime import open_runtime
    from tests.harness import settings_for

    async with open_runtime(settings_for(tmp_path)) as runtime:
        for provider in runtime.ctx.providers.values():
            for client in (provider.http, provider.submit_http):
                assert isinstance(client, GuardedClient)
                assert client._direct._session._guard.resolver is netguard.provider_resolver
        assert runtime.guard.resolver is netguard.system_resolver
        assert runtime.deliveries is not None and runtime.deliveries.client._guard.resolver is netguard.system_resolver
