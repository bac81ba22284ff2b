"""Hostile input to every console page and form answers a page (4xx or the page itself), never a 500."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.harness import API_KEY, Harness, harness

JUNK = ["garbage", "../../etc/passwd", "\x00", "%00", "tsk_" + "Z" * 40, "'; DROP TABLE tasks; --", "😀" * 50,
        "9" * 400, ""]
PAGES = ["/console/", "/console/archives", "/console/subscriptions", "/console/dead-letters", "/console/providers",
         "/console/queue"]
PARAMS = ["cursor", "status", "provider", "q", "done", "n", "next"]
IDS = ["/console/tasks/{}", "/console/archives/{}"]
FORMS = ["/console/tasks/{}/cancel", "/console/deliveries/{}/retry", "/console/subscriptions/{}/disable",
         "/console/subscriptions/{}/enable", "/console/subscriptions/{}/rotate", "/console/subscriptions/{}/replay",
         "/console/jobs/{}/retry"]
FIELDS = ["url", "events", "description", "since", "status", "delivery", "back", "signing"]


async def log_in(h: Harness) -> None:
    """Into the console as a browser would (its session cookie kept by h.api; no API key sent from then on)."""
    h.api.headers.pop("authorization")
    form = await h.api.get("/console/login")
    nonce = re.search(r'name="nonce" value="([^"]+)"', form.text)
    assert nonce
    logged = await h.api.post("/console/login", data={"credential": API_KEY, "nonce": nonce.group(1)},
                              headers={"origin": "http://relay.test"})
    assert logged.status_code == 303


async def test_junk_in_every_page_and_form_is_never_a_500(tmp_path: Path) -> None:
    async with harness(tmp_path, run_worker=False) as h:
        await log_in(h)
        page = await h.api.get("/console/subscriptions")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf
        seen: list[tuple[str, int]] = []
        for path in PAGES:
            for param in PARAMS:
                for junk in JUNK:
                    answer = await h.api.get(path, params={param: junk})
                    seen.append((f"GET {path}?{param}={junk[:20]!r}", answer.status_code))
        for template in IDS:
            for junk in [j for j in JUNK[:-1] if j.isprintable()]:     # a path cannot carry a NUL
                answer = await h.api.get(template.format(junk))
                seen.append((f"GET {template.format(junk[:20])}", answer.status_code))
        for template in [*FORMS, "/console/subscriptions", "/console/dead-letters/retry"]:
            for junk in JUNK[:-1]:
                data = {"csrf": csrf.group(1), **{name: junk for name in FIELDS}}
                in_path = junk if junk.isprintable() else "nul"       # a path cannot carry a NUL; a field can
                answer = await h.api.post(template.format(in_path) if "{}" in template else template, data=data,
                                          headers={"origin": "http://relay.test"})
                seen.append((f"POST {template} {junk[:20]!r}", answer.status_code))
        # A count that str.isdigit() takes and int() refuses ("²"), after an action's redirect.
        for count in ("²", "１２", "9" * 400):
            answer = await h.api.get("/console/", params={"done": "retried", "n": count})
            seen.append((f"GET /console/?done=retried&n={count[:10]}", answer.status_code))
            assert answer.status_code == 200, (count, answer.status_code)
        # The forms were judged by their handlers, not all turned away at the CSRF check.
        assert {status for what, status in seen if what.startswith("POST")} & {404, 422}, seen[-5:]
        errors = [(what, status) for what, status in seen if status >= 500]
        assert errors == [], errors[:10]
        assert all(status in (200, 303, 400, 401, 403, 404, 409, 413, 422) for _, status in seen), \
            sorted({s for _, s in seen})


async def test_a_login_form_that_never_finishes_arriving_is_answered_408(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The one form anyone may post, sent a byte now and then: answered once its deadline passes, not held."""
    from relay.web.console import actions

    monkeypatch.setattr(actions, "LOGIN_BODY_SECONDS", 0.2)
    never = asyncio.Event()

    async def trickle() -> AsyncIterator[bytes]:
        yield b"credential=x"
        await never.wait()

    async with harness(tmp_path, run_worker=False) as h:
        h.api.headers.pop("authorization")
        answer = await asyncio.wait_for(h.api.post("/console/login", content=trickle(), headers={
            "content-type": "application/x-www-form-urlencoded", "origin": "http://relay.test"}), 10)
        assert answer.status_code == 408 and "took too long" in answer.text


async def test_a_task_page_with_more_deliveries_than_it_shows_says_so(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The task page shows the newest deliveries of a task (its last events': did its outcome reach everyone?) and
    says older ones were left out, where to find them all."""
    from relay.store import console
    monkeypatch.setattr(console, "TIMELINE_LIMIT", 2)
    async with harness(tmp_path) as h:
        for n in range(2):
            made = await h.api.post("/v1/subscriptions", json={"url": f"http://127.0.0.1:9/hook{n}"})
            assert made.status_code == 201, made.text
        task = await h.create(provider="gmicloud", prompt="p")
        await h.wait_status(task["id"])
        await log_in(h)
        page = await h.api.get(f"/console/tasks/{task['id']}")
        assert page.status_code == 200
        assert "Only the newest 2 deliveries are shown" in page.text
        assert page.text.count('class="delivery"') == 2 and 'data-event="task.succeeded"' in page.text
