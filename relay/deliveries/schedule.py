"""When to try a delivery again, and what a subscriber's answer means. Pure.

The schedule lists the delay before each attempt of a round: the first entry
is the delay of the first attempt (0: at once), entry k the wait after attempt
k failed; when the list is used up the delivery has failed (dead letter).
Every delay gets ±jitter. A `Retry-After` from the subscriber is honoured
within [scheduled delay, 2 × scheduled base] (the Svix rule): it can slow a
retry down, never speed it up or stall the schedule.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from email.utils import parsedate_to_datetime

DEFAULT_SCHEDULE = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)

SUCCEEDED = "succeeded"
GONE = "gone"
RETRY = "retry"
REFUSED = "refused"     # the SSRF guard refused the address: no later attempt can succeed, fail now


def first_delay(schedule: Sequence[float], jitter: float, rng: random.Random | None = None) -> float:
    """The delay of a round's first attempt."""
    return _jittered(schedule[0], jitter, rng)


def next_delay(done: int, schedule: Sequence[float], jitter: float, retry_after: float | None = None,
               rng: random.Random | None = None) -> float | None:
    """Seconds until the next attempt after `done` failed attempts of this round; None when exhausted."""
    if done >= len(schedule):
        return None
    base = schedule[done]
    delay = _jittered(base, jitter, rng)
    if retry_after is not None:
        delay = min(max(retry_after, delay), max(2 * base, delay))
    return delay


def _jittered(base: float, jitter: float, rng: random.Random | None) -> float:
    return base * (rng or random).uniform(1 - jitter, 1 + jitter)


def classify(status_code: int | None, *, blocked: bool = False) -> str:
    """2xx: succeeded; 410: gone (stop, disable the subscription); refused by the SSRF guard: refused
    (fail at once); anything else or no answer (a DNS failure included): retry."""
    if blocked:
        return REFUSED
    if status_code is not None and 200 <= status_code < 300:
        return SUCCEEDED
    if status_code == 410:
        return GONE
    return RETRY


def parse_retry_after(value: str | None, now: float) -> float | None:
    """`Retry-After` as seconds from `now` (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    text = value.strip()
    # ASCII digits only: str.isdigit() is also true for "²" (which float() refuses) and "١٢" (not HTTP).
    if text.isascii() and text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        return None
    try:
        return max(0.0, when.timestamp() - now)
    except (OverflowError, ValueError):
        return None
