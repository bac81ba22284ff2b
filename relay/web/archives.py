"""Routes of /v1/archives: archive any link (relay.archives). Thin: parse, call a use case, present."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from relay.archives import ArchiveService
from relay.errors import InvalidRequest
from relay.models import Archive
from relay.present import archive_object
from relay.web.common import (idempotency_key, json_response, query_cursor, query_limit, read_json_body,
                              require_api_key, runtime_of)
from relay.web.tasks import image_url_maker

STATUSES = ("pending", "archiving", "succeeded", "failed")


def _service(request: Request) -> ArchiveService:
    runtime = runtime_of(request)
    return ArchiveService(runtime.ctx, runtime.guard)


def present(request: Request, archive: Archive) -> dict[str, Any]:
    return archive_object(archive, image_url_maker(request))


async def create_archives(request: Request) -> Response:
    """One link (`url`: the archive object) or many (`urls`: `{"data": [...]}`, in the order given).
    202 when something new was accepted; 200 when every link was known (or the Idempotency-Key replayed)."""
    scope = require_api_key(request)
    key = idempotency_key(request)
    data = await read_json_body(request, runtime_of(request).settings.server.max_body_bytes)
    result, many = await _service(request).create(data, scope=scope, idempotency_key=key)
    status = 202 if any(created for _, created in result) else 200
    if many:
        return json_response({"data": [present(request, a) for a, _ in result], "next_cursor": None}, status=status)
    return json_response(present(request, result[0][0]), status=status)


async def get_archive(request: Request) -> Response:
    require_api_key(request)
    archive = await _service(request).get(request.path_params["archive_id"])
    return json_response(present(request, archive))


async def list_archives(request: Request) -> Response:
    require_api_key(request)
    status = request.query_params.get("status")
    if status is not None and status not in STATUSES:
        raise InvalidRequest(f"status must be one of {', '.join(STATUSES)}", field="status")
    archives, cursor = await runtime_of(request).store.list_archives(
        status=status, limit=query_limit(request), cursor=query_cursor(request, "cursor", "arc"))
    return json_response({"data": [present(request, a) for a in archives], "next_cursor": cursor})


routes = [
    Route("/v1/archives", create_archives, methods=["POST"]),
    Route("/v1/archives", list_archives, methods=["GET"]),
    Route("/v1/archives/{archive_id}", get_archive, methods=["GET"]),
]


# ---- the OpenAPI document's part (relay.web.openapi) ------------------------------------------------------
def openapi_schemas() -> dict[str, Any]:
    uri = {"type": "string", "format": "uri", "maxLength": 2048}
    request = {
        "type": "object", "additionalProperties": False,
        "description": "Either url (one link: the answer is an Archive) or urls (up to 100: a list of Archives)",
        "oneOf": [{"required": ["url"]}, {"required": ["urls"]}],
        "properties": {
            "url": uri,
            "urls": {"type": "array", "minItems": 1, "maxItems": 100, "items": uri},
            "expires_at": {"type": "string", "format": "date-time",
                           "description": "When the link dies; default: read from the link (X-Amz-Date + "
                                          "X-Amz-Expires, X-Goog-*, Expires, Azure se), else 24 h"},
            "metadata": {"type": "object"},
            "webhook_url": uri,
        }}
    archive = {"type": "object", "required": ["id", "object", "status", "url", "images"], "properties": {
        "id": {"type": "string"}, "object": {"const": "archive"},
        "status": {"type": "string", "enum": list(STATUSES)},
        "url": {"type": "string"}, "expires_at": {"type": "string"},
        "images": {"type": "array", "items": {"$ref": "#/components/schemas/Image"}},
        "error": {"type": ["object", "null"]}, "metadata": {"type": ["object", "null"]},
        "webhook_url": {"type": ["string", "null"]}, "sequence": {"type": "integer"},
        "created_at": {"type": "string"}, "updated_at": {"type": "string"},
        "completed_at": {"type": ["string", "null"]}}}
    return {"ArchiveRequest": request, "Archive": archive}


def openapi_paths() -> dict[str, Any]:
    from relay.web.openapi import _errors, _ok, _path, _query, cursor_parameter, link

    secured: list[dict[str, list[str]]] = [{"bearer": []}]
    ref = {"$ref": "#/components/schemas/Archive"}
    answer = {"oneOf": [ref, {"type": "object", "required": ["data"], "properties": {
        "data": {"type": "array", "items": ref}, "next_cursor": {"type": "null"}}}]}
    links = {"GetArchive": link("getArchive", "The archive just answered (one url)",
                                path_archive_id="$response.body#/id")}
    return {
        "/v1/archives": {
            "post": {"operationId": "createArchives", "summary": "Archive one link or up to 100 (before they expire)",
                     "security": secured,
                     "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                                     "schema": {"type": "string", "minLength": 1, "maxLength": 255}}],
                     "requestBody": {"required": True, "content": {"application/json": {
                         "schema": {"$ref": "#/components/schemas/ArchiveRequest"}}}},
                     "responses": {"202": _ok("Accepted (something new to archive)", answer, links),
                                   "200": _ok("Every link known already, or replayed by Idempotency-Key", answer,
                                              links),
                                   **_errors(401, 409, 413, 415, 422, 500)}},
            "get": {"operationId": "listArchives", "summary": "List archives, newest first", "security": secured,
                    "parameters": [_query("status", {"type": "string", "enum": list(STATUSES)}),
                                   _query("limit", {"type": "integer", "minimum": 1, "maximum": 200}),
                                   cursor_parameter("cursor", "arc", "Archives older than this one")],
                    "responses": {"200": _ok("Archives", {"type": "object", "required": ["data", "next_cursor"],
                                                          "properties": {"data": {"type": "array", "items": ref},
                                                                         "next_cursor": {"type": ["string", "null"]}}},
                                             {"NextPage": link("listArchives", "The next page",
                                                               query_cursor="$response.body#/next_cursor")}),
                                  **_errors(401, 422, 500)}},
        },
        "/v1/archives/{archive_id}": {"get": {
            "operationId": "getArchive", "summary": "Get an archive", "security": secured,
            "parameters": [_path("archive_id")],
            "responses": {"200": _ok("Archive", ref), **_errors(401, 404, 500)}}},
    }
