"""Documented settings (config.example.toml) that change what a running relay does, set by RELAY_* env."""

from __future__ import annotations

import pytest

from .conftest import RelayFactory
from .harness import Simulator

pytestmark = pytest.mark.e2e


def test_max_body_bytes_setting_is_enforced(sim: Simulator, relay_factory: RelayFactory) -> None:
    """server.max_body_bytes ("largest request body accepted") caps POST /v1/tasks bodies with a 413."""
    relay = relay_factory(RELAY_SERVER_MAX_BODY_BYTES="4096")
    small = relay.api.post("/v1/tasks", json={"provider": "pixazo", "prompt": "small enough"})
    assert small.status_code == 202, small.text
    large = relay.api.post("/v1/tasks", json={"provider": "pixazo", "prompt": "x" * 8000})
    assert large.status_code == 413, f"an 8 KB body passed a 4096-byte max_body_bytes: {large.status_code}"
    assert large.json()["error"]["code"] == "payload_too_large"


def test_provider_max_in_flight_is_respected(sim: Simulator, relay_factory: RelayFactory) -> None:
    """providers.NAME.max_in_flight = 1: the provider never has two of relay's tasks unfinished at once."""
    relay = relay_factory(RELAY_PROVIDERS_PIXAZO_MAX_IN_FLIGHT="1")
    ids = [relay.create({"provider": "pixazo", "prompt": f"one at a time {i} [sim:duration=0.6]"})["id"]
           for i in range(3)]
    for task_id in ids:
        relay.wait_succeeded(task_id, timeout=30)
    at_sim = sorted(sim.tasks("pixazo"), key=lambda t: t["created"])
    assert len(at_sim) == 3
    for earlier, later in zip(at_sim, at_sim[1:]):
        assert later["created"] >= earlier["done_at"], (
            f"task {later['id']} was submitted {earlier['done_at'] - later['created']:.2f} s before "
            f"{earlier['id']} finished: more than max_in_flight=1 in flight")


def test_api_and_worker_roles_share_one_data_dir(sim: Simulator, relay_factory: RelayFactory) -> None:
    """`--role api` takes tasks and a separate `--role worker` process on the same data dir runs them."""
    api = relay_factory(RELAY_SERVER_ROLE="api")
    worker = relay_factory(RELAY_SERVER_ROLE="worker", RELAY_STORAGE_DATA_DIR=str(api.data_dir),
                           RELAY_SERVER_PUBLIC_URL=api.url)
    ids = [api.create({"provider": provider, "prompt": "split roles"})["id"]
           for provider in ("gmicloud", "evolink", "openai")]
    for task_id in ids:
        task = api.wait_succeeded(task_id)
        image = api.api.get(f"/v1/images/{task['images'][0]['id']}")
        assert image.status_code == 200
    worker.process.check_alive()
    # The worker's port answers health checks and metrics only: the API is the api replicas' job.
    assert worker.api.get("/healthz").status_code == 200 and worker.api.get("/readyz").status_code == 200
    assert worker.api.get("/metrics").status_code == 200
    refused = worker.api.get(f"/v1/tasks/{ids[0]}")
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found"
    assert worker.api.post("/v1/tasks", json={"provider": "openai", "prompt": "x"}).status_code == 404
