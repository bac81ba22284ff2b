"""Routes of /v1 for subscribers: subscriptions, deliveries (attempt history, retry, replay), the task-webhook secret.

Secrets appear in a response only on create and rotate-secret; everywhere else
a subscription shows its public parts.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from relay.clock import rfc3339
from relay.deliveries.models import DELIVERY_STATUSES, Attempt, Delivery, Keys, Subscription
from relay.deliveries.service import DeliveryService
from relay.errors import InvalidRequest
from relay.validation import parse_replay_input, parse_subscription_input
from relay.web.common import json_response, query_cursor, query_limit, read_json_body, require_api_key, runtime_of

MAX_BODY = 64 * 1024


def _service(request: Request) -> DeliveryService:
    service = runtime_of(request).deliveries
    assert service is not None, "deliveries are not wired into this runtime"
    return service


def subscription_object(sub: Subscription, keys: Keys | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": sub.id, "object": "subscription", "url": sub.url, "events": sub.events,
        "description": sub.description, "enabled": sub.enabled, "disabled_reason": sub.disabled_reason,
        "signing": sub.signing, "public_key": sub.public_key, "previous_public_key": sub.previous_public_key,
        "previous_secret_expires_at": rfc3339(sub.previous_expires_at), "failing_since": rfc3339(sub.failing_since),
        "created_at": rfc3339(sub.created_at), "updated_at": rfc3339(sub.updated_at)}
    if keys is not None:
        out["secret"] = keys.secret
    return out


def attempt_object(a: Attempt) -> dict[str, Any]:
    return {"number": a.number, "at": rfc3339(a.at), "url": a.url, "origin": a.origin, "status_code": a.status_code,
            "latency_ms": a.latency_ms, "response": a.response, "error": a.error}


def delivery_object(d: Delivery, attempts: list[Attempt] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": d.id, "object": "delivery", "event_id": d.event_id, "event_type": d.event_type, "task_id": d.task_id,
        "subscription_id": d.subscription_id, "url": d.url, "status": d.status, "attempts": d.attempts,
        "next_attempt_at": rfc3339(d.next_attempt_at), "last_attempt_at": rfc3339(d.last_attempt_at),
        "last_status_code": d.last_status_code, "last_error": d.last_error, "created_at": rfc3339(d.created_at),
        "updated_at": rfc3339(d.updated_at), "completed_at": rfc3339(d.completed_at)}
    if attempts is not None:
        out["attempt_history"] = [attempt_object(a) for a in attempts]
    return out


async def _json_body(request: Request) -> dict[str, Any]:
    return await read_json_body(request, MAX_BODY)


# ---- subscriptions -------------------------------------------------------------------------------
async def create_subscription(request: Request) -> Response:
    require_api_key(request)
    given = parse_subscription_input(await _json_body(request), partial=False)
    sub, keys = await _service(request).create_subscription(given)
    return json_response(subscription_object(sub, keys), status=201)


async def list_subscriptions(request: Request) -> Response:
    require_api_key(request)
    subs, cursor = await _service(request).store.list_subscriptions(limit=query_limit(request),
                                                                   cursor=query_cursor(request, "cursor", "sub"))
    return json_response({"data": [subscription_object(s) for s in subs], "next_cursor": cursor})


async def get_subscription(request: Request) -> Response:
    require_api_key(request)
    sub = await _service(request).get_subscription(request.path_params["subscription_id"])
    return json_response(subscription_object(sub))


async def update_subscription(request: Request) -> Response:
    require_api_key(request)
    given = parse_subscription_input(await _json_body(request), partial=True)
    sub = await _service(request).update_subscription(request.path_params["subscription_id"], given)
    return json_response(subscription_object(sub))


async def delete_subscription(request: Request) -> Response:
    require_api_key(request)
    sub_id = request.path_params["subscription_id"]
    await _service(request).delete_subscription(sub_id)
    return json_response({"id": sub_id, "object": "subscription", "deleted": True})


async def rotate_secret(request: Request) -> Response:
    require_api_key(request)
    sub, keys = await _service(request).rotate_secret(request.path_params["subscription_id"])
    return json_response(subscription_object(sub, keys))


async def replay(request: Request) -> Response:
    require_api_key(request)
    given = parse_replay_input(await _json_body(request))
    result = await _service(request).replay(request.path_params["subscription_id"], given)
    return json_response(result, status=202)


# ---- deliveries ----------------------------------------------------------------------------------
async def list_deliveries(request: Request) -> Response:
    """Newest first; filter by subscription_id, status, task_id, event_id."""
    require_api_key(request)
    params = request.query_params
    status = params.get("status")
    if status is not None and status not in DELIVERY_STATUSES:
        raise InvalidRequest(f"status must be one of {', '.join(DELIVERY_STATUSES)}", field="status")
    found, cursor = await _service(request).store.list_deliveries(
        subscription_id=params.get("subscription_id"), status=status, task_id=params.get("task_id"),
        event_id=params.get("event_id"), limit=query_limit(request), cursor=query_cursor(request, "cursor", "dlv"))
    return json_response({"data": [delivery_object(d) for d in found], "next_cursor": cursor})


async def get_delivery(request: Request) -> Response:
    """One delivery with its attempt history (newest first, up to 100)."""
    require_api_key(request)
    service = _service(request)
    delivery = await service.get_delivery(request.path_params["delivery_id"])
    return json_response(delivery_object(delivery, await service.store.list_attempts(delivery.id)))


async def retry_delivery(request: Request) -> Response:
    require_api_key(request)
    delivery = await _service(request).retry_delivery(request.path_params["delivery_id"])
    return json_response(delivery_object(delivery), status=202)


async def webhook_secret(request: Request) -> Response:
    """The secret that signs deliveries to a task's own webhook_url (the Replicate model)."""
    require_api_key(request)
    return json_response({"object": "webhook_secret", "secret": _service(request).task_secret})


routes = [
    Route("/v1/subscriptions", create_subscription, methods=["POST"]),
    Route("/v1/subscriptions", list_subscriptions, methods=["GET"]),
    Route("/v1/subscriptions/{subscription_id}", get_subscription, methods=["GET"]),
    Route("/v1/subscriptions/{subscription_id}", update_subscription, methods=["PATCH"]),
    Route("/v1/subscriptions/{subscription_id}", delete_subscription, methods=["DELETE"]),
    Route("/v1/subscriptions/{subscription_id}/rotate-secret", rotate_secret, methods=["POST"]),
    Route("/v1/subscriptions/{subscription_id}/replay", replay, methods=["POST"]),
    Route("/v1/deliveries", list_deliveries, methods=["GET"]),
    Route("/v1/deliveries/{delivery_id}", get_delivery, methods=["GET"]),
    Route("/v1/deliveries/{delivery_id}/retry", retry_delivery, methods=["POST"]),
    Route("/v1/webhook-secret", webhook_secret, methods=["GET"]),
]


# ---- OpenAPI (merged into /openapi.json by relay.web.openapi) --------------------------------------
def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _ok(description: str, schema: dict[str, Any], links: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": schema}}}
    if links:
        out["links"] = links
    return out


def _errors(*codes: int) -> dict[str, Any]:
    text = {401: "Missing or invalid API key", 404: "Not found", 409: "Conflict", 413: "Payload too large",
            415: "The body is not sent as JSON (Content-Type; none is taken as JSON)",
            422: "Invalid request (field named)", 500: "Internal error"}
    return {str(c): _ok(text[c], _ref("Error")) for c in codes}


def _page(name: str) -> dict[str, Any]:
    return {"type": "object", "required": ["data", "next_cursor"], "properties": {
        "data": {"type": "array", "items": _ref(name)}, "next_cursor": {"type": ["string", "null"]}}}


def openapi_schemas() -> dict[str, Any]:
    from relay.states import ALL_EVENT_TYPES, EVENT_WILDCARDS
    filters = {"type": "array", "minItems": 1, "items": {"type": "string", "enum": [*ALL_EVENT_TYPES,
                                                                                     *EVENT_WILDCARDS]}}
    when = {"type": ["string", "null"], "format": "date-time"}
    changeable = {"url": {"type": "string", "format": "uri", "maxLength": 2048}, "events": filters,
                  "description": {"type": ["string", "null"], "maxLength": 1024}, "enabled": {"type": "boolean"}}
    return {
        "SubscriptionRequest": {"type": "object", "required": ["url"], "additionalProperties": False, "properties": {
            **changeable,
            "signing": {"type": "string", "enum": ["hmac", "ed25519"],
                        "description": "ed25519 adds a v1a signature (verify with public_key) beside v1"}}},
        "SubscriptionUpdate": {"type": "object", "additionalProperties": False, "properties": changeable,
                               "description": "Only what is given changes; signing cannot be changed"},
        "Subscription": {"type": "object", "properties": {
            "id": {"type": "string"}, "url": {"type": "string"}, "events": filters,
            "description": {"type": ["string", "null"]}, "enabled": {"type": "boolean"},
            "disabled_reason": {"type": ["string", "null"], "enum": ["manual", "gone", "failing", None]},
            "signing": {"type": "string"}, "public_key": {"type": ["string", "null"]},
            "previous_public_key": {"type": ["string", "null"]}, "previous_secret_expires_at": when,
            "failing_since": when, "created_at": when, "updated_at": when,
            "secret": {"type": "string", "description": "whsec_…: only in the answers of create and rotate-secret"}}},
        "Delivery": {"type": "object", "properties": {
            "id": {"type": "string"}, "event_id": {"type": "string", "description": "also the webhook-id header"},
            "event_type": {"type": "string"}, "task_id": {"type": "string"},
            "subscription_id": {"type": ["string", "null"], "description": "null: the task's own webhook_url"},
            "url": {"type": "string"}, "status": {"type": "string", "enum": list(DELIVERY_STATUSES)},
            "attempts": {"type": "integer"}, "next_attempt_at": when, "last_attempt_at": when,
            "last_status_code": {"type": ["integer", "null"]}, "last_error": {"type": ["string", "null"]},
            "created_at": when, "updated_at": when, "completed_at": when,
            "attempt_history": {"type": "array", "description": "GET /v1/deliveries/{id} only; newest first",
                                "items": {"type": "object", "properties": {
                                    "number": {"type": "integer"}, "at": when, "url": {"type": "string"},
                                    "origin": {"type": "string", "enum": ["auto", "retry", "replay"]},
                                    "status_code": {"type": ["integer", "null"]},
                                    "latency_ms": {"type": ["number", "null"]},
                                    "response": {"type": ["string", "null"], "description": "first 4 KiB"},
                                    "error": {"type": ["string", "null"]}}}}}},
        "ReplayRequest": {"type": "object", "required": ["since"], "additionalProperties": False, "properties": {
            "since": {"type": "string", "format": "date-time"}, "until": {"type": "string", "format": "date-time"},
            "status": {"type": "string", "enum": ["failed", "canceled", "succeeded", "all"], "default": "failed"}}},
    }


def openapi_paths() -> dict[str, Any]:
    from relay.web.openapi import cursor_parameter, link

    secured: list[dict[str, list[str]]] = [{"bearer": []}]
    path_id = [{"name": "subscription_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    dlv_id = [{"name": "delivery_id", "in": "path", "required": True, "schema": {"type": "string"}}]

    def query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "in": "query", "required": False, "schema": schema}

    def page(prefix: str) -> list[dict[str, Any]]:
        return [query("limit", {"type": "integer", "minimum": 1, "maximum": 200}),
                cursor_parameter("cursor", prefix, "Items older than this one")]

    def body(name: str) -> dict[str, Any]:
        return {"required": True, "content": {"application/json": {"schema": _ref(name)}}}

    sub_id, dlv = "$response.body#/id", "$response.body#/id"
    to_sub = {
        "GetSubscription": link("getSubscription", "The subscription", path_subscription_id=sub_id),
        "UpdateSubscription": link("updateSubscription", "Change it", path_subscription_id=sub_id),
        "RotateSecret": link("rotateSubscriptionSecret", "Rotate its secret", path_subscription_id=sub_id),
        "Replay": link("replaySubscription", "Replay its deliveries since it was created",
                       path_subscription_id=sub_id, body={"since": "$response.body#/created_at"}),
        "DeleteSubscription": link("deleteSubscription", "Delete it", path_subscription_id=sub_id),
        "SubscriptionDeliveries": link("listDeliveries", "Its deliveries", query_subscription_id=sub_id)}

    def only(*names: str) -> dict[str, Any]:
        return {name: to_sub[name] for name in names}

    first_delivery = "$response.body#/data/0/id"
    return {
        "/v1/subscriptions": {
            "post": {"operationId": "createSubscription",
                     "summary": "Create a subscription (the secret is shown only here and on rotate)",
                     "security": secured, "requestBody": body("SubscriptionRequest"),
                     "responses": {"201": _ok("Created", _ref("Subscription"), to_sub),
                                   **_errors(401, 413, 415, 422, 500)}},
            "get": {"operationId": "listSubscriptions", "summary": "List subscriptions, newest first",
                    "security": secured, "parameters": page("sub"),
                    "responses": {"200": _ok("Subscriptions", _page("Subscription"), {
                        "NextPage": link("listSubscriptions", "The next page",
                                         query_cursor="$response.body#/next_cursor"),
                        "FirstSubscription": link("getSubscription", "The page's first subscription",
                                                  path_subscription_id="$response.body#/data/0/id")}),
                                  **_errors(401, 422, 500)}}},
        "/v1/subscriptions/{subscription_id}": {
            "get": {"operationId": "getSubscription", "summary": "Get a subscription", "security": secured,
                    "parameters": path_id,
                    "responses": {"200": _ok("Subscription", _ref("Subscription"),
                                             only("UpdateSubscription", "RotateSecret", "Replay")),
                                  **_errors(401, 404, 500)}},
            "patch": {"operationId": "updateSubscription", "summary": "Change url, events, description or enabled",
                      "security": secured, "parameters": path_id, "requestBody": body("SubscriptionUpdate"),
                      "responses": {"200": _ok("Subscription", _ref("Subscription"),
                                               only("GetSubscription", "RotateSecret", "SubscriptionDeliveries")),
                                    **_errors(401, 404, 413, 415, 422, 500)}},
            "delete": {"operationId": "deleteSubscription",
                       "summary": "Delete (pending deliveries are canceled; history stays)", "security": secured,
                       "parameters": path_id,
                       "responses": {"200": _ok("Deleted", {"type": "object"}, {
                           "GetDeleted": link("getSubscription", "Gone: 404", path_subscription_id=sub_id)}),
                                     **_errors(401, 404, 500)}}},
        "/v1/subscriptions/{subscription_id}/rotate-secret": {"post": {
            "operationId": "rotateSubscriptionSecret",
            "summary": "New secret; the old one keeps signing beside it for 24 h (409 while ten already sign)",
            "security": secured, "parameters": path_id,
            "responses": {"200": _ok("Subscription with its new secret", _ref("Subscription"),
                                     only("GetSubscription", "Replay")),
                          **_errors(401, 404, 409, 500)}}},
        "/v1/subscriptions/{subscription_id}/replay": {"post": {
            "operationId": "replaySubscription",
            "summary": "Send again the deliveries created in a time window with a status", "security": secured,
            "parameters": path_id,
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("ReplayRequest")}}},
            "responses": {"202": _ok("Replay started", {"type": "object", "properties": {
                "replayed": {"type": "integer"}, "has_more": {"type": "boolean"},
                "subscription_id": {"type": "string"}}}, {
                    "SubscriptionDeliveries": link("listDeliveries", "The deliveries replayed",
                                                   query_subscription_id="$request.path.subscription_id")}),
                          **_errors(401, 404, 413, 415, 422, 500)}}},
        "/v1/deliveries": {"get": {
            "operationId": "listDeliveries",
            "summary": "Deliveries, newest first (status=failed: the dead letters)", "security": secured,
            "parameters": [query("subscription_id", {"type": "string"}),
                           query("status", {"type": "string", "enum": list(DELIVERY_STATUSES)}),
                           query("task_id", {"type": "string"}), query("event_id", {"type": "string"}), *page("dlv")],
            "responses": {"200": _ok("Deliveries", _page("Delivery"), {
                "NextPage": link("listDeliveries", "The next page", query_cursor="$response.body#/next_cursor"),
                "FirstDelivery": link("getDelivery", "The page's first delivery", path_delivery_id=first_delivery),
                "RetryFirst": link("retryDelivery", "Retry the page's first delivery",
                                   path_delivery_id=first_delivery)}),
                          **_errors(401, 422, 500)}}},
        "/v1/deliveries/{delivery_id}": {"get": {
            "operationId": "getDelivery", "summary": "A delivery with its attempt history", "security": secured,
            "parameters": dlv_id,
            "responses": {"200": _ok("Delivery", _ref("Delivery"), {
                "Retry": link("retryDelivery", "Attempt it now", path_delivery_id=dlv)}),
                          **_errors(401, 404, 500)}}},
        "/v1/deliveries/{delivery_id}/retry": {"post": {
            "operationId": "retryDelivery",
            "summary": "Attempt now (a settled delivery starts a new round of the schedule)", "security": secured,
            "parameters": dlv_id,
            "responses": {"202": _ok("Delivery", _ref("Delivery"), {
                "GetDelivery": link("getDelivery", "The delivery and its attempts", path_delivery_id=dlv)}),
                          **_errors(401, 404, 500)}}},
        "/v1/webhook-secret": {"get": {
            "operationId": "getWebhookSecret",
            "summary": "The whsec_ secret that signs deliveries to a task's own webhook_url", "security": secured,
            "responses": {"200": _ok("Secret", {"type": "object", "properties": {"secret": {"type": "string"}}}),
                          **_errors(401, 500)}}},
    }
