"""Simulated provider tasks: their timing, outcome, prompt directives and the in-memory store.

A task's state is never stored as a moving value: it is computed from the wall
clock since creation, so no background loop is needed and every dialect sees
the same truth. Dialect modules only translate `phase()` into their words.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from typing import Any

# Share of `duration` a task spends queued before it starts running.
QUEUED_SHARE = 0.3

_DIRECTIVE = re.compile(r"\[sim:([a-zA-Z_]+)(?:=([^\]\s]*))?\]")


@dataclass
class Directives:
    """What `[sim:…]` tokens in a prompt asked for (None: not asked)."""

    fail: str | None = None  # failure code, "" for the dialect's default one
    cancel: bool = False
    duration: float | None = None
    ttl: float | None = None
    sync: bool | None = None  # gmicloud / pixazo: answer the submit with the final result
    url: str | None = None  # apimart: "string" or "list"
    callback: str | None = None  # evolink: "drop" to send no callback for this task


def _number(text: str | None) -> float | None:
    try:
        value = float(text or "")
    except ValueError:
        return None
    # Negative, NaN and infinite values would break timing; ignore them like unknown tokens.
    return value if 0 <= value < 1e9 else None


def parse_directives(prompt: str) -> tuple[Directives, str]:
    """Read the `[sim:…]` tokens out of a prompt; returns them and the prompt without them.

    Unknown tokens and bad values are ignored: a prompt is user text, never an error source.
    """
    found = Directives()
    for match in _DIRECTIVE.finditer(prompt):
        key, value = match.group(1).lower(), match.group(2)
        if key == "fail":
            found.fail = value or ""
        elif key == "cancel":
            found.cancel = True
        elif key == "duration":
            found.duration = _number(value)
        elif key == "ttl":
            found.ttl = _number(value)
        elif key in ("sync", "async"):
            found.sync = key == "sync"
        elif key == "url" and value in ("string", "list"):
            found.url = value
        elif key == "callback" and value == "drop":
            found.callback = value
    clean = " ".join(_DIRECTIVE.sub(" ", prompt).split())
    return found, clean


@dataclass
class SimTask:
    """One task as the simulated provider knows it."""

    id: str
    dialect: str
    request: Any  # the body exactly as received (multipart: a summary of the parts)
    created: float  # unix seconds
    duration: float
    n: int
    width: int
    height: int
    fmt: str  # png | jpeg | webp
    prompt: str  # without directives; drawn on the images
    link_ttl: float
    seq: int  # creation order within the dialect, used to alternate variants per task
    model: str = "gpt-image-1.5"
    background: str = "auto"
    outcome: str = "succeeded"  # succeeded | failed | cancelled
    fail_code: str = ""
    directives: Directives = field(default_factory=Directives)
    callback_url: str | None = None
    callback_knobs: dict[str, Any] = field(default_factory=dict)
    callbacks: list[dict[str, Any]] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)

    @property
    def done_at(self) -> float:
        return self.created + self.duration

    @property
    def expires_at(self) -> float:
        return self.done_at + self.link_ttl

    def phase(self, now: float) -> str:
        """queued | running | succeeded | failed | cancelled at `now`."""
        elapsed = now - self.created
        if elapsed >= self.duration:
            return self.outcome
        if elapsed < QUEUED_SHARE * self.duration:
            return "queued"
        return "running"

    def queued_early(self, now: float) -> bool:
        """True in the first half of the queued phase (for dialects with two queued words)."""
        return now - self.created < QUEUED_SHARE * self.duration / 2

    def progress(self, now: float) -> int:
        """0 while queued, 10→95 while running, 100 when succeeded, 0 when failed or cancelled."""
        phase = self.phase(now)
        if phase == "succeeded":
            return 100
        if phase != "running":
            return 0
        start = QUEUED_SHARE * self.duration
        share = (now - self.created - start) / max(self.duration - start, 1e-9)
        return int(10 + 85 * min(max(share, 0.0), 1.0))

    def remaining(self, now: float) -> float:
        return max(self.done_at - now, 0.0)

    def link_expired(self, now: float) -> bool:
        return now >= self.expires_at


def image_token(dialect: str, task_id: str, index: int) -> str:
    """Deterministic file token: the same task and index always give the same link."""
    return hashlib.sha256(f"{dialect}:{task_id}:{index}".encode()).hexdigest()[:32]


class TaskStore:
    """All tasks and image tokens, in memory (a simulator forgets on restart, on purpose)."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._tasks: dict[tuple[str, str], SimTask] = {}
        self._tokens: dict[str, tuple[SimTask, int]] = {}
        # APIMart Idempotency-Key → task id, so a repeated submit returns the same task.
        self.idempotency: dict[str, str] = {}
        self._seq: dict[str, int] = {}

    def next_seq(self, dialect: str) -> int:
        """1, 2, 3… per dialect, so per-task alternation alternates within one dialect."""
        self._seq[dialect] = self._seq.get(dialect, 0) + 1
        return self._seq[dialect]

    def add(self, task: SimTask) -> SimTask:
        task.tokens = [image_token(task.dialect, task.id, i) for i in range(task.n)]
        self._tasks[(task.dialect, task.id)] = task
        for index, token in enumerate(task.tokens):
            self._tokens[token] = (task, index)
        return task

    def get(self, dialect: str, task_id: str) -> SimTask | None:
        return self._tasks.get((dialect, task_id))

    def by_token(self, token: str) -> tuple[SimTask, int] | None:
        return self._tokens.get(token)

    def all(self) -> list[SimTask]:
        return list(self._tasks.values())


def now() -> float:
    """Wall clock in unix seconds (the one place the simulator reads time)."""
    return time.time()
