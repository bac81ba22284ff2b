"""Image downloads over real sockets: a local uvicorn app serving good images and every failure."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from relay.errors import ArchiveError, BlockedAddress, InvalidImage, SourceGone
from relay.images.download import decode_b64_to_file, download_to_file, fetch_bytes
from relay.images.store import LocalImageStore
from relay.images.verify import ainspect_image
from relay.fastclient import GuardedSession
from relay.netguard import NetGuard
from tests.serving import serving


def make_png(size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", size, (200, 30, 90, 255)).save(buf, format="PNG")
    return buf.getvalue()


def make_jpeg(size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(buf, format="JPEG")
    return buf.getvalue()


PNG = make_png()
JPEG = make_jpeg()


# ---------------------------------------------------------------- a local image server


async def _start(send: Any, status: int, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})


async def image_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Serves good images and every way a provider's image link can go wrong."""
    path: str = scope["path"]

    async def body(data: bytes, more: bool = False) -> None:
        await send({"type": "http.response.body", "body": data, "more_body": more})

    if path == "/good.png":
        await _start(send, 200, [(b"content-type", b"image/png"), (b"content-length", str(len(PNG)).encode())])
        await body(PNG)
    elif path.startswith("/status/"):
        await _start(send, int(path.rsplit("/", 1)[1]), [(b"content-length", b"0")])
        await body(b"")
    elif path == "/big":
        await _start(send, 200, [(b"content-length", b"5000")])
        await body(b"x" * 5000)
    elif path == "/big-chunked":  # no Content-Length: the cap must hold while streaming
        await _start(send, 200, [])
        for _ in range(3):
            await body(b"x" * 1000, more=True)
        await body(b"")
    elif path == "/truncated":  # promises the whole PNG, sends half, then the connection closes
        await _start(send, 200, [(b"content-length", str(len(PNG)).encode())])
        await body(PNG[: len(PNG) // 2], more=True)
    elif path == "/slow":  # starts, then stalls until the client gives up
        await _start(send, 200, [(b"content-length", str(len(PNG)).encode())])
        await body(PNG[:10], more=True)
        while (await receive())["type"] != "http.disconnect":
            pass
    elif path.startswith("/hop/"):  # /hop/N redirects N times before the image
        n = int(path.rsplit("/", 1)[1])
        location = b"/good.png" if n <= 1 else f"/hop/{n - 1}".encode()
        await _start(send, 302, [(b"location", location), (b"content-length", b"0")])
        await body(b"")
    elif path == "/to-file":
        await _start(send, 302, [(b"location", b"file:///etc/passwd"), (b"content-length", b"0")])
        await body(b"")
    elif path == "/to-private":
        await _start(send, 302, [(b"location", b"http://10.255.255.1:9/x.png"), (b"content-length", b"0")])
        await body(b"")
    else:
        await _start(send, 404, [(b"content-length", b"0")])
        await body(b"")


@contextlib.asynccontextmanager
async def serve(app: Any) -> AsyncIterator[int]:
    """Run `app` under uvicorn on 127.0.0.1 (a free port) for the block; yields the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    async with serving(app, sock, http="h11", lifespan="off", log_level="critical") as port:
        yield port


@pytest.fixture
async def site() -> AsyncIterator[tuple[GuardedSession, str]]:
    """A guarded session (127.0.0.0/8 allow-listed, as in tests) and the image server's base URL."""
    http = GuardedSession(NetGuard(["127.0.0.0/8"]), httpx.create_ssl_context())
    try:
        async with serve(image_app) as port:
            yield http, f"http://127.0.0.1:{port}"
    finally:
        await http.aclose()


def dl_dir(tmp_path: Path) -> Path:
    d = tmp_path / "dl"
    d.mkdir(exist_ok=True)
    return d


# ---------------------------------------------------------------- downloads


async def test_download_good_image(site: tuple[GuardedSession, str], tmp_path: Path) -> None:
    """A good image arrives whole, with its sha256, size and Content-Type header."""
    http, base = site
    got = await download_to_file(http, f"{base}/good.png", dl_dir(tmp_path), max_bytes=1 << 20, timeout=5)
    assert got.path.read_bytes() == PNG
    assert got.sha256 == hashlib.sha256(PNG).hexdigest() and got.bytes == len(PNG)
    assert got.content_type_header == "image/png"


async def test_download_verify_store_end_to_end(site: tuple[GuardedSession, str], tmp_path: Path) -> None:
    """Download into the store's temp dir, verify, move in: the stored file is the source's bytes."""
    http, base = site
    store = LocalImageStore(tmp_path / "images")
    got = await download_to_file(http, f"{base}/good.png", store.tmp_dir(), max_bytes=1 << 20, timeout=5)
    info = await ainspect_image(got.path, expected=got.content_type_header)
    key = await store.put_file(got.path, got.sha256, info.ext)
    assert store.open_path(key).read_bytes() == PNG and (info.width, info.height) == (64, 48)


@pytest.mark.parametrize("status", [410, 404, 403])
async def test_dead_link_is_source_gone(site: tuple[GuardedSession, str], tmp_path: Path, status: int) -> None:
    """404/410/403 mean the link is gone for good: SourceGone naming the status, no temp file left."""
    http, base = site
    with pytest.raises(SourceGone, match=f"HTTP {status}") as info:
        await download_to_file(http, f"{base}/status/{status}", dl_dir(tmp_path), max_bytes=1 << 20, timeout=5)
    assert info.value.code == "source_gone"
    assert list(dl_dir(tmp_path).iterdir()) == []


@pytest.mark.parametrize("status", [500, 503, 429])
async def test_server_trouble_is_retryable(site: tuple[GuardedSession, str], tmp_path: Path, status: int) -> None:
    """5xx and 429 are retryable ArchiveErrors, not SourceGone."""
    http, base = site
    with pytest.raises(ArchiveError) as info:
        await download_to_file(http, f"{base}/status/{status}", dl_dir(tmp_path), max_bytes=1 << 20, timeout=5)
    assert not isinstance(info.value, SourceGone) and info.value.code == "source_unavailable"


@pytest.mark.parametrize("path", ["/big", "/big-chunked"])
async def test_oversize_body_is_refused(site: tuple[GuardedSession, str], tmp_path: Path, path: str) -> None:
    """Over max_bytes, by Content-Length up front or while streaming: permanent image_too_large."""
    http, base = site
    with pytest.raises(SourceGone) as info:
        await download_to_file(http, f"{base}{path}", dl_dir(tmp_path), max_bytes=1500, timeout=5)
    assert info.value.code == "image_too_large"
    assert list(dl_dir(tmp_path).iterdir()) == []


async def test_truncated_body_is_retryable(site: tuple[GuardedSession, str], tmp_path: Path) -> None:
    """A body cut short of its Content-Length is ArchiveError(truncated), and the partial file is gone."""
    http, base = site
    with pytest.raises(ArchiveError) as info:
        await download_to_file(http, f"{base}/truncated", dl_dir(tmp_path), max_bytes=1 << 20, timeout=5)
    assert info.value.code == "truncated" and not isinstance(info.value, SourceGone)
    assert list(dl_dir(tmp_path).iterdir()) == []


async def test_slow_body_hits_the_deadline(site: tuple[GuardedSession, str], tmp_path: Path) -> None:
    """A body that stalls past the overall deadline is a retryable timeout, the partial file removed."""
    http, base = site
    with pytest.raises(ArchiveError) as info:
        await download_to_file(http, f"{base}/slow", dl_dir(tmp_path), max_bytes=1 << 20, timeout=0.3)
    assert info.value.code == "timeout"
    assert list(dl_dir(tmp_path).iterdir()) == []


async def test_redirects_are_followed_up_to_three(site: tuple[GuardedSession, str], tmp_path: Path) -> None:
    """Three redirects lead to the image; a fourth is refused as too many."""
    http, base = site
    got = await download_to_file(http, f"{base}/hop/3", dl_dir(tmp_path), max_bytes=1 << 20, timeout=5)
    assert got.sha256 == hashlib.sha256(PNG).hexdigest()
    got.path.unlink()
    with pytest.raises(SourceGone) as info:
        await download_to_file(http, f"{base}/hop/4", dl_dir(tmp_path), max_bytes=1 << 20, timeout=5)
    assert info.value.code == "too_many_redirects"
    assert list(dl_dir(tmp_path).iterdir()) == []


async def test_redirect_to_non_http_is_source_gone(site: tuple[GuardedSession, str], tmp_path: Path) -> None:
    """A redirect to file:// is refused permanently."""
    http, base = site
    with pytest.raises(SourceGone) as info:
        await download_to_file(http, f"{base}/to-file", dl_dir(tmp_path), max_bytes=1 << 20, timeout=5)
    assert info.value.code == "invalid_url"


async def test_redirect_to_private_address_is_blocked(site: tuple[GuardedSession, str], tmp_path: Path) -> None:
    """Each redirect hop is checked by the guard: a hop to 10.x raises BlockedAddress."""
    http, base = site
    with pytest.raises(BlockedAddress):
        await download_to_file(http, f"{base}/to-private", dl_dir(tmp_path), max_bytes=1 << 20, timeout=5)
    assert list(dl_dir(tmp_path).iterdir()) == []


async def test_blocked_source_propagates(tmp_path: Path) -> None:
    """Without an allow-list, a loopback source raises BlockedAddress and leaves no temp file."""
    http = GuardedSession(NetGuard(), httpx.create_ssl_context())
    async with serve(image_app) as port:
        with pytest.raises(BlockedAddress):
            await download_to_file(http, f"http://127.0.0.1:{port}/good.png", dl_dir(tmp_path),
                                   max_bytes=1 << 20, timeout=5)
        with pytest.raises(BlockedAddress):     # a name resolving to loopback, refused by the resolver
            await download_to_file(http, f"http://localhost:{port}/good.png", dl_dir(tmp_path),
                                   max_bytes=1 << 20, timeout=5)
    await http.aclose()
    assert list(dl_dir(tmp_path).iterdir()) == []


async def test_connection_refused_is_retryable(tmp_path: Path) -> None:
    """Nobody listening is a retryable connection failure."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # the port is now (almost certainly) closed
    http = GuardedSession(NetGuard(["127.0.0.0/8"]), httpx.create_ssl_context())
    with pytest.raises(ArchiveError) as info:
        await download_to_file(http, f"http://127.0.0.1:{port}/x.png", dl_dir(tmp_path),
                               max_bytes=1 << 20, timeout=5)
    await http.aclose()
    assert info.value.code == "connection_failed"


async def test_fetch_bytes_returns_body_and_sniffed_type(site: tuple[GuardedSession, str]) -> None:
    """Reference images come back in memory with their real type, under the same size cap."""
    http, base = site
    assert await fetch_bytes(http, f"{base}/good.png", max_bytes=1 << 20, timeout=5) == (PNG, "image/png")
    with pytest.raises(SourceGone, match="limit"):
        await fetch_bytes(http, f"{base}/big-chunked", max_bytes=1500, timeout=5)


# ---------------------------------------------------------------- base64


async def test_decode_b64_to_file(tmp_path: Path) -> None:
    """Inline base64 (bare or as a data: URL, line-wrapped or not) becomes a hashed temp file."""
    encoded = base64.b64encode(JPEG).decode()
    got = await decode_b64_to_file(encoded, tmp_path, max_bytes=1 << 20)
    assert got.path.read_bytes() == JPEG and got.sha256 == hashlib.sha256(JPEG).hexdigest()
    assert got.content_type_header is None and got.bytes == len(JPEG)
    wrapped = "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))
    got = await decode_b64_to_file(f"data:image/jpeg;base64,{wrapped}", tmp_path, max_bytes=1 << 20)
    assert got.content_type_header == "image/jpeg" and got.path.read_bytes() == JPEG


@pytest.mark.parametrize("data", ["not base64 at all!", "QUJD$", "data:image/png,QUJD"])
async def test_bad_base64_is_invalid_image(tmp_path: Path, data: str) -> None:
    """Undecodable base64 is a permanent InvalidImage, and no file is written."""
    with pytest.raises(InvalidImage):
        await decode_b64_to_file(data, tmp_path, max_bytes=1 << 20)
    assert list(tmp_path.iterdir()) == []


async def test_oversize_base64_is_refused(tmp_path: Path) -> None:
    """Inline images over max_bytes are image_too_large."""
    with pytest.raises(SourceGone) as info:
        await decode_b64_to_file(base64.b64encode(PNG).decode(), tmp_path, max_bytes=len(PNG) - 1)
    assert info.value.code == "image_too_large"
