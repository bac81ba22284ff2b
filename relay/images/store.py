"""Image stores: where archived bytes live, named by their sha256.

Keys are relative and content-addressed: `ab/cd/<sha256>.<ext>`. The same
bytes always get the same key, so storing twice (a retried archive job, two
tasks with one image) is a no-op, and a key never changes meaning.

`ImageStore` is the interface; `LocalImageStore` keeps files under one
directory. Files arrive as temp files written in `tmp_dir()` (same filesystem,
so the final move is an atomic rename: readers see a whole file or none).

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
import time
from collections.abc import Iterator
from pathlib import Path

from relay.errors import ArchiveError

_SHA256 = re.compile(r"[0-9a-f]{64}")
_EXT = re.compile(r"[a-z0-9]{1,8}")
_KEY = re.compile(r"([0-9a-f]{2})/([0-9a-f]{2})/([0-9a-f]{64})\.([a-z0-9]{1,8})")
IMAGE_STORE_UNAVAILABLE = "image_store_unavailable"


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


def _check_key(key: str) -> None:
    # Keys come from our own database, but a key is also a path: never let one
    # escape the root (no "..", no absolute paths).
    m = _KEY.fullmatch(key)
    if m is None or m.group(3)[:2] != m.group(1) or m.group(3)[2:4] != m.group(2):
        raise ValueError(f"not an image store key: {key!r}")


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
    async def exists(self, key: str) -> bool:
        """True if `key` is stored."""

    @abc.abstractmethod
    async def check(self) -> None:
        """Readiness: raise ArchiveError if the store cannot take writes now."""


class LocalImageStore(ImageStore):
    """Images as files under `root`: `root/ab/cd/<sha256>.<ext>`, temp files in `root/tmp`."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._tmp = self.root / "tmp"

    def tmp_dir(self) -> Path:
        self._tmp.mkdir(parents=True, exist_ok=True)
        return self._tmp

    def open_path(self, key: str) -> Path:
        """The file holding `key` (it may not exist). Raises ValueError for a malformed key."""
        _check_key(key)
        return self.root / key

    async def put_file(self, tmp_path: Path, sha256: str, ext: str) -> str:
        key = image_key(sha256, ext)
        dest = self.root / key
        with unavailable_on_oserror():
            await asyncio.to_thread(self._put_sync, Path(tmp_path), dest)
        return key

    @staticmethod
    def _put_sync(tmp_path: Path, dest: Path) -> None:
        if dest.exists():
            # Same name means same bytes: keep the stored copy, drop ours.
            tmp_path.unlink(missing_ok=True)
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Data on disk before the rename makes it visible; the rename on disk
        # (directory fsync) before we report the key to the database.
        with tmp_path.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, dest)
        _fsync_dir(dest.parent)

    async def exists(self, key: str) -> bool:
        path = self.open_path(key)
        return await asyncio.to_thread(path.is_file)

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

    async def sweep_tmp(self, older_than: float) -> int:
        """Delete temp files not modified for `older_than` seconds (left by a crash). Returns the count."""
        return await asyncio.to_thread(self._sweep_sync, older_than)

    def _sweep_sync(self, older_than: float) -> int:
        if not self._tmp.is_dir():
            return 0
        cutoff = time.time() - older_than
        removed = 0
        for entry in self._tmp.iterdir():
            try:
                if entry.is_file() and entry.stat().st_mtime < cutoff:
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
