"""SimulatorConfig: the simulator's start-up settings (the runtime knobs live in faults.py)."""

from __future__ import annotations

from dataclasses import dataclass

import httpx


@dataclass
class SimulatorConfig:
    # Used to build the image links in responses, so it must be what clients can reach.
    public_url: str = "http://127.0.0.1:8700"
    # Seconds from submit to a final state: queued for the first ~30 %, then running.
    duration: float = 1.0
    # Image links answer 410 this many seconds after the task completed.
    link_ttl: float = 86400.0
    # EvoLink callback delivery: per-attempt timeout and the waits between retries.
    callback_timeout: float = 10.0
    callback_retry_delays: tuple[float, ...] = (1.0, 2.0, 4.0)
    # Seed for the random fault rates (None: unseeded).
    seed: int | None = None
    # Real EvoLink only calls https URLs; the simulator also takes http for local use.
    allow_http_callbacks: bool = True
    # Tests in one process route callbacks to relay's app with an ASGI transport (None: real network).
    callback_transport: httpx.AsyncBaseTransport | None = None
    # Serve one pre-rendered picture per size and format with a unique chunk per task (benchmarks: measure
    # relay, not Pillow drawing), instead of drawing every image (see imaging.py).
    prerendered: bool = False
