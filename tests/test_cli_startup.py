"""`relay` meets what it cannot start with by saying so in one line and an exit code, never a traceback: a
database it cannot reach, a data directory it cannot use, what `relay check-config` would otherwise pass, and
arguments out of range."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.harness import clean_environ

DOWN = "postgresql://relay:hunter2@127.0.0.1:1/relay"     # nothing listens on port 1
SECRET = "s" * 40


def relay(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args], env=clean_environ(**env), capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def assert_one_line(done: subprocess.CompletedProcess[str], code: int, *says: str) -> None:
    assert done.returncode == code, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    for text in says:
        assert text in done.stderr, done.stderr


@pytest.mark.parametrize(("command", "code"), [("serve", 1), ("retention", 2)])
def test_a_database_relay_cannot_reach_is_named_without_its_password(command: str, code: int,
                                                                     tmp_path: Path) -> None:
    """serve exits 1 for a database it cannot reach now (worth starting again: a service manager does), 2 for
    settings it cannot start with."""
    done = relay(command, RELAY_STORAGE_DATABASE=DOWN, RELAY_AUTH_SIGNING_SECRET=SECRET,
                 RELAY_STORAGE_DATA_DIR=str(tmp_path))
    assert_one_line(done, code, "cannot reach the database postgresql://relay:***@127.0.0.1:1/relay",
                    "ConnectionRefusedError")
    assert "hunter2" not in done.stderr


def test_a_data_dir_relay_cannot_use_is_named(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    done = relay("serve", RELAY_STORAGE_DATA_DIR=str(tmp_path / "a-file" / "data"))
    assert_one_line(done, 2, "cannot start: storage.data_dir", "Not a directory")


def test_check_config_fails_what_serve_would_refuse_and_warns_of_an_unreachable_public_url(tmp_path: Path) -> None:
    refused = relay("check-config", RELAY_STORAGE_DATABASE=DOWN, RELAY_STORAGE_DATA_DIR=str(tmp_path))
    assert_one_line(refused, 2, "relay serve would not start", "auth.signing_secret")
    warned = relay("check-config", RELAY_SERVER_HOST="0.0.0.0", RELAY_STORAGE_DATA_DIR=str(tmp_path))
    assert_one_line(warned, 0, "server.public_url is http://0.0.0.0:8080", "configuration OK")
    quiet = relay("check-config", RELAY_SERVER_HOST="0.0.0.0", RELAY_SERVER_PUBLIC_URL="https://relay.example",
                  RELAY_STORAGE_DATA_DIR=str(tmp_path))
    assert_one_line(quiet, 0, "configuration OK")
    assert "public_url is" not in quiet.stderr


@pytest.mark.parametrize(("args", "says"), [
    (("serve", "--log-level", "loud"), "invalid choice: 'loud'"),
    (("demo", "--port", "99999"), "is not a port"),
    (("tasks", "--watch", "--interval", "-1"), "is not a number of seconds above 0"),
    (("replay", "sub_x", "--since", "99999999999999999999w"), "reaches back before the year 1"),
    (("archive", "links.txt", "--concurrency", "0"), "is not a whole number of at least 1"),
])
def test_arguments_out_of_range_are_usage_errors(args: tuple[str, ...], says: str) -> None:
    assert_one_line(relay(*args), 2, says)


def test_a_database_file_relay_cannot_open_is_a_setting_to_fix_not_a_wait(tmp_path: Path) -> None:
    """SQLite's relay.db is a directory (or unreadable): exit 2, "cannot open", not "cannot start yet" (a service
    manager would start it again for ever)."""
    (tmp_path / "relay.db").mkdir()
    done = relay("serve", RELAY_STORAGE_DATA_DIR=str(tmp_path))
    assert_one_line(done, 2, "cannot start: cannot open the database")


def test_what_counts_as_a_database_to_wait_for_at_start() -> None:
    import socket
    import sqlite3

    import asyncpg

    from relay.outage import unreachable_at_start
    busy = sqlite3.OperationalError("database is locked")
    busy.sqlite_errorcode = 5  # type: ignore[attr-defined]
    cantopen = sqlite3.OperationalError("unable to open database file")
    cantopen.sqlite_errorcode = 14  # type: ignore[attr-defined]
    import errno
    waits = [ConnectionRefusedError(errno.ECONNREFUSED, "refused"), TimeoutError(),
             socket.gaierror(socket.EAI_AGAIN, "again"), OSError(errno.EHOSTUNREACH, "no route"),
             OSError("Multiple exceptions: [Errno 111] …, [Errno 99] …"),
             asyncpg.CannotConnectNowError("starting up"), asyncpg.TooManyConnectionsError("too many"), busy]
    stops = [socket.gaierror(socket.EAI_NONAME, "no such host"), asyncpg.InvalidPasswordError("wrong"),
             asyncpg.InvalidCatalogNameError("no such database"), asyncpg.ClientConfigurationError("bad sslmode"),
             ConnectionError("PostgreSQL server at \"db:5432\" rejected SSL upgrade"),
             cantopen, PermissionError(13, "denied")]
    assert [unreachable_at_start(e) for e in waits] == [True] * len(waits)
    assert [unreachable_at_start(e) for e in stops] == [False] * len(stops)
