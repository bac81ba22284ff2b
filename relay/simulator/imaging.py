"""Real image bytes for simulated tasks: drawing with Pillow and a bounded in-memory cache.

An image is a pure function of (task id, index, size, format, prompt), so its
sha256 is reproducible and an evicted image can be drawn again byte for byte.
Drawing runs in a thread so a burst of downloads does not stall the event loop.

Pre-rendered mode (`relay simulate --prerendered`, for benchmarks): one image per (size, format,
transparency) is drawn once, and each task's image is that picture with a chunk of its own added
(the task id and index), so every image still has its own sha256 and is still a valid file of its
type, for about a microsecond of CPU instead of the 20-30 ms of a Pillow drawing. The prompt text is
then not drawn into the picture.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import struct
import textwrap
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from .tasks import SimTask

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}

# Bytes kept in memory; beyond this the least recently used images are redrawn on demand.
CACHE_BUDGET = 256 * 1024 * 1024


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def render(task_id: str, index: int, width: int, height: int, fmt: str, prompt: str,
           transparent: bool = False) -> bytes:
    """Draw one image: a two-colour gradient, a few shapes and the prompt text."""
    digest = hashlib.sha256(f"{task_id}:{index}".encode()).digest()
    c1, c2, c3 = digest[0:3], digest[3:6], digest[6:9]
    ramp = Image.linear_gradient("L").resize((width, height))
    # Each channel blends two seed colours along the gradient: cheap, varied, deterministic.
    channels = [ramp.point(lambda v, a=c1[i], b=c2[i]: a + (b - a) * v // 255) for i in range(3)]
    image = Image.merge("RGB", channels)
    if transparent and fmt in ("png", "webp"):
        image = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    for k in range(3):
        x = digest[10 + k] * width // 256
        y = digest[13 + k] * height // 256
        r = 60 + digest[16 + k] % 200
        colour = tuple(c3[(k + j) % 3] for j in range(3)) + (255,)
        if k % 2:
            draw.rectangle((x - r, y - r // 2, x + r, y + r // 2), fill=colour)
        else:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    font = _font(max(width // 36, 12))
    lines = textwrap.wrap(prompt, width=48)[:8] + [f"#{index} {task_id}"]
    draw.multiline_text((width // 20, height // 20), "\n".join(lines), font=font,
                        fill=(255, 255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0, 255))
    out = io.BytesIO()
    if fmt == "jpeg":
        image.convert("RGB").save(out, "JPEG", quality=85)
    elif fmt == "webp":
        image.save(out, "WEBP", quality=80, method=0)
    else:
        image.save(out, "PNG", compress_level=1)
    return out.getvalue()


def with_unique_chunk(data: bytes, fmt: str, tag: bytes) -> bytes:
    """`data` (a rendered image) with an ancillary chunk holding `tag`: the same picture, its own bytes.

    PNG: a tEXt chunk (with its CRC) before IEND. JPEG: a COM segment right after SOI. WebP: an unknown
    RIFF chunk after the image data (decoders skip it), the RIFF size grown to match.
    """
    if fmt == "png":
        iend = data.rindex(b"IEND") - 4          # the IEND chunk starts with its 4-byte length
        body = b"tEXt" + b"relay-sim\x00" + tag
        chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
        return data[:iend] + chunk + data[iend:]
    if fmt == "jpeg":
        return data[:2] + b"\xff\xfe" + struct.pack(">H", len(tag) + 2) + tag + data[2:]
    if fmt == "webp":
        padded = tag + (b"\x00" if len(tag) % 2 else b"")
        chunk = b"RSIM" + struct.pack("<I", len(tag)) + padded
        out = data + chunk
        return out[:4] + struct.pack("<I", len(out) - 8) + out[8:]
    raise ValueError(f"unknown image format {fmt!r}")


def prerendered_base(width: int, height: int, fmt: str, transparent: bool) -> bytes:
    """The one picture pre-rendered mode serves for this size and format (drawn once per process)."""
    return _base(width, height, fmt, transparent)


@lru_cache(maxsize=64)
def _base(width: int, height: int, fmt: str, transparent: bool) -> bytes:
    return render("prerendered", 0, width, height, fmt, "pre-rendered image (relay simulate --prerendered)",
                  transparent)


@dataclass
class ImageInfo:
    data: bytes
    sha256: str
    content_type: str
    width: int
    height: int


class ImageCache:
    """Draws each (task, index) image once, keeps recent bytes, and every sha256 forever."""

    def __init__(self, budget: int = CACHE_BUDGET, *, prerendered: bool = False) -> None:
        self._budget = budget
        self.prerendered = prerendered
        self.clear()

    def clear(self) -> None:
        self._bytes: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._pending: dict[str, asyncio.Future[bytes]] = {}
        self.sha256: dict[str, str] = {}
        self._bases: dict[tuple[int, int, str, bool], bytes] = {}

    async def get(self, task: SimTask, index: int) -> ImageInfo:
        token = task.tokens[index]
        data = self._bytes.get(token)
        if data is not None:
            self._bytes.move_to_end(token)
        else:
            data = await self._draw(task, index, token)
        return ImageInfo(data, self.sha256[token], CONTENT_TYPES[task.fmt], task.width, task.height)

    async def _draw(self, task: SimTask, index: int, token: str) -> bytes:
        pending = self._pending.get(token)
        if pending is not None:  # someone is drawing it already: share their result
            return await asyncio.shield(pending)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[token] = future
        try:
            if self.prerendered:
                data = await self._from_base(task, index)
            else:
                data = await asyncio.to_thread(
                    render, task.id, index, task.width, task.height, task.fmt, task.prompt,
                    task.background == "transparent",
                )
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it, nobody else must
            raise
        finally:
            self._pending.pop(token, None)
        self.sha256[token] = hashlib.sha256(data).hexdigest()
        future.set_result(data)
        self._bytes[token] = data
        self._size += len(data)
        while self._size > self._budget and len(self._bytes) > 1:
            _, old = self._bytes.popitem(last=False)
            self._size -= len(old)
        return data

    async def _from_base(self, task: SimTask, index: int) -> bytes:
        transparent = task.background == "transparent"
        key = (task.width, task.height, task.fmt, transparent)
        if key not in self._bases:      # the first image of this size and format: drawn once, in a thread
            self._bases[key] = await asyncio.to_thread(prerendered_base, *key)
        return with_unique_chunk(self._bases[key], task.fmt, f"{task.id}:{index}".encode())
