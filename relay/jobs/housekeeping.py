"""The housekeeping job: one retention sweep (relay.retention) per `retention.interval`, one job per database.

A singleton: its dedupe key `housekeeping` lets the database hold one live housekeeping job however many
replicas start and each enqueue it (`schedule`, at start). After a run the job plans its own next run (a
planned re-run of the same row, so the key is never free in between); a sweep that stopped at its time
budget comes back at once. A job that fails for good is kept dead, which frees the key: the next start of
any replica schedules a new one.
"""

from __future__ import annotations

import logging

from relay import ids
from relay.config import RetentionSettings
from relay.images.store import ImageStore
from relay.models import Job
from relay.queue import Again
from relay.retention import Sweeper
from relay.clock import Clock
from relay.store.base import Store

log = logging.getLogger("relay.retention")

KIND = "housekeeping"
DEDUPE_KEY = "housekeeping"
SOON = 1.0      # seconds before a sweep that ran out of time goes on


def housekeeping_job(now: float) -> Job:
    return Job(id=ids.new_id("job", now), kind=KIND, payload={}, run_at=now, dedupe_key=DEDUPE_KEY,
               max_attempts=100)


async def schedule(store: Store, settings: RetentionSettings, now: float) -> bool:
    """Make sure this database has its housekeeping job (due now); False if one was there already, or
    `retention.interval` is 0 (no job)."""
    if settings.interval <= 0:
        return False
    return await store.enqueue([housekeeping_job(now)]) == 1


class HousekeepingHandler:
    def __init__(self, store: Store, images: ImageStore, settings: RetentionSettings, clock: Clock) -> None:
        self.settings = settings
        self.sweeper = Sweeper(store, images, settings, now=clock.now)

    async def run(self, job: Job) -> Again | None:
        report = await self.sweeper.sweep()
        gone = ", ".join(f"{n} {what}" for what, n in report.rows() if n)
        if gone or report.file_errors:
            log.info("retention: deleted %s in %.1f s%s", gone or "nothing", report.seconds,
                     "; more left" if report.more else "")
        for problem in report.file_errors[:10]:
            log.warning("retention: could not delete %s (tried again next run)", problem)
        if report.more:
            return Again(SOON)
        # interval 0 (a job enqueued by hand, e.g. by a benchmark): one sweep, then done.
        return Again(self.settings.interval) if self.settings.interval > 0 else None

    async def give_up(self, job: Job, reason: str) -> None:
        log.error("housekeeping gave up (%s); the next start of relay schedules it again", reason)
