"""Archive any link: the use cases behind POST/GET /v1/archives (validated, SSRF-checked, idempotent).

The saving itself is the archive job's (relay.jobs.archive), as for task images; the rows and the
outcome's event are relay.store.archives'. Here: which links, and until when each one lives.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import httpx

from relay import ids
from relay.errors import NotFound
from relay.jobs.context import JobContext
from relay.models import Archive
from relay.netguard import NetGuard, check_given_url, connect_port
from relay.sourcelinks import expiry_from_url, url_key
from relay.store.archives import ARCHIVE_PREFIX
from relay.validation import parse_archive_input

# A link that does not say when it dies is assumed to live this long (the resellers' 24 h).
DEFAULT_LINK_LIFETIME = 24 * 3600.0
# The latest expiry relay believes, whoever states it (the request or the link): a transient failure is retried
# until the link's expiry, so "year 9999" would retry a dead host forever and keep the archive from ever
# settling. Seven days is the longest a SigV4 presigned URL may live.
MAX_LINK_LIFETIME = 7 * 86400.0
HOST_CHECKS_AT_ONCE = 8     # SSRF checks of one request run at once (each may hold a resolver thread for 10 s)


class ArchiveService:
    def __init__(self, ctx: JobContext, guard: NetGuard) -> None:
        self.ctx = ctx
        self.guard = guard

    async def create(self, data: dict[str, Any], *, scope: str,
                     idempotency_key: str | None) -> tuple[list[tuple[Archive, bool]], bool]:
        """Validate, check every link against the SSRF guard, store. Returns ((archive, created) per link, whether
        the body gave a list). A link archived before (the same normalized URL) answers with that archive."""
        from relay.service import idempotency_of

        ctx = self.ctx
        parsed = parse_archive_input(data)
        field = "urls" if parsed.many else "url"
        await self._check_urls(field, parsed.urls)
        if parsed.webhook_url is not None:
            await check_given_url(self.guard, "webhook_url", parsed.webhook_url, name_url=True)
        now = ctx.clock.now()
        archives = [Archive(id=ids.new_id(ARCHIVE_PREFIX, now), source_url=url, url_key=url_key(url),
                            expires_at=self.expiry(url, parsed.expires_at, now), metadata=parsed.metadata,
                            webhook_url=parsed.webhook_url, created_at=now, updated_at=now)
                    for url in parsed.urls]
        result = await ctx.store.create_archives(archives, now,
                                                 idempotency=idempotency_of(scope, idempotency_key, data))
        return result, parsed.many

    async def _check_urls(self, field: str, urls: Sequence[str]) -> None:
        """Every link past the SSRF guard; the first refused one in the body's order answered. One check per
        scheme, host and port (their answer is the same; 100 links on one CDN are one DNS lookup), at most
        HOST_CHECKS_AT_ONCE at once: each lookup holds a thread of the clients' resolver pool for up to 10 s, and
        one request must not take them all (one by one, 100 slow names took 100 lookups' time)."""
        first_of: dict[tuple[str, str, int], str] = {}
        for url in urls:
            first_of.setdefault(_host_of(url), url)
        room = asyncio.Semaphore(HOST_CHECKS_AT_ONCE)

        async def check(url: str) -> None:
            async with room:
                await check_given_url(self.guard, field, url, name_url=True)
        outcomes = dict(zip(first_of, await asyncio.gather(*(check(url) for url in first_of.values()),
                                                          return_exceptions=True)))
        for url in urls:
            outcome = outcomes[_host_of(url)]
            if isinstance(outcome, BaseException):
                raise outcome

    @staticmethod
    def expiry(url: str, given: float | None, now: float) -> float:
        """`expires_at` as given; else what the link's signature says; else 24 h from now; at most 7 days."""
        found = given if given is not None else expiry_from_url(url, now=now)
        return min(found if found is not None else now + DEFAULT_LINK_LIFETIME, now + MAX_LINK_LIFETIME)

    async def get(self, archive_id: str) -> Archive:
        archive = await self.ctx.store.get_archive(archive_id)
        if archive is None:
            raise NotFound(f"no archive {archive_id!r}")
        return archive


def _host_of(url: str) -> tuple[str, str, int]:
    """What the SSRF guard's answer for `url` depends on: its scheme, host and port (a URL that does not parse:
    itself)."""
    try:
        parsed = httpx.URL(url)
        return parsed.scheme, parsed.raw_host.decode("ascii"), connect_port(parsed)
    except (httpx.InvalidURL, TypeError, ValueError, UnicodeDecodeError):
        return "", url, 0
