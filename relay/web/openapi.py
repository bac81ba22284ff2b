"""The OpenAPI 3.1 document of relay's HTTP contract (API.md), served at /openapi.json."""

from __future__ import annotations

from typing import Any

from relay import __version__
from relay.models import BACKGROUNDS, FORMATS, MODERATIONS, QUALITIES
from relay.runtime import Runtime
from relay.states import EVENT_TYPES
from relay.validation import SIZE_CHOICES
from relay.web import subscriptions

ERROR = {"$ref": "#/components/schemas/Error"}


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "The body is not JSON", 401: "Missing or invalid API key", 404: "Not found", 409: "Conflict",
            413: "Payload too large", 422: "Invalid or unsupported request", 500: "Internal error"}
    return {str(c): {"description": text[c], "content": {"application/json": {"schema": ERROR}}} for c in codes}


def _ok(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


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
    secured = [{"bearer": []}]
    task_request = {
        "type": "object", "required": ["provider", "prompt"], "additionalProperties": False,
        "properties": {
            "provider": {"type": "string", "enum": providers},
            "prompt": {"type": "string", "minLength": 1, "maxLength": 32000},
            "size": {"type": "string", "enum": list(SIZE_CHOICES)},
            "quality": {"type": "string", "enum": list(QUALITIES)},
            "n": {"type": "integer", "minimum": 1, "maximum": 10},
            "background": {"type": "string", "enum": list(BACKGROUNDS)},
            "output_format": {"type": "string", "enum": list(FORMATS)},
            "output_compression": {"type": "integer", "minimum": 0, "maximum": 100},
            "moderation": {"type": "string", "enum": list(MODERATIONS)},
            "images": {"type": "array", "maxItems": 16, "items": {"type": "string", "format": "uri"}},
            "mask": {"type": "string", "format": "uri"},
            "webhook_url": {"type": "string", "format": "uri"},
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
        "completed_at": {"type": ["string", "null"]}}}
    event = {"type": "object", "required": ["id", "type", "timestamp", "data"], "properties": {
        "id": {"type": "string"}, "type": {"type": "string", "enum": list(EVENT_TYPES)},
        "timestamp": {"type": "string"}, "sequence": {"type": "integer"}, "data": {"$ref": "#/components/schemas/Task"}}}
    error = {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "message"], "properties": {
            "code": {"type": "string", "enum": ["invalid_request", "unauthorized", "not_found", "conflict",
                                                "payload_too_large", "rate_limited", "unsupported", "internal"]},
            "message": {"type": "string"}, "field": {"type": "string"}}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "relay", "version": __version__,
                 "description": "One API for gpt-image-1.5 across asynchronous resellers."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"TaskRequest": task_request, "Task": task, "Image": image, "Event": event, "Error": error,
                        **subscriptions.openapi_schemas()},
        },
        "paths": {
            "/v1/tasks": {
                "post": {"summary": "Create a task", "security": secured,
                         "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                                         "schema": {"type": "string", "minLength": 1, "maxLength": 255}}],
                         "requestBody": {"required": True, "content": {"application/json": {
                             "schema": {"$ref": "#/components/schemas/TaskRequest"}}}},
                         "responses": {"202": _ok("Accepted", {"$ref": "#/components/schemas/Task"}),
                                       "200": _ok("Replayed by Idempotency-Key", {"$ref": "#/components/schemas/Task"}),
                                       **_errors(401, 409, 413, 422, 500)}},
                "get": {"summary": "List tasks, newest first", "security": secured,
                        "parameters": [_query("status", {"type": "string", "enum": [
                            "pending", "queued", "running", "archiving", "succeeded", "failed", "canceled"]}),
                            _query("provider", {"type": "string"}), limit, _query("cursor", {"type": "string"})],
                        "responses": {"200": _ok("Tasks", _list_of("#/components/schemas/Task")),
                                      **_errors(401, 422, 500)}},
            },
            "/v1/tasks/{task_id}": {"get": {
                "summary": "Get a task", "security": secured, "parameters": [_path("task_id")],
                "responses": {"200": _ok("Task", {"$ref": "#/components/schemas/Task"}), **_errors(401, 404, 500)}}},
            "/v1/tasks/{task_id}/cancel": {"post": {
                "summary": "Cancel a task (409 when terminal)", "security": secured, "parameters": [_path("task_id")],
                "responses": {"200": _ok("Canceled", {"$ref": "#/components/schemas/Task"}),
                              **_errors(401, 404, 409, 500)}}},
            "/v1/images/{image_id}": {"get": {
                "summary": "Archived image bytes (API key or signed link)", "security": [{"bearer": []}, {}],
                "parameters": [_path("image_id"), _query("exp", {"type": "string"}), _query("sig", {"type": "string"})],
                "responses": {"200": {"description": "Image bytes", "content": {"image/*": {}}},
                              "304": {"description": "Not modified: If-None-Match matched the ETag (the sha256)"},
                              **_errors(401, 404, 500)}}},
            "/v1/events": {"get": {
                "summary": "The ordered event log, oldest first after the cursor", "security": secured,
                "parameters": [_query("after", {"type": "string"}), _query("type", {
                    "type": "string", "enum": list(EVENT_TYPES)}), _query("task_id", {"type": "string"}), limit],
                "responses": {"200": _ok("Events", _list_of("#/components/schemas/Event")), **_errors(401, 422, 500)}}},
            "/v1/providers": {"get": {
                "summary": "Configured providers and their capabilities", "security": secured,
                "responses": {"200": _ok("Providers", {"type": "object"}), **_errors(401, 500)}}},
            "/healthz": {"get": {"summary": "Process alive", "responses": {"200": _ok("OK", {"type": "object"})}}},
            "/readyz": {"get": {"summary": "Database and image store reachable", "responses": {
                "200": _ok("Ready", {"type": "object"}), "503": _ok("Not ready", {"type": "object"})}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
                "200": {"description": "Prometheus text", "content": {"text/plain": {}}}}}},
            "/callbacks/{provider}/{task_id}/{token}": {"post": {
                "summary": "Provider callback (the URL relay hands to providers; the token is the credential)",
                "description": "Acknowledged once durably recorded, processed after. A wrong token, an unknown "
                               "provider or one without callbacks is a 404 with no hint.",
                "parameters": [_path("provider"), _path("task_id"), _path("token")],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {}}}},
                "responses": {"200": _ok("Recorded", {"type": "object", "required": ["ok"], "properties": {
                    "ok": {"const": True}}}), **_errors(400, 404, 413, 500)}}},
            **subscriptions.openapi_paths(),
        },
    }
