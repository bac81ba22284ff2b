"""The Simulator: shared state (tasks, images, knobs, stats, callbacks) and the request guard.

`Simulator.serve` is the one path every dialect request takes: auth, counting,
latency, fault injection, body errors → the dialect's 400, crashes → its 500.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import Response

from . import tasks as tasks_mod
from .callbacks import CallbackSender
from .config import SimulatorConfig
from .faults import DIALECTS, FAULT_KINDS, Knobs
from .imaging import EXTENSIONS, ImageCache
from .respond import BodyError, TruncatedResponse, hold, malformed
from .tasks import SimTask, TaskStore
from .validate import Invalid

log = logging.getLogger("relay.simulator")

OP_COUNTERS = {"submit": "submits", "poll": "polls", "download": "downloads"}


class ErrorFn(Protocol):
    def __call__(self, status: int, message: str | None = None, *, code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> Response: ...


def _retry_after(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


class Stats:
    """Counters per dialect, for `GET /_sim/stats`."""

    COUNTERS = ("submits", "polls", "downloads", "callbacks", "callback_failures",
                "callbacks_dropped", "rejected", "unauthorized")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.by_dialect: dict[str, dict[str, Any]] = {
            d: {**{c: 0 for c in self.COUNTERS}, "faults": {k: 0 for k in FAULT_KINDS}}
            for d in DIALECTS
        }

    def bump(self, dialect: str, counter: str) -> None:
        self.by_dialect[dialect][counter] += 1

    def fault(self, dialect: str, kind: str) -> None:
        self.by_dialect[dialect]["faults"][kind] += 1

    def snapshot(self) -> dict[str, Any]:
        totals: dict[str, Any] = {c: 0 for c in self.COUNTERS}
        totals["faults"] = {k: 0 for k in FAULT_KINDS}
        for row in self.by_dialect.values():
            for c in self.COUNTERS:
                totals[c] += row[c]
            for k in FAULT_KINDS:
                totals["faults"][k] += row["faults"][k]
        return {"dialects": self.by_dialect, "totals": totals}


class Simulator:
    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.public_url = config.public_url.rstrip("/")
        self.store = TaskStore()
        self.images = ImageCache(prerendered=config.prerendered)
        self.knobs = Knobs(config)
        self.stats = Stats()
        self.callbacks = CallbackSender(self)

    @staticmethod
    def now() -> float:
        return tasks_mod.now()

    def file_url(self, task: SimTask, index: int) -> str:
        url = f"{self.public_url}/files/{task.tokens[index]}.{EXTENSIONS[task.fmt]}"
        if self.knobs.variants.get("signed_links"):
            # CloudFront's form (the download route ignores it): relay reads the expiry from the link itself.
            url += f"?Expires={math.ceil(task.expires_at)}"
        return url

    def new_task(self, **fields: Any) -> SimTask:
        """Create and store a task; duration, ttl and outcome honour the prompt's directives."""
        directives = fields.pop("directives")
        duration = directives.duration if directives.duration is not None else self.knobs.duration
        ttl = directives.ttl if directives.ttl is not None else self.knobs.link_ttl
        outcome, fail_code = "succeeded", ""
        if directives.fail is not None:
            outcome, fail_code = "failed", directives.fail
        elif directives.cancel:
            outcome = "cancelled"
        fields.setdefault("duration", duration)
        task = SimTask(created=self.now(), link_ttl=ttl, seq=self.store.next_seq(fields["dialect"]),
                       outcome=outcome, fail_code=fail_code, directives=directives, **fields)
        return self.store.add(task)

    async def reset(self) -> None:
        await self.callbacks.cancel_all()
        self.store.clear()
        self.images.clear()
        self.knobs.reset()
        self.stats.clear()
        self.callbacks.log.clear()

    async def aclose(self) -> None:
        await self.callbacks.aclose()

    @staticmethod
    def authorized(request: Request, auth: str) -> bool:
        if auth == "apim":
            return bool(request.headers.get("ocp-apim-subscription-key", "").strip())
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and bool(key.strip())

    async def serve(self, request: Request, *, dialect: str, op: str, error: ErrorFn,
                    handler: Callable[[], Awaitable[Response]], auth: str | None = "bearer") -> Response:
        if auth and not self.authorized(request, auth):
            self.stats.bump(dialect, "unauthorized")
            return error(401)
        self.stats.bump(dialect, OP_COUNTERS[op])
        if self.knobs.latency:
            await asyncio.sleep(self.knobs.latency)
        fault = self.knobs.pick(dialect, op)
        if fault:
            self.stats.fault(dialect, fault.kind)
            if fault.kind == "429":
                return error(429, headers={"Retry-After": _retry_after(fault.retry_after)})
            if fault.kind == "500":
                return error(500)
            if fault.kind == "503":
                return error(503, headers={"Retry-After": _retry_after(fault.retry_after)})
        try:
            response = await handler()
        except (Invalid, BodyError) as exc:
            self.stats.bump(dialect, "rejected")
            message = exc.message if isinstance(exc, Invalid) else str(exc)
            param = exc.param if isinstance(exc, Invalid) else None
            response = error(400, message, param=param)
        except Exception:  # a simulator bug must still answer in the dialect's shape
            log.exception("simulator %s %s handler failed", dialect, op)
            response = error(500)
        if fault is None:
            return response
        if fault.kind == "timeout":
            # The work is done (a submit's task exists); only the answer never arrives in time.
            await hold(request, self.knobs.timeout_seconds)
            return response
        if fault.kind == "truncate":
            return TruncatedResponse(response)
        self.knobs.malformed_sent += 1
        return malformed(op, self.knobs.malformed_sent)
