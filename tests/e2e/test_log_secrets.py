"""No secret reaches a log line (issue 10, item 4): a real relay process, configured with known secrets,
run through a callback task, a polled task behind provider faults, a task the provider fails, webhooks that
fail and are retried, a subscription whose secret is rotated, all at DEBUG and in both log formats; then
every secret, and every form relay derives from one (tokens, keys, their base64 and hex), is searched
for in everything the process wrote.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterator

import pytest

from relay.config import PROVIDER_KINDS
from relay.deliveries.secrets import task_webhook_secret
from relay.links import Signer
from tests.sink import Sink

from .conftest import RelayFactory
from .harness import API_KEY, Simulator, wait_for

pytestmark = pytest.mark.timeout(90)

FAIL = "[sim:fail]"


@pytest.fixture
def sink() -> Iterator[Sink]:
    with Sink().serving_in_thread() as serving:
        yield serving


def forms(secret: str) -> set[str]:
    """The secret, and, for a whsec_ key, its base64 body and the raw key in hex and base64url."""
    found = {secret}
    if secret.startswith("whsec_"):
        body = secret.removeprefix("whsec_")
        raw = base64.b64decode(body)
        found |= {body, raw.hex(), base64.urlsafe_b64encode(raw).decode().rstrip("=")}
    return found


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_no_secret_reaches_a_log_line(sim: Simulator, relay_factory: RelayFactory, sink: Sink, log_format: str) -> None:
    """API key, provider keys, the signing secret (and the callback tokens and task secret derived from it),
    and subscription secrets (created and rotated) appear in no line relay writes, even at DEBUG."""
    signing_secret = "sign-" + secrets.token_urlsafe(24)
    provider_keys = {kind: f"pk-{kind}-" + secrets.token_urlsafe(18) for kind in PROVIDER_KINDS}
    env = {f"RELAY_PROVIDERS_{kind.upper()}_API_KEY": key for kind, key in provider_keys.items()}
    relay = relay_factory(RELAY_AUTH_SIGNING_SECRET=signing_secret, RELAY_LOG_FORMAT=log_format, **env)
    # Restarted at DEBUG: the harness starts at info, and the secret-bearing libraries talk at DEBUG.
    relay.process.stop()
    relay.process.argv += ["--log-level", "debug"]
    relay.start()

    sim.faults(next=[{"dialect": "apimart", "op": "submit", "fault": "500"},
                     {"dialect": "apimart", "op": "poll", "fault": "429", "retry_after": 0.2},
                     {"dialect": "gmicloud", "op": "poll", "fault": "500"}])
    sink.script("/hooks", {"status": 500}, {"status": 503})      # the first webhooks fail, then are retried
    created = relay.api.post("/v1/subscriptions", json={"url": sink.url("/hooks?token=hook-token-secret"),
                                                        "events": ["task.*"]})
    assert created.status_code == 201, created.text
    subscription = created.json()
    whsecs = [subscription["secret"]]
    tasks = [relay.create({"provider": "evolink", "prompt": "secrets: callback",
                           "webhook_url": sink.url("/task?token=task-hook-secret")}),
             relay.create({"provider": "apimart", "prompt": "secrets: polled"}),
             relay.create({"provider": "gmicloud", "prompt": f"secrets: refused {FAIL}"})]
    rotated = relay.api.post(f"/v1/subscriptions/{subscription['id']}/rotate-secret")
    assert rotated.status_code == 200, rotated.text
    whsecs.append(rotated.json()["secret"])
    tasks.append(relay.create({"provider": "pixazo", "prompt": "secrets: after the rotation"}))
    ends = {task["id"]: relay.wait_terminal(task["id"], timeout=40)["status"] for task in tasks}
    assert sorted(ends.values()) == ["failed", "succeeded", "succeeded", "succeeded"], ends
    wait_for(lambda: {r.webhook_id for r in sink.delivered("/hooks")} >=
             {e["id"] for t in tasks for e in relay.events(t["id"])}, 30, "every event delivered to the subscriber")
    relay.process.stop()        # everything flushed
    text = "\n".join(path.read_text(errors="replace") for path in relay.process.logs)

    signer = Signer(signing_secret)
    task_secret = task_webhook_secret("", signing_secret)
    wanted = {"API key": {API_KEY}, "signing secret": {signing_secret},
              "callback tokens": {signer.callback_token(t["provider"], t["id"]) for t in tasks},
              "task webhook secret": forms(task_secret),
              "subscriber URL tokens": {"hook-token-secret", "task-hook-secret"}}
    for kind, key in provider_keys.items():
        wanted[f"{kind} key"] = {key}
    for index, whsec in enumerate(whsecs):
        wanted[f"subscription secret {index}"] = forms(whsec)
    leaked = {name: sorted(s for s in values if s in text) for name, values in wanted.items()}
    assert not any(leaked.values()), leaked

    # The check looked at real lines: the task, request, delivery and job lines are there, with their ids.
    lines = text.splitlines()
    if log_format == "json":
        records = [json.loads(line) for line in lines if line.startswith("{")]
        assert any(r.get("logger") == "relay.tasks" and r.get("task_id") and r.get("event_id") for r in records)
        assert any(r.get("logger") == "relay.providers" and r.get("outcome") == "server_error" for r in records)
        assert any(r.get("delivery_id") and r.get("event_id") and r.get("status_code") == 500 for r in records)
        assert any(r.get("job_id") and r.get("outcome") == "retry" for r in records)
        assert any("failed" in r["message"] and r.get("status") == "failed" for r in records)
        assert any(r["level"] == "debug" for r in records)
    else:
        assert any(" relay.tasks: " in line and "task_id=" in line and "event_id=" in line for line in lines)
        assert any("relay.deliveries" in line and "delivery_id=" in line for line in lines)
        assert any(" DEBUG " in line for line in lines)
    assert "/hooks?***" in text
