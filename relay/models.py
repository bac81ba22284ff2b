"""The nouns of relay: requests, provider updates, tasks, images, events, jobs.

Plain dataclasses with no I/O. Times are unix seconds (float) inside relay and
RFC 3339 strings only at the HTTP edge.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

# How long an Idempotency-Key is remembered: a retry within it gets the first answer, never a second task.
IDEMPOTENCY_WINDOW = 24 * 3600.0


class TaskStatus(str, enum.Enum):
    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    ARCHIVING = "archiving"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def rank(self) -> int:
        """Position in the forward-only order; all terminal states share the top rank."""
        return _RANK[self]

    @property
    def terminal(self) -> bool:
        return self in (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELED)


_RANK = {
    TaskStatus.PENDING: 0,
    TaskStatus.QUEUED: 1,
    TaskStatus.RUNNING: 2,
    TaskStatus.ARCHIVING: 3,
    TaskStatus.SUCCEEDED: 4,
    TaskStatus.FAILED: 4,
    TaskStatus.CANCELED: 4,
}


class ProviderStatus(str, enum.Enum):
    """The common vocabulary every provider dialect is mapped into (PROVIDERS.md)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


# The canonical request vocabulary (API.md). Sizes are canonical pixel strings or "auto".
SIZES_PIXELS = ("1024x1024", "1024x1536", "1536x1024")
RATIO_TO_PIXELS = {"1:1": "1024x1024", "2:3": "1024x1536", "3:2": "1536x1024"}
PIXELS_TO_RATIO = {v: k for k, v in RATIO_TO_PIXELS.items()}
QUALITIES = ("low", "medium", "high", "auto")
BACKGROUNDS = ("auto", "transparent", "opaque")
FORMATS = ("png", "jpeg", "webp")
MODERATIONS = ("auto", "low")


@dataclass(frozen=True)
class GenerationRequest:
    """A validated, normalized request. `None` means "not given: provider default"."""

    prompt: str
    size: str | None = None            # "1024x1024" | "1024x1536" | "1536x1024" | "auto"
    quality: str | None = None
    n: int = 1
    background: str | None = None
    output_format: str | None = None
    output_compression: int | None = None
    moderation: str | None = None
    images: tuple[str, ...] = ()       # reference image URLs
    mask: str | None = None            # mask URL

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt": self.prompt, "n": self.n}
        for name in ("size", "quality", "background", "output_format", "output_compression", "moderation", "mask"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.images:
            out["images"] = list(self.images)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationRequest:
        return cls(
            prompt=data["prompt"],
            size=data.get("size"),
            quality=data.get("quality"),
            n=int(data.get("n", 1)),
            background=data.get("background"),
            output_format=data.get("output_format"),
            output_compression=data.get("output_compression"),
            moderation=data.get("moderation"),
            images=tuple(data.get("images") or ()),
            mask=data.get("mask"),
        )


@dataclass(frozen=True)
class ProviderImage:
    """One image as a provider reported it: a URL to fetch, or inline base64 (OpenAI)."""

    url: str | None = None
    b64: str | None = None
    content_type: str | None = None
    width: int | None = None
    height: int | None = None
    expires_at: float | None = None     # unix seconds, when the provider says; else caps.default_expiry applies


@dataclass(frozen=True)
class TaskUpdate:
    """What a provider said about a task, in the common vocabulary. Produced by adapters only."""

    status: ProviderStatus
    provider_task_id: str | None = None
    progress: int | None = None                   # 0..100
    images: tuple[ProviderImage, ...] = ()         # set when status is SUCCEEDED
    error_code: str | None = None                 # set when FAILED
    error_message: str | None = None
    estimated_seconds: float | None = None         # provider's own estimate of time to completion
    raw: Any = None                                # the parsed body, for the record (never trusted)


@dataclass
class ImageRecord:
    id: str
    task_id: str
    index: int
    source_url: str | None
    source_expires_at: float | None
    status: str = "pending"                        # pending | archived | failed
    sha256: str | None = None
    content_type: str | None = None
    width: int | None = None
    height: int | None = None
    bytes: int | None = None
    path: str | None = None
    archived_at: float | None = None
    error: str | None = None


@dataclass
class Task:
    id: str
    provider: str
    request: dict[str, Any]
    status: TaskStatus = TaskStatus.PENDING
    provider_task_id: str | None = None
    progress: int | None = None
    error: dict[str, str] | None = None
    metadata: dict[str, Any] | None = None
    webhook_url: str | None = None
    webhook_events: list[str] | None = None
    sequence: int = 1
    created_at: float = 0.0
    updated_at: float = 0.0
    completed_at: float | None = None
    deadline_at: float | None = None               # polling gives up (failed/timeout) after this
    submit_started_at: float | None = None         # set just before the submit request is sent
    images: list[ImageRecord] = field(default_factory=list)
    # Failover (relay.routing): the providers to try in order (None: `provider` alone), the route named,
    # and every provider left behind with why: {"provider", "outcome", "reason", "at"}.
    candidates: list[str] | None = None
    route: str | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, Any] | None = None            # what the provider reported about usage and billing
    cost: dict[str, Any] | None = None             # relay.costs: {"amount", "currency", "source"} once ended


@dataclass
class Event:
    id: str
    type: str
    task_id: str
    sequence: int
    created_at: float
    data: dict[str, Any] | None = None


@dataclass
class Job:
    id: str
    kind: str                                      # submit | poll | archive | … (see relay.jobs)
    task_id: str | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    run_at: float = 0.0                            # due time (a claim leaves it; the lease ends at lease_until)
    dedupe_key: str | None = None                  # at most one live job per key
    attempts: int = 0
    max_attempts: int = 10
    lease_token: str | None = None                 # who holds the lease; finishing needs the same token
    last_error: str | None = None


@dataclass
class Archive:
    """A link archived on its own (POST /v1/archives): one source URL, its one image, the task-like lifecycle.

    Statuses are the task's subset pending → archiving → succeeded | failed, decided by the same functions of
    relay.states; its image is an ImageRecord whose owner id (`task_id`) is this archive's `arc_…` id.
    """

    id: str
    source_url: str
    url_key: str                                   # sha256 of the normalized URL: the same link is one archive
    expires_at: float                              # when the link dies (given, read from the link, or +24 h)
    status: TaskStatus = TaskStatus.PENDING
    error: dict[str, str] | None = None
    metadata: dict[str, Any] | None = None
    webhook_url: str | None = None
    webhook_events: list[str] | None = None        # always None: the per-archive hook takes every archive event
    sequence: int = 1
    created_at: float = 0.0
    updated_at: float = 0.0
    completed_at: float | None = None
    images: list[ImageRecord] = field(default_factory=list)
