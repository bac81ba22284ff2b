"""Several relays on one PostgreSQL database, as real processes over real sockets (issue 9, items 4-6).

- Three `relay serve` replicas (own ports and data dirs; one database, one signing secret, one S3 bucket
  on a real S3-protocol server: moto's, started here) share tasks on all five dialects created through all of them; one replica is SIGKILLed
  mid-work while the others carry on, then restarted. Every task ends as planned, no provider task is
  made twice, each transition is one event (contiguous sequences), every event reaches the subscriber
  signed, and every image is an object in the bucket, served with the same bytes and ETag by each replica.
- `relay serve --processes 2`: one port, two processes; a SIGKILLed process is started again and the
  whole serves and finishes tasks; SIGTERM stops both.
- An API replica and a worker replica (--role) split the work; the worker is woken across processes.
- What --processes refuses: SQLite (one process), and PostgreSQL without a shared signing secret.

A fresh database per test (tests/pg.py); PostgreSQL missing is an error, never a skip.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.config import PROVIDER_KINDS
from tests.s3server import REGION, MotoS3
from tests.sink import Sink

from .conftest import _test_failed
from .harness import (API_KEY, TERMINAL, Relay, Simulator, child_pids, clean_environ, free_port, pid_alive,
                      postgres_database, replica_env, start_all, wait_for)

pytestmark = pytest.mark.timeout(90)

DIALECTS = PROVIDER_KINDS
FAIL = "[sim:fail]"
BUCKET = "relay-replicas"


@pytest.fixture
def database() -> Iterator[str]:
    with postgres_database() as dsn:
        yield dsn


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    """A real S3-protocol server that checks SigV4 signatures against the key it issued."""
    server = MotoS3(tmp_path_factory.mktemp("moto")).start()
    try:
        server.provision(BUCKET, auth=True)
        yield server
    finally:
        server.stop()


def bucket_env(moto: MotoS3, prefix: str) -> dict[str, str]:
    return {"RELAY_STORAGE_IMAGES_URL": f"s3://{BUCKET}/{prefix}", "RELAY_STORAGE_S3_ENDPOINT_URL": moto.endpoint,
            "RELAY_STORAGE_S3_REGION": REGION, "RELAY_STORAGE_S3_ACCESS_KEY_ID": moto.access_key_id,
            "RELAY_STORAGE_S3_SECRET_ACCESS_KEY": moto.secret_access_key}


@pytest.fixture
def sink() -> Iterator[Sink]:
    with Sink().serving_in_thread() as serving:
        yield serving


@pytest.fixture
def cleanup(request: pytest.FixtureRequest) -> Iterator[list[Relay]]:
    """Relays appended here are stopped after the test; their output is printed when it failed."""
    relays: list[Relay] = []
    yield relays
    failed = _test_failed(request.node)
    for relay in relays:
        try:
            relay.close()
        finally:
            if failed:
                print(relay.process.output())


def _tag(i: int) -> str:
    return f"replicas-{i:03d}."


def _provider_tasks_by_tag(sim: Simulator) -> dict[str, list[str]]:
    made: dict[str, list[str]] = defaultdict(list)
    for summary in sim.tasks():
        request = json.dumps(sim.task(summary["dialect"], summary["id"])["request"])
        for word in request.replace('"', " ").split():
            if word.startswith("replicas-") and word.endswith("."):
                made[word].append(summary["id"])
    return made


def test_replicas_share_one_database_and_survive_a_kill(sim: Simulator, database: str, sink: Sink, moto: MotoS3,
                                                        cleanup: list[Relay], tmp_path: Path) -> None:
    shared = {**replica_env(database, tmp_path / "unused-images"), **bucket_env(moto, "replicas"),
              "RELAY_CALLBACKS_SAFETY_NET_SECONDS": "2"}     # callbacks sent to the killed replica: polled
    replicas = [Relay(sim, tmp_path / f"data{i}", tmp_path, name=f"replica{i}", extra_env=shared) for i in range(3)]
    cleanup.extend(replicas)
    start_all(replicas)

    response = replicas[0].api.post("/v1/subscriptions", json={"url": sink.url("/all"), "events": ["task.*"]})
    assert response.status_code == 201, response.text
    secret = response.json()["secret"]

    # Three tasks per dialect (one planned to fail), created round-robin through the three replicas.
    plans: list[dict[str, Any]] = []
    for i in range(3 * len(DIALECTS)):
        provider = DIALECTS[i % len(DIALECTS)]
        fail = i // len(DIALECTS) == 2
        body = {"provider": provider, "prompt": f"{_tag(i)} a harbour {FAIL if fail else ''} [sim:duration=1.2]"}
        via = replicas[i % 3]
        task = via.create(body, headers={"Idempotency-Key": _tag(i)})
        plans.append({"id": task["id"], "tag": _tag(i), "provider": provider, "fail": fail, "body": body})
    # The same Idempotency-Key on the other replicas gives the same task (200), never a second one.
    for relay in replicas[1:]:
        again = relay.api.post("/v1/tasks", json=plans[0]["body"], headers={"Idempotency-Key": plans[0]["tag"]})
        assert again.status_code == 200 and again.json()["id"] == plans[0]["id"], again.text

    # Mid-work: most submits are out, no task is finished yet. SIGKILL a replica; the others carry on.
    wait_for(lambda: sim.stats()["totals"]["submits"] >= 8, 15, "8 submits at the simulator")
    replicas[1].kill()
    before = {p["id"] for p in plans if replicas[0].task(p["id"])["status"] in TERMINAL}

    def progressed() -> bool:
        replicas[0].process.check_alive()
        replicas[2].process.check_alive()
        done = {p["id"] for p in plans if replicas[2].task(p["id"])["status"] in TERMINAL}
        return len(done - before) >= 3

    wait_for(progressed, 20, "three more tasks to finish while replica1 is down", interval=0.1)
    replicas[1].start()

    def all_terminal() -> dict[str, dict[str, Any]]:
        for relay in replicas:
            relay.process.check_alive()
        tasks = {p["id"]: replicas[1].task(p["id"]) for p in plans}
        return tasks if all(t["status"] in TERMINAL for t in tasks.values()) else {}

    tasks = wait_for(all_terminal, 30, "every task to be terminal", interval=0.2)

    # Every task as planned (a submit cut off by the kill may end submit_outcome_unknown: never resent).
    unknown = 0
    for plan in plans:
        task = tasks[plan["id"]]
        error = task.get("error") or {}
        if task["status"] == "failed" and error.get("code") == "submit_outcome_unknown":
            assert plan["provider"] != "apimart" and task["provider_task_id"] is None, task
            unknown += 1
            continue
        if plan["fail"]:
            assert (task["status"], error.get("code")) == ("failed", "content_policy_violation"), task
        else:
            assert task["status"] == "succeeded", task
    assert unknown <= 3, f"{unknown} tasks lost their submit to one kill"
    print(f"replicas: {unknown} submits cut off by the kill ended submit_outcome_unknown")

    # No provider task made twice for one relay task; a task names the provider task made for it.
    made = _provider_tasks_by_tag(sim)
    for plan in plans:
        at_sim = made.get(plan["tag"], [])
        assert len(at_sim) <= 1, f"{plan['id']} was submitted {len(at_sim)} times: {at_sim}"
        provider_task_id = tasks[plan["id"]]["provider_task_id"]
        assert provider_task_id is None or [provider_task_id] == at_sim, (plan, at_sim)

    # One event per transition: per task, sequences 2..task.sequence, each once, the last the final state.
    events: dict[str, dict[str, Any]] = {}
    for plan in plans:
        got = replicas[2].events(plan["id"])
        task = tasks[plan["id"]]
        assert sorted(e["sequence"] for e in got) == list(range(2, task["sequence"] + 1)), (task, got)
        types = [e["type"] for e in sorted(got, key=lambda e: e["sequence"]) if e["type"] != "task.progress"]
        assert len(types) == len(set(types)) and types[-1] == f"task.{task['status']}", types
        events.update({e["id"]: e for e in got})

    # Every event reaches the subscriber, signed with its secret, carrying that event.
    wait_for(lambda: set(events) <= {r.webhook_id for r in sink.delivered("/all")}, 20,
             "every event at the subscriber", interval=0.1)
    for received in sink.delivered("/all"):
        payload = received.verify(secret)
        event = events[received.webhook_id]
        assert (payload["type"], payload["data"]["id"], payload["data"]["sequence"]) == \
            (event["type"], event["data"]["id"], event["sequence"])

    # Every image: the bytes the simulator served, with the same ETag, from each replica.
    images = 0
    for plan in plans:
        task = tasks[plan["id"]]
        if task["status"] != "succeeded":
            continue
        served = sim.task(plan["provider"], task["provider_task_id"])["images"]
        for image in task["images"]:
            for relay in replicas:
                response = relay.api.get(f"/v1/images/{image['id']}")
                assert response.status_code == 200, (relay.process.name, response.text)
                assert hashlib.sha256(response.content).hexdigest() == image["sha256"] \
                    == served[image["index"]]["sha256"]
                assert response.headers["etag"] == f'"{image["sha256"]}"'
            images += 1
    assert images == sum(1 for t in tasks.values() if t["status"] == "succeeded") >= 7
    # ... and each is an object in the bucket (content-addressed), none on the replicas' local disks.
    listed = moto.client().list_objects_v2(Bucket=BUCKET, Prefix="replicas/")
    keys = {item["Key"].rsplit("/", 1)[-1].split(".")[0] for item in listed.get("Contents", [])}
    archived = {i["sha256"] for t in tasks.values() for i in t["images"]}
    assert archived <= keys, archived - keys
    assert not (tmp_path / "unused-images").exists() or not any((tmp_path / "unused-images").rglob("*.png"))
    assert Counter(t["provider"] for t in tasks.values()) == {d: 3 for d in DIALECTS}


def test_processes_share_one_port_and_a_killed_one_is_started_again(sim: Simulator, database: str,
                                                                     cleanup: list[Relay], tmp_path: Path) -> None:
    relay = Relay(sim, tmp_path / "data", tmp_path, name="processes",
                  extra_env=replica_env(database, tmp_path / "images"), extra_args=["--processes", "2"])
    cleanup.append(relay)
    relay.start()
    assert relay.process.proc is not None
    parent = relay.process.proc.pid

    def two_processes(without: int = 0) -> list[int]:
        relay.process.check_alive()
        pids = child_pids(parent)
        return pids if len(pids) == 2 and without not in pids else []

    first = wait_for(two_processes, 10, "two processes")

    def run_one_per_dialect(label: str) -> None:
        ids = [relay.create({"provider": d, "prompt": f"{label} [sim:duration=0.3]"})["id"] for d in DIALECTS]
        for task_id in ids:
            relay.wait_succeeded(task_id, timeout=20)

    run_one_per_dialect("before")
    os.kill(first[0], signal.SIGKILL)
    again = wait_for(lambda: two_processes(without=first[0]), 10, "the killed process to be started again")
    assert first[1] in again
    wait_for(lambda: relay.api.get("/healthz").status_code == 200, 10, "relay to answer")
    run_one_per_dialect("after")

    proc = relay.process.proc
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    relay.process.proc = None
    assert not any(pid_alive(pid) for pid in again), "a process outlived its supervisor"


def test_processes_stop_when_their_supervisor_is_killed(sim: Simulator, database: str, cleanup: list[Relay],
                                                        tmp_path: Path) -> None:
    """A supervisor SIGKILLed leaves no relay behind holding the port: each process sees it gone and stops."""
    relay = Relay(sim, tmp_path / "data", tmp_path, name="orphans",
                  extra_env=replica_env(database, tmp_path / "images"), extra_args=["--processes", "2"])
    cleanup.append(relay)
    relay.start()
    assert relay.process.proc is not None
    parent = relay.process.proc.pid
    children = wait_for(lambda: pids if len(pids := child_pids(parent)) == 2 else [], 10, "two processes")
    relay.process.kill()
    wait_for(lambda: not any(pid_alive(pid) for pid in children), 10, "the orphaned processes to stop")
    assert "the supervising process" in relay.process.output()


def test_an_api_replica_and_a_worker_replica_split_the_work(sim: Simulator, database: str,
                                                            cleanup: list[Relay], tmp_path: Path) -> None:
    """--role api takes the tasks, --role worker runs them, woken by the database's notification (its idle
    poll is 30 s: tasks that finish in seconds were not waited for); a task created while no worker runs is
    run by the worker that starts later."""
    shared = {**replica_env(database, tmp_path / "images"), "RELAY_WORKER_IDLE_POLL_SECONDS": "30"}
    api = Relay(sim, tmp_path / "data-api", tmp_path, name="api", extra_env=shared, extra_args=["--role", "api"])
    worker = Relay(sim, tmp_path / "data-worker", tmp_path, name="worker", extra_env=shared,
                   extra_args=["--role", "worker"])
    cleanup.extend([api, worker])
    start_all([api, worker])
    # The worker's first claims (at its start) found nothing: from now on only a notification wakes it soon.
    ids = [api.create({"provider": d, "prompt": "split [sim:duration=0.3]"})["id"] for d in DIALECTS]
    for task_id in ids:
        task = api.wait_succeeded(task_id, timeout=15)
        assert task["images"], task
    # With no worker running, the API replica still takes tasks; a worker that starts later runs them.
    worker.process.stop()
    waiting = api.create({"provider": "gmicloud", "prompt": "waits [sim:duration=0.3]"})
    assert waiting["status"] == "pending", waiting
    worker.start()
    api.wait_succeeded(waiting["id"], timeout=15)


def test_processes_refuse_sqlite_and_a_missing_signing_secret(tmp_path: Path) -> None:
    def serve(**env: str) -> subprocess.CompletedProcess[str]:
        environ = clean_environ(RELAY_STORAGE_DATA_DIR=str(tmp_path / "data"), RELAY_AUTH_API_KEYS=API_KEY,
                                RELAY_SERVER_PORT=str(free_port()), **env)
        return subprocess.run([sys.executable, "-m", "relay", "serve", "--processes", "2"], env=environ,
                              capture_output=True, text=True, timeout=30, check=False)

    on_sqlite = serve()
    assert on_sqlite.returncode == 2
    assert "needs a PostgreSQL database" in on_sqlite.stderr and "SQLite is for one process" in on_sqlite.stderr

    no_secret = serve(RELAY_STORAGE_DATABASE="postgresql://postgres@127.0.0.1:5432/relay_never_created")
    assert no_secret.returncode == 2, no_secret.stderr
    assert "explicit auth.signing_secret" in no_secret.stderr


def test_processes_wait_out_an_unreachable_database_and_stop_on_a_wrong_one(tmp_path: Path) -> None:
    """A database that cannot be reached at start (down, still starting, failing over) is a crash the supervisor
    starts again after a growing delay: `relay serve --processes 2` stays up (it stopped everything, exit 2). One
    that can never work (no such database) stops them all with exit 2, saying why."""
    environ = clean_environ(RELAY_STORAGE_DATA_DIR=str(tmp_path / "data"), RELAY_AUTH_API_KEYS=API_KEY,
                            RELAY_SERVER_PORT=str(free_port()), RELAY_AUTH_SIGNING_SECRET="s" * 40,
                            RELAY_STORAGE_DATABASE="postgresql://postgres@127.0.0.1:1/relay")
    log = tmp_path / "supervisor.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "relay", "serve", "--processes", "2"], env=environ,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_for(lambda: log.read_text().count("cannot start yet: cannot reach the database") >= 3, 30,
                     "the processes to fail to reach the database and be started again")
            assert proc.poll() is None, log.read_text()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    wrong = subprocess.run([sys.executable, "-m", "relay", "serve", "--processes", "2"],
                           env={**environ, "RELAY_STORAGE_DATABASE": "postgresql://postgres@127.0.0.1:5432/"
                                                                     "relay_never_created"},
                           capture_output=True, text=True, timeout=60, check=False)
    assert wrong.returncode == 2, wrong.stderr
    assert "cannot start: cannot open the database" in wrong.stderr and "relay_never_created" in wrong.stderr
