"""The OpenAPI 3.1 document of relay's HTTP contract (API.md), served at /openapi.json.

Operations carry operationIds and their responses carry OpenAPI links (create a task →
get, cancel, list its events; a page → the next page; …), so that a client generator, or
schemathesis' stateful mode, can chain calls with the ids relay hands out.
"""

from __future__ import annotations

from typing import Any

from relay import __version__
from relay.models import BACKGROUNDS, FORMATS, MODERATIONS, QUALITIES
from relay.runtime import Runtime
from relay.states import ALL_EVENT_TYPES, EVENT_TYPES
from relay.validation import SIZE_CHOICES
from relay.web import archives, jobs, subscriptions
from relay.web.providers import PROVIDERS_SCHEMA, TASK_ROUTING_PROPERTIES, provider_field_schema

ERROR = {"$ref": "#/components/schemas/Error"}
ERROR_CODES = ["invalid_request", "unauthorized", "not_found", "conflict", "payload_too_large",
               "unsupported_media_type", "rate_limited", "unsupported", "internal"]
# A paging cursor is an id from an earlier page (or empty: the first page); anything else is a 422.
ULID_PATTERN = "[0-9A-HJKMNP-TV-Z]{26}"


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "The body is not JSON", 401: "Missing or invalid API key", 404: "Not found", 409: "Conflict",
            413: "Payload too large", 415: "The body is not sent as JSON (Content-Type; none is taken as JSON)",
            422: "Invalid or unsupported request (the field is named)", 500: "Internal error",
            503: "The image store cannot be read now (image_store_unavailable; Retry-After)"}
    return {str(c): {"description": text[c], "content": {"application/json": {"schema": ERROR}}} for c in codes}


def _ok(description: str, schema: dict[str, Any], links: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": schema}}}
    if links:
        out["links"] = links
    return out


def link(operation_id: str, description: str, *, body: dict[str, Any] | None = None,
         **parameters: str) -> dict[str, Any]:
    """An OpenAPI link; `parameters` are keyed `path_x` / `query_x` (written `path.x` / `query.x`)."""
    out: dict[str, Any] = {"operationId": operation_id, "description": description,
                           "parameters": {key.replace("_", ".", 1): value for key, value in parameters.items()}}
    if body is not None:
        out["requestBody"] = body
    return out


def cursor_parameter(name: str, prefix: str, what: str) -> dict[str, Any]:
    """A paging cursor query parameter: the last id of the previous page; anything else is 422 naming it."""
    return {"name": name, "in": "query", "required": False,
            "schema": {"type": "string", "pattern": f"^({prefix}_{ULID_PATTERN})?$"},
            "description": f"{what}: a {prefix}_… id from the previous page's next_cursor (422 otherwise)"}


def _list_of(ref: str) -> dict[str, Any]:
    return {"type": "object", "required": ["data", "next_cursor"], "properties": {
        "data": {"type": "array", "items": {"$ref": ref}}, "next_cursor": {"type": ["string", "null"]}}}


def _query(name: str, schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def openapi_document(runtime: Runtime) -> dict[str, Any]:
    providers = list(runtime.ctx.providers)
    limit = _query("limit", {"type": "integer", "minimum": 1, "maximum": 200})
    secured: list[dict[str, list[str]]] = [{"bearer": []}]
    task_id = "$response.body#/id"
    task_links = {"GetTask": link("getTask", "The task just answered", path_task_id=task_id),
                  "CancelTask": link("cancelTask", "Cancel it", path_task_id=task_id),
                  "TaskEvents": link("listEvents", "Its events", query_task_id=task_id),
                  "TaskDeliveries": link("listDeliveries", "Deliveries of its events", query_task_id=task_id)}
    created_links = {**task_links, "SameProvider": link("listTasks", "Tasks of its provider and status",
                                                        query_provider="$response.body#/provider",
                                                        query_status="$response.body#/status")}
    task_request = {
        "type": "object", "required": ["provider", "prompt"], "additionalProperties": False,
        "dependentRequired": {"webhook_events": ["webhook_url"]},
        "properties": {
            "provider": provider_field_schema(providers, list(runtime.settings.routes)),
            "prompt": {"type": "string", "minLength": 1, "maxLength": 32000, "pattern": "\\S"},
            "size": {"type": "string", "enum": list(SIZE_CHOICES)},
            "quality": {"type": "string", "enum": list(QUALITIES)},
            "n": {"type": "integer", "minimum": 1, "maximum": 10},
            "background": {"type": "string", "enum": list(BACKGROUNDS)},
            "output_format": {"type": "string", "enum": list(FORMATS)},
            "output_compression": {"type": "integer", "minimum": 0, "maximum": 100},
            "moderation": {"type": "string", "enum": list(MODERATIONS)},
            "images": {"type": "array", "maxItems": 16,
                       "items": {"type": "string", "format": "uri", "maxLength": 2048}},
            "mask": {"type": "string", "format": "uri", "maxLength": 2048},
            "webhook_url": {"type": "string", "format": "uri", "maxLength": 2048},
            "webhook_events": {"type": "array", "items": {"type": "string", "enum": [*EVENT_TYPES, "task.*"]}},
            "metadata": {"type": "object"},
        }}
    # POST /v1/tasks with provider_task_id: adopt a provider task submitted elsewhere (relay.adopt).
    adopt_request = {
        "type": "object", "required": ["provider", "provider_task_id"], "additionalProperties": False,
        "dependentRequired": {"webhook_events": ["webhook_url"]},
        "properties": {
            "provider": {"type": "string", "enum": providers},
            "provider_task_id": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._:~-]{0,199}$",
                                 "not": {"pattern": "\\.\\."}},
            "webhook_url": {"type": "string", "format": "uri", "maxLength": 2048},
            "webhook_events": {"type": "array", "items": {"type": "string", "enum": [*EVENT_TYPES, "task.*"]}},
            "metadata": {"type": "object"},
        }}
    image = {"type": "object", "properties": {
        "id": {"type": "string"}, "index": {"type": "integer"}, "status": {"type": "string"},
        "url": {"type": ["string", "null"]}, "sha256": {"type": ["string", "null"]},
        "content_type": {"type": ["string", "null"]}, "width": {"type": ["integer", "null"]},
        "height": {"type": ["integer", "null"]}, "bytes": {"type": ["integer", "null"]},
        "source_url": {"type": ["string", "null"]}, "source_expires_at": {"type": ["string", "null"]},
        "archived_at": {"type": ["string", "null"]}}}
    task = {"type": "object", "required": ["id", "provider", "status", "sequence", "images"], "properties": {
        "id": {"type": "string"}, "provider": {"type": "string"}, "provider_task_id": {"type": ["string", "null"]},
        "status": {"type": "string", "enum": ["pending", "queued", "running", "archiving", "succeeded", "failed",
                                              "canceled"]},
        "progress": {"type": ["integer", "null"]}, "request": {"type": "object"},
        "images": {"type": "array", "items": {"$ref": "#/components/schemas/Image"}},
        "error": {"type": ["object", "null"]}, "metadata": {"type": ["object", "null"]},
        "sequence": {"type": "integer"}, "created_at": {"type": "string"}, "updated_at": {"type": "string"},
        "completed_at": {"type": ["string", "null"]}, **TASK_ROUTING_PROPERTIES}}
    event = {"type": "object", "required": ["id", "type", "timestamp", "data"], "properties": {
        "id": {"type": "string"}, "type": {"type": "string", "enum": list(ALL_EVENT_TYPES)},
        "timestamp": {"type": "string"}, "sequence": {"type": "integer"},
        "data": {"anyOf": [{"$ref": "#/components/schemas/Task"}, {"$ref": "#/components/schemas/Archive"}]}}}
    error = {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "message"], "properties": {
            "code": {"type": "string", "enum": ERROR_CODES},
            "message": {"type": "string"}, "field": {"type": "string"}}}}}
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "relay", "version": __version__,
                 "description": "One API for gpt-image-1.5 across asynchronous resellers."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"TaskRequest": task_request, "Task": task, "Image": image, "Event": event, "Error": error,
                        **subscriptions.openapi_schemas(), **jobs.openapi_schemas(),
                        **archives.openapi_schemas(), "AdoptRequest": adopt_request},
        },
        "paths": {
            "/v1/tasks": {
                "post": {"operationId": "createTask", "summary": "Create a task", "security": secured,
                         "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                                         "schema": {"type": "string", "minLength": 1, "maxLength": 255}}],
                         "requestBody": {"required": True, "content": {"application/json": {
                             "schema": {"oneOf": [{"$ref": "#/components/schemas/TaskRequest"},
                                                  {"$ref": "#/components/schemas/AdoptRequest"}]}}}},
                         "responses": {"202": _ok("Accepted", {"$ref": "#/components/schemas/Task"}, created_links),
                                       "200": _ok("Replayed by Idempotency-Key", {"$ref": "#/components/schemas/Task"},
                                                  created_links),
                                       **_errors(401, 409, 413, 415, 422, 500)}},
                "get": {"operationId": "listTasks", "summary": "List tasks, newest first", "security": secured,
                        "parameters": [_query("status", {"type": "string", "enum": [
                            "pending", "queued", "running", "archiving", "succeeded", "failed", "canceled"]}),
                            _query("provider", {"type": "string"}), limit,
                            cursor_parameter("cursor", "tsk", "Tasks older than this one")],
                        "responses": {"200": _ok("Tasks", _list_of("#/components/schemas/Task"), {
                            "NextPage": link("listTasks", "The next page", query_cursor="$response.body#/next_cursor"),
                            "FirstTask": link("getTask", "The first task of the page",
                                              path_task_id="$response.body#/data/0/id")}),
                                      **_errors(401, 422, 500)}},
            },
            "/v1/tasks/{task_id}": {"get": {
                "operationId": "getTask", "summary": "Get a task", "security": secured,
                "parameters": [_path("task_id")],
                "responses": {"200": _ok("Task", {"$ref": "#/components/schemas/Task"}, {
                    "CancelTask": task_links["CancelTask"], "TaskEvents": task_links["TaskEvents"],
                    "FirstImage": link("getImage", "Its first archived image",
                                       path_image_id="$response.body#/images/0/id")}),
                              **_errors(401, 404, 500)}}},
            "/v1/tasks/{task_id}/cancel": {"post": {
                "operationId": "cancelTask", "summary": "Cancel a task (409 when terminal)", "security": secured,
                "parameters": [_path("task_id")],
                "responses": {"200": _ok("Canceled", {"$ref": "#/components/schemas/Task"}, {
                    "GetTask": task_links["GetTask"], "TaskEvents": task_links["TaskEvents"]}),
                              **_errors(401, 404, 409, 500)}}},
            "/v1/images/{image_id}": {"get": {
                "operationId": "getImage", "summary": "Archived image bytes (API key or signed link)",
                "security": [{"bearer": []}, {}],
                "parameters": [_path("image_id"), _query("exp", {"type": "string"}), _query("sig", {"type": "string"})],
                "responses": {"200": {"description": "Image bytes", "content": {"image/*": {}}},
                              "304": {"description": "Not modified: If-None-Match matched the ETag (the sha256)"},
                              **_errors(401, 404, 500, 503)}}},
            "/v1/events": {"get": {
                "operationId": "listEvents", "summary": "The ordered event log, oldest first after the cursor",
                "security": secured,
                "parameters": [cursor_parameter("after", "evt", "Events after this one (an unknown one is 422)"),
                               _query("type", {"type": "string", "enum": list(ALL_EVENT_TYPES)}),
                               _query("task_id", {"type": "string"}), limit],
                "responses": {"200": _ok("Events", _list_of("#/components/schemas/Event"), {
                    "NextPage": link("listEvents", "The next page", query_after="$response.body#/next_cursor"),
                    "EventTask": link("getTask", "The task of the page's first event",
                                      path_task_id="$response.body#/data/0/data/id")}),
                              **_errors(401, 422, 500)}}},
            "/v1/providers": {"get": {
                "operationId": "listProviders",
                "summary": "Configured providers: capabilities, circuit breaker, prices, costs per day; and routes",
                "security": secured,
                "parameters": [_query("days", {"type": "integer", "minimum": 1, "maximum": 90},
                                      "Days of cost totals (today and before, UTC); default 7")],
                "responses": {"200": _ok("Providers", PROVIDERS_SCHEMA), **_errors(401, 422, 500)}}},
            "/healthz": {"get": {"operationId": "healthz", "summary": "Process alive",
                                 "responses": {"200": _ok("OK", {"type": "object"})}}},
            "/readyz": {"get": {"operationId": "readyz", "summary": "Database and image store reachable", "responses": {
                "200": _ok("Ready", {"type": "object"}), "503": _ok("Not ready", {"type": "object"})}}},
            "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus metrics", "responses": {
                "200": {"description": "Prometheus text", "content": {"text/plain": {}}}}}},
            "/callbacks/{provider}/{task_id}/{token}": {"post": {
                "operationId": "providerCallback",
                "summary": "Provider callback (the URL relay hands to providers; the token is the credential)",
                "description": "Acknowledged once durably recorded, processed after. A wrong token, an unknown "
                               "provider or one without callbacks is a 404 with no hint.",
                "parameters": [_path("provider"), _path("task_id"), _path("token")],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {}}}},
                "responses": {"200": _ok("Recorded", {"type": "object", "required": ["ok"], "properties": {
                    "ok": {"const": True}}}), **_errors(400, 404, 413, 500)}}},
            **subscriptions.openapi_paths(),
            **jobs.openapi_paths(),
            **archives.openapi_paths(),
        },
    }
    _with_nul_refusals(document["paths"])
    return document


def _with_nul_refusals(paths: dict[str, Any]) -> None:
    """Every operation with a path parameter can answer 404, and every one with a query parameter 422: a NUL
    character in either is refused in front of every route (relay.web.app.refuse_nul)."""
    for operations in paths.values():
        for operation in operations.values():
            kinds = {parameter.get("in") for parameter in operation.get("parameters", [])}
            for kind, status in (("path", 404), ("query", 422)):
                if kind in kinds and str(status) not in operation["responses"]:
                    operation["responses"].update(_errors(status))
