"""When a provider does not answer a poll or a submit: how long relay waits, and what the task fails as at its
deadline (relay.jobs.context.unavailable_delay, relay.jobs.poll). End to end: tests/test_pipeline.py."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from relay.config import load_settings
from relay.errors import ProviderUnavailable, RateLimited
from relay.clock import ManualClock
from relay.jobs.context import JobContext
from relay.jobs.poll import PollHandler
from relay.models import Job, Task
from relay.outage import RETRY_AFTER_CAP

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


def poll_handler(now: float) -> PollHandler:
    ctx: Any = SimpleNamespace(settings=SETTINGS, clock=ManualClock(now))
    ctx.unavailable_delay = lambda failures, exc: JobContext.unavailable_delay(ctx, failures, exc)
    ctx.before_deadline = lambda task, delay: JobContext.before_deadline(ctx, task, delay)
    return PollHandler(ctx)


def watched(deadline_at: float | None) -> Task:
    return Task(id="tsk_1", provider="apimart", request={"prompt": "p"}, provider_task_id="pt_1",
                deadline_at=deadline_at)


def test_a_poll_the_provider_did_not_answer_runs_again_no_later_than_the_deadline() -> None:
    handler = poll_handler(now=1000.0)
    again = handler._again_later(Job(id="job_1", kind="poll", payload={"polls": 3}), watched(1000.0 + 60),
                                 RateLimited(retry_after=3600.0))
    assert again.after == 60.0 and again.payload is not None
    assert again.payload["polls"] == 3 and again.payload["failures"] == 1 and again.payload["failing_since"] == 1000.0
    assert again.payload["last_error"].startswith("rate_limited")
    later = poll_handler(now=1010.0)._again_later(Job(id="job_1", kind="poll", payload=again.payload),
                                                   watched(1000.0 + 60), ProviderUnavailable("502"))
    assert later.payload is not None and later.payload["failures"] == 2 and later.payload["failing_since"] == 1000.0


async def test_a_task_without_a_deadline_leaves_a_failed_poll_to_the_worker() -> None:
    """Rows from before deadlines: the worker's attempts still bound the failures (no planned re-run forever)."""
    class Unanswered:
        caps = SimpleNamespace(default_expiry=3600.0)

        async def fetch(self, provider_task_id: str) -> Any:
            raise ProviderUnavailable("502")

    class Store:
        async def get_task(self, task_id: str, images: bool = True) -> Task:
            return watched(None)

    async def throttle(name: str) -> None:
        return None

    ctx: Any = SimpleNamespace(settings=SETTINGS, clock=ManualClock(1000.0), store=Store(), throttle=throttle,
                               provider=lambda name: Unanswered())
    with pytest.raises(ProviderUnavailable):
        await PollHandler(ctx).run(Job(id="job_1", kind="poll", task_id="tsk_1", payload={"polls": 1}))
