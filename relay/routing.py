"""Which providers a task may go to, in which order, and when its submit moves on to the next one.

A task names one provider (as always), a list of them in failover order (`"provider": ["evolink", "apimart"]`),
or a route of the config (`[routes.NAME] providers = […], strategy = "ordered" | "cheapest"`). A list must
name configured providers that can all honour every option asked (else 422 naming the field); a route keeps
those of its providers that can (422 `unsupported` when none can), cheapest first for `strategy = "cheapest"`
(relay.costs prices the request; providers without a price go last, in the route's order).

The submit moves to the next provider only when the current one certainly did not accept the task
(`moves_on`): it refused it with a 4xx that is not about the prompt's content, answered 5xx, could not be
connected to, rate-limited it beyond the configured patience, or its circuit is open. Never when the outcome
of a submit is unknown: that is relay.jobs.submit's `submit_outcome_unknown` rule, unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from relay.config import Settings
from relay.costs import PriceTable
from relay.errors import (
    InvalidRequest,
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
    RateLimited,
    Unsupported,
)
from relay.models import GenerationRequest, Task
from relay.providers.base import Provider, check_supported

MAX_PROVIDERS = 8
# 4xx statuses that say the provider account, not the request, is the problem: they count against its circuit.
ACCOUNT_STATUSES = frozenset({401, 402, 403})


@dataclass(frozen=True)
class Choice:
    """What the task's `provider` field asked for, before the request's options are checked."""

    names: tuple[str, ...]
    route: str | None = None
    strategy: str = "ordered"
    listed: bool = False            # a list in the body (each must support every option) or a route


def choose(value: Any, settings: Settings) -> Choice | None:
    """The providers a `provider` field names; None for a plain provider name (the path of old).
    Raises InvalidRequest (field "provider") for a list that is not a list of distinct configured names."""
    if isinstance(value, str) and value in settings.routes:
        route = settings.routes[value]
        return Choice(names=route.providers, route=route.name, strategy=route.strategy)
    if not isinstance(value, list):
        return None
    known = list(settings.providers)
    if not value or len(value) > MAX_PROVIDERS or not all(isinstance(v, str) and v for v in value):
        raise InvalidRequest(f"provider must be a provider name, a route name, or a list of 1 to {MAX_PROVIDERS} "
                             "provider names in failover order", field="provider")
    if len(set(value)) != len(value):
        raise InvalidRequest("provider lists a provider twice", field="provider")
    for name in value:
        if name not in known:
            raise InvalidRequest(f"unknown provider {name!r}; configured providers: {', '.join(known)}",
                                 field="provider")
    return Choice(names=tuple(value), listed=True)


def plan(choice: Choice, request: GenerationRequest, providers: Mapping[str, Provider],
         prices: Mapping[str, PriceTable]) -> tuple[str, ...]:
    """The providers to try, in order. A list: all must support the request (the first refusal is the 422).
    A route: those that do, ordered by its strategy; 422 `unsupported` when none does."""
    able: list[str] = []
    first_refusal: Unsupported | None = None
    for name in choice.names:
        try:
            check_supported(providers[name].caps, request, name)
        except Unsupported as exc:
            if choice.listed:
                raise
            first_refusal = first_refusal or exc
            continue
        able.append(name)
    if not able:
        assert first_refusal is not None
        raise Unsupported(f"no provider of route {choice.route!r} supports this request: {first_refusal.message}",
                          field=first_refusal.field)
    if choice.strategy == "cheapest":
        req = request.to_dict()
        # sorted() is stable: equal prices, and unpriced providers (last), keep the route's order.
        able.sort(key=lambda name: _price_key(prices.get(name), req))
    return tuple(able)


def _price_key(table: PriceTable | None, request: dict[str, Any]) -> tuple[int, float]:
    price = table.for_request(request) if table is not None else None
    return (1, 0.0) if price is None else (0, price)


def next_provider(task: Task) -> str | None:
    """The provider after the task's current one in its failover order; None when it is the last (or alone)."""
    chain = task.candidates or []
    if task.provider not in chain:
        return None
    index = chain.index(task.provider)
    return chain[index + 1] if index + 1 < len(chain) else None


def moves_on(exc: ProviderError, *, waited_for_rate_limit: float, patience: float) -> str | None:
    """The outcome to record if this submit error lets a task move to its next provider, else None.

    `waited_for_rate_limit`: the seconds this task has been told to wait by the provider's 429s so far,
    this one's Retry-After included."""
    if isinstance(exc, RateLimited):
        return "rate_limited" if waited_for_rate_limit > patience else None
    if isinstance(exc, ProviderUnavailable):     # 5xx, a connection refused, junk: nothing was accepted
        return "unavailable"
    if isinstance(exc, ProviderRejected):
        # A refusal of the prompt's content would be the next provider's too: the task fails as today.
        return None if exc.code == "content_policy_violation" else "refused"
    return None                                  # SubmitOutcomeUnknown above all: never a second submit


def counts_against_circuit(exc: ProviderError) -> bool:
    """Whether a failed submit says the provider is in trouble (not the request): 5xx, no connection, 429,
    a submit left without an answer, or a refusal of the account (401/402/403)."""
    if isinstance(exc, ProviderRejected):
        return exc.status in ACCOUNT_STATUSES
    return True
