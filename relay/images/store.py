"""Image stores: where archived bytes live, named by their sha256.

Keys are relative and content-addressed: `ab/cd/<sha256>.<ext>`. The same
bytes always get the same key, so storing twice (a retried archive job, two
tasks with one image) is a no-op, and a key never changes meaning.

`ImageStore` is the interface, backend-neutral: large downloads land in a local
`tmp_dir()` and `put_file` takes the verified temp file in; `put_bytes` takes a
verified body that was small enough to be held in memory (most images: see
relay.images.download); `stat`/`open` serve it back (size, then the bytes as a
stream), `check` is /readyz's probe.
`LocalImageStore` keeps files under one directory (temp files on the same
filesystem, so the final move is an atomic rename: readers see a whole file or
none); `relay.images.s3.S3ImageStore` keeps objects in an S3-compatible bucket
under the same keys. `open_image_store` picks one from the settings.

A write the filesystem refuses (ENOSPC, EDQUOT, EROFS, EIO …) is the store
being unavailable, not the image being bad: `unavailable_on_oserror` turns it
into a retryable ArchiveError(code="image_store_unavailable") with a message
that says so ("the image store could not be written: No space left on device").
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import re
import tempfile
import time
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from relay.errors import ArchiveError

if TYPE_CHECKING:
    from relay.config import StorageSettings

_SHA256 = re.compile(r"[0-9a-f]{64}")
_EXT = re.compile(r"[a-z0-9]{1,8}")
_KEY = re.compile(r"([0-9a-f]{2})/([0-9a-f]{2})/([0-9a-f]{64})\.([a-z0-9]{1,8})")
IMAGE_STORE_UNAVAILABLE = "image_store_unavailable"
CHUNK = 256 * 1024      # bytes per read when an image is streamed out of a store
CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp", "gif": "image/gif"}


@contextlib.contextmanager
def unavailable_on_oserror() -> Iterator[None]:
    """Raise a failed filesystem call of the image store as a retryable ArchiveError naming the cause."""
    try:
        yield
    except OSError as exc:
        raise ArchiveError(f"the image store could not be written: {exc.strerror or exc}",
                           code=IMAGE_STORE_UNAVAILABLE) from exc


def image_key(sha256: str, ext: str) -> str:
    """The store key for bytes with this sha256 (lowercase hex) and extension."""
    if not _SHA256.fullmatch(sha256):
        raise ValueError(f"not a lowercase hex sha256: {sha256!r}")
    ext = ext.lower().lstrip(".")
    if not _EXT.fullmatch(ext):
        raise ValueError(f"bad file extension: {ext!r}")
    return f"{sha256[:2]}/{sha256[2:4]}/{sha256}.{ext}"


def check_key(key: str) -> None:
    # Keys come from our own database, but a key is also a path: never let one
    # escape the root (no "..", no absolute paths).
    m = _KEY.fullmatch(key)
    if m is None or m.group(3)[:2] != m.group(1) or m.group(3)[2:4] != m.group(2):
        raise ValueError(f"not an image store key: {key!r}")


@dataclass
class StoredImage:
    """An image being read out of a store: its size, then its bytes (`chunks`, to be iterated once)."""

    size: int
    chunks: AsyncGenerator[bytes, None]
    path: Path | None = None   # a local file with the same bytes, when the store keeps one (served directly)

    async def aclose(self) -> None:
        """Release the open file or connection without reading the rest (e.g. the client went away)."""
        await self.chunks.aclose()


class ImageStore(abc.ABC):
    """Content-addressed storage for archived images."""

    @abc.abstractmethod
    def tmp_dir(self) -> Path:
        """A local directory for downloads in progress (created if missing)."""

    @abc.abstractmethod
    async def put_file(self, tmp_path: Path, sha256: str, ext: str) -> str:
        """Move the finished temp file into the store and return its key. Idempotent.

        The temp file is consumed (moved or deleted) on success. Raises ArchiveError
        (retryable) if the store cannot take it.
        """

    @abc.abstractmethod
    async def put_bytes(self, data: bytes, sha256: str, ext: str) -> str:
        """Store `data` (verified, whose sha256 is `sha256`) and return its key. Idempotent.

        Raises ArchiveError (retryable) if the store cannot take it. Blocks the event loop in no file-system call.
        """

    @abc.abstractmethod
    async def stat(self, key: str) -> int | None:
        """The size in bytes of the image stored under `key`, or None if there is none.

        Raises ValueError for a malformed key, ArchiveError(code="image_store_unavailable") if the store
        cannot be asked now.
        """

    async def exists(self, key: str) -> bool:
        """True if `key` is stored."""
        return await self.stat(key) is not None

    @abc.abstractmethod
    async def open(self, key: str) -> StoredImage | None:
        """The stored image under `key` for reading, or None if there is none. Errors as for `stat`."""

    @abc.abstractmethod
    def location(self, key: str) -> str:
        """Where `key` is kept, for people (a file path, an s3:// URL): logs, `relay demo`."""

    @abc.abstractmethod
    async def check(self) -> None:
        """Readiness: raise ArchiveError if the store cannot be used now (quickly: /readyz waits for it)."""

    @abc.abstractmethod
    async def delete(self, key: str) -> bool:
        """Remove the image under `key`: True if it was there. Idempotent.

        Only retention calls this, after the database has settled that no image uses the key's sha256 (see
        relay.store.retention). Raises ValueError for a malformed key, ArchiveError(code=
        "image_store_unavailable") if the store cannot do it now.
        """

    async def sweep_tmp(self, older_than: float) -> int:
        """Delete temp files not modified for `older_than` seconds (left by a crash). Returns the count."""
        return await asyncio.to_thread(_sweep_dir, self.tmp_dir(), older_than)

    async def count_tmp(self, older_than: float) -> int:
        """How many temp files `sweep_tmp(older_than)` would delete now (a dry run)."""
        return await asyncio.to_thread(lambda: len(_old_files(self.tmp_dir(), older_than)))


class LocalImageStore(ImageStore):
    """Images as files under `root`: `root/ab/cd/<sha256>.<ext>`, temp files in `root/tmp`."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._tmp = self.root / "tmp"

    def tmp_dir(self) -> Path:
        self._tmp.mkdir(parents=True, exist_ok=True)
        return self._tmp

    def open_path(self, key: str) -> Path:
        """The file holding `key` (it may not exist): local stores only. Raises ValueError for a malformed key."""
        check_key(key)
        return self.root / key

    def location(self, key: str) -> str:
        return str(self.open_path(key))

    async def put_file(self, tmp_path: Path, sha256: str, ext: str) -> str:
        key = image_key(sha256, ext)
        dest = self.root / key
        with unavailable_on_oserror():
            await asyncio.to_thread(self._put_sync, Path(tmp_path), dest)
        return key

    @staticmethod
    def _put_sync(tmp_path: Path, dest: Path) -> None:
        if dest.exists():
            # Same name means same bytes: keep the stored copy, drop ours. The directory is still fsynced before
            # the key is reported: another process may have renamed the file in and not fsynced it yet.
            tmp_path.unlink(missing_ok=True)
            _fsync_dir(dest.parent)
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Data on disk before the rename makes it visible; the rename on disk
        # (directory fsync) before we report the key to the database.
        with tmp_path.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, dest)
        _fsync_dir(dest.parent)

    async def put_bytes(self, data: bytes, sha256: str, ext: str) -> str:
        key = image_key(sha256, ext)
        dest = self.root / key
        with unavailable_on_oserror():
            # One trip to a thread for the whole of it: temp file, write, fsync, rename, directory fsync.
            await asyncio.to_thread(self._put_bytes_sync, data, dest)
        return key

    def _put_bytes_sync(self, data: bytes, dest: Path) -> None:
        if dest.exists():
            _fsync_dir(dest.parent)     # same name, same bytes; its rename made durable before the key is used
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Written beside the other temp files and renamed in whole, as put_file's are: readers see all or nothing.
        fd, name = tempfile.mkstemp(dir=self.tmp_dir(), prefix="put-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(name, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(name)
            raise
        _fsync_dir(dest.parent)

    async def exists(self, key: str) -> bool:
        path = self.open_path(key)
        return await asyncio.to_thread(path.is_file)

    async def stat(self, key: str) -> int | None:
        path = self.open_path(key)
        try:
            info = await asyncio.to_thread(path.stat)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ArchiveError(f"the image store could not be read: {exc.strerror or exc}",
                               code=IMAGE_STORE_UNAVAILABLE) from exc
        return info.st_size

    async def open(self, key: str) -> StoredImage | None:
        size = await self.stat(key)
        if size is None:
            return None
        path = self.open_path(key)
        return StoredImage(size=size, chunks=_read_chunks(path), path=path)

    async def delete(self, key: str) -> bool:
        path = self.open_path(key)
        try:
            await asyncio.to_thread(path.unlink)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise ArchiveError(f"the image store could not delete {key}: {exc.strerror or exc}",
                               code=IMAGE_STORE_UNAVAILABLE) from exc
        # The emptied ab/cd/ folders stay: removing one could race an archive's rename into it.
        return True

    async def check(self) -> None:
        try:
            await asyncio.to_thread(self._check_sync)
        except OSError as exc:
            raise ArchiveError(f"image store {self.root} is not writable: {exc}", code="store_unavailable") from exc

    def _check_sync(self) -> None:
        tmp = self.tmp_dir()
        probe = tmp / f".probe-{os.getpid()}-{time.monotonic_ns()}"
        try:
            with probe.open("wb") as f:
                f.write(b"ok")
                f.flush()
                os.fsync(f.fileno())
        finally:
            probe.unlink(missing_ok=True)



def open_image_store(storage: StorageSettings) -> ImageStore:
    """The image store the settings choose: `images_url = "s3://…"` → S3ImageStore, else the local directory."""
    if storage.images_url.startswith("s3://"):
        from relay.images.s3 import S3ImageStore   # obstore is imported only by those who use it
        return S3ImageStore.from_settings(storage)
    return LocalImageStore(Path(storage.images_dir))


async def _read_chunks(path: Path) -> AsyncGenerator[bytes, None]:
    # The file is opened on the first read: a body never iterated (served by path instead) holds nothing open.
    handle = await asyncio.to_thread(path.open, "rb")
    try:
        while chunk := await asyncio.to_thread(handle.read, CHUNK):
            yield chunk
    finally:
        handle.close()


def _old_files(tmp: Path, older_than: float) -> list[Path]:
    """Files of `tmp` not modified for `older_than` seconds (by the wall clock: file times are wall-clock times)."""
    if not tmp.is_dir():
        return []
    cutoff = time.time() - older_than
    found = []
    for entry in tmp.iterdir():
        try:
            if entry.is_file() and entry.stat().st_mtime < cutoff:
                found.append(entry)
        except FileNotFoundError:
            pass  # finished (moved into the store) or swept meanwhile
    return found


def _sweep_dir(tmp: Path, older_than: float) -> int:
    removed = 0
    for entry in _old_files(tmp, older_than):
        try:
            entry.unlink()
            removed += 1
        except FileNotFoundError:
            pass  # another replica swept it first
    return removed


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not supported everywhere (e.g. Windows); the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
