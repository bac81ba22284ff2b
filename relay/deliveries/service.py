"""Delivery use cases and the parts the deliver job shares: options, keys, the HTTP client, the in-flight caps.

The web layer calls the use cases (subscriptions, retry, replay, the
task-webhook secret); the deliver job (handler.py) calls `send`. Secrets are
decrypted only here, only when needed, and never logged.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import httpx

from relay import __version__, ids, jsontext, signing
from relay.clock import Clock, rfc3339
from relay.config import Settings
from relay.deliveries.lanes import Lanes, SharedReleases
from relay.deliveries.models import Attempt, Delivery, Keys, SendTarget, Subscription
from relay.deliveries.schedule import parse_retry_after
from relay.deliveries.secrets import SecretBox
from relay.errors import BlockedAddress, NotFound
from relay.fastclient import GuardedSession
from relay.links import Signer
from relay.netguard import NetGuard, check_given_url
from relay.present import with_image_urls
from relay.store.base import Store
from relay.validation import ReplayInput, SubscriptionInput, storable_text

RESPONSE_LIMIT = 4096            # bytes of a subscriber's answer kept with the attempt
ERROR_LIMIT = 1000
KEY_CACHE = 10_000               # subscriptions whose decrypted keys are kept in memory


@dataclass(frozen=True)
class DeliveryOptions:
    schedule: tuple[float, ...]
    jitter: float
    timeout: float
    concurrency_per_subscription: int
    auto_disable_after: float
    rotation_overlap: float

    @classmethod
    def from_settings(cls, settings: Settings) -> DeliveryOptions:
        d = settings.deliveries
        return cls(schedule=d.schedule, jitter=d.jitter, timeout=d.timeout,
                   concurrency_per_subscription=d.concurrency_per_subscription,
                   auto_disable_after=d.auto_disable_after, rotation_overlap=d.rotation_overlap)


@dataclass(frozen=True)
class Sent:
    """What one POST came to."""

    status_code: int | None
    latency_ms: float
    response: str | None = None
    error: str | None = None
    retry_after: float | None = None
    blocked: bool = False          # the SSRF guard refused the address (policy, not a network failure)


class DeliveryService:
    def __init__(self, settings: Settings, store: Store, clock: Clock, *, guard: NetGuard, signer: Signer,
                 box: SecretBox, task_secret: str, shared_lanes: bool = False,
                 tls: ssl.SSLContext | None = None) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.guard = guard
        self.signer = signer
        self.box = box
        self.task_secret = task_secret
        self.options = DeliveryOptions.from_settings(settings)
        self.lanes = Lanes()
        # Replicas share the database: the per-subscriber cap is kept in the store too (see handler.py),
        # each held slot leased for longer than an attempt can last.
        self.shared_lanes = shared_lanes
        self.lane_lease = 2 * self.options.timeout + 10.0
        self.shared_releases = SharedReleases()
        if shared_lanes:
            store.on_lane_freed(self.shared_releases.freed)
        self._keys: dict[tuple[str, str], Keys] = {}
        # The CA bundle takes ~30 ms to load: the runtime's, else loaded here once.
        self.client = GuardedSession(guard, tls or httpx.create_ssl_context())
        store.set_delivery_options(initial_delay=self.options.schedule[0])

    def __repr__(self) -> str:
        return "DeliveryService()"

    async def start(self) -> None:
        """Safety net at start: a pending delivery without a job gets one."""
        await self.store.requeue_orphaned_deliveries(self.clock.now())

    async def close(self) -> None:
        await self.client.aclose()

    # ---- keys -------------------------------------------------------------------------------------
    def keys_of(self, sub: Subscription) -> Keys:
        """The subscription's clear keys (decrypted once per keyring value, then kept in memory)."""
        cache_key = (sub.id, sub.keyring)
        keys = self._keys.get(cache_key)
        if keys is None:
            keys = Keys.from_json(json.loads(self.box.decrypt(sub.keyring, bound_to=sub.id)))
            if len(self._keys) >= KEY_CACHE:
                self._keys.clear()
            self._keys[cache_key] = keys
        return keys

    def _seal(self, sub_id: str, keys: Keys) -> str:
        return self.box.encrypt(json.dumps(keys.to_json()), bound_to=sub_id)

    def signing_keys(self, sub: Subscription, now: float) -> list[str]:
        overlap = sub.previous_expires_at is not None and now < sub.previous_expires_at
        return self.keys_of(sub).signing_keys(include_previous=overlap, now=now)

    # ---- subscriptions ----------------------------------------------------------------------------
    async def create_subscription(self, given: SubscriptionInput) -> tuple[Subscription, Keys]:
        """Store a new subscription with fresh keys; the clear keys are returned once, here."""
        assert given.url is not None and given.events is not None and given.signing is not None
        await check_given_url(self.guard, "url", given.url)
        now = self.clock.now()
        sub_id = ids.new_id("sub", now)
        signing_key = signing.generate_signing_key() if given.signing == "ed25519" else None
        keys = Keys(secret=signing.generate_secret(), signing_key=signing_key)
        sub = Subscription(id=sub_id, url=given.url, events=given.events, description=given.description,
                           enabled=bool(given.enabled), disabled_reason=None if given.enabled else "manual",
                           signing=given.signing, keyring=self._seal(sub_id, keys),
                           public_key=signing.public_key_of(signing_key) if signing_key else None,
                           created_at=now, updated_at=now)
        return await self.store.create_subscription(sub), keys

    async def get_subscription(self, sub_id: str) -> Subscription:
        sub = await self.store.get_subscription(sub_id)
        if sub is None:
            raise NotFound(f"no subscription {sub_id!r}")
        return sub

    async def update_subscription(self, sub_id: str, given: SubscriptionInput) -> Subscription:
        if given.url is not None:
            await check_given_url(self.guard, "url", given.url)

        def change(sub: Subscription) -> Subscription:
            out = replace(sub)
            if given.url is not None:
                out.url = given.url
            if given.events is not None:
                out.events = given.events
            if "description" in given.given:
                out.description = given.description
            if given.enabled is not None:
                out.enabled = given.enabled
            return out

        updated = await self.store.update_subscription(sub_id, change, self.clock.now())
        if updated is None:
            raise NotFound(f"no subscription {sub_id!r}")
        return updated

    async def rotate_secret(self, sub_id: str) -> tuple[Subscription, Keys]:
        """New keys; the current ones sign beside them for `rotation_overlap`, and so do the keys of earlier
        rotations until their own overlaps end (Keys.rotated)."""
        now = self.clock.now()
        fresh: dict[str, Keys] = {}

        def change(sub: Subscription) -> Subscription:
            old = self.keys_of(sub)
            signing_key = signing.generate_signing_key() if sub.signing == "ed25519" else None
            keys = old.rotated(signing.generate_secret(), signing_key, sub.previous_expires_at, now)
            fresh["keys"] = keys
            return replace(sub, keyring=self._seal(sub.id, keys), previous_public_key=sub.public_key,
                           public_key=signing.public_key_of(signing_key) if signing_key else None,
                           previous_expires_at=now + self.options.rotation_overlap)

        updated = await self.store.update_subscription(sub_id, change, now)
        if updated is None:
            raise NotFound(f"no subscription {sub_id!r}")
        return updated, fresh["keys"]

    async def delete_subscription(self, sub_id: str) -> None:
        if not await self.store.delete_subscription(sub_id, self.clock.now()):
            raise NotFound(f"no subscription {sub_id!r}")

    async def replay(self, sub_id: str, given: ReplayInput) -> dict[str, Any]:
        await self.get_subscription(sub_id)
        now = self.clock.now()
        until = given.until if given.until is not None else now + 1e-3
        count, more = await self.store.replay_deliveries(sub_id, since=given.since, until=until,
                                                         statuses=given.statuses, now=now)
        return {"object": "replay", "subscription_id": sub_id, "replayed": count, "has_more": more,
                "since": rfc3339(given.since), "until": rfc3339(until), "statuses": list(given.statuses)}

    # ---- deliveries -------------------------------------------------------------------------------
    async def get_delivery(self, delivery_id: str) -> Delivery:
        delivery = await self.store.get_delivery(delivery_id)
        if delivery is None:
            raise NotFound(f"no delivery {delivery_id!r}")
        return delivery

    async def retry_delivery(self, delivery_id: str) -> Delivery:
        delivery = await self.store.retry_delivery(delivery_id, self.clock.now())
        if delivery is None:
            raise NotFound(f"no delivery {delivery_id!r}")
        return delivery

    # ---- sending ----------------------------------------------------------------------------------
    def body(self, target: SendTarget, now: float) -> bytes:
        """The Standard Webhooks payload: type, the event's time, the task with fresh signed image links."""
        settings = self.settings

        def image_url(image_id: str) -> str:
            return self.signer.image_url(settings.server.public_url, image_id, now=now, ttl=settings.archive.link_ttl)

        payload = {"type": target.delivery.event_type, "timestamp": rfc3339(target.event_created_at),
                   "data": with_image_urls(target.event_data or {}, image_url)}
        return jsontext.http_body(payload)

    async def send(self, url: str, msg_id: str, body: bytes, keys: list[str], now: float) -> Sent:
        """POST one signed attempt; never raises for anything the network or the subscriber does."""
        headers = {"content-type": "application/json", "user-agent": f"relay/{__version__}",
                   **signing.headers(msg_id, body, keys, now=now)}
        timeout = self.options.timeout
        started = time.perf_counter()
        status: int | None = None
        snippet: bytes = b""
        retry_after: str | None = None
        location: str | None = None
        blocked = False
        try:
            async with asyncio.timeout(timeout):
                async with self.client.request("POST", url, timeout, data=body, headers=headers) as response:
                    status = response.status
                    retry_after = response.headers.get("retry-after")
                    location = response.headers.get("location")
                    while len(snippet) < RESPONSE_LIMIT:
                        chunk = await response.content.read(RESPONSE_LIMIT - len(snippet))
                        if not chunk:
                            break
                        snippet += chunk
            error = None
        except TimeoutError:
            error = (f"timeout: no answer within {timeout:g} s" if status is None
                     else f"timeout: the response body did not finish within {timeout:g} s")
        except BlockedAddress as exc:
            # Raised by the guard at connect time (a DNS failure is a connection error instead, below,
            # and is retried): policy, so no later attempt would get through.
            error = f"blocked_address: {exc}; not retried"
            blocked = True
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            # ValueError: a header value the subscriber sent that aiohttp refuses to parse.
            error = f"connection_error: {type(exc).__name__}: {exc}" if status is None else f"read_error: {exc}"
        latency = (time.perf_counter() - started) * 1000
        if error is None and status is not None and not 200 <= status < 300:
            error = f"HTTP {status}"
            if 300 <= status < 400:
                error += f": redirect to {location or '(no Location)'} not followed"
        # Kept as text for GET /v1/deliveries and the console: a binary answer's NULs become U+FFFD, as its invalid
        # UTF-8 does, and so do lone surrogates in the error (aiohttp decodes a header that is not UTF-8, say a
        # redirect's Location, with surrogateescape): neither database could store them (relay.validation).
        text = storable_text(snippet[:RESPONSE_LIMIT].decode("utf-8", errors="replace")) if snippet else None
        return Sent(status_code=status, latency_ms=round(latency, 2), response=text,
                    error=storable_text(error[:ERROR_LIMIT]) if error else None,
                    retry_after=parse_retry_after(retry_after, now), blocked=blocked)

    def attempt(self, delivery: Delivery, url: str, at: float, sent: Sent) -> Attempt:
        return Attempt(delivery_id=delivery.id, number=delivery.attempts + 1, at=at, url=url,
                       origin=delivery.round_origin, status_code=sent.status_code, latency_ms=sent.latency_ms,
                       response=sent.response, error=sent.error, subscription_id=delivery.subscription_id)


def build_delivery_service(settings: Settings, store: Store, clock: Clock, *, guard: NetGuard, signer: Signer,
                           signing_secret: str, shared_lanes: bool = False,
                           tls: ssl.SSLContext | None = None) -> DeliveryService:
    """The service as the runtime wires it: keys from config, or derived from the signing secret."""
    from relay.deliveries.secrets import task_webhook_secret

    d = settings.deliveries
    box = SecretBox(d.encryption_key or signing_secret, [*d.previous_encryption_keys, signing_secret])
    return DeliveryService(settings, store, clock, guard=guard, signer=signer, box=box,
                           task_secret=task_webhook_secret(d.task_webhook_secret, signing_secret),
                           shared_lanes=shared_lanes, tls=tls)
