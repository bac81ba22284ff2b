"""Image verification: are these bytes (a file, or a body held in memory) really a PNG/JPEG/WebP/GIF, and how
big is the image?

Two checks, cheap then thorough: `sniff_image` reads magic bytes (enough to
pick a file extension or refuse obvious garbage), `inspect_image` has Pillow
parse and fully decode the file, so truncated or corrupt data, a type that
differs from the claimed one, and decompression bombs are refused with
`InvalidImage` (a permanent `SourceGone`: retrying cannot fix the bytes).
"""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from relay.errors import InvalidImage

# gpt-image-1.5 outputs are at most 1536x1024 (1.6 Mpx); 64 Mpx leaves room for
# any future size while keeping a decode's memory bounded (~256 MB RGBA).
MAX_PIXELS = 64_000_000

# Content type -> (Pillow format name, file extension used by the image store).
TYPES: dict[str, tuple[str, str]] = {
    "image/png": ("PNG", "png"),
    "image/jpeg": ("JPEG", "jpg"),
    "image/webp": ("WEBP", "webp"),
    "image/gif": ("GIF", "gif"),
}
_ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg", "png": "image/png", "jpeg": "image/jpeg",
            "jpg": "image/jpeg", "webp": "image/webp", "gif": "image/gif"}
_PIL_FORMATS = [fmt for fmt, _ in TYPES.values()]


@dataclass(frozen=True)
class ImageInfo:
    content_type: str
    width: int
    height: int

    @property
    def ext(self) -> str:
        """The file extension the store uses for this type ("png", "jpg", "webp", "gif")."""
        return TYPES[self.content_type][1]


def sniff_image(head: bytes) -> str | None:
    """The content type the magic bytes at the start of a file announce, or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return None


def normalize_content_type(value: str | None) -> str | None:
    """'image/JPG; charset=x' -> 'image/jpeg'; also accepts bare format names ('png'). None if empty."""
    if not value:
        return None
    base = value.split(";", 1)[0].strip().lower()
    return _ALIASES.get(base, base) or None


def inspect_image(source: str | Path | bytes, *, expected: str | None = None,
                  max_pixels: int = MAX_PIXELS) -> ImageInfo:
    """Decode the image in `source` (a file's path, or the bytes themselves) and return its real type and size.

    Blocking (a full decode): call it through `asyncio.to_thread` or `ainspect_image`.
    Raises InvalidImage if the file is not a supported image, is corrupt or
    truncated, has more than `max_pixels` pixels, or is not of the `expected`
    content type (when one is given; "image/jpg" and "jpeg" count as image/jpeg).
    """
    def opened(fmt: str) -> Image.Image:
        return Image.open(io.BytesIO(source) if isinstance(source, bytes) else Path(source), formats=[fmt])

    if isinstance(source, bytes):
        sniffed = sniff_image(source[:16])
    else:
        with Path(source).open("rb") as f:
            sniffed = sniff_image(f.read(16))
    if sniffed is None:
        raise InvalidImage("not a PNG, JPEG, WebP or GIF image")
    claimed = normalize_content_type(expected)
    if claimed is not None and claimed != sniffed:
        raise InvalidImage(f"expected {claimed} but the bytes are {sniffed}")
    fmt = TYPES[sniffed][0]
    try:
        # Two opens, as Pillow requires: verify() leaves the image unusable.
        with opened(fmt) as im:
            _check_pixels(im.size, max_pixels)
            im.verify()
        with opened(fmt) as im:
            width, height = im.size
            # A full decode cost 5-30 ms per image, the largest CPU cost of archiving, so each format
            # is checked as cheaply as still catches a cut or damaged body:
            # - PNG: verify() has already walked every chunk to IEND and checked each CRC.
            # - WebP: its RIFF container must account for every byte of the file, chunk by chunk.
            # - JPEG (no checksums, no length): decoded at 1/8 scale (draft), which still reads every
            #   entropy-coded byte, so truncation is caught at half the cost.
            if fmt == "WEBP":
                _check_riff(source if isinstance(source, bytes) else Path(source).read_bytes())
            elif fmt != "PNG":
                if fmt == "JPEG":
                    im.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                im.load()
    except InvalidImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard fires inside open() for images far above MAX_PIXELS.
        raise InvalidImage(f"image too large to decode safely: {exc}") from None
    except OSError as exc:
        if exc.errno is not None:
            # The disk, not the image: a file descriptor short (EMFILE), EIO, the file gone. Raised as it is, so
            # the archive is tried again (InvalidImage fails the task for good while its link may still live).
            # Pillow's own reports of corrupt data carry no errno.
            raise
        raise InvalidImage(f"corrupt or truncated {sniffed}: {exc}") from None
    except (SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports corrupt data through these too (and through OSError above), depending on the plugin.
        raise InvalidImage(f"corrupt or truncated {sniffed}: {exc}") from None
    return ImageInfo(content_type=sniffed, width=width, height=height)


async def ainspect_image(source: str | Path | bytes, *, expected: str | None = None,
                         max_pixels: int = MAX_PIXELS) -> ImageInfo:
    """`inspect_image` off the event loop."""
    return await asyncio.to_thread(inspect_image, source, expected=expected, max_pixels=max_pixels)


def _check_riff(data: bytes) -> None:
    """A WebP file's RIFF size and its chunks' sizes must add up to exactly the file's length."""
    declared = int.from_bytes(data[4:8], "little") + 8
    if declared != len(data):
        raise InvalidImage(f"corrupt or truncated image/webp: RIFF says {declared} bytes, file has {len(data)}")
    offset, image_chunk = 12, False
    while offset < len(data):
        if offset + 8 > len(data):
            raise InvalidImage("corrupt or truncated image/webp: a chunk header is cut off")
        fourcc, size = data[offset:offset + 4], int.from_bytes(data[offset + 4:offset + 8], "little")
        image_chunk |= fourcc in (b"VP8 ", b"VP8L", b"ANMF", b"ALPH")
        offset += 8 + size + (size & 1)    # chunks are padded to an even size
        if offset > len(data):
            raise InvalidImage(f"corrupt or truncated image/webp: chunk {fourcc!r} runs past the end")
    if not image_chunk:
        raise InvalidImage("corrupt image/webp: no image data chunk")


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise InvalidImage(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InvalidImage(f"image is {width}x{height}, over the {max_pixels:,} pixel limit")
