"""What a task costs: the provider's own usage report, the configured price tables, and the rule joining them.

Pure: no I/O. A task's cost is decided once, when it ends (relay.store.outbox writes it in the transition that
ends it), from, in this order:
  1. a money amount the provider reported (`cost` in its usage or task body)          → source "reported"
  2. credits it reported (EvoLink `usage.credits_reserved`) × the table's credit_price  → source "reported"
  3. tokens it reported (OpenAI `usage`) × the table's per-million token prices          → source "reported"
  4. the table's price per image (by quality and size) × the images billed               → source "estimated"
Without a price table and without a reported amount the cost is null: relay does not guess a currency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from relay.models import Task, TaskStatus

MAX_USAGE_KEYS = 32
SIZE_KEYS = ("1024x1024", "1024x1536", "1536x1024", "auto")
QUALITY_KEYS = ("low", "medium", "high", "auto")


@dataclass(frozen=True)
class PriceTable:
    """`[providers.NAME.prices]`: per-image prices by quality and size, and how the provider bills."""

    currency: str = "USD"
    default: float | None = None                      # per image, for any quality/size not listed
    by_quality: dict[str, float] = field(default_factory=dict)                 # quality → per image
    by_quality_size: dict[tuple[str, str], float] = field(default_factory=dict)  # (quality, size) → per image
    only_successful: bool = False                     # bills only successful images (APIMart)
    credit_price: float | None = None                 # money per reported credit (EvoLink)
    input_token_price: float | None = None            # money per million input tokens (OpenAI)
    output_token_price: float | None = None           # money per million output tokens (OpenAI)

    def per_image(self, quality: str | None, size: str | None) -> float | None:
        """The price of one image of this quality and size; None when the table has none for it."""
        q, s = quality or "auto", size or "auto"
        if (q, s) in self.by_quality_size:
            return self.by_quality_size[q, s]
        if q in self.by_quality:
            return self.by_quality[q]
        return self.default

    def for_request(self, request: dict[str, Any]) -> float | None:
        """The estimated price of a request (n images), for `strategy = "cheapest"`."""
        price = self.per_image(request.get("quality"), request.get("size"))
        return None if price is None else price * int(request.get("n") or 1)


def reported_usage(raw: Any) -> dict[str, Any] | None:
    """The usage/billing block of a provider body, as reported (bounded): EvoLink's and OpenAI's `usage`,
    APIMart's `cost`/`credits_cost` beside its task. None when the body reports nothing."""
    if not isinstance(raw, dict):
        return None
    out: dict[str, Any] = {}
    for body in (raw, raw.get("data")):
        if not isinstance(body, dict):
            continue
        usage = body.get("usage")
        if isinstance(usage, dict):
            out.update(_scalars(usage))
        for key in ("cost", "credits_cost"):
            if _number(body.get(key)) is not None:
                out[key] = body[key]
    return out or None


def _scalars(usage: dict[str, Any]) -> dict[str, Any]:
    """Numbers, short strings and one level of number-only objects (OpenAI's *_details); nothing else."""
    out: dict[str, Any] = {}
    for key, value in list(usage.items())[:MAX_USAGE_KEYS]:
        if not isinstance(key, str) or len(key) > 64:
            continue
        if isinstance(value, str) and len(value) <= 64 or _number(value) is not None:
            out[key] = value
        elif isinstance(value, dict):
            nested = {k: v for k, v in list(value.items())[:MAX_USAGE_KEYS]
                      if isinstance(k, str) and len(k) <= 64 and _number(v) is not None}
            if nested:
                out[key] = nested
    return out


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value) if value >= 0 else None


def billed_images(task: Task, table: PriceTable | None) -> int:
    """How many images the provider bills for this (ended) task.

    Images it produced are billed (even when relay failed to archive them). A task it accepted and then failed
    or canceled is billed as asked (n), unless the provider bills only successful images. A task no provider
    accepted costs nothing.
    """
    if task.images:
        return len(task.images)
    if task.provider_task_id is None or task.status == TaskStatus.SUCCEEDED:
        return 0
    if table is not None and table.only_successful:
        return 0
    return int(task.request.get("n") or 1)


def task_cost(task: Task, table: PriceTable | None) -> dict[str, Any] | None:
    """The cost of an ended task: {"amount", "currency", "source": "reported" | "estimated"}, or None."""
    usage = task.usage or {}
    currency = table.currency if table is not None else "USD"
    images = billed_images(task, table)
    refunded = images == 0 and task.status != TaskStatus.SUCCEEDED
    reported = _number(usage.get("cost"))
    if reported is not None:
        return _cost(0.0 if refunded and table is not None and table.only_successful else reported, currency,
                     "reported")
    if table is None:
        return None
    credits = _number(usage.get("credits_cost")) or _number(usage.get("credits_reserved"))
    if credits is not None and table.credit_price is not None:
        return _cost(0.0 if refunded else credits * table.credit_price, currency, "reported")
    tokens_in, tokens_out = _number(usage.get("input_tokens")), _number(usage.get("output_tokens"))
    if (tokens_out is not None and table.output_token_price is not None
            and (tokens_in is None or table.input_token_price is not None)):
        amount = tokens_out * table.output_token_price / 1e6
        if tokens_in is not None and table.input_token_price is not None:
            amount += tokens_in * table.input_token_price / 1e6
        return _cost(amount, currency, "reported")
    price = table.per_image(task.request.get("quality"), task.request.get("size"))
    if price is None:
        return None
    return _cost(price * images, currency, "estimated")


def _cost(amount: float, currency: str, source: str) -> dict[str, Any]:
    return {"amount": round(amount, 6), "currency": currency, "source": source}


def cost_day(at: float) -> int:
    """The UTC day (days since 1970-01-01) a cost is counted on: the day its task ended."""
    return int(at // 86400)
