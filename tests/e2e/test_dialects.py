"""Every provider dialect end to end: submit through relay, archive, and serve the exact provider bytes."""

from __future__ import annotations

import hashlib
import io
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from PIL import Image

from .harness import Relay, Simulator, wait_for

pytestmark = pytest.mark.e2e

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
PIL_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}

CASES = [
    pytest.param("gmicloud", {"size": "1024x1536"}, {}, id="gmicloud"),
    pytest.param("gmicloud", {"size": "1536x1024", "output_format": "jpeg"},
                 {"variants": {"gmicloud_sync": True}}, id="gmicloud-sync"),
    pytest.param("apimart", {"size": "1024x1536", "n": 2}, {"variants": {"apimart_url_as_string": True}},
                 id="apimart-n2-url-string"),
    pytest.param("apimart", {"size": "1536x1024", "n": 2, "output_format": "jpeg"},
                 {"variants": {"apimart_url_as_string": False}}, id="apimart-n2-url-list"),
    pytest.param("evolink", {"size": "1536x1024"}, {}, id="evolink"),
    pytest.param("pixazo", {"size": "1024x1024", "output_format": "webp"}, {}, id="pixazo"),
    pytest.param("pixazo", {"size": "1024x1536"}, {"variants": {"pixazo_sync": True}}, id="pixazo-sync"),
    pytest.param("openai", {"size": "1536x1024", "output_format": "webp", "n": 2}, {}, id="openai-n2"),
]


def _check_image(relay: Relay, image: dict[str, Any], expected: dict[str, Any], content_type: str,
                 width: int, height: int) -> None:
    assert image["status"] == "archived", image
    assert image["content_type"] == content_type
    assert (image["width"], image["height"]) == (width, height)

    # The signed link works without an API key.
    url = image["url"]
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == relay.url and parts.path == f"/v1/images/{image['id']}"
    assert {"exp", "sig"} <= set(parse_qs(parts.query)), url
    with httpx.Client(timeout=10) as anonymous:
        signed = anonymous.get(url)
        head = anonymous.head(url)
        bare = anonymous.get(f"{relay.url}/v1/images/{image['id']}")
    assert signed.status_code == 200, signed.text
    body = signed.content
    digest = hashlib.sha256(body).hexdigest()
    assert digest == image["sha256"] == expected["sha256"], "relay's bytes differ from the provider's"
    assert len(body) == image["bytes"] == expected["bytes"]
    assert signed.headers["content-type"].split(";")[0] == content_type
    assert signed.headers["etag"].strip('"') == image["sha256"]
    assert "immutable" in signed.headers["cache-control"]
    with Image.open(io.BytesIO(body)) as decoded:
        assert decoded.size == (width, height)
        assert decoded.format == PIL_FORMATS[content_type]

    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["etag"].strip('"') == image["sha256"]
    assert head.headers["content-type"].split(";")[0] == content_type
    assert int(head.headers["content-length"]) == len(body)

    assert bare.status_code == 401 and bare.json()["error"]["code"] == "unauthorized"

    # The same bytes with the API key and no signature.
    keyed = relay.api.get(f"/v1/images/{image['id']}")
    assert keyed.status_code == 200
    assert keyed.content == body
    assert keyed.headers["etag"].strip('"') == image["sha256"]


@pytest.mark.parametrize(("provider", "extra", "knobs"), CASES)
def test_each_dialect_end_to_end(sim: Simulator, relay: Relay, provider: str, extra: dict[str, Any],
                                 knobs: dict[str, Any]) -> None:
    """A task on each dialect (and variant) succeeds, and relay serves exactly the provider's bytes."""
    if knobs:
        sim.faults(**knobs)
    request = {"provider": provider, "prompt": f"e2e {provider} lighthouse", **extra}
    created = relay.create({**request, "metadata": {"case": provider}})
    assert created["status"] == "pending" and created["metadata"] == {"case": provider}

    task = relay.wait_succeeded(created["id"])
    n = extra.get("n", 1)
    width, height = (int(v) for v in extra["size"].split("x"))
    content_type = CONTENT_TYPES[extra.get("output_format", "png")]
    assert task["provider_task_id"], task
    assert task["progress"] == 100 and task["error"] is None and task["completed_at"]
    assert [img["index"] for img in task["images"]] == list(range(n))

    at_sim = sim.task(provider, task["provider_task_id"])
    assert at_sim["status"] == "succeeded" and at_sim["n"] == n
    assert len(at_sim["images"]) == n
    for image in task["images"]:
        expected = at_sim["images"][image["index"]]
        assert expected["content_type"] == content_type
        assert (expected["width"], expected["height"]) == (width, height)
        _check_image(relay, image, expected, content_type, width, height)

    if provider == "evolink":   # the callback dialect: relay acknowledged the callback at once
        callbacks = wait_for(lambda: sim.task(provider, task["provider_task_id"])["callbacks"], 5,
                             "the simulator's callback to relay")
        assert callbacks[0]["status_code"] == 200, callbacks
        assert callbacks[0]["url"].startswith(f"{relay.url}/callbacks/evolink/{task['id']}/"), callbacks
    # (No "zero polls" check for the sync variants: the simulator's held answer can come a hair
    # before its own done_at and say "running", and then one poll is right.)
    assert sim.stats(provider)["submits"] == 1

    types = [e["type"] for e in relay.events(task["id"])]
    assert types.count("task.succeeded") == 1, types
    assert types[-1] == "task.succeeded", types
