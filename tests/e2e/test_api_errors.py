"""The HTTP error contract of API.md over a real socket: one error shape, the right status and field."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from .harness import Relay

pytestmark = pytest.mark.e2e


def _error(response: httpx.Response, status: int, code: str, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, f"expected {status}, got {response.status_code}: {response.text}"
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    err: dict[str, Any] = body["error"]
    assert err["code"] == code, err
    assert isinstance(err["message"], str) and err["message"], err
    assert "Traceback" not in err["message"]
    if field is not None:
        assert err.get("field") == field, err
    return err


def test_api_errors_over_http(relay: Relay) -> None:
    """Bad auth, bad input, unsupported options, oversize bodies and idempotency conflicts get API.md errors."""
    api = relay.api
    with httpx.Client(base_url=relay.url, timeout=10) as anonymous:
        _error(anonymous.get("/v1/tasks"), 401, "unauthorized")
        _error(anonymous.post("/v1/tasks", json={"provider": "evolink", "prompt": "x"}), 401, "unauthorized")
        _error(anonymous.get("/v1/tasks", headers={"authorization": "Bearer wrong-key-wrong-key-wrong"}),
               401, "unauthorized")
        _error(anonymous.get("/v1/no-such-route"), 404, "not_found")
        _error(anonymous.get("/nothing/here"), 404, "not_found")

    def post(body: Any, **kwargs: Any) -> httpx.Response:
        return api.post("/v1/tasks", json=body, **kwargs)

    _error(post({"provider": "nope", "prompt": "x"}), 422, "invalid_request", "provider")
    _error(post({"prompt": "x"}), 422, "invalid_request", "provider")
    _error(post({"provider": "evolink"}), 422, "invalid_request", "prompt")
    err = _error(post({"provider": "apimart", "prompt": "x", "output_format": "webp"}), 422, "unsupported",
                 "output_format")
    assert "png" in err["message"] and "jpeg" in err["message"], "the message says what apimart accepts"
    _error(post({"provider": "evolink", "prompt": "x", "n": 2}), 422, "unsupported", "n")
    _error(post({"provider": "evolink", "prompt": "x", "images": ["https://example.com/a.png"],
                 "mask": "https://example.com/m.png"}), 422, "unsupported", "mask")
    _error(post({"provider": "evolink", "prompt": "x", "size": "999x999"}), 422, "invalid_request", "size")
    _error(post({"provider": "evolink", "prompt": "x", "n": 0}), 422, "invalid_request", "n")
    _error(post({"provider": "evolink", "prompt": "x", "colour": "red"}), 422, "invalid_request", "colour")
    _error(post({"provider": "evolink", "prompt": "x", "metadata": {"blob": "m" * (16 * 1024)}}),
           422, "invalid_request", "metadata")
    _error(post({"provider": "evolink", "prompt": "p" * (1024 * 1024 + 10)}), 413, "payload_too_large")
    _error(api.post("/v1/tasks", content=b"this is not json", headers={"content-type": "application/json"}),
           422, "invalid_request")
    _error(post(["a", "list"]), 422, "invalid_request")
    _error(api.get("/v1/tasks/tsk_doesnotexist"), 404, "not_found")
    _error(api.get("/v1/images/img_doesnotexist"), 404, "not_found")
    _error(api.delete("/v1/tasks"), 405, "invalid_request")
    _error(api.get("/v1/tasks", params={"status": "bogus"}), 422, "invalid_request", "status")
    assert api.get("/v1/tasks").json()["data"] == [], "no rejected request created a task"

    # Idempotency-Key: the same body returns the original task; a different body is a conflict.
    body = {"provider": "evolink", "prompt": "once only", "metadata": {"a": 1, "b": 2}}
    key = {"Idempotency-Key": "order-42"}
    first = post(body, headers=key)
    assert first.status_code == 202, first.text
    again = api.post("/v1/tasks", headers={**key, "content-type": "application/json"},
                     content=json.dumps({"metadata": {"b": 2, "a": 1}, "prompt": "once only", "provider": "evolink"}))
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    _error(post({**body, "prompt": "something else"}, headers=key), 409, "conflict")
    _error(post(body, headers={"Idempotency-Key": "k" * 256}), 422, "invalid_request")
    listed = api.get("/v1/tasks").json()["data"]
    assert [t["id"] for t in listed] == [first.json()["id"]], "a replay must not create a second task"
