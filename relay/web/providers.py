"""GET /v1/providers: the configured providers, what each can do, its circuit breaker, its prices and what
its tasks cost per UTC day; and the routes of the config. An addition to API.md."""

from __future__ import annotations

import datetime as dt
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from relay.circuit import Circuit
from relay.costs import PriceTable, cost_day
from relay.errors import InvalidRequest
from relay.web.common import json_response, require_api_key, runtime_of, small_int

DEFAULT_DAYS, MAX_DAYS = 7, 90


def _day(day: int) -> str:
    return (dt.date(1970, 1, 1) + dt.timedelta(days=day)).isoformat()


def price_object(table: PriceTable | None) -> dict[str, Any] | None:
    if table is None:
        return None
    return {"currency": table.currency, "default": table.default, "by_quality": table.by_quality,
            "by_quality_size": {f"{q}/{s}": v for (q, s), v in sorted(table.by_quality_size.items())},
            "only_successful": table.only_successful, "credit_price": table.credit_price,
            "input_token_price": table.input_token_price, "output_token_price": table.output_token_price}


async def list_providers(request: Request) -> Response:
    """Every provider with its capabilities, circuit, prices and costs per day (`?days=`, default 7, at most 90:
    today and the days before it, UTC; days without a priced task are left out)."""
    require_api_key(request)
    runtime = runtime_of(request)
    text = request.query_params.get("days")
    days = DEFAULT_DAYS if text is None else small_int(text)
    if days is None or not 1 <= days <= MAX_DAYS:
        raise InvalidRequest(f"days must be an integer from 1 to {MAX_DAYS}", field="days")
    since = cost_day(runtime.ctx.clock.now()) - days + 1
    totals: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(await runtime.store.cost_totals(since), key=lambda r: (-r["day"], r["currency"])):
        totals.setdefault(row["provider"], []).append(
            {"day": _day(row["day"]), "currency": row["currency"], "tasks": row["tasks"], "amount": row["amount"]})
    circuits = await runtime.store.circuits()
    settings = runtime.settings
    data = [{"name": name, "kind": p.kind, "capabilities": p.caps.describe(),
             "circuit": circuits.get(name, Circuit(name)).describe(),
             "prices": price_object(settings.prices.get(name)),
             "costs": totals.get(name, [])}
            for name, p in runtime.ctx.providers.items()]
    routes = [{"name": r.name, "providers": list(r.providers), "strategy": r.strategy}
              for r in settings.routes.values()]
    return json_response({"data": data, "routes": routes, "next_cursor": None})


# ---- OpenAPI pieces (relay.web.openapi) -------------------------------------------------------------------
_NULLABLE_STR = {"type": ["string", "null"]}
COST_SCHEMA: dict[str, Any] = {"type": ["object", "null"], "properties": {
    "amount": {"type": "number"}, "currency": {"type": "string"},
    "source": {"type": "string", "enum": ["reported", "estimated"]}}}
ATTEMPT_SCHEMA: dict[str, Any] = {"type": "object", "properties": {
    "provider": {"type": "string"},
    "outcome": {"type": "string", "description": "refused | unavailable | rate_limited | skipped (circuit open), "
                                                 "or for the current provider: pending | submitting | accepted | "
                                                 "failed | canceled | succeeded"},
    "reason": _NULLABLE_STR, "at": _NULLABLE_STR}}
# Additive fields of the task object.
TASK_ROUTING_PROPERTIES: dict[str, Any] = {
    "route": _NULLABLE_STR,
    "providers": {"type": "array", "items": {"type": "string"}, "description": "The providers to try, in order"},
    "attempts": {"type": "array", "items": ATTEMPT_SCHEMA},
    "providers_tried": {"type": "array", "items": {"type": "string"}},
    "usage": {"type": ["object", "null"], "description": "What the provider reported about usage and billing"},
    "cost": COST_SCHEMA,
}


def provider_field_schema(providers: list[str], routes: list[str]) -> dict[str, Any]:
    """`provider` of a task request: a provider, a route, or providers in failover order."""
    return {"oneOf": [{"type": "string", "enum": [*providers, *routes]},
                      {"type": "array", "minItems": 1, "maxItems": 8, "uniqueItems": True,
                       "items": {"type": "string", "enum": providers}}]}


PROVIDERS_SCHEMA: dict[str, Any] = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string"}, "kind": {"type": "string"}, "capabilities": {"type": "object"},
        "circuit": {"type": "object", "properties": {
            "state": {"type": "string", "enum": ["closed", "open", "half_open"]},
            "consecutive_failures": {"type": "integer"}, "opened_at": _NULLABLE_STR, "retry_at": _NULLABLE_STR,
            "last_error": _NULLABLE_STR}},
        "prices": {"type": ["object", "null"]},
        "costs": {"type": "array", "items": {"type": "object", "properties": {
            "day": {"type": "string", "format": "date"}, "currency": {"type": "string"},
            "tasks": {"type": "integer"}, "amount": {"type": "number"}}}}}}},
    "routes": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string"}, "providers": {"type": "array", "items": {"type": "string"}},
        "strategy": {"type": "string", "enum": ["ordered", "cheapest"]}}}},
    "next_cursor": {"type": "null"}}}
