"""Images in an S3-compatible bucket (AWS S3, MinIO, Cloudflare R2, Ceph RGW …): what several replicas share.

Chosen by `storage.images_url = "s3://BUCKET/PREFIX"` with `[storage.s3]` endpoint_url, region,
access_key_id, secret_access_key (see relay.config). Objects are named like the local store's files,
`PREFIX/ab/cd/<sha256>.<ext>`, so a key in the database means the same bytes on every replica.

Large downloads land on local disk first (`tmp_dir()`, under the data directory), smaller ones are held
in memory (relay.images.download): the archive job verifies the body (size cap, magic bytes, dimensions,
sha256) before `put_file` or `put_bytes` uploads it, so nothing unverified ever reaches the bucket. An
object already under the key (same name, same size) is not uploaded again: content addressing makes a
retried job or a second task with the same image free.
Requests are SigV4-signed with the payload's sha256, so the service itself refuses a body damaged on
the way; objects carry their Content-Type and an immutable Cache-Control.

Every failure of the bucket is the store's, never the image's: unreachable, 5xx, throttling (429,
SlowDown), a missing bucket, refused credentials all raise a retryable
ArchiveError(code="image_store_unavailable") whose message says which and what to fix, so the archive
job waits the outage out (relay.jobs.archive) instead of failing tasks with an internal error.

The client: obstore (Python bindings of the Rust `object_store` crate of Apache Arrow). Native asyncio
with no aiohttp/botocore underneath (a fraction of botocore's per-request Python cost, no
botocore-version pinning), typed (mypy --strict), one small wheel with no Python dependencies; it streams
an upload from a file (multipart above 5 MiB) and a download in chunks, and retries 5xx and connection
errors with backoff itself (kept short here: relay's job backoff does the long waiting).

SSRF: relay's guard (relay.netguard) is for URLs that providers, clients and subscribers hand to relay.
This client talks only to the endpoint the operator configured, which is infrastructure (often on a
private address, e.g. MinIO on the LAN), so it deliberately does not go through the guard.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import obstore
from obstore.exceptions import BaseError as ObstoreError
from obstore.exceptions import PermissionDeniedError, UnauthenticatedError
from obstore.store import S3Store

from relay.config import StorageSettings, s3_url_parts
from relay.errors import ArchiveError
from relay.images.store import (CHUNK, CONTENT_TYPES, IMAGE_STORE_UNAVAILABLE, ImageStore, StoredImage, check_key,
                                image_key, unavailable_on_oserror)

if TYPE_CHECKING:
    from obstore import GetResult
    from obstore.store import ClientConfig, RetryConfig, S3Config

CACHE_CONTROL = "public, max-age=31536000, immutable"
PROBE_PREFIX = ".relay-readyz/"     # listed by check(): nothing is ever stored there
_STORE_ERRORS = (ObstoreError, OSError, TimeoutError)

# obstore's messages: "... Server returned non-2xx status code: 403 Forbidden: <?xml …<Code>…</Code>…" and, for
# network failures, a debug dump with "kind: Connect" … message: "Connection refused".
_STATUS = re.compile(r"status code: (\d{3})( [A-Za-z ]{1,40})?")
_CODE = re.compile(r"<Code>([^<]{1,64})</Code>")
_MESSAGE = re.compile(r"<Message>([^<]{1,300})</Message>")
_KIND = re.compile(r"HttpError \{\s*kind: (\w+)")
_OS_MESSAGE = re.compile(r'message: "([^"]{1,200})"')
_THROTTLED = frozenset({"SlowDown", "RequestLimitExceeded", "TooManyRequests", "Throttling", "ThrottlingException"})


class S3ImageStore(ImageStore):
    """Content-addressed images in one bucket under one prefix; temp files of large bodies on local disk."""

    def __init__(self, bucket: str, prefix: str = "", *, tmp_root: Path | str, endpoint_url: str = "",
                 region: str = "us-east-1", access_key_id: str = "", secret_access_key: str = "",
                 timeout: float = 300.0, check_timeout: float = 3.0) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.region = region
        self.check_timeout = check_timeout
        self._tmp = Path(tmp_root)
        config: S3Config = {"region": region}
        if endpoint_url:
            config["endpoint"] = endpoint_url
        if access_key_id:   # else the AWS chain of the environment: session token, web identity, instance role
            config["access_key_id"] = access_key_id
            config["secret_access_key"] = secret_access_key
        allow_http = endpoint_url.startswith("http://")
        data: ClientConfig = {"allow_http": allow_http, "connect_timeout": timedelta(seconds=5),
                              "read_timeout": timedelta(seconds=30), "timeout": timedelta(seconds=timeout),
                              "user_agent": "relay/0.1"}
        # A few quick retries of 5xx and connection errors; relay's job backoff waits out a longer outage.
        retry: RetryConfig = {"max_retries": 2, "retry_timeout": timedelta(seconds=15),
                              "backoff": {"init_backoff": timedelta(milliseconds=100),
                                          "max_backoff": timedelta(seconds=2)}}
        self._store = S3Store(bucket, prefix=self.prefix or None, config=config, client_options=data,
                              retry_config=retry)
        # /readyz's probe: one request, no retries, a short deadline.
        probe: ClientConfig = {"allow_http": allow_http, "connect_timeout": timedelta(seconds=check_timeout),
                               "timeout": timedelta(seconds=check_timeout), "user_agent": "relay/0.1"}
        self._probe = S3Store(bucket, prefix=self.prefix or None, config=config, client_options=probe,
                              retry_config={"max_retries": 0})

    @classmethod
    def from_settings(cls, storage: StorageSettings) -> S3ImageStore:
        bucket, prefix = s3_url_parts(storage.images_url)
        s3 = storage.s3
        return cls(bucket, prefix, tmp_root=Path(storage.data_dir) / "tmp", endpoint_url=s3.endpoint_url,
                   region=s3.region or "us-east-1", access_key_id=s3.access_key_id,
                   secret_access_key=s3.secret_access_key)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def tmp_dir(self) -> Path:
        self._tmp.mkdir(parents=True, exist_ok=True)
        return self._tmp

    def location(self, key: str) -> str:
        check_key(key)
        return f"{self.url}/{key}"

    async def put_file(self, tmp_path: Path, sha256: str, ext: str) -> str:
        key = image_key(sha256, ext)
        tmp_path = Path(tmp_path)
        with unavailable_on_oserror():
            size = tmp_path.stat().st_size
        await self._upload(key, tmp_path, size)
        tmp_path.unlink(missing_ok=True)
        return key

    async def put_bytes(self, data: bytes, sha256: str, ext: str) -> str:
        """Uploaded from memory: no temp file on local disk at all."""
        key = image_key(sha256, ext)
        await self._upload(key, data, len(data))
        return key

    async def _upload(self, key: str, body: Path | bytes, size: int) -> None:
        try:
            if await self._size(key) != size:   # absent (or, never expected, not these bytes): upload
                attributes = {"Content-Type": CONTENT_TYPES.get(key.rpartition(".")[2], "application/octet-stream"),
                              "Cache-Control": CACHE_CONTROL}
                await obstore.put_async(self._store, key, body, attributes=attributes)
        except _STORE_ERRORS as exc:
            raise self._unavailable("written", exc) from exc

    async def stat(self, key: str) -> int | None:
        check_key(key)
        try:
            return await self._size(key)
        except _STORE_ERRORS as exc:
            raise self._unavailable("read", exc) from exc

    async def open(self, key: str) -> StoredImage | None:
        check_key(key)
        try:
            result = await obstore.get_async(self._store, key)
        except FileNotFoundError as exc:
            if "<Code>NoSuchBucket</Code>" in str(exc):    # the store is missing, not the image
                raise self._unavailable("read", exc) from exc
            return None
        except _STORE_ERRORS as exc:
            raise self._unavailable("read", exc) from exc
        return StoredImage(size=result.meta["size"], chunks=self._chunks(result))

    async def delete(self, key: str) -> bool:
        check_key(key)
        try:
            # S3's DELETE answers 204 whether or not the object was there: ask first, for the count.
            if await self._size(key) is None:
                return False
            await obstore.delete_async(self._store, key)
        except FileNotFoundError:
            return False
        except _STORE_ERRORS as exc:
            raise self._unavailable("written", exc) from exc
        return True

    async def _chunks(self, result: GetResult) -> AsyncGenerator[bytes, None]:
        try:
            async for chunk in result.stream(min_chunk_size=CHUNK):
                yield bytes(chunk)
        except _STORE_ERRORS as exc:
            raise self._unavailable("read", exc) from exc

    async def check(self) -> None:
        """One ListObjectsV2 of an empty prefix: the endpoint answers, the bucket exists, the credentials work."""
        try:
            async with asyncio.timeout(self.check_timeout + 1):
                await obstore.list_with_delimiter_async(self._probe, PROBE_PREFIX)
        except _STORE_ERRORS as exc:
            raise self._unavailable("reached", exc) from exc

    async def _size(self, key: str) -> int | None:
        """The object's size, None if there is none (HEAD has no body: a missing bucket looks the same)."""
        try:
            meta = await obstore.head_async(self._store, key)
        except FileNotFoundError:
            return None
        return meta["size"]

    def _unavailable(self, action: str, exc: BaseException) -> ArchiveError:
        return ArchiveError(f"the image store could not be {action}: {self.explain(exc)}",
                            code=IMAGE_STORE_UNAVAILABLE)

    def explain(self, exc: BaseException) -> str:
        """What went wrong with the bucket, in one line an operator can act on (never a credential)."""
        endpoint = self.endpoint_url or f"AWS S3 ({self.region})"
        where = f"{self.url} at {endpoint}"
        if isinstance(exc, TimeoutError):
            return f"{where} did not answer within {self.check_timeout + 1:g} s"
        text = str(exc)
        head = text.split("\n\nDebug source", 1)[0]
        status_match, code_match, message_match = _STATUS.search(head), _CODE.search(head), _MESSAGE.search(head)
        status = int(status_match.group(1)) if status_match else None
        code = code_match.group(1) if code_match else None   # HEAD answers have no body: "403 Forbidden" only
        reason = status_match.group(0).removeprefix("status code: ") if status_match else None
        detail = (f"{status} {code}" if code else reason) or type(exc).__name__
        if message_match:
            detail += f": {message_match.group(1)}"
        if code == "NoSuchBucket":
            return (f"bucket {self.bucket!r} does not exist at {endpoint}: create it, or correct "
                    "storage.images_url")
        if isinstance(exc, (PermissionDeniedError, UnauthenticatedError)) or status in (401, 403):
            return (f"{where} refused relay's credentials ({detail}): check storage.s3.access_key_id and "
                    "secret_access_key (or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and that they may "
                    "s3:GetObject, s3:PutObject, s3:ListBucket (and for retention s3:DeleteObject) on the bucket")
        if status is None:
            kind, os_message = _KIND.search(text), _OS_MESSAGE.search(text)
            reason = ", ".join(m.group(1) for m in (kind, os_message) if m) or head.splitlines()[0][:200]
            return f"{where} is unreachable ({reason})"
        if status >= 500 or status == 429 or code in _THROTTLED:
            return f"{where} is unavailable ({detail})"
        return f"{where} refused the request ({detail})"
