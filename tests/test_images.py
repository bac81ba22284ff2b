"""Images: verification with Pillow and the content-addressed local store."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from relay.errors import ArchiveError, InvalidImage, SourceGone
from relay.images.store import LocalImageStore, image_key
from relay.images.verify import ainspect_image, inspect_image, sniff_image

# ---------------------------------------------------------------- images


def make_image(fmt: str, size: tuple[int, int] = (64, 48)) -> bytes:
    mode = "RGBA" if fmt in ("PNG", "WEBP") else "RGB"
    im = Image.new(mode, size, (200, 30, 90) if mode == "RGB" else (200, 30, 90, 255))
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


PNG = make_image("PNG", (64, 48))
JPEG = make_image("JPEG", (40, 30))
WEBP = make_image("WEBP", (32, 32))
GIF = make_image("GIF", (10, 12))


def png_header_only(width: int, height: int) -> bytes:
    """A syntactically valid PNG announcing `width` x `height`, with (almost) no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def write(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------- verify


@pytest.fixture(params=["path", "bytes"])
def source(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[bytes], Path | bytes]:
    """inspect_image's input both ways: a file's path, or the bytes themselves (a body held in memory)."""
    if request.param == "bytes":
        return lambda data: data
    return lambda data: write(tmp_path, "img", data)


@pytest.mark.parametrize(("data", "expected"), [
    (PNG, "image/png"), (JPEG, "image/jpeg"), (WEBP, "image/webp"), (GIF, "image/gif"),
    (b"<html>", None), (b"", None), (b"RIFF\0\0\0\0WAVE", None),
])
def test_sniff_image_reads_magic_bytes(data: bytes, expected: str | None) -> None:
    """Magic bytes name the four accepted types and nothing else."""
    assert sniff_image(data[:16]) == expected


@pytest.mark.parametrize(("data", "ctype", "size"), [
    (PNG, "image/png", (64, 48)), (JPEG, "image/jpeg", (40, 30)), (WEBP, "image/webp", (32, 32)),
])
def test_inspect_image_reports_type_and_size(source: Callable[[bytes], Path | bytes], data: bytes, ctype: str,
                                             size: tuple[int, int]) -> None:
    """Real Pillow-made images are accepted with their true type and dimensions."""
    info = inspect_image(source(data), expected=ctype)
    assert (info.content_type, info.width, info.height) == (ctype, *size)


def test_inspect_image_accepts_jpeg_aliases(source: Callable[[bytes], Path | bytes]) -> None:
    """'image/jpg' and 'jpeg' both mean image/jpeg when claimed."""
    path = source(JPEG)
    assert inspect_image(path, expected="image/jpg").ext == "jpg"
    assert inspect_image(path, expected="jpeg; q=1").content_type == "image/jpeg"


def test_png_claimed_as_jpeg_is_refused(source: Callable[[bytes], Path | bytes]) -> None:
    """Bytes of another type than the claimed one are refused."""
    with pytest.raises(InvalidImage, match="expected image/jpeg but the bytes are image/png"):
        inspect_image(source(PNG), expected="image/jpeg")


def test_garbage_is_refused(source: Callable[[bytes], Path | bytes]) -> None:
    """Non-image bytes are refused with code invalid_image (a permanent SourceGone)."""
    with pytest.raises(InvalidImage) as info:
        inspect_image(source(b"<html>expired</html>"))
    assert info.value.code == "invalid_image" and isinstance(info.value, SourceGone)


@pytest.mark.parametrize("data", [PNG[: len(PNG) // 2], PNG[:-12], JPEG[: len(JPEG) // 2],
                                  JPEG[: len(JPEG) * 9 // 10], WEBP[: len(WEBP) // 2], WEBP[:-1],
                                  b"\x89PNG\r\n\x1a\nnot really"])
def test_truncated_or_corrupt_image_is_refused(source: Callable[[bytes], Path | bytes], data: bytes) -> None:
    """Right magic bytes but cut-off or corrupt data are refused (PNG by its chunk CRCs and IEND, JPEG and
    WebP by decoding; a PNG that lost its IEND chunk too)."""
    with pytest.raises(InvalidImage):
        inspect_image(source(data))


@pytest.mark.parametrize("dims", [(10_000, 8_000), (30_000, 30_000)])
def test_decompression_bomb_header_is_refused(source: Callable[[bytes], Path | bytes], dims: tuple[int, int]) -> None:
    """A tiny file announcing a huge image is refused before any pixels are decoded."""
    with pytest.raises(InvalidImage, match="pixel limit|too large"):
        inspect_image(source(png_header_only(*dims)))


async def test_ainspect_image_runs_off_the_loop(tmp_path: Path) -> None:
    """The async wrapper gives the same answer."""
    assert (await ainspect_image(write(tmp_path, "img", WEBP))).content_type == "image/webp"


# ---------------------------------------------------------------- store


async def test_store_is_content_addressed_and_idempotent(tmp_path: Path) -> None:
    """Same bytes -> same key; storing twice keeps one file and consumes both temp files."""
    store = LocalImageStore(tmp_path / "images")
    sha = hashlib.sha256(PNG).hexdigest()
    first = write(store.tmp_dir(), "a.part", PNG)
    key = await store.put_file(first, sha, "png")
    assert key == f"{sha[:2]}/{sha[2:4]}/{sha}.png" == image_key(sha, ".PNG")
    assert store.open_path(key).read_bytes() == PNG and not first.exists()
    second = write(store.tmp_dir(), "b.part", PNG)
    assert await store.put_file(second, sha, "png") == key
    assert not second.exists() and await store.exists(key)
    assert list(store.tmp_dir().iterdir()) == []


async def test_store_puts_bytes_under_the_same_key_once(tmp_path: Path) -> None:
    """A body held in memory is stored under the key put_file gives the same bytes, whole, once; no temp file
    is left behind."""
    store = LocalImageStore(tmp_path / "images")
    sha = hashlib.sha256(PNG).hexdigest()
    key = await store.put_bytes(PNG, sha, "png")
    assert key == image_key(sha, "png") and store.open_path(key).read_bytes() == PNG
    stored = store.open_path(key).stat()
    assert await store.put_bytes(PNG, sha, "png") == key
    assert store.open_path(key).stat().st_ino == stored.st_ino      # not written again (a rename makes a new inode)
    assert await store.put_file(write(store.tmp_dir(), "a.part", PNG), sha, "png") == key
    assert list(store.tmp_dir().iterdir()) == []


async def test_store_exists_is_false_for_missing_and_refuses_bad_keys(tmp_path: Path) -> None:
    """A missing key is False; a path-like key is refused, never resolved outside the root."""
    store = LocalImageStore(tmp_path)
    assert not await store.exists(image_key("0" * 64, "png"))
    for bad in ("../../etc/passwd", "/etc/passwd", f"ab/cd/{'0' * 64}.png", "aa/aa/x.png"):
        with pytest.raises(ValueError):
            store.open_path(bad)


async def test_store_check_passes_on_writable_dir_and_fails_otherwise(tmp_path: Path) -> None:
    """Readiness: a writable root passes; a root that cannot be a directory raises ArchiveError."""
    await LocalImageStore(tmp_path / "ok").check()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArchiveError, match="not writable"):
        await LocalImageStore(tmp_path / "file").check()


async def test_store_sweeps_old_temp_files_only(tmp_path: Path) -> None:
    """Leftovers of a crash are deleted after their age passes; fresh downloads are kept."""
    store = LocalImageStore(tmp_path)
    old, fresh = write(store.tmp_dir(), "old.part", b"x"), write(store.tmp_dir(), "new.part", b"y")
    past = time.time() - 7200
    os.utime(old, (past, past))
    assert await store.sweep_tmp(3600) == 1
    assert not old.exists() and fresh.exists()


def test_a_flipped_byte_inside_png_pixel_data_is_refused(source: Callable[[bytes], Path | bytes]) -> None:
    """A PNG is not decoded, so its chunk CRCs are what must catch corrupt pixel data."""
    data = bytearray(PNG)
    idat = data.index(b"IDAT")
    data[idat + 4 + 10] ^= 0xFF     # a byte inside the IDAT payload; its CRC no longer matches
    with pytest.raises(InvalidImage):
        inspect_image(source(bytes(data)))


@pytest.mark.parametrize("errno_", [24, 5, 2])     # EMFILE, EIO, ENOENT
def test_a_disk_error_while_verifying_is_raised_not_taken_for_a_bad_image(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, errno_: int) -> None:
    """Reading the downloaded file fails (out of file descriptors under load, an I/O error, the file gone): that is
    the disk, and the archive must be tried again. As InvalidImage it failed the task for good while the
    provider's link still lived. Pillow's own reports of corrupt data carry no errno and stay InvalidImage."""
    path = write(tmp_path, "img.png", PNG)
    real_open = Image.open

    def failing_open(fp: object, *args: object, **kwargs: object) -> Image.Image:
        if isinstance(fp, Path):
            raise OSError(errno_, os.strerror(errno_))
        return real_open(fp, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Image, "open", failing_open)
    with pytest.raises(OSError) as raised:
        inspect_image(path, expected="image/png")
    assert not isinstance(raised.value, InvalidImage) and raised.value.errno == errno_
    with pytest.raises(InvalidImage):
        inspect_image(PNG[:-20])           # in memory, truncated: corrupt data, still InvalidImage
