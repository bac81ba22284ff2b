"""relay's provider simulator: the five gpt-image-1.5 dialects of PROVIDERS.md on localhost.

Base URLs are path prefixes of `public_url`: /gmicloud, /apimart, /evolink,
/pixazo, /openai (e.g. `POST /evolink/v1/images/generations`). Images are real
PNG/JPEG/WebP bytes at `GET /files/{token}.{ext}`, deterministic per (task id,
index), answering 410 once the link has expired. Any non-empty key is accepted
(Bearer, or `Ocp-Apim-Subscription-Key` for pixazo); a missing one gets 401.

Prompt directives (steer one task; removed from the text drawn on the image):
    [sim:fail] / [sim:fail=CODE]   end as failed (EvoLink error.code = CODE,
                                   default content_policy_violation; OpenAI → 400 moderation_blocked)
    [sim:cancel]                   end as cancelled (OpenAI: like fail)
    [sim:duration=3.5]             seconds from submit to the final state (OpenAI: the response delay)
    [sim:ttl=2]                    image links die 2 s after completion
    [sim:sync] / [sim:async]       gmicloud/pixazo: final answer from the submit POST, or not
    [sim:url=string|list]          apimart: result.images[].url shape
    [sim:callback=drop]            evolink: send no callback for this task

Runtime knobs (`POST /_sim/faults`, every key optional, merged; `POST /_sim/reset`
restores the start-up config and forgets all tasks; `GET /_sim/faults` shows them):
    next: [{dialect|null, op: submit|poll|download|any, fault, count, retry_after}]
          FIFO of one-shot faults, appended to; fault is 429|500|timeout|truncate|malformed
          (truncate with op "any" only hits downloads)
    rates: {fault: probability} per request, seeded by SimulatorConfig.seed
    latency, timeout_seconds, duration, link_ttl
    callbacks: {duplicate, reorder, delay, drop, wrong_token}  (read when an EvoLink task is created)
    variants: {gmicloud_sync, pixazo_sync, apimart_url_as_string (null: alternate), apimart_error_as_200}

Inspection: GET /_sim/tasks, /_sim/tasks/{dialect}/{id} (request, status, images with sha256,
callback attempts), /_sim/stats, /_sim/callbacks. OpenAI task ids come in `x-request-id`.
"""

from .app import create_simulator_app
from .config import SimulatorConfig

__all__ = ["SimulatorConfig", "create_simulator_app"]
