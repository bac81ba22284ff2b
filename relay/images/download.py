"""Getting image bytes from a provider: stream a URL, or decode inline base64.

Bodies are streamed in chunks and hashed on the way. One of up to SPOOL_BYTES
is held in memory and handed over as bytes, so the event loop makes no
file-system call for it (creating, writing and removing temp files on the loop's
thread held it for 13 % of its busy time under bench.throughput: file creation
waits on the filesystem's journal while archive threads fsync), as long as all
bodies held at once stay within SPOOL_BUDGET_BYTES. A larger body, or one that
would go past the budget, spills to a temp file and is never held whole in
memory. A size cap and one overall deadline bound every download. Failures
are sorted at this boundary into the error tree, so archive jobs only decide
"retry" or "fail":

    ArchiveError(code=timeout | truncated | connection_failed | source_unavailable | unexpected_status)
        retryable: the deadline passed, the body stopped short, the
        connection failed, or the source said 5xx / 408 / 425 / 429
    SourceGone(code=source_gone | image_too_large | too_many_redirects | invalid_url)
        permanent: 4xx (404/410/403 …), over the size cap, a redirect loop, a non-http(s) URL
    InvalidImage(code=invalid_image)
        permanent: base64 that does not decode
    BlockedAddress
        permanent: the SSRF guard refused an address (raised by the guarded session)

Downloads go through relay.fastclient.GuardedSession (aiohttp behind the SSRF
guard; why aiohttp: see there). Redirects are followed by hand, at most
MAX_REDIRECTS hops; each hop is a request of its own, which the guard checks.
Temp files are removed on every failure path, cancellation included.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import builtins
import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import aiohttp
from yarl import URL

from relay.errors import ArchiveError, InvalidImage, SourceGone
from relay.fastclient import GuardedSession
from relay.images.verify import sniff_image

if TYPE_CHECKING:
    from relay.images.store import ImageStore

MAX_REDIRECTS = 3
CHUNK_SIZE = 64 * 1024
# A gpt-image-1.5 output is at most about 3 MB (a 1536x1024 PNG); JPEG and WebP ones a fraction of that.
SPOOL_BYTES = 4 * 1024 * 1024
# What all bodies held in memory may add up to, process-wide (8 of the largest at once).
SPOOL_BUDGET_BYTES = 32 * 1024 * 1024
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_RETRYABLE_4XX = frozenset({408, 425, 429})


class SpoolBudget:
    """The bytes that bodies held in memory add up to, against a limit (used from the event loop's thread only)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> bool:
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def give(self, size: int) -> None:
        self.held -= size


BUDGET = SpoolBudget(SPOOL_BUDGET_BYTES)


@dataclass
class Downloaded:
    """A finished body, in memory (`data`) or in a temp file (`path`): the caller verifies it, puts it into the
    image store, and calls `release()` in any case, which gives its memory back to the budget and deletes the temp
    file unless the store took it (`path` set to None)."""

    sha256: str
    bytes: int
    content_type_header: str | None
    data: builtins.bytes | None = None      # (`bytes` is the size field's name here)
    path: Path | None = None
    budget: SpoolBudget | None = None       # the budget `data` is counted in, until released
    held: int = 0                           # how much of it

    @property
    def body(self) -> builtins.bytes | Path:
        """What to verify: the bytes, or the temp file holding them."""
        body = self.data if self.data is not None else self.path
        assert body is not None, "released"
        return body

    async def put_into(self, store: ImageStore, ext: str) -> str:
        """Into `store` under its sha256 (from memory, or the temp file, which the store takes); the key."""
        if self.data is not None:
            return await store.put_bytes(self.data, self.sha256, ext)
        assert self.path is not None, "released"
        key = await store.put_file(self.path, self.sha256, ext)
        self.path = None        # the store took the file
        return key

    def release(self) -> None:
        if self.budget is not None:
            self.budget.give(self.held)
            self.budget = None
        if self.path is not None:
            # Called in `finally` blocks: a failing unlink must not hide why the body was let go (the temp
            # dir's sweep takes what is left).
            with contextlib.suppress(OSError):
                self.path.unlink(missing_ok=True)
            self.path = None


class _Spool:
    """A body as it arrives: held in memory while it fits (SPOOL_BYTES, and the budget), else in a temp file."""

    def __init__(self, tmp_dir: Callable[[], Path], budget: SpoolBudget) -> None:
        self._tmp_dir = tmp_dir
        self._budget = budget
        self._chunks: list[bytes] = []
        self._held = 0                      # bytes taken from the budget for _chunks
        self._file: BinaryIO | None = None
        self._path: Path | None = None
        self._digest = hashlib.sha256()
        self._size = 0

    def write(self, chunk: bytes) -> None:
        self._digest.update(chunk)
        self._size += len(chunk)
        if self._file is None:
            if self._size <= SPOOL_BYTES and self._budget.take(len(chunk)):
                self._held += len(chunk)
                self._chunks.append(chunk)
                return
            self._spill()
        assert self._file is not None
        # A blocking write, on purpose: 64 KiB into the page cache costs microseconds; the fsync that can
        # block is done in a thread by the store when the file is moved in.
        self._file.write(chunk)

    def _spill(self) -> None:
        """Into a temp file from here on (created on the loop's thread: only for bodies that outgrow the spool)."""
        self._file, self._path = _new_temp_file(self._tmp_dir(), "dl-")
        self._file.writelines(self._chunks)
        self._chunks = []
        self._budget.give(self._held)
        self._held = 0

    def finish(self, content_type: str | None) -> Downloaded:
        found = Downloaded(sha256=self._digest.hexdigest(), bytes=self._size, content_type_header=content_type)
        if self._file is None:
            found.data, found.budget, found.held = b"".join(self._chunks), self._budget, self._held
            self._chunks, self._held = [], 0     # now counted in `found`, until it is released
        else:
            self._file.close()
            found.path, self._path = self._path, None
        return found

    def discard(self) -> None:
        """After a failure: nothing stays counted, no temp file stays behind, and the failure is what propagates
        (closing flushes, which on a full disk raises again)."""
        self._budget.give(self._held)
        self._chunks, self._held = [], 0
        try:
            if self._file is not None:
                self._file.close()
        except OSError:
            pass
        finally:
            if self._path is not None:
                with contextlib.suppress(OSError):
                    self._path.unlink(missing_ok=True)


def _new_temp_file(tmp_dir: Path, prefix: str) -> tuple[BinaryIO, Path]:
    fd, name = tempfile.mkstemp(dir=tmp_dir, prefix=prefix, suffix=".part")
    return os.fdopen(fd, "wb"), Path(name)


async def download(http: GuardedSession, url: str, tmp_dir: Callable[[], Path], *,
                   max_bytes: int, timeout: float, budget: SpoolBudget = BUDGET) -> Downloaded:
    """Stream `url` into memory or, past the spool, a new temp file in `tmp_dir()`, hashing as it goes.

    Raises as the module docstring says; on any failure no temp file is left behind and no memory stays counted.
    """
    spool = _Spool(tmp_dir, budget)
    try:
        content_type = await _fetch(http, url, max_bytes=max_bytes, timeout=timeout, sink=spool.write)
        return spool.finish(content_type)
    except BaseException:
        spool.discard()
        raise


async def fetch_bytes(http: GuardedSession, url: str, *, max_bytes: int, timeout: float) -> tuple[bytes, str]:
    """Fetch a small body (a reference image) into memory with the same guards as `download`.

    Returns the bytes and their content type: the sniffed image type when the
    magic bytes say so, else the Content-Type header, else application/octet-stream.
    """
    buf = bytearray()
    header = await _fetch(http, url, max_bytes=max_bytes, timeout=timeout, sink=buf.extend)
    content_type = sniff_image(bytes(buf[:16])) or (header or "").split(";", 1)[0].strip()
    return bytes(buf), content_type or "application/octet-stream"


async def decode_b64(data: str, tmp_dir: Callable[[], Path], *, max_bytes: int,
                     budget: SpoolBudget = BUDGET) -> Downloaded:
    """Decode inline base64 (bare or a `data:` URL): the bytes in memory when the text's decoded size fits the
    spool and the budget, as a download's would, else in a new temp file in `tmp_dir()`.

    Raises InvalidImage for undecodable base64 and SourceGone(code="image_too_large")
    over `max_bytes`. The decode runs in a thread: a few MB of base64 is milliseconds
    of CPU that should not stall the loop.
    """
    decoded_at_most = len(data) // 4 * 3 + 3
    held = decoded_at_most if decoded_at_most <= SPOOL_BYTES and budget.take(decoded_at_most) else 0

    def adopt(found: Downloaded) -> Downloaded:
        if found.data is not None:
            found.budget, found.held = budget, held
        else:
            budget.give(held)
        return found

    def let_go(work: asyncio.Future[Downloaded]) -> None:
        """The thread's result, which nobody will take: its temp file deleted, its memory given back."""
        if work.cancelled() or work.exception() is not None:
            budget.give(held)
        else:
            adopt(work.result()).release()

    # Shielded: cancelled (the job's deadline, a shutdown), the caller goes at once while the thread runs on to
    # the end, so what it makes is let go when it ends rather than left in a temp file nobody removes.
    work = asyncio.ensure_future(asyncio.to_thread(_decode_b64_sync, data, tmp_dir, max_bytes, held > 0))
    try:
        found = await asyncio.shield(work)
    except BaseException:
        if work.done():
            let_go(work)
        else:
            work.add_done_callback(let_go)
        raise
    return adopt(found)


def _decode_b64_sync(data: str, tmp_dir: Callable[[], Path], max_bytes: int, in_memory: bool) -> Downloaded:
    content_type: str | None = None
    if data.startswith("data:"):
        header, comma, data = data.partition(",")
        if not comma or not header.endswith(";base64"):
            raise InvalidImage("not a base64 data: URL")
        content_type = header[len("data:"):].split(";", 1)[0] or None
    data = "".join(data.split())  # line-wrapped base64 is still base64
    # Refuse by length before allocating the decoded bytes.
    if len(data) // 4 * 3 - 2 > max_bytes:
        raise SourceGone(f"inline image is larger than {max_bytes} bytes", code="image_too_large")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImage(f"inline image is not valid base64: {exc}") from None
    if len(raw) > max_bytes:
        raise SourceGone(f"inline image is larger than {max_bytes} bytes", code="image_too_large")
    if in_memory:
        return Downloaded(sha256=hashlib.sha256(raw).hexdigest(), bytes=len(raw), content_type_header=content_type,
                          data=raw)
    f, path = _new_temp_file(tmp_dir(), "b64-")
    try:
        with f:
            f.write(raw)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return Downloaded(path=path, sha256=hashlib.sha256(raw).hexdigest(), bytes=len(raw),
                      content_type_header=content_type)


async def _fetch(http: GuardedSession, url: str, *, max_bytes: int, timeout: float,
                 sink: Callable[[bytes], object]) -> str | None:
    """GET `url` following up to MAX_REDIRECTS redirects, feed the body to `sink`, return Content-Type."""
    try:
        async with asyncio.timeout(timeout):
            current = _parsed(url)
            for _hop in range(MAX_REDIRECTS + 1):
                with _map_transport_errors():
                    async with http.request("GET", current, timeout) as response:
                        location = response.headers.get("location")
                        if response.status in _REDIRECT_STATUSES and location:
                            current = _parsed(location, response.url)
                            continue
                        try:
                            _check_status(response.status)
                            declared = _declared_length(response)
                            if declared is not None and declared > max_bytes:
                                raise SourceGone(f"image is {declared} bytes, over the {max_bytes} byte limit",
                                                 code="image_too_large")
                            await _read_body(response, max_bytes, sink, declared)
                        except ArchiveError as exc:
                            exc.status = response.status
                            raise
                        content_type: str | None = response.headers.get("content-type")
                        return content_type
            raise SourceGone(f"more than {MAX_REDIRECTS} redirects", code="too_many_redirects")
    except TimeoutError:
        raise ArchiveError(f"download did not finish within {timeout:g} s", code="timeout") from None


def _parsed(text: str, base: URL | None = None) -> str:
    """`text` as a URL (joined to `base`, for a redirect's Location); SourceGone if it is not one."""
    try:
        return str(base.join(URL(text)) if base is not None else URL(text))
    except ValueError as exc:
        raise SourceGone(f"invalid URL: {exc}", code="invalid_url") from None


@contextlib.contextmanager
def _map_transport_errors() -> Iterator[None]:
    """aiohttp's errors, turned into retryable or permanent archive errors."""
    try:
        yield
    except aiohttp.NonHttpUrlClientError as exc:
        raise SourceGone(f"not an http(s) URL: {exc}", code="invalid_url") from exc
    except aiohttp.InvalidURL as exc:
        raise SourceGone(f"invalid URL: {exc}", code="invalid_url") from exc
    except TimeoutError as exc:      # the session's own deadline (aiohttp's ServerTimeoutError is one)
        raise ArchiveError(f"source timed out: {type(exc).__name__}", code="timeout") from exc
    except aiohttp.ClientError as exc:
        raise ArchiveError(f"cannot reach source: {type(exc).__name__}: {exc}", code="connection_failed") from exc


def _check_status(status: int) -> None:
    if status == 200:
        return
    if status >= 500 or status in _RETRYABLE_4XX:
        raise ArchiveError(f"source answered HTTP {status}; will retry", code="source_unavailable")
    if 400 <= status < 500:
        # Expired signed links answer 403 (S3, GCS) as often as 404/410; none come back.
        raise SourceGone(f"source link is gone (HTTP {status})", code="source_gone")
    raise ArchiveError(f"unexpected HTTP {status} from source", code="unexpected_status")


def _declared_length(response: aiohttp.ClientResponse) -> int | None:
    if response.headers.get("content-encoding", "identity").lower() != "identity":
        return None        # the header counts the bytes on the wire, the body is counted decoded
    try:
        return int(response.headers["content-length"])
    except (KeyError, ValueError):
        return None


async def _read_body(response: aiohttp.ClientResponse, max_bytes: int, sink: Callable[[bytes], object],
                     declared: int | None) -> None:
    received = 0
    try:
        async for chunk in response.content.iter_chunked(CHUNK_SIZE):
            received += len(chunk)
            if received > max_bytes:
                raise SourceGone(f"image is over the {max_bytes} byte limit", code="image_too_large")
            sink(chunk)
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, ConnectionResetError) as exc:
        raise ArchiveError(f"body ended early after {received} bytes: {exc}", code="truncated") from exc
    # aiohttp already refuses a short body (ClientPayloadError); this covers a server that closes cleanly.
    if declared is not None and received < declared:
        raise ArchiveError(f"body ended after {received} of {declared} bytes", code="truncated")
