"""Throwaway PostgreSQL databases for tests: one fresh database per use, always dropped.

The server is `RELAY_TEST_POSTGRES` (a DSN naming any database the role may connect to, used only to
create and drop others), else the local one every CI machine has. A server that cannot be reached is
an error with a clear message, never a skip: the store contract suite must run on PostgreSQL too, and
CI must not go green without it.

    async with fresh_database() as dsn:     # postgresql://postgres@127.0.0.1:5432/relay_test_3f9a…
        store = PostgresStore(dsn)

Databases are created from template0 (nothing connects to it, so parallel test runs never trip over
"source database is being accessed by other users") and dropped `WITH (FORCE)`, so a test that failed
with connections still open leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg

DEFAULT_ROOT = "postgresql://postgres@127.0.0.1:5432/postgres"
CONNECT_TIMEOUT = 10.0          # seconds to reach the server
STATEMENT_TIMEOUT = 60.0        # seconds for CREATE / DROP DATABASE
PREFIX = "relay_test_"


class PostgresUnavailable(RuntimeError):
    """The test PostgreSQL server cannot be reached."""


def root_dsn() -> str:
    """The DSN tests create and drop their databases through."""
    return os.environ.get("RELAY_TEST_POSTGRES") or DEFAULT_ROOT


def dsn_for(database: str, root: str | None = None) -> str:
    """`root` with its database replaced by `database` (user, host, port and query kept)."""
    parts = urlsplit(root or root_dsn())
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


async def admin_connection() -> asyncpg.Connection:
    """A connection to the root database, or PostgresUnavailable saying what to do."""
    root = root_dsn()
    try:
        return await asyncpg.connect(root, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        source = "RELAY_TEST_POSTGRES" if os.environ.get("RELAY_TEST_POSTGRES") else "the default"
        raise PostgresUnavailable(
            f"PostgreSQL is not reachable at {_hide_password(root)} ({source}): {type(exc).__name__}: {exc}. "
            "The store tests run on SQLite and PostgreSQL alike and need a server: start it "
            "(e.g. `pg_ctlcluster --skip-systemctl-redirect 15 main start`) or point RELAY_TEST_POSTGRES at one "
            "(trust auth or a password in the DSN; the role must be allowed to CREATE DATABASE).") from exc


@contextlib.asynccontextmanager
async def fresh_database() -> AsyncIterator[str]:
    """Create `relay_test_<random>`, yield its DSN, drop it afterwards (also when the body raised)."""
    name = PREFIX + secrets.token_hex(8)
    admin = await admin_connection()
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0', timeout=STATEMENT_TIMEOUT)
    finally:
        await admin.close()
    try:
        yield dsn_for(name)
    finally:
        await drop_database(name)


async def drop_database(name: str) -> None:
    """DROP DATABASE … WITH (FORCE): ends the connections a failed test left open."""
    assert name.startswith(PREFIX), name
    admin = await admin_connection()
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', timeout=STATEMENT_TIMEOUT)
    finally:
        await admin.close()


def _hide_password(dsn: str) -> str:
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
