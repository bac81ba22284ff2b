"""Hypothesis on POST /callbacks/{provider}/{task_id}/{token}, in process, with the worker drained after each post.

Four EvoLink tasks sit in stable simulator states (still queued for minutes, completed,
failed, canceled), so the provider's answer to the confirmation poll is known. Each
example posts arbitrary bytes, arbitrary JSON or a near-valid task body to a valid
callback URL or to a wrong one, then drains the worker and checks: the answer is
exactly what API.md promises (200 / 400 / 404 / 413, in shape); draining never raises
and leaves no callback job behind; no task moves backwards or changes once terminal;
and a body whose state the provider does not confirm changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import string
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from relay.errors import RelayError
from relay.models import Task, TaskStatus, TaskUpdate
from relay.states import on_update
MAX_CALLBACK_BODY = 1_048_576   # server.max_body_bytes, the default the harness runs with
from tests.fuzzing import FUZZ, JSON, URLS, InLoop, as_bytes, error_shape_problem, near

# The simulator's tasks end as the prompt directs; none calls back by itself (the test posts every callback).
PROMPTS = {"queued": "slow [sim:duration=600] [sim:callback=drop]", "completed": "done [sim:callback=drop]",
           "failed": "no [sim:fail] [sim:callback=drop]", "canceled": "stop [sim:cancel] [sim:callback=drop]"}
EVOLINK_WORDS = ["pending", "processing", "completed", "failed", "cancelled", "canceled", "COMPLETED", " failed ",
                 "running", "succeeded", "queued", "", "exploded"]
BIG = b'{"id":"' + b"x" * MAX_CALLBACK_BODY + b'"}'
ODD = [b"", b"{", b"null", b"[]", b"\xff", b"\xef\xbb\xbf{}", b"NaN", b"[" * 5000, b'{"a":' * 3000, BIG,
       b'{"id":"x","status":"completed","results":["https://x/\\ud800.png"]}']


@dataclass
class World:
    env: InLoop
    tasks: dict[str, str]               # name → relay task id
    tickets: dict[str, str]             # name → provider task id
    truth: dict[str, TaskUpdate]        # name → what the provider answers for it (stable)
    best_rank: dict[str, int]


def snapshot(task: Task) -> tuple[Any, ...]:
    return (task.status, task.sequence, task.progress, task.error, task.provider_task_id, len(task.images))


async def _build(env: InLoop) -> World:
    h = env.h
    tasks = {name: (await h.create(provider="evolink", prompt=prompt))["id"] for name, prompt in PROMPTS.items()}
    await h.runtime.worker.drain()          # the submits
    stored = {name: await h.runtime.store.get_task(task_id) for name, task_id in tasks.items()}
    tickets = {name: task.provider_task_id for name, task in stored.items() if task and task.provider_task_id}
    assert set(tickets) == set(PROMPTS) and all(t.status == TaskStatus.QUEUED for t in stored.values() if t)
    provider = h.runtime.ctx.providers["evolink"]
    truth = {}
    for name, ticket in tickets.items():
        for _ in range(100):                 # the quick tasks end ~50 ms after their submit
            truth[name] = await provider.fetch(ticket)
            if name == "queued" or truth[name].status.value in ("succeeded", "failed", "canceled"):
                break
            await asyncio.sleep(0.02)
    assert [truth[n].status.value for n in PROMPTS] == ["queued", "succeeded", "failed", "canceled"], truth
    return World(env, tasks, tickets, truth, {name: TaskStatus.QUEUED.rank for name in PROMPTS})


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    # No safety-net poll during the test: only callbacks (and their confirmations) move the tasks.
    with InLoop(tmp_path_factory.mktemp("fuzz-callbacks"), RELAY_CALLBACKS_SAFETY_NET_SECONDS="3600") as env:
        yield env.run(_build(env))


def callback_bodies(world: World, name: str) -> st.SearchStrategy[bytes]:
    """Mostly about `name`'s own provider task: its real body, that body mutated, or one with another state."""
    real = world.truth[name].raw
    task_body = st.fixed_dictionaries(
        {"id": st.sampled_from([world.tickets[name]] * 4 + [*world.tickets.values(), "task-unified-0-other", ""]),
         "status": st.one_of(st.just(real["status"]), st.sampled_from(EVOLINK_WORDS))},
        optional={"progress": st.one_of(st.integers(-5, 150), st.floats(), st.text(max_size=4)),
                  "results": st.one_of(st.just(real.get("results")), st.lists(st.sampled_from(URLS), max_size=2)),
                  "error": st.fixed_dictionaries({"code": st.text(max_size=10), "message": st.text(max_size=20)}),
                  "task_info": st.fixed_dictionaries({"estimated_time": st.integers(-1, 10**6)})})
    return st.one_of(st.just(real).map(as_bytes), task_body.map(as_bytes), task_body.map(as_bytes),
                     near(real).map(as_bytes), JSON.map(as_bytes), st.binary(max_size=200), st.sampled_from(ODD))


def expected_answer(url_valid: bool, body: bytes) -> int:
    """API.md: wrong token 404 (before the body is read); over 1 MiB 413; not JSON 400; else 200."""
    if not url_valid:
        return 404
    if len(body) > MAX_CALLBACK_BODY:
        return 413
    try:
        json.loads(body.decode())
    except (UnicodeDecodeError, ValueError, RecursionError):
        return 400
    return 200


def urls(world: World) -> st.SearchStrategy[tuple[str, str, bool]]:
    """(task name, path, valid?) — the real callback URL of a task, or one wrong in some part."""
    ctx = world.env.h.runtime.ctx

    def build(name: str, flaw: str, other: str, junk: str) -> tuple[str, str, bool]:
        task_id = world.tasks[name]
        token = ctx.signer.callback_token("evolink", task_id)
        provider = "evolink"
        if flaw == "token":
            token = token[:-1] + ("0" if token[-1] != "0" else "1")
        elif flaw == "short_token":
            token = token[:8]
        elif flaw == "junk_token":
            token = junk or "x"
        elif flaw == "provider":
            provider = other
        elif flaw == "task":
            task_id = world.tasks[other] if other in world.tasks else "tsk_" + (junk or "x")
        valid = flaw == "none" or (flaw == "task" and task_id == world.tasks[name])
        return name, f"/callbacks/{provider}/{task_id}/{token}", valid

    return st.builds(build, st.sampled_from(list(PROMPTS)),
                     st.sampled_from(["none"] * 6 + ["token", "short_token", "junk_token", "provider", "task"]),
                     st.sampled_from([*PROMPTS, "gmicloud", "apimart", "nope", "EVOLINK"]),
                     st.text(string.ascii_letters + string.digits + "-_.~", max_size=12))


@st.composite
def posts(draw: st.DrawFn, world: World) -> tuple[str, str, bool, bytes]:
    name, path, valid = draw(urls(world))
    return name, path, valid, draw(callback_bodies(world, name))


def test_callbacks_answer_in_shape_and_only_move_tasks_forward(world: World) -> None:
    """Any body to any callback URL: a promised answer, a clean drain, forward-only tasks, unconfirmed = no change."""
    env, h = world.env, world.env.h
    provider = h.runtime.ctx.providers["evolink"]

    @settings(FUZZ, max_examples=150)
    @given(example=posts(world))
    def post(example: tuple[str, str, bool, bytes]) -> None:
        name, path, valid, body = example
        before = {n: env.run(h.runtime.store.get_task(task_id)) for n, task_id in world.tasks.items()}
        response = env.run(h.api.post(path, content=body, headers={"authorization": "",
                                                                    "content-type": "application/json"}))
        want = expected_answer(valid, body)
        assert response.status_code == want, (path, body[:80], response.status_code, response.text[:200])
        if want == 200:
            assert response.json() == {"ok": True} and response.headers["content-type"] == "application/json"
        else:
            assert error_shape_problem(response) is None, response.text
            if want == 404:
                assert response.json()["error"]["message"] == "not found"     # no hint

        env.run(h.runtime.worker.drain())        # never raises; processes the callback and what it causes
        leftover = env.run(h.runtime.store.job_counts())
        assert set(leftover) <= {"poll:queued"}, leftover

        # What may change: only the target, only if the provider confirms the body's state.
        reported = None
        if want == 200:
            try:
                reported = provider.parse_callback(body)
            except RelayError:
                pass
        truth = world.truth[name]
        target_before = before[name]
        assert target_before is not None
        confirmed = (reported is not None and reported.provider_task_id == world.tickets[name]
                     and reported.status == truth.status and not target_before.status.terminal
                     and target_before.status != TaskStatus.ARCHIVING)
        event(f"confirmed: {confirmed}")
        for n, task_id in world.tasks.items():
            after = env.run(h.runtime.store.get_task(task_id))
            old = before[n]
            assert after is not None and old is not None
            assert after.status.rank >= world.best_rank[n], f"{n} moved back to {after.status}"
            world.best_rank[n] = after.status.rank
            if old.status.terminal:
                assert snapshot(after) == snapshot(old), f"terminal {n} changed"
            if n != name or not confirmed or on_update(old, truth) is None:
                assert snapshot(after) == snapshot(old), f"{n} changed without a confirmed callback: {after}"
            else:
                transition = on_update(old, truth)
                assert transition is not None
                # Entering archiving starts the archive jobs, which the drain above ran to the end.
                expect = TaskStatus.SUCCEEDED if transition.status == TaskStatus.ARCHIVING else transition.status
                assert after.status == expect, (n, after.status, expect)

    post()
    # Whatever the examples did, the genuine callback of each finished task takes it to its end state once.
    ends = {"queued": TaskStatus.QUEUED, "completed": TaskStatus.SUCCEEDED, "failed": TaskStatus.FAILED,
            "canceled": TaskStatus.CANCELED}
    for name, task_id in world.tasks.items():
        genuine = world.truth[name].raw          # the provider's own task object: what its callback carries
        path = h.runtime.ctx.callback_url("evolink", task_id).removeprefix(h.runtime.settings.server.public_url)
        for _ in range(2):                       # a repeat is acknowledged again and changes nothing
            response = env.run(h.api.post(path, json=genuine))
            assert response.status_code == 200, response.text
            env.run(h.runtime.worker.drain())
        task = env.run(h.runtime.store.get_task(task_id))
        assert task is not None and task.status == ends[name], (name, task)
        events = env.run(h.api.get("/v1/events", params={"task_id": task_id})).json()["data"]
        types = [e["type"] for e in events if e["type"] != "task.progress"]
        assert len(types) == len(set(types)), f"a status event twice: {types}"


def test_callback_for_an_unknown_provider_task_never_reaches_the_provider(world: World) -> None:
    """A valid URL with a body naming another provider task is acknowledged, then rejected without a poll."""
    env, h = world.env, world.env.h
    name = "queued"
    path = h.runtime.ctx.callback_url("evolink", world.tasks[name]).removeprefix(h.runtime.settings.server.public_url)
    polls = env.run(h.sim.get("/_sim/stats")).json()["dialects"]["evolink"]["polls"]
    before = env.run(h.runtime.store.get_task(world.tasks[name]))
    response = env.run(h.api.post(path, json={"id": "task-unified-0-other", "status": "completed",
                                              "results": ["https://evil.test/x.png"]}))
    assert response.status_code == 200
    env.run(h.runtime.worker.drain())
    after = env.run(h.runtime.store.get_task(world.tasks[name]))
    assert before is not None and after is not None and snapshot(after) == snapshot(before)
    assert env.run(h.sim.get("/_sim/stats")).json()["dialects"]["evolink"]["polls"] == polls
