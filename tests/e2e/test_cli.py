"""The operator CLI as an operator runs it: a subprocess against a running relay, at 80 columns, output read as text.

relay and the simulator are real processes (tests/e2e/conftest.py); subscribers are a
tests/sink.py Sink over a real socket, failing or answering 200 as each test scripts it.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.sink import Sink

from .conftest import RelayFactory
from .harness import API_KEY, Relay, clean_environ, free_port, wait_for

pytestmark = pytest.mark.e2e

CLI_TIMEOUT = 60.0
# Two attempts, 0.2 s apart, then the delivery is failed: dead letters within a second.
FAST_FAILURE = {"RELAY_DELIVERIES_SCHEDULE": "0,0.2", "RELAY_DELIVERIES_JITTER": "0"}


def cli(relay: Relay | None, *args: str, columns: int = 80, url: str | None = None,
        key: str = API_KEY) -> subprocess.CompletedProcess[str]:
    """`relay ARGS…` as a subprocess with its output piped (as in a script) at `columns` columns."""
    target = url or (relay.url if relay else "")
    argv = [sys.executable, "-m", "relay", *args, "--url", target, "--api-key", key]
    return subprocess.run(argv, env=clean_environ(COLUMNS=str(columns)), capture_output=True, text=True,
                          timeout=CLI_TIMEOUT, stdin=subprocess.DEVNULL)


def lines_holding(output: str, text: str) -> list[str]:
    return [line for line in output.splitlines() if text in line]


def assert_fits(output: str, columns: int = 80) -> None:
    too_wide = [line for line in output.splitlines() if len(line) > columns]
    assert not too_wide, f"lines wider than {columns} columns:\n" + "\n".join(too_wide)


@pytest.fixture
def sink() -> Iterator[Sink]:
    with Sink().serving_in_thread() as running:
        yield running


def subscribe(relay: Relay, url: str) -> str:
    response = relay.api.post("/v1/subscriptions", json={"url": url, "events": ["task.succeeded"]})
    assert response.status_code == 201, response.text
    sub_id: str = response.json()["id"]
    return sub_id


def deliveries(relay: Relay, **params: str) -> list[dict[str, Any]]:
    response = relay.api.get("/v1/deliveries", params=params)
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["data"]
    return found


def failed_deliveries(relay: Relay, sink: Sink, count: int = 2) -> tuple[str, list[str]]:
    """A subscription whose subscriber answers 503, and `count` of its deliveries failed for good."""
    sink.default("/down", status=503)
    sub_id = subscribe(relay, sink.url("/down"))
    for i in range(count):
        relay.wait_succeeded(relay.create({"provider": "evolink", "prompt": f"cli {i}"})["id"])
    failed = wait_for(lambda: len(found := deliveries(relay, subscription_id=sub_id, status="failed")) == count
                      and found, 20, f"{count} deliveries of {sub_id} to fail")
    return sub_id, [d["id"] for d in failed]


def test_subscriptions_show_state_and_last_error_with_whole_ids_at_80_columns(relay_factory: RelayFactory,
                                                                              sink: Sink) -> None:
    """`relay subscriptions`: each id whole on one line, failing vs active, the last error; nothing past 80 columns."""
    relay = relay_factory(**FAST_FAILURE)
    failing, _ = failed_deliveries(relay, sink)
    healthy = subscribe(relay, sink.url("/up"))

    done = cli(relay, "subscriptions")
    assert done.returncode == 0, done.stderr
    assert_fits(done.stdout)
    [failing_line] = lines_holding(done.stdout, failing)
    assert "failing" in failing_line and "HTTP 503" in failing_line, done.stdout
    [healthy_line] = lines_holding(done.stdout, healthy)
    assert "active" in healthy_line, done.stdout


def test_failed_deliveries_are_listed_then_retry_delivers_them(relay_factory: RelayFactory, sink: Sink) -> None:
    """`relay deliveries --failed` lists each dead letter whole; once the sink answers 200, `retry --wait` delivers."""
    relay = relay_factory(**FAST_FAILURE)
    sub_id, failed = failed_deliveries(relay, sink)

    listed = cli(relay, "deliveries", "--failed")
    assert listed.returncode == 0, listed.stderr
    assert_fits(listed.stdout)
    for delivery_id in failed:
        [line] = lines_holding(listed.stdout, delivery_id)
        assert "failed" in line, listed.stdout
    only_sub = cli(relay, "deliveries", "--failed", "--subscription", sub_id)
    assert all(lines_holding(only_sub.stdout, d) for d in failed), only_sub.stdout

    sink.default("/down", status=200)
    retried = cli(relay, "deliveries", "retry", *failed, "--wait")
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert_fits(retried.stdout)
    for delivery_id in failed:
        [line] = lines_holding(retried.stdout, delivery_id)
        assert "succeeded" in line, retried.stdout
    assert {d["status"] for d in deliveries(relay, subscription_id=sub_id)} == {"succeeded"}
    assert len(sink.delivered("/down")) == len(failed)


def test_retry_of_an_unknown_delivery_says_not_found(relay: Relay) -> None:
    """`relay deliveries retry dlv_…` of an id relay does not know: a `not found` row and exit code 5."""
    done = cli(relay, "deliveries", "retry", "dlv_00000000000000000000000000")
    assert done.returncode == 5, done.stdout + done.stderr
    [line] = lines_holding(done.stdout, "dlv_00000000000000000000000000")
    assert "not found" in line


def test_replay_sends_a_subscriptions_failed_deliveries_again(relay_factory: RelayFactory, sink: Sink) -> None:
    """`relay replay SUB --since 10m` re-sends the failed deliveries; they reach the recovered sink and succeed."""
    relay = relay_factory(**FAST_FAILURE)
    sub_id, failed = failed_deliveries(relay, sink)
    sink.default("/down", status=200)

    done = cli(relay, "replay", sub_id, "--since", "10m")
    assert done.returncode == 0, done.stderr
    assert f"replayed {len(failed)} failed deliveries of {sub_id}" in done.stdout, done.stdout
    wait_for(lambda: len(sink.delivered("/down")) == len(failed), 20, "the replayed deliveries to arrive")
    wait_for(lambda: {d["status"] for d in deliveries(relay, subscription_id=sub_id)} == {"succeeded"}, 20,
             "the replayed deliveries to be succeeded")
    again = cli(relay, "replay", sub_id, "--since", "10m")
    assert "replayed 0 failed deliveries" in again.stdout, again.stdout


def test_tasks_watch_until_done_shows_the_task_succeed(relay: Relay) -> None:
    """`relay tasks --watch --until-done` piped: a table each time a task moves, ending with it succeeded."""
    task_id = relay.create({"provider": "gmicloud", "prompt": "watched"})["id"]
    done = cli(relay, "tasks", "--watch", "--until-done", "--interval", "0.1")
    assert done.returncode == 0, done.stderr
    assert_fits(done.stdout)
    lines = lines_holding(done.stdout, task_id)
    assert "succeeded" in lines[-1], done.stdout
    assert relay.task(task_id)["status"] == "succeeded"


def test_tasks_watch_ends_on_ctrl_c_without_a_traceback(relay: Relay) -> None:
    """A running `relay tasks --watch` stopped by SIGINT (Ctrl-C) exits 0 and prints no traceback."""
    task_id = relay.wait_succeeded(relay.create({"provider": "openai", "prompt": "watched"})["id"])["id"]
    argv = [sys.executable, "-m", "relay", "tasks", "--watch", "--interval", "0.1", "--url", relay.url,
            "--api-key", API_KEY]
    seen: list[str] = []
    errors: list[str] = []
    with subprocess.Popen(argv, env=clean_environ(COLUMNS="80"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, stdin=subprocess.DEVNULL) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        readers = [threading.Thread(target=seen.extend, args=(proc.stdout,), daemon=True),
                   threading.Thread(target=errors.extend, args=(proc.stderr,), daemon=True)]
        for reader in readers:
            reader.start()
        try:
            wait_for(lambda: any(task_id in line and "succeeded" in line for line in list(seen)), 20,
                     "the watch to show the task succeeded")
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=10) == 0, "".join(errors)
        finally:
            if proc.poll() is None:
                proc.kill()
            for reader in readers:
                reader.join(timeout=10)
    assert "Traceback" not in "".join(errors), "".join(errors)


def test_tasks_keep_status_and_ids_whole_when_narrow(relay: Relay) -> None:
    """`relay tasks` at 60 columns and piped: ids and `succeeded` whole; --json gives the API's objects."""
    task_id = relay.wait_succeeded(relay.create({"provider": "apimart", "prompt": "narrow"})["id"])["id"]
    done = cli(relay, "tasks", columns=60)
    assert done.returncode == 0, done.stderr
    assert_fits(done.stdout, 60)
    [line] = lines_holding(done.stdout, task_id)
    assert "succeeded" in line and "apimart" in line, done.stdout
    as_json = cli(relay, "tasks", "--json")
    assert f'"id": "{task_id}"' in as_json.stdout


def test_errors_are_one_line_with_an_exit_code(relay: Relay) -> None:
    """Unreachable relay → 3, a wrong key → 4, an unknown subscription → 5; one `relay:` line, no traceback."""
    cases = [(cli(None, "subscriptions", url=f"http://127.0.0.1:{free_port()}"), 3, "cannot reach relay"),
             (cli(relay, "deliveries", "--failed", key="rk_wrong_0123456789abcdef"), 4, "refused the API key"),
             (cli(relay, "replay", "sub_00000000000000000000000000", "--since", "1h"), 5, "404 not_found")]
    for done, code, text in cases:
        assert done.returncode == code, (done.args, done.stdout, done.stderr)
        assert done.stderr.startswith("relay: ") and text in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr


@pytest.mark.timeout(150)
def test_demo_final_table_keeps_task_ids_whole_at_80_columns(tmp_path: Path) -> None:
    """`relay demo` piped at 80 columns: its archived-images table fits and shows every task id on one line."""
    argv = [sys.executable, "-m", "relay", "demo", "--port", "0", "--per-provider", "1", "--data-dir", "demo-data"]
    done = subprocess.run(argv, cwd=tmp_path, env=clean_environ(COLUMNS="80"), capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    table = done.stdout.split("archived files:")[0]
    assert_fits(table)
    rows = [line for line in table.splitlines() if "│ tsk_" in line]
    assert rows and all("succeeded" in row for row in rows), table
    for row in rows:
        assert re.search(r"│ tsk_[0-9A-Z]{26} │", row), f"a task id cut or wrapped: {row}"


def test_submit_wait_prints_one_json_document_on_stdout_and_the_progress_on_stderr(relay: Relay) -> None:
    """`relay submit … --wait | jq`: stdout is the final task alone (the progress bar, which rich prints once when
    the output is not a terminal, goes to stderr with the summary)."""
    done = cli(relay, "submit", "a lighthouse", "--provider", "gmicloud", "--wait")
    assert done.returncode == 0, done.stderr
    task = json.loads(done.stdout)
    assert task["status"] == "succeeded" and task["images"][0]["sha256"]
    assert task["id"] in done.stderr


def test_until_done_with_no_tasks_ends_at_once(relay: Relay) -> None:
    """Nothing listed, nothing to wait for: `relay tasks --until-done` ends (it waited for ever)."""
    done = cli(relay, "tasks", "--until-done")
    assert done.returncode == 0, done.stderr


def test_output_into_a_pipe_closed_early_ends_quietly(relay: Relay) -> None:
    """`relay tasks --json | head -0`: the reader is gone before relay writes; no BrokenPipeError traceback."""
    argv = [sys.executable, "-m", "relay", "tasks", "--json", "--url", relay.url, "--api-key", API_KEY]
    proc = subprocess.Popen(argv, env=clean_environ(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    try:
        err = proc.stderr.read().decode()
        code = proc.wait(timeout=CLI_TIMEOUT)
    finally:
        proc.kill()
        proc.stderr.close()
    assert "Traceback" not in err and code == 1, (code, err)
