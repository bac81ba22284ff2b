"""The SSRF guard: which addresses relay may open a connection to.

Every outbound request relay makes goes through relay.fastclient's aiohttp
sessions, which enforce it: image downloads, reference-image fetches and webhook
deliveries directly, provider calls through httpx clients whose transport is such
a session (fastclient.guarded_client). The policy has two layers:

    NetGuard.check_url(url)   early refusal with a clear message (registration
                              time, before a job is even queued)
    GuardedResolver           the real enforcement: at connect time it resolves
    (relay.fastclient)        the host itself through resolve_checked, checks
                              *every* address, and the connection is opened only
                              to an address it just checked

Because the socket is opened to a vetted IP, not re-resolved by the network
stack, DNS rebinding (a name that is public when checked and 127.0.0.1 when
connected) cannot slip through. TLS still verifies and sends SNI for the
*hostname*: aiohttp keeps the URL's host for that, apart from the address
the resolver answered.

Refused: loopback, private (RFC 1918), link-local (incl. 169.254.169.254
cloud metadata), CGNAT 100.64/10, multicast, unspecified, reserved and
broadcast, benchmarking, documentation, IPv6 unique-local and site-local, and
IPv4 embedded in IPv6 (v4-mapped, 6to4, NAT64) when the embedded address would
be refused. An allow-list of CIDRs or hostnames opts addresses back in (tests,
or a deployment that delivers to its own LAN).

Redirects are not the guard's business: each hop opens its own connection and
is therefore checked, but whether to follow at all is the caller's choice
(webhook delivery must not follow; image downloads follow a few hops).
Proxies and Unix sockets are refused: they would bypass the address check.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence

import httpx

from relay.errors import BlockedAddress, InvalidRequest

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]

# Ranges that `is_global` (or its absence of an opinion) lets through on some
# Python versions, or that deserve a precise name in the error message.
_V4_BLOCKS: tuple[tuple[ipaddress.IPv4Network, str], ...] = tuple(
    (ipaddress.IPv4Network(net), why)
    for net, why in (
        ("0.0.0.0/8", "unspecified"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "shared (CGNAT)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local / cloud metadata"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "IETF protocol assignment"),
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "6to4 relay anycast"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
        ("255.255.255.255/32", "broadcast"),
    )
)
_V6_BLOCKS: tuple[tuple[ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.IPv6Network(net), why)
    for net, why in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/96", "IPv4-compatible (deprecated)"),
        ("64:ff9b:1::/48", "local-use NAT64"),
        ("100::/64", "discard"),
        ("2001::/32", "Teredo"),
        ("2001:db8::/32", "documentation"),
        ("3fff::/20", "documentation"),
        ("5f00::/16", "SRv6 SIDs"),
        ("fc00::/7", "unique-local"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def blocked_reason(addr: IPAddress) -> str | None:
    """Why `addr` must not be connected to, or None if it is a public address."""
    if isinstance(addr, ipaddress.IPv6Address):
        # Addresses that carry an IPv4 address inside reach that IPv4 host
        # (the kernel, a 6to4 relay or a NAT64 gateway unwraps them), so they
        # are judged by what they embed.
        embedded: ipaddress.IPv4Address | None = addr.ipv4_mapped or addr.sixtofour
        if embedded is None and addr in _NAT64:
            embedded = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if embedded is not None:
            inner = blocked_reason(embedded)
            return f"{inner} (embedded in IPv6)" if inner else None
        for net6, why in _V6_BLOCKS:
            if addr in net6:
                return why
    else:
        for net4, why in _V4_BLOCKS:
            if addr in net4:
                return why
    # The explicit tables above name the usual suspects; these flags catch the
    # rest of IANA's special-purpose registries as Python knows them.
    if addr.is_multicast:
        return "multicast"
    if addr.is_loopback:
        return "loopback"
    if addr.is_link_local:
        return "link-local"
    if addr.is_unspecified:
        return "unspecified"
    if addr.is_reserved:
        return "reserved"
    if addr.is_private:
        return "private"
    if not addr.is_global:
        return "non-global"
    return None


# Name lookups run on threads of their own, with a deadline. The loop's getaddrinfo runs them on libuv's pool of
# four threads under uvloop (asyncio: the default executor, which also does image-store I/O), and a name server
# that never answers holds a thread for the resolver's whole timeout, whoever waits: four links to such names,
# which any API client can give (webhooks, archived links, reference images), stalled every lookup, the
# providers' too. Here such lookups hold at most DNS_THREADS threads and fail after DNS_TIMEOUT like a name that
# does not resolve (retried later); the providers' names, which the operator configures, are looked up on
# threads of their own (provider_resolver), and the loop's own pools are left alone.
DNS_THREADS = 32
DNS_TIMEOUT = 10.0


def threaded_resolver(threads: int, name: str) -> Resolver:
    """A Resolver whose lookups run on a pool of `threads` threads of its own, each given DNS_TIMEOUT."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)

    async def resolve(host: str, port: int) -> list[str]:
        """All addresses `host` resolves to, in the order the system prefers them."""
        lookup = asyncio.get_running_loop().run_in_executor(
            pool, functools.partial(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM))
        try:
            infos = await asyncio.wait_for(lookup, DNS_TIMEOUT)
        except TimeoutError:
            raise socket.gaierror(socket.EAI_AGAIN, f"{host}: no answer from DNS within {DNS_TIMEOUT:g} s") from None
        seen: list[str] = []
        for _family, _type, _proto, _canon, sockaddr in infos:
            ip = str(sockaddr[0])
            if ip not in seen:
                seen.append(ip)
        return seen
    return resolve


system_resolver = threaded_resolver(DNS_THREADS, "relay-dns")            # names clients can give
provider_resolver = threaded_resolver(8, "relay-dns-providers")         # names the configuration gives


def _parse_ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def _normalize_host(host: str) -> str:
    return host.strip("[]").rstrip(".").lower()


class NetGuard:
    """The address policy: public addresses pass, everything else needs the allow-list."""

    def __init__(self, allow: Sequence[str] = (), *, resolver: Resolver | None = None) -> None:
        """`allow`: CIDRs ("127.0.0.0/8", "::1/128") or hostnames ("localhost") exempt from the guard."""
        self._allow_nets: list[IPNetwork] = []
        self._allow_hosts: set[str] = set()
        for entry in allow:
            entry = entry.strip()
            try:
                self._allow_nets.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                if not entry:
                    raise ValueError("empty entry in the SSRF allow-list") from None
                self._allow_hosts.add(_normalize_host(entry))
        self.resolver: Resolver = resolver or system_resolver

    def host_allowed(self, host: str) -> bool:
        """True if `host` is allow-listed by name (every address it resolves to is then accepted)."""
        return _normalize_host(host) in self._allow_hosts

    def check_ip(self, ip: str) -> None:
        """Raise BlockedAddress unless `ip` is public or allow-listed."""
        addr = _parse_ip(ip)
        if addr is None:
            raise BlockedAddress(f"{ip!r} is not an IP address")
        # Compare the allow-list against the unscoped address ("fe80::1%eth0").
        plain = ipaddress.ip_address(str(addr).split("%", 1)[0])
        candidates: list[IPAddress] = [plain]
        if isinstance(plain, ipaddress.IPv6Address) and plain.ipv4_mapped is not None:
            candidates.append(plain.ipv4_mapped)  # ::ffff:127.0.0.1 is 127.0.0.1 on the wire
        if any(c.version == net.version and c in net for c in candidates for net in self._allow_nets):
            return
        reason = blocked_reason(plain)
        if reason is not None:
            raise BlockedAddress(f"refusing to connect to {ip}: {reason} address (not in the allow-list)")

    async def resolve_checked(self, host: str, port: int, *, resolver: Resolver | None = None) -> list[str]:
        """Resolve `host` and return its addresses if every one passes; else raise BlockedAddress.

        A resolution failure is raised as OSError (socket.gaierror), not BlockedAddress:
        it says nothing about the policy and may succeed later.
        """
        literal = _parse_ip(host)
        if literal is not None:
            ips = [str(literal)]
        else:
            try:
                ips = list(await (resolver or self.resolver)(host, port))
            except UnicodeError as exc:
                # "a..b" or a 64-letter label: the IDNA codec refuses it before DNS is asked. Same meaning
                # as a name that does not resolve, so every caller's resolution-failure path applies.
                raise socket.gaierror(socket.EAI_NONAME, f"{host} is not a valid host name: {exc}") from None
            if not ips:
                raise socket.gaierror(socket.EAI_NONAME, f"{host} resolved to no addresses")
        if self.host_allowed(host):
            return ips
        for ip in ips:
            try:
                self.check_ip(ip)
            except BlockedAddress:
                # One bad address poisons the name: a client could be steered to any of them. The message
                # says what kind of address, not which: it reaches API clients (a 422, an attempt's error),
                # who would otherwise map internal names to internal addresses by asking.
                addr = _parse_ip(ip.split("%", 1)[0])
                kind = (blocked_reason(addr) if addr is not None else None) or "refused"
                raise BlockedAddress(f"{host} resolves to a {kind} address (not in the allow-list)") from None
        return ips

    async def check_url(self, url: str) -> None:
        """Refuse `url` unless it is http(s) with a host whose every address passes.

        Raises BlockedAddress with a message fit for an API client, also when the
        URL is malformed or the host does not resolve (we cannot vouch for it).
        """
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError, ValueError) as exc:
            raise BlockedAddress(f"not a valid URL: {exc}") from None
        if parsed.scheme not in ("http", "https"):
            raise BlockedAddress(f"only http and https URLs are allowed, not {parsed.scheme or 'no scheme'!r}")
        # raw_host is the IDNA-encoded ASCII form, what DNS and the transport use.
        host = parsed.raw_host.decode("ascii")
        if not host:
            raise BlockedAddress("the URL has no host")
        if (":" in host or host.replace(".", "").isdigit()) and _parse_ip(host) is None:
            # "127.1", "2130706433", "1.2.3.4.5": some resolvers take them for addresses, others for names,
            # and HTTP clients connect to them without resolving; refused, not guessed at.
            raise BlockedAddress(f"{host} looks like an IP address but is not one in standard form")
        if self.host_allowed(host):
            return  # allowed by name: whatever it resolves to, no need to ask DNS now
        port = connect_port(parsed)
        try:
            await self.resolve_checked(host, port)
        except OSError as exc:
            raise BlockedAddress(f"cannot resolve {host}: {exc}") from None


DEFAULT_PORTS = {"http": 80, "https": 443}


def connect_port(parsed: httpx.URL) -> int:
    """The port a URL's request goes to: its own, else its scheme's default."""
    return parsed.port or DEFAULT_PORTS.get(parsed.scheme, 80)


async def check_given_url(guard: NetGuard, field: str, url: str, *, name_url: bool = False) -> None:
    """`guard.check_url` for a URL a client gave in `field`: a refusal is InvalidRequest naming the field (and,
    with `name_url`, the URL itself: for a field that holds several)."""
    try:
        await guard.check_url(url)
    except BlockedAddress as exc:
        where = f"{field} ({url})" if name_url else field
        raise InvalidRequest(f"{where} is refused: {exc}", field=field) from None
