"""The nouns of delivery: subscriptions, deliveries, attempts; and which events a filter takes. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from relay.clock import rfc3339
from relay.errors import Conflict
from relay.states import ALL_EVENT_TYPES, EVENT_WILDCARDS

SIGNING_SCHEMES = ("hmac", "ed25519")
DELIVERY_STATUSES = ("pending", "succeeded", "failed", "canceled")
TERMINAL_DELIVERY = ("succeeded", "failed", "canceled")
WILDCARDS = EVENT_WILDCARDS

# Why a subscription is disabled.
DISABLED_MANUAL = "manual"          # PATCH enabled=false
DISABLED_GONE = "gone"              # the subscriber answered 410
DISABLED_FAILING = "failing"        # every attempt failed for longer than deliveries.auto_disable_after


def valid_filter(pattern: str) -> bool:
    """An exact event type, `task.*`, `archive.*`, or `*`."""
    return pattern in ALL_EVENT_TYPES or pattern in WILDCARDS


def matches(patterns: Sequence[str] | None, event_type: str) -> bool:
    """Does a filter take this event type? None (no filter) takes everything; `x.*` takes `x.` anything."""
    if patterns is None:
        return True
    for pattern in patterns:
        if pattern == "*" or pattern == event_type:
            return True
        if pattern.endswith(".*") and event_type.startswith(pattern[:-1]):
            return True
    return False


@dataclass
class Subscription:
    id: str
    url: str
    events: list[str]
    description: str | None = None
    enabled: bool = True
    disabled_reason: str | None = None
    signing: str = "hmac"
    keyring: str = ""                       # encrypted (see secrets.py); never leaves the process in clear
    public_key: str | None = None           # whpk_ when signing is ed25519
    previous_public_key: str | None = None
    previous_expires_at: float | None = None  # the previous keys sign beside the new ones until then
    failing_since: float | None = None      # first failure of the current run of failures
    created_at: float = 0.0
    updated_at: float = 0.0


@dataclass
class Delivery:
    id: str
    event_id: str
    event_type: str
    task_id: str
    subscription_id: str | None              # None: the task's own webhook_url
    url: str                                 # where it goes (a subscription's URL at its latest attempt)
    status: str = "pending"                  # pending | succeeded | failed | canceled
    attempts: int = 0                        # all attempts ever made
    round_attempts: int = 0                  # attempts in the current round (the schedule position)
    round_origin: str = "auto"               # auto | retry | replay: what started the current round
    next_attempt_at: float | None = None
    last_attempt_at: float | None = None
    last_status_code: int | None = None
    last_error: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    completed_at: float | None = None


@dataclass
class Attempt:
    delivery_id: str
    number: int                              # 1 for the first attempt of the delivery
    at: float
    url: str
    origin: str = "auto"                     # auto | retry (manual) | replay: what started its round
    status_code: int | None = None
    latency_ms: float | None = None
    response: str | None = None              # first 4 KiB of the body
    error: str | None = None
    id: int = 0
    subscription_id: str | None = None       # the delivery's (None: a task's own webhook_url)


EARLIER_KEYS_KEPT = 8      # keys of rotations before the previous one still in their overlap, at most


@dataclass(frozen=True)
class EarlierKey:
    """Keys of a rotation before the previous one, signing until `until` (their own overlap's end)."""

    secret: str
    signing_key: str | None
    until: float


@dataclass(frozen=True)
class Keys:
    """A subscription's clear keys: what signs now, and what still signs during a rotation.

    `earlier`: rotated out before `previous`, each still inside its own overlap. A rotation sent twice (a client
    retrying after a timeout, a form sent again) must not drop the secret the receiver still holds: each keeps
    signing until its own overlap ends, not until the next rotation."""

    secret: str                              # whsec_
    signing_key: str | None = None           # whsk_ for ed25519 subscriptions
    previous_secret: str | None = None
    previous_signing_key: str | None = None
    earlier: tuple[EarlierKey, ...] = ()

    def signing_keys(self, *, include_previous: bool, now: float) -> list[str]:
        """Keys to sign with, newest first. The earlier ones end no later than the previous ones do."""
        keys = [self.secret]
        if self.signing_key:
            keys.append(self.signing_key)
        if include_previous:
            keys += [k for k in (self.previous_secret, self.previous_signing_key) if k]
            for old in self.earlier:
                if now < old.until:
                    keys += [k for k in (old.secret, old.signing_key) if k]
        return keys

    def rotated(self, secret: str, signing_key: str | None, previous_until: float | None, now: float) -> Keys:
        """New keys; these become the previous ones, and the previous ones (if still signing: `previous_until`)
        join the earlier ones still inside their overlap. Conflict when EARLIER_KEYS_KEPT are inside theirs
        already: a rotation then would stop one of them signing before its overlap ends (API.md: 24 h)."""
        earlier = [old for old in self.earlier if now < old.until]
        if self.previous_secret and previous_until is not None and now < previous_until:
            earlier.insert(0, EarlierKey(self.previous_secret, self.previous_signing_key, previous_until))
        if len(earlier) > EARLIER_KEYS_KEPT:
            free_at = min(old.until for old in earlier)
            raise Conflict(f"this subscription's secret was rotated {len(earlier) + 1} times within the overlap: "
                           f"every secret rotated out keeps signing until its overlap ends, and at most "
                           f"{EARLIER_KEYS_KEPT + 2} sign at once; rotate again after {rfc3339(free_at)}")
        return Keys(secret=secret, signing_key=signing_key, previous_secret=self.secret,
                    previous_signing_key=self.signing_key, earlier=tuple(earlier))

    def to_json(self) -> dict[str, Any]:
        return {"secret": self.secret, "signing_key": self.signing_key, "previous_secret": self.previous_secret,
                "previous_signing_key": self.previous_signing_key,
                "earlier": [{"secret": o.secret, "signing_key": o.signing_key, "until": o.until} for o in self.earlier]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Keys:
        return cls(secret=data["secret"], signing_key=data.get("signing_key"),
                   previous_secret=data.get("previous_secret"), previous_signing_key=data.get("previous_signing_key"),
                   earlier=tuple(EarlierKey(o["secret"], o.get("signing_key"), float(o["until"]))
                                 for o in data.get("earlier", ())))


@dataclass
class SendTarget:
    """Everything the deliver job needs, read in one go."""

    delivery: Delivery
    event_data: dict[str, Any] | None
    event_created_at: float
    subscription: Subscription | None = None


@dataclass(frozen=True)
class Recorded:
    """What recording an attempt decided."""

    delivery: Delivery
    disabled: str | None = None              # the subscription was disabled for this reason
