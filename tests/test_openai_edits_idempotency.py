"""The OpenAI edits endpoint with an Idempotency-Key: the same uploads sent again give the original task, also
when the retry crosses a UTC midnight (where the signed links to the uploads change their expiry)."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from relay.clock import ManualClock
from tests.harness import harness

DAY = 86400


def _png(color: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(out, "PNG")
    return out.getvalue()


async def test_an_edit_retried_across_midnight_with_its_key_is_the_same_task(tmp_path: Path) -> None:
    clock = ManualClock(start=20_000 * DAY - 5)                 # five seconds before a UTC midnight
    async with harness(tmp_path, run_worker=False, clock=clock, RELAY_OPENAI_COMPAT_WAIT_SECONDS="0.01",
                       RELAY_SERVER_PUBLIC_URL="http://127.0.0.1:9") as h:      # the uploads' links must resolve

        async def edit(key: str, image: bytes) -> str:
            answer = await h.api.post("/openai/v1/images/edits", data={"prompt": "make it blue", "model": "evolink"},
                                      files={"image": ("a.png", image, "image/png")},
                                      headers={"idempotency-key": key})
            assert answer.status_code == 504, answer.text     # no worker: the task waits, and its id is named
            return answer.headers["x-relay-task-id"]

        first = await edit("k1", _png((200, 0, 0)))
        assert await edit("k1", _png((200, 0, 0))) == first      # the same day
        clock.advance(10)                                        # past midnight: the links' expiry moved
        assert await edit("k1", _png((200, 0, 0))) == first
        other = await h.api.post("/openai/v1/images/edits", data={"prompt": "make it blue", "model": "evolink"},
                                 files={"image": ("a.png", _png((0, 200, 0)), "image/png")},
                                 headers={"idempotency-key": "k1"})
        assert other.status_code == 409, other.text                # another upload under the key: a conflict
