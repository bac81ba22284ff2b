"""The circuit breaker of one provider: pure decisions over its shared state (relay.store.routing keeps it).

    closed ──(threshold consecutive submit failures)──▶ open ──(cooldown passed; one submit admitted)──▶ half_open
       ▲                                                  ▲                                                 │
       └──────────────────(the probe is accepted)─────────┴──────────(the probe fails)──────────────────────┘

While open, a task with another provider left skips this one (it is tried last, never silently dropped: a
task whose only provider is open still submits to it). Half-open admits one probe at a time; a probe that
never reports back (its replica died) is forgotten after another cooldown.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass(frozen=True)
class Circuit:
    provider: str
    state: str = CLOSED
    failures: int = 0                  # consecutive failed submits
    opened_at: float | None = None
    retry_at: float | None = None      # open: when a probe may go; half_open: when the probe is forgotten
    last_error: str | None = None
    updated_at: float = 0.0

    def describe(self) -> dict[str, object]:
        from relay.clock import rfc3339
        return {"state": self.state, "consecutive_failures": self.failures, "opened_at": rfc3339(self.opened_at),
                "retry_at": rfc3339(self.retry_at), "last_error": self.last_error}


def shut(c: Circuit, now: float) -> bool:
    """Whether no submit may go to this provider now: open (or a probe out) and not cooled down."""
    return c.state != CLOSED and c.retry_at is not None and now < c.retry_at


def admit(c: Circuit, now: float, cooldown: float) -> tuple[bool, Circuit | None]:
    """May a submit go to this provider now? (allowed, the new state to write or None)."""
    if c.state == CLOSED:
        return True, None
    if shut(c, now):
        return False, None
    # Open and cooled down, or a half-open probe that never came back: this submit is the probe.
    return True, replace(c, state=HALF_OPEN, retry_at=now + cooldown, updated_at=now)


def failed(c: Circuit, now: float, error: str, *, threshold: int, cooldown: float) -> Circuit:
    """A submit to the provider failed (it did not accept the task, or never answered)."""
    failures = c.failures + 1
    if c.state == HALF_OPEN or failures >= threshold:
        return replace(c, state=OPEN, failures=failures, opened_at=now, retry_at=now + cooldown,
                       last_error=error[:300], updated_at=now)
    return replace(c, failures=failures, last_error=error[:300], updated_at=now)


def succeeded(c: Circuit, now: float) -> Circuit:
    """The provider accepted a submit: closed, the count starts again."""
    return replace(c, state=CLOSED, failures=0, opened_at=None, retry_at=None, updated_at=now)
