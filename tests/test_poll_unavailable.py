"""When a provider does not answer a poll or a submit: how long relay waits, and what the task fails as at its
deadline (relay.jobs.context.unavailable_delay, relay.jobs.poll). End to end: tests/test_pipeline.py."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from relay.config import load_settings
from relay.errors import ProviderUnavailable, RateLimited
from relay.jobs.context import RETRY_AFTER_CAP, JobContext
from relay.jobs.poll import PollHandler
from relay.models import Job

SETTINGS = load_settings(None, {"RELAY_WORKER_RETRY_BASE": "2", "RELAY_WORKER_RETRY_CAP": "300",
                                "RELAY_POLLING_MAX_DELAY": "30"})


def delay(failures: int, exc: ProviderUnavailable) -> float:
    ctx: Any = SimpleNamespace(settings=SETTINGS)
    return JobContext.unavailable_delay(ctx, failures, exc)


def test_a_retry_after_longer_than_the_backoff_is_honoured_up_to_an_hour() -> None:
    assert delay(1, RateLimited(retry_after=42.0)) == 42.0
    assert delay(1, RateLimited(retry_after=10 * RETRY_AFTER_CAP)) == RETRY_AFTER_CAP


def test_a_retry_after_of_zero_never_asks_again_at_once() -> None:
    """A provider answering 429 with Retry-After: 0 (or a date in the past) on every call: backoff still grows."""
    assert 1.6 <= delay(1, RateLimited(retry_after=0.0)) <= 2.4
    assert 0.8 * 300 <= delay(12, RateLimited(retry_after=0.0)) <= 1.2 * 300


def test_without_a_retry_after_the_backoff_grows_with_the_failures_in_a_row() -> None:
    assert 1.6 <= delay(1, ProviderUnavailable("502")) <= 2.4
    assert 6.4 <= delay(3, ProviderUnavailable("502")) <= 9.6


def past_deadline(payload: dict[str, Any], now: float) -> tuple[str, str]:
    ctx: Any = SimpleNamespace(settings=SETTINGS)
    return PollHandler(ctx)._past_deadline(Job(id="job_1", kind="poll", payload=payload), now)


def test_at_the_deadline_a_provider_that_stopped_answering_is_named_unavailable() -> None:
    code, message = past_deadline({"polls": 9, "failures": 7, "last_error": "provider_unavailable: HTTP 502",
                                   "failing_since": 1000.0}, now=1000.0 + 30)
    assert code == "provider_unavailable" and "deadline" in message and "502" in message


def test_at_the_deadline_one_failed_poll_does_not_make_a_slow_task_an_unavailable_provider() -> None:
    code, message = past_deadline({"polls": 40, "failures": 1, "last_error": "provider_unavailable: HTTP 502",
                                   "failing_since": 1000.0}, now=1000.0 + 3)
    assert code == "timeout" and "the last poll failed" in message and "502" in message
    assert past_deadline({"polls": 40}, now=1000.0) == (
        "timeout", "the provider did not finish the task before the deadline")
