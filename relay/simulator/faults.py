"""Runtime knobs: injected faults, callback behaviour, dialect variants, timing overrides.

`POST /_sim/faults` merges a JSON body into these (see `Knobs.update`); every
key is optional, unknown keys are refused so a typo in a test fails loudly.
`next` rules are a FIFO of one-shot faults consumed in order; `rates` are
per-request probabilities drawn from a seeded RNG.
"""

from __future__ import annotations

import copy
import random
from dataclasses import asdict, dataclass
from typing import Any

from .config import SimulatorConfig

DIALECTS = ("gmicloud", "apimart", "evolink", "pixazo", "openai")
FAULT_KINDS = ("429", "500", "503", "timeout", "truncate", "malformed")   # 503: with Retry-After
OPS = ("submit", "poll", "download", "any")

CALLBACK_DEFAULTS: dict[str, Any] = {
    "duplicate": 1, "reorder": False, "delay": 0.0, "drop": False, "wrong_token": False,
}
VARIANT_DEFAULTS: dict[str, Any] = {
    "gmicloud_sync": False,
    "pixazo_sync": False,
    "apimart_url_as_string": None,  # None: alternate per task (odd tasks string, even list)
    "apimart_error_as_200": False,  # refusals as HTTP 200 with {"code": 4xx, ...}
    "signed_links": False,  # image links carry their expiry as a CDN signs it: ?Expires=<unix seconds>
}


@dataclass
class FaultRule:
    dialect: str | None
    op: str
    fault: str
    count: int = 1
    retry_after: float = 1.0

    def matches(self, dialect: str, op: str) -> bool:
        if self.dialect not in (None, dialect):
            return False
        if self.op == "any":
            # A body cut short is a download fault unless the rule names another op.
            return self.fault != "truncate" or op == "download"
        return self.op == op


@dataclass
class Fault:
    kind: str
    retry_after: float = 1.0


def _number(value: Any, name: str, low: float = 0.0, high: float = 1e9) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} must be a number in [{low}, {high}]")
    return float(value)


def _flag(value: Any, name: str, nullable: bool = False) -> bool | None:
    if value is None and nullable:
        return None
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false" + (" or null" if nullable else ""))
    return value


def _keys(body: Any, allowed: set[str], name: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ValueError(f"{name} must be an object")
    unknown = set(body) - allowed
    if unknown:
        raise ValueError(f"unknown key(s) in {name}: {', '.join(sorted(unknown))}")
    return body


def _rule(raw: Any) -> FaultRule:
    body = _keys(raw, {"dialect", "op", "fault", "count", "retry_after"}, "a 'next' rule")
    dialect = body.get("dialect")
    if dialect is not None and dialect not in DIALECTS:
        raise ValueError(f"dialect must be one of {', '.join(DIALECTS)} or null")
    op = body.get("op", "any")
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}")
    fault = str(body.get("fault", ""))  # accept 429 as a number too
    if fault not in FAULT_KINDS:
        raise ValueError(f"fault must be one of {', '.join(FAULT_KINDS)}")
    count = body.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError("count must be a positive integer")
    retry_after = _number(body.get("retry_after", 1), "retry_after", 0, 86400)
    return FaultRule(dialect, op, fault, count, retry_after)


class Knobs:
    """Everything a test can change at runtime, and the fault picker that reads it."""

    def __init__(self, config: SimulatorConfig) -> None:
        self._config = config
        self.reset()

    def reset(self) -> None:
        self.next: list[FaultRule] = []
        self.rates: dict[str, float] = {kind: 0.0 for kind in FAULT_KINDS}
        self.latency = 0.0
        self.timeout_seconds = 30.0
        self.callbacks = dict(CALLBACK_DEFAULTS)
        self.variants = dict(VARIANT_DEFAULTS)
        self.duration = self._config.duration
        self.link_ttl = self._config.link_ttl
        self.rng = random.Random(self._config.seed)
        self.malformed_sent = 0

    def update(self, raw: Any) -> None:
        """Merge a `POST /_sim/faults` body. ValueError (nothing changed) if any part is wrong."""
        body = _keys(raw, {"next", "rates", "latency", "timeout_seconds", "callbacks", "variants",
                           "duration", "link_ttl"}, "the body")
        staged = copy.deepcopy({k: getattr(self, k) for k in
                                ("next", "rates", "callbacks", "variants")})
        scalars: dict[str, float] = {}
        if "next" in body:
            if not isinstance(body["next"], list):
                raise ValueError("next must be a list of rules")
            staged["next"].extend(_rule(item) for item in body["next"])
        for kind, rate in _keys(body.get("rates", {}), set(FAULT_KINDS), "rates").items():
            staged["rates"][kind] = _number(rate, f"rates.{kind}", 0, 1)
        for key, value in _keys(body.get("callbacks", {}), set(CALLBACK_DEFAULTS), "callbacks").items():
            if key == "duplicate":
                if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100:
                    raise ValueError("callbacks.duplicate must be an integer in [1, 100]")
            elif key == "delay":
                value = _number(value, "callbacks.delay", 0, 3600)
            else:
                value = _flag(value, f"callbacks.{key}")
            staged["callbacks"][key] = value
        for key, value in _keys(body.get("variants", {}), set(VARIANT_DEFAULTS), "variants").items():
            staged["variants"][key] = _flag(value, f"variants.{key}", nullable=key == "apimart_url_as_string")
        for key, high in (("latency", 3600), ("timeout_seconds", 3600), ("duration", 86400),
                          ("link_ttl", 1e9)):
            if key in body:
                scalars[key] = _number(body[key], key, 0, high)
        # Only now, with every part valid, apply: a bad body changes nothing.
        for key, value in {**staged, **scalars}.items():
            setattr(self, key, value)

    def snapshot(self) -> dict[str, Any]:
        return {
            "next": [asdict(rule) for rule in self.next],
            "rates": dict(self.rates),
            "latency": self.latency,
            "timeout_seconds": self.timeout_seconds,
            "callbacks": dict(self.callbacks),
            "variants": dict(self.variants),
            "duration": self.duration,
            "link_ttl": self.link_ttl,
        }

    def pick(self, dialect: str, op: str) -> Fault | None:
        """The fault for this request, if any: a matching `next` rule first, then the dice."""
        for rule in self.next:
            if rule.matches(dialect, op):
                rule.count -= 1
                if rule.count <= 0:
                    self.next.remove(rule)
                return Fault(rule.fault, rule.retry_after)
        for kind in FAULT_KINDS:
            rate = self.rates.get(kind, 0.0)
            if kind == "truncate" and op != "download":
                continue
            # Draw only for non-zero rates so a seeded run's sequence depends on the rates set.
            if rate > 0 and self.rng.random() < rate:
                return Fault(kind)
        return None
