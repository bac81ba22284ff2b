"""The archive job: save one image before its source link dies, verified and content-addressed.

Streams the source (or decodes inline base64) to a temp file with a size cap
and a timeout, checks it is a real image of the type it claims, moves it into
the image store under its sha256, and records it; the task succeeds when its
last image is saved. A dead or invalid source fails the task with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

from relay.clock import rfc3339
from relay.errors import BlockedAddress, SourceGone
from relay.images.download import decode_b64_to_file, download_to_file
from relay.images.verify import inspect_image
from relay.jobs.context import JobContext
from relay.models import Job
from relay.store.base import ArchiveResult

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif"}


class ArchiveHandler:
    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx

    async def run(self, job: Job) -> None:
        ctx = self.ctx
        image_id = str(job.payload.get("image_id"))
        found = await ctx.store.get_image_source(image_id)
        if found is None:
            return None
        image, inline = found
        if image.status != "pending":
            return None
        settings = ctx.settings.archive
        tmp_dir = ctx.image_store.tmp_dir()
        try:
            if inline:
                downloaded = await decode_b64_to_file(inline, tmp_dir, max_bytes=settings.max_bytes)
            elif image.source_url:
                if image.source_expires_at is not None and ctx.clock.now() > image.source_expires_at:
                    raise SourceGone(f"the source link expired at {rfc3339(image.source_expires_at)} "
                                     "before it could be archived", code="source_expired")
                downloaded = await download_to_file(ctx.http, image.source_url, tmp_dir,
                                                    max_bytes=settings.max_bytes, timeout=settings.timeout)
            else:
                raise SourceGone("the provider gave neither a URL nor inline data for this image", code="no_source")
        except SourceGone as exc:
            await self._fail(image_id, exc.code, exc.message)
            return None
        except BlockedAddress as exc:
            await self._fail(image_id, "blocked_address", str(exc))
            return None
        try:
            info = await asyncio.to_thread(inspect_image, downloaded.path)
            key = await ctx.image_store.put_file(downloaded.path, downloaded.sha256,
                                                 EXTENSIONS.get(info.content_type, "bin"))
        except SourceGone as exc:
            await self._fail(image_id, exc.code, exc.message)
            return None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(downloaded.path)
        await ctx.store.image_archived(image_id, ArchiveResult(
            sha256=downloaded.sha256, content_type=info.content_type, width=info.width, height=info.height,
            bytes=downloaded.bytes, path=key), ctx.clock.now())
        return None

    async def _fail(self, image_id: str, code: str, message: str) -> None:
        await self.ctx.store.image_failed(image_id, code, message, self.ctx.clock.now())

    async def give_up(self, job: Job, reason: str) -> None:
        await self._fail(str(job.payload.get("image_id")), "archive_failed",
                         f"the image could not be saved: {reason}")
