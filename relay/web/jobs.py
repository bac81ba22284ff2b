"""Routes of /v1/jobs: the job queue as an operator sees it, and retrying a dead job (API.md "Added next").

A job dies when it failed more times than it may (its last error kept); until now it sat in the jobs
table with no way to see or retry it. The console's Queue page calls the same `retry_job` use case.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from relay.clock import rfc3339
from relay.errors import InvalidRequest, NotFound
from relay.runtime import Runtime
from relay.store.console import JOB_STATES, JobInfo
from relay.web.common import json_response, query_cursor, query_limit, require_api_key, runtime_of


def job_object(job: JobInfo) -> dict[str, Any]:
    return {"id": job.id, "object": "job", "kind": job.kind, "task_id": job.task_id, "state": job.state,
            "payload": job.payload, "run_at": rfc3339(job.run_at), "attempts": job.attempts,
            "max_attempts": job.max_attempts, "last_error": job.last_error, "leased": job.leased,
            "lease_until": None if job.lease_until is None else rfc3339(job.lease_until),
            "created_at": rfc3339(job.created_at)}


async def retry_job(runtime: Runtime, job_id: str) -> JobInfo:
    """Queue a dead job again, due now (NotFound if unknown, Conflict if it is not dead)."""
    job = await runtime.store.retry_dead_job(job_id, runtime.ctx.clock.now())
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    return job


async def list_jobs(request: Request) -> Response:
    require_api_key(request)
    state = request.query_params.get("state", "dead")
    if state not in JOB_STATES:
        raise InvalidRequest(f"state must be one of {', '.join(JOB_STATES)}", field="state")
    jobs, cursor = await runtime_of(request).store.list_jobs(
        state=state, kind=request.query_params.get("kind") or None, limit=query_limit(request),
        cursor=query_cursor(request, "cursor", "job"))
    return json_response({"data": [job_object(j) for j in jobs], "next_cursor": cursor})


async def retry(request: Request) -> Response:
    require_api_key(request)
    job = await retry_job(runtime_of(request), request.path_params["job_id"])
    return json_response(job_object(job), status=202)


routes = [
    Route("/v1/jobs", list_jobs, methods=["GET"]),
    Route("/v1/jobs/{job_id}/retry", retry, methods=["POST"]),
]


def openapi_paths() -> dict[str, Any]:
    """Merged into /openapi.json by relay.web.openapi."""
    from relay.web.openapi import cursor_parameter, link

    error = {"$ref": "#/components/schemas/Error"}

    def errors(*codes: int) -> dict[str, Any]:
        text = {401: "Missing or invalid API key", 404: "Not found", 409: "The job is not dead",
                422: "Invalid request (field named)", 500: "Internal error"}
        return {str(c): {"description": text[c], "content": {"application/json": {"schema": error}}} for c in codes}

    job = {"$ref": "#/components/schemas/Job"}
    secured: list[dict[str, list[str]]] = [{"bearer": []}]
    return {
        "/v1/jobs": {"get": {
            "operationId": "listJobs", "tags": ["jobs"],
            "summary": "Jobs in the queue, newest first (state=dead: jobs that failed for good, with their last error)",
            "security": secured,
            "parameters": [
                {"name": "state", "in": "query", "required": False,
                 "schema": {"type": "string", "enum": list(JOB_STATES), "default": "dead"}},
                {"name": "kind", "in": "query", "required": False, "schema": {"type": "string"}},
                {"name": "limit", "in": "query", "required": False,
                 "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
                cursor_parameter("cursor", "job", "Jobs older than this one")],
            "responses": {"200": {"description": "Jobs", "content": {"application/json": {"schema": {
                "type": "object", "required": ["data", "next_cursor"], "properties": {
                    "data": {"type": "array", "items": job}, "next_cursor": {"type": ["string", "null"]}}}}},
                "links": {"NextPage": link("listJobs", "The next page", query_cursor="$response.body#/next_cursor"),
                          "RetryFirst": link("retryJob", "Retry the page's first job",
                                             path_job_id="$response.body#/data/0/id")}},
                **errors(401, 422, 500)}}},
        "/v1/jobs/{job_id}/retry": {"post": {
            "operationId": "retryJob", "tags": ["jobs"],
            "summary": "Queue a dead job again, due now, its attempts reset (if the same work was queued again "
                       "since, the dead job is dropped and the live one returned)",
            "security": secured,
            "parameters": [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"202": {"description": "The job, queued", "content": {"application/json": {
                "schema": job}}}, **errors(401, 404, 409, 500)}}},
    }


def openapi_schemas() -> dict[str, Any]:
    when = {"type": "string", "format": "date-time"}
    return {"Job": {"type": "object", "properties": {
        "id": {"type": "string"}, "object": {"type": "string", "enum": ["job"]},
        "kind": {"type": "string", "description": "submit | poll | callback | archive | deliver | …"},
        "task_id": {"type": ["string", "null"]}, "state": {"type": "string", "enum": list(JOB_STATES)},
        "payload": {"type": "object"},
        "run_at": {**when, "description": "a queued job: when it is due; a dead one: when it died"},
        "attempts": {"type": "integer"},
        "max_attempts": {"type": "integer"}, "last_error": {"type": ["string", "null"]},
        "leased": {"type": "boolean", "description": "a worker claimed it (held until lease_until)"},
        "lease_until": {"type": ["string", "null"], "format": "date-time",
                        "description": "when the lease runs out: a job still queued then is due again"},
        "created_at": when}}}
