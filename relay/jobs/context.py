"""What job handlers share: the store, the providers, the clock, the image store, the settings."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


from relay.clock import Clock
from relay.config import Settings
from relay.errors import ProviderUnavailable, RelayError
from relay.fastclient import GuardedSession
from relay.images.store import ImageStore
from relay.links import Signer
from relay.models import Job, Task
from relay.outage import retry_delay
from relay.providers.base import Provider
from relay.ratelimit import RateLimiter
from relay import ids
from relay.store.base import Store


@dataclass
class JobContext:
    settings: Settings
    store: Store
    clock: Clock
    providers: dict[str, Provider]
    image_store: ImageStore
    http: GuardedSession                    # guarded client for image downloads and inputs (aiohttp)
    signer: Signer
    limiters: dict[str, RateLimiter] = field(default_factory=dict)
    # Callback URLs are handed to providers only when this relay serves /callbacks (see relay.web).
    callbacks_enabled: bool = False

    def provider(self, name: str) -> Provider:
        try:
            return self.providers[name]
        except KeyError:
            raise RelayError(f"provider {name!r} is not configured any more") from None

    async def throttle(self, name: str) -> None:
        """Wait for the provider's shared request budget."""
        limiter = self.limiters.get(name)
        if limiter is not None:
            await limiter.acquire()

    def callback_url(self, provider: str, task_id: str) -> str:
        token = self.signer.callback_token(provider, task_id)
        return f"{self.settings.server.public_url}/callbacks/{provider}/{task_id}/{token}"

    def first_poll_delay(self, provider: str, estimate: float | None) -> float:
        """The provider's own estimate when given, else the configured initial delay."""
        configured = self.settings.providers[provider].poll_initial_delay
        base = configured if configured is not None else self.settings.polling.initial_delay
        if estimate is not None and estimate > 0:
            return min(max(estimate, base), self.settings.polling.max_delay)
        return base

    def safety_net_delay(self, estimate: float | None) -> float:
        """How long to wait for a callback before polling anyway: twice the provider's estimate (at least
        10 s), never more than callbacks.safety_net_seconds; that setting alone when there is no estimate."""
        cap = self.settings.callbacks.safety_net_seconds
        if estimate is not None and estimate > 0:
            return min(cap, max(10.0, 2 * estimate))
        return cap

    def next_poll_delay(self, polls: int) -> float:
        """Backoff with jitter up to the cap, after `polls` polls without completion."""
        p = self.settings.polling
        # The exponent held where any backoff has long passed any cap: 1.6 ** 1510 overflows a float, which a
        # task polled for 12 h at 30 s reached.
        delay = min(p.max_delay, p.initial_delay * (p.backoff ** min(polls, 64)))
        return delay * random.uniform(1 - p.jitter, 1 + p.jitter)

    def unavailable_delay(self, failures: int, exc: ProviderUnavailable) -> float:
        """When to ask a provider again after `failures` answers in a row that were not answers (429, 5xx, a
        timeout, junk): relay.outage.retry_delay with the worker's retry_base and retry_cap. Submits and polls
        re-run on it until the task's deadline, not for the worker's few attempts: a provider down for twenty
        minutes must not fail tasks whose deadline is thirty away."""
        worker = self.settings.worker
        return retry_delay(failures, exc.retry_after, worker.retry_base, worker.retry_cap)

    def before_deadline(self, task: Task, delay: float) -> float:
        """`delay`, shortened so that the task's next run comes no later than its deadline (where it fails)."""
        if task.deadline_at is None:
            return delay
        return min(delay, max(0.0, task.deadline_at - self.clock.now()))

    def poll_job(self, task_id: str, delay: float, polls: int = 0) -> Job:
        now = self.clock.now()
        return Job(id=ids.new_id("job", now), kind="poll", task_id=task_id, payload={"polls": polls},
                   run_at=now + delay, dedupe_key=f"poll:{task_id}")
