"""The one source of time. Production uses SystemClock; tests use ManualClock and move it."""

from __future__ import annotations

import time
from datetime import datetime, timezone


class Clock:
    def now(self) -> float:
        """Unix time in seconds."""
        raise NotImplementedError


class SystemClock(Clock):
    def now(self) -> float:
        return time.time()


class ManualClock(Clock):
    """A clock that only moves when told to (tests)."""

    def __init__(self, start: float = 1_790_000_000.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds


def rfc3339(ts: float | None) -> str | None:
    """Unix seconds → '2026-11-22T10:00:00.123Z' (None stays None)."""
    if ts is None:
        return None
    dt = datetime.fromtimestamp(ts, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def parse_rfc3339(value: str) -> float:
    """'2026-11-22T10:00:00Z' (or with offset) → unix seconds. Raises ValueError."""
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    try:
        # In UTC, not just as written: every later step (rfc3339 in answers, the store) works in UTC.
        return dt.astimezone(timezone.utc).timestamp()
    except (OverflowError, ValueError):
        # 9999-12-31T23:59:59-23:59 is a valid string whose UTC instant is in year 10000.
        raise ValueError(f"{value!r} is out of the supported range of years 1-9999") from None
