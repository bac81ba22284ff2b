"""`relay simulate --prerendered`: one drawn picture per size and format, a unique chunk per task.

Each image must still be a valid file of its type (relay's own verification and a full Pillow decode
accept it), have its own sha256, and be what /_sim reports, exactly as in the drawing mode.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from relay.images.verify import inspect_image
from relay.simulator import SimulatorConfig, create_simulator_app
from relay.simulator.imaging import prerendered_base, with_unique_chunk

BASE = "http://sim.test"
AUTH = {"Authorization": "Bearer test-key"}
GMI = "/gmicloud/api/v1/ie/requestqueue/apikey/requests"
FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"), "webp": ("WEBP", "image/webp")}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_unique_chunk_keeps_a_valid_image(fmt: str, tmp_path: Path) -> None:
    base = prerendered_base(64, 48, fmt, False)
    images = [with_unique_chunk(base, fmt, f"tsk_{n}:0".encode()) for n in range(3)]
    assert len({hashlib.sha256(data).hexdigest() for data in images}) == 3
    for n, data in enumerate(images):
        path = tmp_path / f"{n}.{fmt}"
        path.write_bytes(data)
        info = inspect_image(path)
        assert (info.content_type, info.width, info.height) == (FORMATS[fmt][1], 64, 48)
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            assert image.format == FORMATS[fmt][0] and image.size == (64, 48)


def test_odd_sized_tag_keeps_webp_riff_sizes(tmp_path: Path) -> None:
    data = with_unique_chunk(prerendered_base(32, 32, "webp", False), "webp", b"odd")
    path = tmp_path / "odd.webp"
    path.write_bytes(data)
    inspect_image(path)      # raises if the RIFF sizes do not add up


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = create_simulator_app(SimulatorConfig(public_url=BASE, duration=0.1, seed=7, prerendered=True))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c:
            yield c


async def test_tasks_get_distinct_valid_images(client: httpx.AsyncClient) -> None:
    body = {"model": "gpt-image-1.5", "payload": {"prompt": "a fox [sim:duration=0.1]", "n": 2,
                                                  "size": "1024x1024", "output_format": "png"}}
    ids = [(await client.post(GMI, json=body, headers=AUTH)).json()["request_id"] for _ in range(2)]
    seen: set[str] = set()
    for rid in ids:
        for _ in range(500):
            final = (await client.get(f"{GMI}/{rid}", headers=AUTH)).json()
            if final["status"] == "success":
                break
            await asyncio.sleep(0.01)
        assert final["status"] == "success"
        detail = (await client.get(f"/_sim/tasks/gmicloud/{rid}")).json()
        for index, media in enumerate(final["outcome"]["media_urls"]):
            response = await client.get(media["url"])
            assert response.status_code == 200
            with Image.open(io.BytesIO(response.content)) as image:
                image.load()
                assert image.format == "PNG" and image.size == (1024, 1024)
            digest = hashlib.sha256(response.content).hexdigest()
            assert detail["images"][index]["sha256"] == digest
            seen.add(digest)
    assert len(seen) == 4      # two tasks × two images, every one its own bytes
