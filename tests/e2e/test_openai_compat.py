"""The OpenAI-shaped surface (/openai/v1/images/*) driven by the official `openai` SDK from PyPI, against
`relay serve` and `relay simulate` as real processes: real sockets, no mocks."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from relay.config import PROVIDER_KINDS
from relay.images.store import image_key

from .conftest import RelayFactory
from .harness import API_KEY, Relay, Simulator

pytestmark = pytest.mark.e2e


def client(relay: Relay, key: str = API_KEY, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{relay.url}/openai/v1", api_key=key, timeout=60, **options)


def png(width: int = 64, height: int = 64, color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format="PNG")
    return out.getvalue()


def task_of(relay: Relay, response: Any) -> dict[str, Any]:
    """The relay task behind an SDK response (relay answers its id as x-request-id)."""
    task_id = response._request_id
    assert task_id and task_id.startswith("tsk_"), task_id
    return relay.task(task_id)


def test_generate_returns_a_stable_link_to_the_archived_image(relay: Relay) -> None:
    """images.generate answers relay's signed link, fetchable without a key, whose bytes are the archived image."""
    with client(relay) as sdk:
        result = sdk.images.generate(model="apimart", prompt="a lighthouse at dusk", size="1024x1024")
    assert len(result.data or []) == 1
    task = task_of(relay, result)
    assert task["status"] == "succeeded" and task["provider"] == "apimart"
    archived = task["images"][0]
    url = result.data[0].url
    assert url is not None and url.startswith(f"{relay.url}/v1/images/{archived['id']}?")
    fetched = httpx.get(url, timeout=10)          # no API key: the link itself is the credential
    assert fetched.status_code == 200
    assert hashlib.sha256(fetched.content).hexdigest() == archived["sha256"]
    assert Image.open(io.BytesIO(fetched.content)).size == (1024, 1024)
    # Without response_format, b64_json too (OpenAI's default for gpt-image models): the same bytes.
    assert base64.b64decode(result.data[0].b64_json or "") == fetched.content
    assert result.size == "1024x1024" and result.output_format == "png"
    assert result.created == int(result.created) > 0


def test_b64_json_gives_the_archived_bytes_only(relay: Relay) -> None:
    """response_format=b64_json answers the archived bytes in base64, and no url."""
    with client(relay) as sdk:
        result = sdk.images.generate(model="evolink", prompt="a red fox", size="1536x1024", quality="low",
                                     response_format="b64_json")
    item = (result.data or [])[0]
    assert item.url is None and item.b64_json
    raw = base64.b64decode(item.b64_json)
    task = task_of(relay, result)
    assert hashlib.sha256(raw).hexdigest() == task["images"][0]["sha256"]
    assert Image.open(io.BytesIO(raw)).size == (1536, 1024)
    assert result.quality == "low"


def test_generate_several_images_through_a_provider_list(relay: Relay, sim: Simulator) -> None:
    """n=2 gives two archived images; a comma-separated model is a failover list, served by its first provider."""
    with client(relay) as sdk:
        result = sdk.images.generate(model="apimart,openai", prompt="two boats", n=2, response_format="url")
    task = task_of(relay, result)
    assert task["providers"] == ["apimart", "openai"] and task["provider"] == "apimart"
    assert [item.url is not None for item in result.data or []] == [True, True]
    assert {img["sha256"] for img in task["images"]} == {
        hashlib.sha256(httpx.get(item.url or "", timeout=10).content).hexdigest() for item in result.data or []}


def test_edit_uploads_a_png_as_the_tasks_reference_image(relay: Relay, sim: Simulator) -> None:
    """images.edit with a PNG file: the upload becomes the task's reference image, which the provider fetched."""
    upload = png()
    with client(relay) as sdk:
        result = sdk.images.edit(model="evolink", image=("input.png", upload, "image/png"),
                                 prompt="make it blue", response_format="url")
    task = task_of(relay, result)
    assert task["status"] == "succeeded"
    [reference] = task["request"]["images"]
    assert reference.startswith(f"{relay.url}/openai/v1/inputs/{hashlib.sha256(upload).hexdigest()}.png?")
    assert httpx.get(reference, timeout=10).content == upload        # what the provider was given to fetch
    assert sim.task("evolink", task["provider_task_id"])["request"]["image_urls"] == [reference]
    fetched = httpx.get((result.data or [])[0].url or "", timeout=10)
    assert hashlib.sha256(fetched.content).hexdigest() == task["images"][0]["sha256"]
    # Kept as an upload (relay.retention): a user of its sha256 that retention never deletes the file under.
    sha = hashlib.sha256(upload).hexdigest()
    with contextlib.closing(sqlite3.connect(relay.data_dir / "relay.db")) as db:
        assert db.execute("SELECT key FROM uploads WHERE sha256 = ?", (sha,)).fetchall() == [(image_key(sha, "png"),)]


def test_edit_with_several_images_and_a_mask_on_a_base64_dialect(relay: Relay, sim: Simulator) -> None:
    """image[] with two files and a mask: relay fetches its own upload links and sends the bytes (OpenAI dialect)."""
    first, second, mask = png(color=(1, 2, 3)), png(color=(4, 5, 6)), png(color=(0, 0, 0))
    with client(relay) as sdk:
        result = sdk.images.edit(model="openai", prompt="merge them",
                                 image=[("a.png", first, "image/png"), ("b.png", second, "image/png")],
                                 mask=("mask.png", mask, "image/png"), response_format="b64_json")
    task = task_of(relay, result)
    assert len(task["request"]["images"]) == 2 and task["request"]["mask"]
    assert [hashlib.sha256(httpx.get(u, timeout=10).content).hexdigest() for u in task["request"]["images"]] == [
        hashlib.sha256(first).hexdigest(), hashlib.sha256(second).hexdigest()]
    received = sim.task("openai", task["provider_task_id"])["request"]      # what the provider was sent
    assert [image["sha256"] for image in received["image"]] == [
        hashlib.sha256(first).hexdigest(), hashlib.sha256(second).hexdigest()]
    assert received["mask"]["sha256"] == hashlib.sha256(mask).hexdigest()
    raw = base64.b64decode((result.data or [])[0].b64_json or "")
    assert hashlib.sha256(raw).hexdigest() == task["images"][0]["sha256"]
    assert result.usage is not None and result.usage.output_tokens > 0     # the provider's token report


def test_a_wrong_key_is_an_authentication_error(relay: Relay) -> None:
    """A key relay does not know: 401 in OpenAI's shape, which the SDK raises as AuthenticationError."""
    with client(relay, key="sk-not-a-relay-key-0000000000") as sdk, pytest.raises(openai.AuthenticationError) as err:
        sdk.images.generate(model="apimart", prompt="x")
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"


def test_an_unknown_model_is_not_found(relay: Relay) -> None:
    """A model that is neither a provider nor a route: OpenAI's 404 model_not_found, naming what is configured."""
    with client(relay) as sdk, pytest.raises(openai.NotFoundError) as err:
        sdk.images.generate(model="gpt-image-1", prompt="x")
    assert err.value.code == "model_not_found" and err.value.param == "model"
    assert "apimart" in err.value.message


def test_an_invalid_option_is_a_bad_request_naming_it(relay: Relay) -> None:
    """relay's validation (the same rules as POST /v1/tasks) answers a 400 naming the parameter."""
    with client(relay) as sdk, pytest.raises(openai.BadRequestError) as err:
        sdk.images.generate(model="apimart", prompt="x", size="256x256")
    assert err.value.param == "size" and err.value.code == "invalid_value"
    with client(relay) as sdk, pytest.raises(openai.BadRequestError) as err:
        sdk.images.generate(model="apimart", prompt="x", extra_body={"colour": "red"})
    assert err.value.param == "colour" and err.value.code == "unknown_parameter"


@pytest.mark.parametrize("model", ["apimart", "evolink"])
def test_a_content_policy_failure_is_a_bad_request(relay: Relay, model: str) -> None:
    """A task the provider fails on content policy: 400 content_policy_violation naming the relay task."""
    with client(relay) as sdk, pytest.raises(openai.BadRequestError) as err:
        sdk.images.generate(model=model, prompt="[sim:fail] something forbidden")
    assert err.value.code == "content_policy_violation"
    body = err.value.body
    assert isinstance(body, dict) and str(body["task_id"]).startswith("tsk_")
    assert relay.task(str(body["task_id"]))["status"] == "failed"


def test_running_out_of_wait_names_the_task_to_poll(relay_factory: RelayFactory, sim: Simulator) -> None:
    """Past openai_compat.wait_seconds: a 504 naming the relay task, not retried by the SDK; the task goes on."""
    relay = relay_factory(RELAY_OPENAI_COMPAT_WAIT_SECONDS="1")
    with client(relay) as sdk, pytest.raises(openai.InternalServerError) as err:   # max_retries stays the default
        sdk.images.generate(model="apimart", prompt="[sim:duration=4] a slow one")
    assert err.value.status_code == 504 and err.value.code == "timeout"
    task_id = err.value.response.headers["x-relay-task-id"]
    assert f"GET /v1/tasks/{task_id}" in err.value.message
    assert len(sim.tasks("apimart")) == 1                 # x-should-retry: false, so no second task
    relay.wait_succeeded(task_id)


def test_an_upload_that_is_not_an_image_is_a_bad_request(relay: Relay) -> None:
    """images.edit with bytes that are no PNG, JPEG or WebP: 400 naming image, and no task."""
    with client(relay) as sdk, pytest.raises(openai.BadRequestError) as err:
        sdk.images.edit(model="evolink", image=("notes.png", b"not an image at all", "image/png"), prompt="x")
    assert err.value.param == "image" and err.value.code == "invalid_image_format"
    assert relay.api.get("/v1/tasks").json()["data"] == []


def test_model_may_name_a_route(relay_factory: RelayFactory, sim: Simulator, tmp_path: Path) -> None:
    """A [routes.NAME] from the config is a model: the task runs on the route's providers, in order."""
    providers = "\n".join(f'[providers.{kind}]\nkind = "{kind}"\nbase_url = "{sim.url}/{kind}"\napi_key = "sim"\n'
                          for kind in PROVIDER_KINDS)
    config = tmp_path / "relay.toml"
    config.write_text('[server]\nallow_http_callbacks = true\n[network]\nallow = ["127.0.0.0/8"]\n'
                      f'{providers}\n[routes.any-reseller]\nproviders = ["evolink", "apimart"]\n')
    relay = relay_factory(RELAY_CONFIG=str(config))
    with client(relay) as sdk:
        result = sdk.images.generate(model="any-reseller", prompt="a kite", response_format="url")
    task = task_of(relay, result)
    assert task["route"] == "any-reseller" and task["provider"] == "evolink" and task["status"] == "succeeded"


def test_an_endpoint_relay_does_not_serve_is_an_openai_shaped_404(relay: Relay) -> None:
    """Other SDK calls under /openai/v1 (models.list here) get OpenAI's error shape, which the SDK raises."""
    with client(relay) as sdk, pytest.raises(openai.NotFoundError) as err:
        sdk.models.list()
    assert err.value.code == "unknown_url" and "/openai/v1/images/generations" in err.value.message
