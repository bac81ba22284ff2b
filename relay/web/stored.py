"""Serving a file of the image store (an archived image, an uploaded edit input): the one way, for GET and HEAD.

Served by relay from any image store (a local directory or a bucket), so ETags, signed links and API keys work
the same on every replica, and the bucket need not be reachable by clients. HEAD asks the store for the size
only (a bucket's object is not read). A store that cannot be read now is a 503 with Retry-After; a file that is
not there (also one retention deletes while it is being served) is the caller's `missing` error.
"""

from __future__ import annotations

import os

from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from relay.errors import ApiError, ArchiveError
from relay.images.store import ImageStore


class ImageStoreUnavailable(ApiError):
    """The image store cannot be read now (an addition to API.md's codes)."""

    status, code = 503, "image_store_unavailable"


async def stored_file(request: Request, store: ImageStore, key: str, *, media_type: str | None,
                      headers: dict[str, str], missing: ApiError) -> Response:
    """The file under `key` (HEAD: its headers and size)."""
    try:
        if request.method == "HEAD":
            size = await store.stat(key)
            if size is None:
                raise missing
            return Response(status_code=200, media_type=media_type, headers={**headers, "Content-Length": str(size)})
        body = await store.open(key)
    except ArchiveError as exc:
        raise ImageStoreUnavailable(exc.message, headers={"Retry-After": "5"}) from exc
    if body is None:
        raise missing
    if body.path is not None:   # a local file: Starlette serves it (ranges included)
        await body.aclose()
        return StoredFileResponse(body.path, missing=missing, media_type=media_type, headers=headers)
    return StreamingResponse(body.chunks, media_type=media_type, headers={**headers, "Content-Length": str(body.size)})


class StoredFileResponse(FileResponse):
    """A local image store's file, served by Starlette (ranges included). Retention may delete the file between the
    handler finding it and this response reading it: then, as long as nothing was sent, the answer is `missing`
    in relay's error shape (Starlette raises a RuntimeError, a 500). Gone after the headers were sent, the response
    breaks off, as for any read error."""

    def __init__(self, path: str | os.PathLike[str], *, missing: ApiError, media_type: str | None,
                 headers: dict[str, str]) -> None:
        super().__init__(path, media_type=media_type, headers=headers)
        self._missing = missing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)
        try:
            await super().__call__(scope, receive, sending)
        except (RuntimeError, FileNotFoundError):
            if started or os.path.exists(self.path):
                raise
            raise self._missing from None
