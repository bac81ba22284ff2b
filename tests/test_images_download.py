"""Image downloads over real sockets: a local uvicorn app serving good images and every failure."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hashlib
import io
import socket
import tempfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from relay.errors import ArchiveError, BlockedAddress, InvalidImage, SourceGone
from relay.images import download as download_module
from relay.images.download import Downloaded, SpoolBudget, decode_b64, download, fetch_bytes
from relay.images.store import LocalImageStore
from relay.images.verify import ainspect_image
from relay.fastclient import GuardedSession
from relay.netguard import NetGuard
from tests.harness import wait_for
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


# Where a body goes: "memory", a budget with room; "file", a budget of nothing, so it spills from its first chunk.
MODES = ["memory", "file"]


def budget_for(mode: str) -> SpoolBudget:
    return SpoolBudget(1 << 30 if mode == "memory" else 0)


async def fetch(http: GuardedSession, url: str, tmp_path: Path, *, mode: str = "memory", max_bytes: int = 1 << 20,
                timeout: float = 5, budget: SpoolBudget | None = None) -> Downloaded:
    return await download(http, url, lambda: dl_dir(tmp_path), max_bytes=max_bytes, timeout=timeout,
                          budget=budget if budget is not None else budget_for(mode))


# ---------------------------------------------------------------- downloads


async def test_download_good_image_into_memory(site: tuple[GuardedSession, str], tmp_path: Path) -> None:
    """A good image arrives whole, with its sha256, size and Content-Type header; held in memory (no file at
    all), counted in the budget until released."""
    http, base = site
    budget = budget_for("memory")
    got = await fetch(http, f"{base}/good.png", tmp_path, budget=budget)
    assert got.data == PNG and got.path is None and list(dl_dir(tmp_path).iterdir()) == []
    assert got.sha256 == hashlib.sha256(PNG).hexdigest() and got.bytes == len(PNG)
    assert got.content_type_header == "image/png"
    assert budget.held == len(PNG)
    got.release()
    got.release()           # twice is harmless
    assert budget.held == 0


async def test_a_body_past_the_spool_or_the_budget_goes_to_a_file(site: tuple[GuardedSession, str], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Larger than SPOOL_BYTES, or more than the budget has left: the body is written to a temp file (what was
    held so far first) and nothing stays counted; release() deletes the file."""
    http, base = site
    budget = budget_for("memory")
    monkeypatch.setattr(download_module, "SPOOL_BYTES", len(PNG) - 1)
    past_spool = await fetch(http, f"{base}/good.png", tmp_path, budget=budget)
    monkeypatch.undo()
    past_budget = await fetch(http, f"{base}/good.png", tmp_path, budget=SpoolBudget(len(PNG) - 1))
    for got in (past_spool, past_budget):
        assert got.data is None and got.path is not None and got.path.read_bytes() == PNG
        assert got.sha256 == hashlib.sha256(PNG).hexdigest() and got.bytes == len(PNG)
    assert budget.held == 0
    for got in (past_spool, past_budget):
        got.release()
    assert list(dl_dir(tmp_path).iterdir()) == []


async def test_a_full_disk_while_spilling_leaves_no_temp_file(site: tuple[GuardedSession, str], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The temp file's disk fills up mid-body: the download fails with that OSError (the image store's outage to
    the archive job), not with the one closing the file raises again, and neither the file nor any memory stays."""
    http, base = site

    class FullFile(io.BufferedWriter):
        def write(self, data: Any) -> int:
            raise OSError(errno.ENOSPC, "No space left on device (first)")

        def close(self) -> None:
            super().close()
            raise OSError(errno.ENOSPC, "No space left on device (at close)")

    def full_temp_file(tmp_dir: Path, prefix: str) -> tuple[io.BufferedWriter, Path]:
        fd, name = tempfile.mkstemp(dir=tmp_dir, prefix=prefix, suffix=".part")
        return FullFile(io.FileIO(fd, "wb")), Path(name)

    monkeypatch.setattr(download_module, "_new_temp_file", full_temp_file)
    with pytest.raises(OSError, match=r"\(first\)") as raised:
        await fetch(http, f"{base}/good.png", tmp_path, mode="file")
    assert raised.value.errno == errno.ENOSPC
    assert list(dl_dir(tmp_path).iterdir()) == []


@pytest.mark.parametrize("mode", MODES)
async def test_download_verify_store_end_to_end(site: tuple[GuardedSession, str], tmp_path: Path, mode: str) -> None:
    """Download, verify, put in (from memory or from the temp file): the stored file is the source's bytes."""
    http, base = site
    store = LocalImageStore(tmp_path / "images")
    got = await download(http, f"{base}/good.png", store.tmp_dir, max_bytes=1 << 20, timeout=5,
                         budget=budget_for(mode))
    assert (got.data is not None) == (mode == "memory")
    info = await ainspect_image(got.body, expected=got.content_type_header)
    key = await got.put_into(store, info.ext)
    assert got.path is None          # the store took the temp file, if there was one
    got.release()
    assert store.open_path(key).read_bytes() == PNG and (info.width, info.height) == (64, 48)
    assert list(store.tmp_dir().iterdir()) == []


@pytest.mark.parametrize("status", [410, 404, 403])
async def test_dead_link_is_source_gone(site: tuple[GuardedSession, str], tmp_path: Path, status: int) -> None:
    """404/410/403 mean the link is gone for good: SourceGone naming the status, no temp file left."""
    http, base = site
    with pytest.raises(SourceGone, match=f"HTTP {status}") as info:
        await fetch(http, f"{base}/status/{status}", tmp_path)
    assert info.value.code == "source_gone"
    assert list(dl_dir(tmp_path).iterdir()) == []


@pytest.mark.parametrize("status", [500, 503, 429])
async def test_server_trouble_is_retryable(site: tuple[GuardedSession, str], tmp_path: Path, status: int) -> None:
    """5xx and 429 are retryable ArchiveErrors, not SourceGone."""
    http, base = site
    with pytest.raises(ArchiveError) as info:
        await fetch(http, f"{base}/status/{status}", tmp_path)
    assert not isinstance(info.value, SourceGone) and info.value.code == "source_unavailable"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", ["/big", "/big-chunked"])
async def test_oversize_body_is_refused(site: tuple[GuardedSession, str], tmp_path: Path, path: str,
                                        mode: str) -> None:
    """Over max_bytes, by Content-Length up front or while streaming: permanent image_too_large, nothing left
    behind (no file, nothing counted)."""
    http, base = site
    budget = budget_for(mode)
    with pytest.raises(SourceGone) as info:
        await fetch(http, f"{base}{path}", tmp_path, max_bytes=1500, budget=budget)
    assert info.value.code == "image_too_large"
    assert list(dl_dir(tmp_path).iterdir()) == [] and budget.held == 0


@pytest.mark.parametrize("mode", MODES)
async def test_truncated_body_is_retryable(site: tuple[GuardedSession, str], tmp_path: Path, mode: str) -> None:
    """A body cut short of its Content-Length is ArchiveError(truncated); the partial body is gone."""
    http, base = site
    budget = budget_for(mode)
    with pytest.raises(ArchiveError) as info:
        await fetch(http, f"{base}/truncated", tmp_path, budget=budget)
    assert info.value.code == "truncated" and not isinstance(info.value, SourceGone)
    assert list(dl_dir(tmp_path).iterdir()) == [] and budget.held == 0


@pytest.mark.parametrize("mode", MODES)
async def test_slow_body_hits_the_deadline(site: tuple[GuardedSession, str], tmp_path: Path, mode: str) -> None:
    """A body that stalls past the overall deadline is a retryable timeout, the partial body removed."""
    http, base = site
    budget = budget_for(mode)
    with pytest.raises(ArchiveError) as info:
        await fetch(http, f"{base}/slow", tmp_path, timeout=0.3, budget=budget)
    assert info.value.code == "timeout"
    assert list(dl_dir(tmp_path).iterdir()) == [] and budget.held == 0


async def test_redirects_are_followed_up_to_three(site: tuple[GuardedSession, str], tmp_path: Path) -> None:
    """Three redirects lead to the image; a fourth is refused as too many."""
    http, base = site
    got = await fetch(http, f"{base}/hop/3", tmp_path)
    assert got.sha256 == hashlib.sha256(PNG).hexdigest()
    got.release()
    with pytest.raises(SourceGone) as info:
        await fetch(http, f"{base}/hop/4", tmp_path)
    assert info.value.code == "too_many_redirects"
    assert list(dl_dir(tmp_path).iterdir()) == []


async def test_redirect_to_non_http_is_source_gone(site: tuple[GuardedSession, str], tmp_path: Path) -> None:
    """A redirect to file:// is refused permanently."""
    http, base = site
    with pytest.raises(SourceGone) as info:
        await fetch(http, f"{base}/to-file", tmp_path)
    assert info.value.code == "invalid_url"


async def test_redirect_to_private_address_is_blocked(site: tuple[GuardedSession, str], tmp_path: Path) -> None:
    """Each redirect hop is checked by the guard: a hop to 10.x raises BlockedAddress."""
    http, base = site
    with pytest.raises(BlockedAddress):
        await fetch(http, f"{base}/to-private", tmp_path)
    assert list(dl_dir(tmp_path).iterdir()) == []


async def test_blocked_source_propagates(tmp_path: Path) -> None:
    """Without an allow-list, a loopback source raises BlockedAddress and leaves no temp file."""
    http = GuardedSession(NetGuard(), httpx.create_ssl_context())
    async with serve(image_app) as port:
        with pytest.raises(BlockedAddress):
            await fetch(http, f"http://127.0.0.1:{port}/good.png", tmp_path)
        with pytest.raises(BlockedAddress):     # a name resolving to loopback, refused by the resolver
            await fetch(http, f"http://localhost:{port}/good.png", tmp_path)
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
        await fetch(http, f"http://127.0.0.1:{port}/x.png", tmp_path)
    await http.aclose()
    assert info.value.code == "connection_failed"


async def test_fetch_bytes_returns_body_and_sniffed_type(site: tuple[GuardedSession, str]) -> None:
    """Reference images come back in memory with their real type, under the same size cap."""
    http, base = site
    assert await fetch_bytes(http, f"{base}/good.png", max_bytes=1 << 20, timeout=5) == (PNG, "image/png")
    with pytest.raises(SourceGone, match="limit"):
        await fetch_bytes(http, f"{base}/big-chunked", max_bytes=1500, timeout=5)


# ---------------------------------------------------------------- base64


async def test_decode_b64(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inline base64 (bare or as a data: URL, line-wrapped or not) becomes hashed bytes in memory, or a temp file
    past SPOOL_BYTES."""
    encoded = base64.b64encode(JPEG).decode()
    budget = budget_for("memory")                 # counted like a download's body, until released
    got = await decode_b64(encoded, lambda: tmp_path, max_bytes=1 << 20, budget=budget)
    assert got.data == JPEG and got.path is None and got.sha256 == hashlib.sha256(JPEG).hexdigest()
    assert got.content_type_header is None and got.bytes == len(JPEG)
    got.release()
    wrapped = "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))
    got = await decode_b64(f"data:image/jpeg;base64,{wrapped}", lambda: tmp_path, max_bytes=1 << 20, budget=budget)
    assert got.content_type_header == "image/jpeg" and got.data == JPEG
    got.release()
    assert list(tmp_path.iterdir()) == [] and budget.held == 0
    got = await decode_b64(encoded, lambda: tmp_path, max_bytes=1 << 20, budget=budget)
    assert got.data == JPEG and budget.held >= len(JPEG)
    got.release()
    assert budget.held == 0
    with pytest.raises(InvalidImage):
        await decode_b64("QUJD$", lambda: tmp_path, max_bytes=1 << 20, budget=budget)
    assert budget.held == 0
    got = await decode_b64(encoded, lambda: tmp_path, max_bytes=1 << 20, budget=budget_for("file"))  # no room
    assert got.data is None and got.path is not None and got.path.read_bytes() == JPEG
    got.release()
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(download_module, "SPOOL_BYTES", len(JPEG) - 1)      # past the spool
    got = await decode_b64(encoded, lambda: tmp_path, max_bytes=1 << 20, budget=budget)
    assert got.data is None and got.path is not None and got.path.read_bytes() == JPEG
    got.release()
    assert list(tmp_path.iterdir()) == [] and budget.held == 0


@pytest.mark.parametrize("data", ["not base64 at all!", "QUJD$", "data:image/png,QUJD"])
async def test_bad_base64_is_invalid_image(tmp_path: Path, data: str) -> None:
    """Undecodable base64 is a permanent InvalidImage, and no file is written."""
    with pytest.raises(InvalidImage):
        await decode_b64(data, lambda: tmp_path, max_bytes=1 << 20)
    assert list(tmp_path.iterdir()) == []


async def test_oversize_base64_is_refused(tmp_path: Path) -> None:
    """Inline images over max_bytes are image_too_large, and nothing stays counted."""
    budget = budget_for("memory")
    with pytest.raises(SourceGone) as info:
        await decode_b64(base64.b64encode(PNG).decode(), lambda: tmp_path, max_bytes=len(PNG) - 1, budget=budget)
    assert info.value.code == "image_too_large" and budget.held == 0


async def test_a_decode_cancelled_while_its_thread_writes_leaves_no_temp_file(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The archive job is cancelled (its deadline, a shutdown) while the decode's thread is about to write the
    temp file: the thread runs on, and what it wrote is deleted when it ends, not left for the sweep."""
    entered, gate, made = threading.Event(), threading.Event(), []
    real = download_module._new_temp_file

    def held_at_the_gate(tmp_dir: Path, prefix: str) -> tuple[Any, Path]:
        entered.set()
        gate.wait(10)
        file, path = real(tmp_dir, prefix)
        made.append(path)
        return file, path

    monkeypatch.setattr(download_module, "_new_temp_file", held_at_the_gate)
    decoding = asyncio.create_task(decode_b64(base64.b64encode(JPEG).decode(), lambda: tmp_path,
                                              max_bytes=1 << 20, budget=budget_for("file")))
    await wait_for(entered.is_set, 5, "the decode's thread to reach the temp file")
    decoding.cancel()
    with pytest.raises(asyncio.CancelledError):
        await decoding
    gate.set()
    await wait_for(lambda: made != [] and not made[0].exists(), 5, "the thread's temp file to be deleted")
    assert list(tmp_path.iterdir()) == []
