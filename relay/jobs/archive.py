"""The archive job: save one image before its source link dies, verified and content-addressed.

Streams the source (or decodes inline base64) into memory, or a temp file when
large (relay.images.download), with a size cap and a timeout, checks it is a
real image of the type it claims, puts it into the image store under its
sha256, and records it; the task succeeds when its
last image is saved. A dead or invalid source fails the task with the reason.

A transient failure of the source (5xx, 429, a timeout, a cut body) is tried again with
backoff for as long as the source link lives, not a fixed number of times.
An image store that cannot be written (a full disk; a bucket that is unreachable,
throttling, missing or refusing relay's credentials) is our outage, not the
image's fault: the job comes back with backoff as a planned re-run (so it uses
up no attempts) for as long as the source lives, logged once per interval, and
the image is saved when space returns. If the source dies first, the task fails
saying the store was why ("the image store could not be written: …").
"""

from __future__ import annotations

import asyncio
import logging
import time

from relay import metrics
from relay.clock import rfc3339
from relay.errors import ArchiveError, BlockedAddress, SourceGone
from relay.images.download import Downloaded, decode_b64, download
from relay.images.store import IMAGE_STORE_UNAVAILABLE, unavailable_on_oserror
from relay.images.verify import inspect_image
from relay.jobs.context import JobContext
from relay.models import ImageRecord, Job
from relay.outage import Outage, backoff
from relay.queue import Again
from relay.store.archives import is_archive_id
from relay.store.base import ArchiveResult

log = logging.getLogger("relay.archive")

LINK_DIED = frozenset({"source_expired", "source_gone"})


class ArchiveHandler:
    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        # Logging and counting only: each job keeps its own backoff (see _again_later), on these same terms.
        worker = ctx.settings.worker
        self.outage = Outage("image store", log, base=worker.retry_base, cap=worker.retry_cap)

    async def run(self, job: Job) -> Again | None:
        ctx = self.ctx
        image_id = str(job.payload.get("image_id"))
        found = await ctx.store.get_image_source(image_id)
        if found is None:
            return None
        image, inline = found
        if image.status != "pending":
            return None
        if is_archive_id(image.task_id):      # an archive of a link (POST /v1/archives): pending → archiving
            await ctx.store.archive_started(image.task_id, ctx.clock.now())
        provider = str(job.payload.get("provider", "unknown"))   # archive jobs of older versions lack it
        started = time.perf_counter()
        try:
            result = await self._save(image, inline, provider)
        except SourceGone as exc:
            metrics.labeled(metrics.ARCHIVE_SECONDS, "failed").observe(time.perf_counter() - started)
            await self._fail(image_id, *self._reason(job, exc))
            return None
        except BlockedAddress as exc:
            metrics.labeled(metrics.ARCHIVE_SECONDS, "failed").observe(time.perf_counter() - started)
            await self._fail(image_id, "blocked_address", str(exc))
            return None
        except ArchiveError as exc:
            metrics.labeled(metrics.ARCHIVE_SECONDS, "retry").observe(time.perf_counter() - started)
            return self._again_later(job, exc)
        self.outage.succeeded()
        metrics.labeled(metrics.ARCHIVE_SECONDS, "archived").observe(time.perf_counter() - started)
        metrics.labeled(metrics.ARCHIVE_BYTES, provider).inc(result.bytes)
        await ctx.store.image_archived(image_id, result, ctx.clock.now(), owner_id=image.task_id)
        return None

    async def _save(self, image: ImageRecord, inline: str | None, provider: str) -> ArchiveResult:
        """Fetch (into memory or the store's temp dir), verify, put in. A temp file never outlives this call."""
        with unavailable_on_oserror():   # any OSError here is our disk's: relay.images.download maps the network's
            downloaded = await self._fetch(image, inline, provider)
            try:
                info = await asyncio.to_thread(inspect_image, downloaded.body)
                # Before the file is put: retention must not delete it meanwhile (relay.store.retention).
                await self.ctx.store.hold_image(image.id, downloaded.sha256, self.ctx.clock.now())
                key = await downloaded.put_into(self.ctx.image_store, info.ext)
            finally:
                downloaded.release()
        return ArchiveResult(sha256=downloaded.sha256, content_type=info.content_type, width=info.width,
                             height=info.height, bytes=downloaded.bytes, path=key)

    async def _fetch(self, image: ImageRecord, inline: str | None, provider: str) -> Downloaded:
        ctx = self.ctx
        settings = ctx.settings.archive
        tmp_dir = ctx.image_store.tmp_dir     # called only for a body that goes to a file
        if inline:
            return await decode_b64(inline, tmp_dir, max_bytes=settings.max_bytes)
        if image.source_url:
            if image.source_expires_at is not None and ctx.clock.now() > image.source_expires_at:
                raise SourceGone(f"the source link expired at {rfc3339(image.source_expires_at)} "
                                 "before it could be archived", code="source_expired")
            started, status = time.perf_counter(), None
            try:
                downloaded = await download(ctx.http, image.source_url, tmp_dir,
                                            max_bytes=settings.max_bytes, timeout=settings.timeout)
                status = 200
            except ArchiveError as exc:
                status = exc.status
                raise
            finally:
                # The link in the line goes through the log filter like any other (a signed query is redacted).
                metrics.provider_request(provider, "download", status, time.perf_counter() - started,
                                         what=f"image {image.id} GET {image.source_url}")
            return downloaded
        raise SourceGone("the provider gave neither a URL nor inline data for this image", code="no_source")

    @staticmethod
    def _reason(job: Job, exc: SourceGone) -> tuple[str, str]:
        """Why the image is lost: its source, or, if the store kept it from being saved in time, the store."""
        store_error = job.payload.get("store_error")
        if store_error and exc.code in LINK_DIED:
            return IMAGE_STORE_UNAVAILABLE, (f"{store_error}, and the source link died before the store came back "
                                             f"({exc.message})")
        last_error = job.payload.get("last_error")
        if last_error and exc.code in LINK_DIED:
            return exc.code, f"{exc.message}; the last try before that failed: {last_error}"
        return exc.code, exc.message

    def _again_later(self, job: Job, exc: ArchiveError) -> Again:
        """A transient failure (the source's 5xx, 429, a timeout, a cut body; our store's outage): try again
        with this job's own backoff, for as long as the source link lives.

        A planned re-run, so the worker's attempt count does not run out while the link is alive: the
        guarantee is "archived before the link dies, or failed with a clear reason", and a source that
        answers 500 ten times in a row may still answer the eleventh time (found by tests/chaos).
        """
        failures = int(job.payload.get("failures", 0)) + 1
        payload = {**job.payload, "failures": failures, "last_error": f"{exc.code}: {exc.message}"[:500]}
        if exc.code == IMAGE_STORE_UNAVAILABLE:
            self.outage.failed(exc, f"archiving image {job.payload.get('image_id')}")
            payload["store_error"] = exc.message
        else:
            log.info("image %s: %s; trying again", job.payload.get("image_id"), exc.code)
        worker = self.ctx.settings.worker
        return Again(backoff(failures, worker.retry_base, worker.retry_cap), payload=payload)

    async def _fail(self, image_id: str, code: str, message: str) -> None:
        await self.ctx.store.image_failed(image_id, code, message, self.ctx.clock.now())

    async def give_up(self, job: Job, reason: str) -> None:
        await self._fail(str(job.payload.get("image_id")), "archive_failed",
                         f"the image could not be saved: {reason}")
