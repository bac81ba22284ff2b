"""The subscriptions API: create, list, get, update, delete, rotate-secret; validation; SSRF at registration."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay.clock import ManualClock
from relay.config import load_settings
from relay.deliveries.secrets import SecretBox
from relay.deliveries.service import DeliveryService
from relay.errors import InvalidRequest
from relay.links import Signer
from relay.netguard import NetGuard
from relay.store.sqlite import SQLiteStore
from relay.validation import parse_subscription_input
from tests.harness import API_KEY, harness


def assert_error(response: httpx.Response, status: int, code: str, field: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error.get("field") == field, error


async def test_create_returns_the_secret_once(tmp_path: Path) -> None:
    """201 with a whsec_ secret; GET and list never show it again."""
    async with harness(tmp_path, run_worker=False) as h:
        created = await h.api.post("/v1/subscriptions", json={
            "url": "http://127.0.0.1:9/hook", "events": ["task.*"], "description": "orders"})
        assert created.status_code == 201, created.text
        sub = created.json()
        assert sub["id"].startswith("sub_") and sub["secret"].startswith("whsec_")
        assert sub["events"] == ["task.*"] and sub["enabled"] is True and sub["signing"] == "hmac"
        assert sub["public_key"] is None
        got = (await h.api.get(f"/v1/subscriptions/{sub['id']}")).json()
        listed = (await h.api.get("/v1/subscriptions")).json()
        assert "secret" not in got and all("secret" not in s for s in listed["data"])
        assert got["url"] == sub["url"] and listed["data"][0]["id"] == sub["id"]


async def test_secrets_are_encrypted_in_the_database(tmp_path: Path) -> None:
    """The clear secret appears nowhere in the database file."""
    async with harness(tmp_path, run_worker=False) as h:
        sub = (await h.api.post("/v1/subscriptions", json={"url": "http://127.0.0.1:9/h",
                                                           "signing": "ed25519"})).json()
        db_path = h.runtime.settings.storage.database.removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        raw = db.execute("SELECT keyring FROM subscriptions").fetchone()[0]
    assert raw.startswith("enc1:") and sub["secret"] not in raw
    blob = b"".join(p.read_bytes() for p in Path(db_path).parent.glob("relay.db*"))
    assert sub["secret"].encode() not in blob and sub["secret"][6:].encode() not in blob


async def test_ed25519_subscription_gets_a_public_key(tmp_path: Path) -> None:
    """signing=ed25519 returns a whpk_ public key beside the whsec_ secret."""
    async with harness(tmp_path, run_worker=False) as h:
        sub = (await h.api.post("/v1/subscriptions", json={"url": "http://127.0.0.1:9/h",
                                                           "signing": "ed25519"})).json()
        assert sub["signing"] == "ed25519" and sub["public_key"].startswith("whpk_")
        assert sub["secret"].startswith("whsec_")


async def test_list_paginates_newest_first(tmp_path: Path) -> None:
    """limit/cursor pages through subscriptions, newest first, with next_cursor null at the end."""
    async with harness(tmp_path, run_worker=False) as h:
        ids = [(await h.api.post("/v1/subscriptions", json={"url": f"http://127.0.0.1:9/{i}"})).json()["id"]
               for i in range(5)]
        page1 = (await h.api.get("/v1/subscriptions", params={"limit": 3})).json()
        page2 = (await h.api.get("/v1/subscriptions", params={"limit": 3, "cursor": page1["next_cursor"]})).json()
        assert [s["id"] for s in page1["data"] + page2["data"]] == ids[::-1]
        assert page2["next_cursor"] is None


async def test_update_and_disable_and_reenable(tmp_path: Path) -> None:
    """PATCH changes url, events, description, enabled; re-enabling clears the disabled reason."""
    async with harness(tmp_path, run_worker=False) as h:
        sub = (await h.api.post("/v1/subscriptions", json={"url": "http://127.0.0.1:9/a"})).json()
        assert sub["events"] == ["*"]
        patched = await h.api.patch(f"/v1/subscriptions/{sub['id']}", json={
            "url": "http://127.0.0.1:9/b", "events": ["task.succeeded", "task.failed"], "description": None,
            "enabled": False})
        assert patched.status_code == 200, patched.text
        body = patched.json()
        assert body["url"].endswith("/b") and body["events"] == ["task.succeeded", "task.failed"]
        assert body["enabled"] is False and body["disabled_reason"] == "manual"
        again = (await h.api.patch(f"/v1/subscriptions/{sub['id']}", json={"enabled": True})).json()
        assert again["enabled"] is True and again["disabled_reason"] is None and again["url"].endswith("/b")


async def test_delete_then_404(tmp_path: Path) -> None:
    """DELETE answers {deleted: true}; afterwards the subscription is 404 everywhere."""
    async with harness(tmp_path, run_worker=False) as h:
        sub = (await h.api.post("/v1/subscriptions", json={"url": "http://127.0.0.1:9/a"})).json()
        deleted = await h.api.delete(f"/v1/subscriptions/{sub['id']}")
        assert deleted.status_code == 200 and deleted.json() == {"id": sub["id"], "object": "subscription",
                                                                 "deleted": True}
        for method, path in (("GET", ""), ("PATCH", ""), ("DELETE", ""), ("POST", "/rotate-secret")):
            response = await h.api.request(method, f"/v1/subscriptions/{sub['id']}{path}", json={})
            assert_error(response, 404, "not_found")


async def test_rotate_returns_a_new_secret_and_keeps_the_old_for_24h(tmp_path: Path) -> None:
    """rotate-secret shows the new secret once; the old one signs alongside until the overlap ends."""
    clock = ManualClock()
    async with harness(tmp_path, run_worker=False, clock=clock) as h:
        sub = (await h.api.post("/v1/subscriptions", json={"url": "http://127.0.0.1:9/a"})).json()
        rotated = await h.api.post(f"/v1/subscriptions/{sub['id']}/rotate-secret")
        assert rotated.status_code == 200, rotated.text
        new = rotated.json()
        assert new["secret"].startswith("whsec_") and new["secret"] != sub["secret"]
        service = h.runtime.deliveries
        assert service is not None
        stored = await h.runtime.store.get_subscription(sub["id"])
        assert stored is not None
        assert service.signing_keys(stored, clock.now()) == [new["secret"], sub["secret"]]
        assert service.signing_keys(stored, clock.now() + 86399) == [new["secret"], sub["secret"]]
        assert service.signing_keys(stored, clock.now() + 86401) == [new["secret"]]


@pytest.mark.parametrize("body,field", [
    ({}, "url"),
    ({"url": "ftp://x/y"}, "url"),
    ({"url": "not a url"}, "url"),
    ({"url": "http://127.0.0.1:9/a", "events": []}, "events"),
    ({"url": "http://127.0.0.1:9/a", "events": ["task.nope"]}, "events"),
    ({"url": "http://127.0.0.1:9/a", "events": "task.*"}, "events"),
    ({"url": "http://127.0.0.1:9/a", "description": 5}, "description"),
    ({"url": "http://127.0.0.1:9/a", "enabled": "yes"}, "enabled"),
    ({"url": "http://127.0.0.1:9/a", "signing": "rsa"}, "signing"),
    ({"url": "http://127.0.0.1:9/a", "secret": "whsec_x"}, "secret"),
])
async def test_invalid_create_is_422_naming_the_field(tmp_path: Path, body: dict[str, Any], field: str) -> None:
    """Every invalid field is refused in API.md's error shape, naming the field."""
    async with harness(tmp_path, run_worker=False) as h:
        assert_error(await h.api.post("/v1/subscriptions", json=body), 422, "invalid_request", field)


async def test_non_json_and_auth_errors(tmp_path: Path) -> None:
    """A non-JSON body is 422; no or a wrong API key is 401 on every route."""
    async with harness(tmp_path, run_worker=False) as h:
        response = await h.api.post("/v1/subscriptions", content=b"nope")
        assert_error(response, 422, "invalid_request")
        for method, path in (("POST", "/v1/subscriptions"), ("GET", "/v1/subscriptions"),
                             ("GET", "/v1/deliveries"), ("GET", "/v1/webhook-secret"),
                             ("POST", "/v1/deliveries/dlv_x/retry")):
            response = await h.api.request(method, path, headers={"authorization": "Bearer wrong-key-0123456789"})
            assert_error(response, 401, "unauthorized")
        assert API_KEY  # the harness client itself is authenticated


async def test_signing_cannot_be_patched(tmp_path: Path) -> None:
    """Changing the signing scheme is refused (create a new subscription instead)."""
    async with harness(tmp_path, run_worker=False) as h:
        sub = (await h.api.post("/v1/subscriptions", json={"url": "http://127.0.0.1:9/a"})).json()
        response = await h.api.patch(f"/v1/subscriptions/{sub['id']}", json={"signing": "ed25519"})
        assert_error(response, 422, "invalid_request", "signing")


async def test_webhook_secret_endpoint_is_stable(tmp_path: Path) -> None:
    """GET /v1/webhook-secret returns the same whsec_ secret every time, and across restarts."""
    async with harness(tmp_path, run_worker=False) as h:
        first = (await h.api.get("/v1/webhook-secret")).json()
        assert first["secret"].startswith("whsec_") and first == (await h.api.get("/v1/webhook-secret")).json()
    async with harness(tmp_path, run_worker=False) as h:
        assert (await h.api.get("/v1/webhook-secret")).json() == first


# ---- SSRF at registration -----------------------------------------------------------------------
@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/h", "http://10.1.2.3/h", "http://169.254.169.254/latest",
                                 "http://[::1]:8080/h", "http://localhost:8080/h", "http://0.0.0.0/h",
                                 "http://[::ffff:127.0.0.1]/h"])
async def test_private_addresses_are_refused_without_allow_list(tmp_path: Path, url: str) -> None:
    """With an empty network.allow, loopback, private, link-local/metadata URLs are 422 on create and update."""
    async with harness(tmp_path, run_worker=False, RELAY_NETWORK_ALLOW="") as h:
        response = await h.api.post("/v1/subscriptions", json={"url": url})
        assert_error(response, 422, "invalid_request", "url")
        assert "refused" in response.json()["error"]["message"]


async def test_allow_list_lets_loopback_register(tmp_path: Path) -> None:
    """The embedded defaults allow-list loopback (the simulator and test sinks live there)."""
    async with harness(tmp_path, run_worker=False) as h:
        assert (await h.api.post("/v1/subscriptions", json={"url": "http://127.0.0.1:9/h"})).status_code == 201
        assert (await h.api.post("/v1/subscriptions", json={"url": "http://[::1]:9/h"})).status_code == 201


@pytest.mark.parametrize("name,address", [("internal.example", "10.0.0.7"), ("meta.example", "169.254.169.254"),
                                          ("loop.example", "127.0.0.1"), ("six.example", "::1")])
async def test_hostname_resolving_to_a_private_address_is_refused(tmp_path: Path, name: str, address: str) -> None:
    """A hostname is judged by what it resolves to (every address), at registration and on PATCH."""
    async def resolver(host: str, port: int) -> list[str]:
        return {"public.example": ["93.184.216.34"]}.get(host, [address])

    settings = load_settings(None, {"RELAY_NETWORK_ALLOW": "", "RELAY_STORAGE_DATA_DIR": str(tmp_path)})
    store = SQLiteStore(tmp_path / "relay.db")
    await store.open()
    try:
        service = DeliveryService(settings, store, ManualClock(), guard=NetGuard((), resolver=resolver),
                                  signer=Signer("s" * 40), box=SecretBox("k" * 32), task_secret="whsec_x")
        with pytest.raises(InvalidRequest, match="refused"):
            await service.create_subscription(parse_subscription_input({"url": f"https://{name}/hook"},
                                                                       partial=False))
        sub, _ = await service.create_subscription(parse_subscription_input({"url": "https://public.example/h"},
                                                                            partial=False))
        with pytest.raises(InvalidRequest, match="refused"):
            await service.update_subscription(sub.id, parse_subscription_input({"url": f"https://{name}/x"},
                                                                               partial=True))
        await service.close()
    finally:
        await store.close()


async def test_every_subscriber_route_is_in_openapi(tmp_path: Path) -> None:
    """/openapi.json documents each subscriptions, deliveries and webhook-secret route and method."""
    from relay.web import subscriptions
    async with harness(tmp_path, run_worker=False) as h:
        doc = (await h.api.get("/openapi.json")).json()
    for route in subscriptions.routes:
        for method in route.methods or ():
            if method != "HEAD":
                assert method.lower() in doc["paths"][route.path], (method, route.path)
    assert "Subscription" in doc["components"]["schemas"] and "Delivery" in doc["components"]["schemas"]
