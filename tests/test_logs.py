"""No log line carries URL credentials, query strings or keys (issue 8, 5).

The end-to-end test installs the CLI's logging (relay.logs.configure_logging, at DEBUG so that httpx and
httpcore log everything too) and runs real requests through relay's real code paths over real sockets:
a task on the simulator whose provider base URL carries a password, its webhook_url with a password and
a `?token=` that fails, is retried and then fails for good on a redirect to another tokened URL, and an
image archived from a presigned link that first answers 503. Every line the root handler wrote is checked.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from PIL import Image

from relay import ids
from relay.clock import ManualClock
from relay.logs import (
    REDACTED,
    RedactingFilter,
    configure_logging,
    default_format,
    log_context,
    redact_text,
    redact_url,
)
from relay.models import Job, ProviderImage, ProviderStatus, Task, TaskUpdate
from relay.runtime import Runtime, open_runtime
from relay.simulator import SimulatorConfig, create_simulator_app
from relay.states import on_update
from tests.harness import settings_for, wait_for
from tests.serving import serving
from tests.sink import Sink

SECRETS = ("PASS", "SECRET", "dXNlcjpQQVNT")      # the last one: base64 of user:PASS (a Basic header)


# ---- the logging configuration, restored after each test -------------------------------------------
@pytest.fixture
def relay_logging() -> Iterator[io.StringIO]:
    """configure_logging("debug") writing to a buffer; the root logger and the loggers it touches restored."""
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    touched = [logging.getLogger(n) for n in ("httpx", "httpcore", "uvicorn", "uvicorn.error", "uvicorn.access",
                                                "uvicorn.asgi")]
    saved = [(logger, logger.level, list(logger.filters)) for logger in touched]
    buffer = io.StringIO()
    configure_logging("debug", stream=buffer, fmt="text")
    try:
        yield buffer
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for logger, level, filters in saved:
            logger.setLevel(level)
            logger.filters[:] = filters


def leaks(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(secret in line for secret in SECRETS)]


# ---- real servers -------------------------------------------------------------------------------
def bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def png_bytes() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


async def drive(runtime: Runtime, until: Any, what: str) -> None:
    """Advance the manual clock a second at a time and run what became due, until `until()` holds."""
    clock = runtime.ctx.clock
    assert isinstance(clock, ManualClock)

    async def step() -> bool:
        clock.advance(1.0)
        await runtime.worker.drain()
        return bool(await until())
    await wait_for(step, 20, what)


async def test_no_log_line_carries_a_password_or_a_query_token(tmp_path: Path, relay_logging: io.StringIO) -> None:
    sink = Sink()
    sim_socket = bound_socket()
    sim_port = int(sim_socket.getsockname()[1])
    sim = create_simulator_app(SimulatorConfig(public_url=f"http://127.0.0.1:{sim_port}", duration=0.05))
    async with sink.serving(), serving(sim, sim_socket):
        provider_url = f"http://user:PASS@127.0.0.1:{sim_port}/pixazo"
        hook = f"http://user:PASS@127.0.0.1:{sink.port}/hook?token=SECRET"
        sink.script("/hook", {"status": 503},
                    {"status": 302, "location": "http://127.0.0.1:9/next?token=SECRET&u=user:PASS@x"})
        settings = settings_for(tmp_path, RELAY_PROVIDERS_PIXAZO_BASE_URL=provider_url,
                                RELAY_DELIVERIES_SCHEDULE="0,1", RELAY_DELIVERIES_TIMEOUT="5")
        async with open_runtime(settings, clock=ManualClock(start=time.time())) as runtime:
            store = runtime.store
            # A task on the (password-protected) provider, with a tokened webhook_url.
            now = runtime.ctx.clock.now()
            task = Task(id=ids.new_id("tsk", now), provider="pixazo", request={"prompt": "a lighthouse", "n": 1},
                        webhook_url=hook, webhook_events=["task.succeeded"], created_at=now, updated_at=now,
                        deadline_at=now + 3600)
            await store.create_task(task, [Job(id=ids.new_id("job", now), kind="submit", task_id=task.id,
                                               run_at=now, dedupe_key=f"submit:{task.id}")])

            async def succeeded(task_id: str = task.id) -> bool:
                found = await store.get_task(task_id)
                return found is not None and found.status.value == "succeeded"
            await drive(runtime, succeeded, "the provider task to be archived")

            # An image from a presigned link that first answers 503 (retried), then the image.
            sink.script("/img.png", {"status": 503})
            sink.default("/img.png", body=png_bytes(), headers={"content-type": "image/png"})
            signed = sink.url("/img.png") + "?X-Amz-Credential=PASS&X-Amz-Signature=SECRET"
            other = Task(id=ids.new_id("tsk", now), provider="pixazo", request={"prompt": "p", "n": 1},
                         created_at=now, updated_at=now, deadline_at=now + 3600)
            await store.create_task(other, [])
            done = TaskUpdate(status=ProviderStatus.SUCCEEDED, provider_task_id="elsewhere-1",
                              images=(ProviderImage(url=signed),))
            assert await store.apply(other.id, lambda t: on_update(t, done), runtime.ctx.clock.now())
            await drive(runtime, lambda: succeeded(other.id), "the presigned image to be archived")

            async def hook_settled() -> bool:
                counts = await store.delivery_counts()
                return counts.get("pending", 0) == 0
            await drive(runtime, hook_settled, "every delivery to the hook to settle")
            counts = await store.delivery_counts()

        assert counts == {"failed": 1}, counts
        assert [r.status for r in sink.on("/img.png")] == [503, 200]
        assert [r.status for r in sink.on("/hook")] == [503, 302]

    text = relay_logging.getvalue()
    assert leaks(text) == [], "\n".join(leaks(text)[:20])
    # The lines that would have leaked are there, redacted (so the check above looked at something).
    assert f"to http://***@127.0.0.1:{sink.port}/hook?*** retry (503)" in text        # the delivery attempt
    assert f"HTTP Request: POST http://***@127.0.0.1:{sim_port}/pixazo/" in text
    assert f"GET http://127.0.0.1:{sink.port}/img.png?*** → 503" in text        # the download's outcome line
    assert "failed for good after 2 attempts: HTTP 302: redirect to http://127.0.0.1:9/next?*** not followed" in text


def test_below_debug_httpx_request_lines_are_off(relay_logging: io.StringIO) -> None:
    """`relay serve` at info: httpx/httpcore are set to WARNING (their INFO line per request is gone)."""
    buffer = io.StringIO()
    configure_logging("info", stream=buffer, fmt="text")
    assert logging.getLogger("httpx").level == logging.WARNING
    assert logging.getLogger("httpcore").level == logging.WARNING
    logging.getLogger("httpx").info("HTTP Request: GET http://h/?token=SECRET")
    logging.getLogger("relay.test").info("see http://user:PASS@h/x?token=SECRET")
    assert buffer.getvalue().count("\n") == 1 and leaks(buffer.getvalue()) == []
    assert "see http://***@h/x?***" in buffer.getvalue()
    assert sum(any(isinstance(f, RedactingFilter) for f in h.filters)
               for h in logging.getLogger().handlers) == 1     # configuring again replaced, not added


def test_exception_text_and_arguments_are_redacted(relay_logging: io.StringIO) -> None:
    """The formatted message (arguments included), the traceback text and the stack text are all redacted."""
    log = logging.getLogger("relay.test")
    try:
        raise ValueError("cannot fetch http://user:PASS@h/img.png?sig=SECRET: Bearer rk_live_SECRET12345")
    except ValueError:
        log.exception("download of %s failed", "https://u:PASS@cdn.example/a.png?X-Amz-Signature=SECRET")
    log.warning("webhook secret %s", "whsec_SECRET0123456789", stack_info=True)
    log.info("broken call %s %s", "http://u:PASS@h/")  # noqa: PLE1206  # arguments that do not fit the format
    text = relay_logging.getvalue()
    assert leaks(text) == [], text
    assert "download of https://***@cdn.example/a.png?*** failed" in text
    assert "ValueError: cannot fetch http://***@h/img.png?*** Bearer ***" in text
    assert "webhook secret whsec_***" in text and "Stack (most recent call last)" in text


def test_uvicorn_handlers_of_their_own_are_covered(relay_logging: io.StringIO) -> None:
    """uvicorn with its default log config (relay demo) logs through its own handlers: still redacted."""
    uvicorn.Config(lambda *a: None, log_level="info")        # installs uvicorn's handlers, as uvicorn.run does
    handler = logging.getLogger("uvicorn").handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    buffer = io.StringIO()
    stream = handler.setStream(buffer)
    try:
        logging.getLogger("uvicorn.error").error("Invalid HTTP request to http://u:PASS@h/?token=SECRET")
    finally:
        handler.setStream(stream)
    assert leaks(buffer.getvalue()) == [] and "http://***@h/?***" in buffer.getvalue()


# ---- the redaction itself ------------------------------------------------------------------------
@pytest.mark.parametrize("url,expected", [
    ("https://user:pw@h/p?x=1", "https://***@h/p?***"),
    ("http://user:PASS@127.0.0.1:8080/hook?token=SECRET", "http://***@127.0.0.1:8080/hook?***"),
    ("https://h/p", "https://h/p"),
    ("https://h:8443/a/b.png", "https://h:8443/a/b.png"),
    ("https://h/p?", "https://h/p?***"),
    ("https://h/p#access_token=SECRET", "https://h/p#***"),
    # IPv6 hosts, with and without a zone and a port
    ("http://user:PASS@[::1]:8080/p?token=SECRET", "http://***@[::1]:8080/p?***"),
    ("http://[2001:db8::1]/p?token=SECRET", "http://[2001:db8::1]/p?***"),
    ("http://u:PASS@[fe80::1%25eth0]/p", "http://***@[fe80::1%25eth0]/p"),
    # "@" in the path is not userinfo; the host stays
    ("https://cdn.example/users/@alice?sig=SECRET", "https://cdn.example/users/@alice?***"),
    ("http://evil.example/@trusted.example/", "http://evil.example/@trusted.example/"),
    # the last "@" of the authority ends the userinfo ("@" inside a password)
    ("http://a@b:PASS@host/", "http://***@host/"),
    # percent-encoding: encoded "@" in userinfo, an encoded "?" starts the query, an encoded "@" as delimiter
    ("http://user%40x.io:p%40PASS@host/p", "http://***@host/p"),
    ("https://h/p%3Ftoken=SECRET", "https://h/p?***"),
    ("https://h/p%3ftoken=SECRET", "https://h/p?***"),
    ("http://user%3APASS%40host/x", "http://***@host/x"),
    # an authority no client would parse: nothing of it is kept
    ("http://user:pa/ssPASS@host/p?x=SECRET", "http://***?***"),
    ("http://user:PASS?@host/", "http://***?***"),
    # a backslash ends the authority (as browsers read it)
    ("http://user:PASS@host\\@evil.example/?x=SECRET", "http://***@host\\@evil.example/?***"),
    ("postgresql://relay:PASS@db:5432/relay?sslmode=require", "postgresql://***@db:5432/relay?***"),
    ("not a url", "not a url"),
])
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected
    assert redact_url(expected) == expected          # redacting twice changes nothing


@pytest.mark.parametrize("text,expected", [
    ('HTTP Request: POST http://user:PASS@127.0.0.1:1/hook?token=SECRET "HTTP/1.1 503 Service Unavailable"',
     'HTTP Request: POST http://***@127.0.0.1:1/hook?*** "HTTP/1.1 503 Service Unavailable"'),
    ("httpx.ConnectError: failed for url 'http://u:PASS@h:1/x?sig=SECRET'",
     "httpx.ConnectError: failed for url 'http://***@h:1/x?***'"),
    ("(see https://u:PASS@h/p).", "(see https://***@h/p)."),                  # sentence punctuation kept
    ("see https://h/p?t=SECRET).", "see https://h/p?***"),                    # … unless a query may own it
    ("<https://u:PASS@h/p>", "<https://***@h/p>"),
    # URLs inside other URLs' parameters and paths, encoded once or twice
    ("redirect to https://x/cb?next=http%3A%2F%2Fuser%3APASS%40evil%2Fp%3Ftoken%3DSECRET not followed",
     "redirect to https://x/cb?*** not followed"),
    ("go https://h/r/http%253A%252F%252Fuser%253APASS%2540evil%252F end", "go https://h/r/http://***@evil/ end"),
    ("next=https%3A%2F%2Fh%2Fp%3Fsig%3DSECRET&x=1", "next=https://h/p?***"),
    ('{"url": "http:\\/\\/user:PASS@h\\/p?token=SECRET"}', '{"url": "http://***@h\\/p?***"}'),
    # credentials and keys outside URLs
    ("authorization: Bearer rk_test_SECRET0123456789", "authorization: Bearer ***"),
    ("Authorization: Basic dXNlcjpQQVNT", "Authorization: Basic ***"),
    ("secret whsec_SECRETabc+/= signing whsk_SECRET key sk-proj-SECRETSECRET12",
     "secret whsec_*** signing whsk_*** key sk-***"),
    ("POST /callbacks/evolink/tsk_01JD/SECRETtoken failed", "POST /callbacks/evolink/tsk_01JD/*** failed"),
    # prose is left alone
    ("Basic authentication; bearer tokens; work_dir; task tsk_01 done",
     "Basic authentication; bearer tokens; work_dir; task tsk_01 done"),
])
def test_redact_text(text: str, expected: str) -> None:
    assert redact_text(text) == expected
    assert REDACTED in expected or expected == text


# ---- formats and the ids every line carries (issue 10, item 4) ----------------------------------------
def test_json_lines_carry_the_context_ids_and_extra_fields(relay_logging: io.StringIO) -> None:
    """A JSON line has time, level, logger, message and every id known where it was logged; `extra=` wins."""
    buffer = io.StringIO()
    configure_logging("info", stream=buffer, fmt="json")
    with log_context(job_id="job_1", task_id="tsk_1"):
        logging.getLogger("relay.test").info("attempt %d", 2, extra={"delivery_id": "dlv_1", "task_id": "tsk_2"})
    logging.getLogger("relay.test").info("outside")
    first, second = (json.loads(line) for line in buffer.getvalue().splitlines())
    assert first["message"] == "attempt 2" and first["level"] == "info" and first["logger"] == "relay.test"
    assert (first["job_id"], first["task_id"], first["delivery_id"]) == ("job_1", "tsk_2", "dlv_1")
    assert first["time"].endswith("Z")
    assert "job_id" not in second and second["message"] == "outside"


def test_json_fields_and_exceptions_are_redacted(relay_logging: io.StringIO) -> None:
    """Extra fields go through the same redaction as the message, whatever their type; so does the traceback."""
    buffer = io.StringIO()
    configure_logging("info", stream=buffer, fmt="json")
    try:
        raise RuntimeError("GET http://u:PASS@h/x?token=SECRET failed")
    except RuntimeError:
        logging.getLogger("relay.test").exception("boom", extra={
            "url": "https://u:PASS@h/?sig=SECRET", "headers": {"authorization": "Bearer rk_SECRET_0123456789"}})
    line = json.loads(buffer.getvalue())
    assert leaks(buffer.getvalue()) == [] and "rk_SECRET" not in buffer.getvalue()
    assert line["url"] == "https://***@h/?***"
    assert "RuntimeError: GET http://***@h/x?*** failed" in line["exception"]


def test_text_lines_end_with_the_ids(relay_logging: io.StringIO) -> None:
    """In text, the ids follow the message as key=value, in a fixed order."""
    buffer = io.StringIO()
    configure_logging("info", stream=buffer, fmt="text")
    with log_context(task_id="tsk_1"):
        logging.getLogger("relay.test").info("done", extra={"event_id": "evt_1"})
    assert buffer.getvalue().rstrip().endswith("relay.test: done task_id=tsk_1 event_id=evt_1")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_text_on_a_terminal_json_elsewhere(relay_logging: io.StringIO) -> None:
    """No format asked for: a terminal gets text, a file or pipe gets JSON lines; a bad format is refused."""
    assert default_format(_Terminal()) == "text"
    assert default_format(io.StringIO()) == "json"
    with pytest.raises(ValueError, match="text, json"):
        configure_logging("info", stream=io.StringIO(), fmt="yaml")


def test_serve_takes_log_format_from_the_flag_then_the_environment(tmp_path: Path) -> None:
    """`relay serve --log-format`, else RELAY_LOG_FORMAT; a bad value stops with exit code 2 and says why."""
    import subprocess
    import sys

    from tests.e2e.harness import clean_environ

    def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "relay", "serve", "--port", "1", *args], text=True,
                              capture_output=True, timeout=30, env=clean_environ(
                                  RELAY_STORAGE_DATA_DIR=str(tmp_path), RELAY_STORAGE_DATABASE="sqlite:///:memory:",
                                  **env))
    assert "--log-format" in subprocess.run([sys.executable, "-m", "relay", "serve", "--help"], text=True,
                                            capture_output=True, timeout=30).stdout
    bad = run(RELAY_LOG_FORMAT="yaml")
    assert bad.returncode == 2 and "log format must be one of text, json (got 'yaml')" in bad.stderr
    assert run("--log-format", "xml").returncode == 2      # argparse's own refusal
