"""Pacing and reporting a resource of our own that keeps failing: a full disk, a database that cannot be written.

A loop that meets such a failure must neither retry at once nor log every try: with the data directory on a
full disk, the worker once wrote 208,376 "claiming jobs failed" tracebacks in 165 s, onto that same disk.
An `Outage` holds the state of one resource for every loop that uses it:
  - when to try again: exponential backoff with jitter (`backoff`), capped, reset by the first success;
  - whether to log: the first failure, then at most one line per `log_interval` with the count since the
    last line and one traceback, and one line when an outage that was logged ends;
  - what to tell /readyz while it lasts (`problem`).
"""

from __future__ import annotations

import errno
import logging
import random
import socket
import sqlite3
import time
from collections.abc import Callable

# What "could not be used now" looks like, as opposed to "this call is wrong" (a bug, bad SQL, a constraint):
# only these are waited out; the rest goes the usual way of errors. SQLite's primary result codes:
_SQLITE_UNAVAILABLE = frozenset({
    5,    # SQLITE_BUSY
    6,    # SQLITE_LOCKED
    7,    # SQLITE_NOMEM
    8,    # SQLITE_READONLY
    10,   # SQLITE_IOERR
    13,   # SQLITE_FULL: "database or disk is full"
    14,   # SQLITE_CANTOPEN
    15,   # SQLITE_PROTOCOL
})
_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EMFILE, errno.ENFILE})


def backoff(attempt: int, base: float, cap: float, jitter: float = 0.2) -> float:
    """Exponential backoff with ±jitter: base, 2·base, 4·base … up to cap."""
    delay = min(cap, base * 2.0 ** max(0, min(attempt - 1, 64)))   # 64: a long outage counts far past that
    return delay * random.uniform(1 - jitter, 1 + jitter)


RETRY_AFTER_CAP = 3600.0        # the other side's Retry-After is honoured up to an hour


def retry_delay(failures: int, retry_after: float | None, base: float, cap: float) -> float:
    """When to try again after `failures` failures in a row: the backoff, or the other side's Retry-After (up to
    RETRY_AFTER_CAP) when it asks for longer. Never sooner than the backoff: a provider answering every call with
    a 429 and `Retry-After: 0` (or a date its clock puts in the past) would otherwise be asked again at once, by
    every job waiting on it."""
    delay = backoff(failures, base, cap)
    if retry_after is not None:
        delay = max(delay, min(retry_after, RETRY_AFTER_CAP))
    return delay


def is_unavailable(exc: BaseException) -> bool:
    """True if `exc` says a store or disk of ours cannot be used now (full, read-only, I/O error, busy)."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return code is not None and code & 0xFF in _SQLITE_UNAVAILABLE
    if type(exc).__module__.startswith("asyncpg"):
        # PostgreSQL unreachable, restarting, full of connections, or a pooled connection it killed.
        import asyncpg
        from asyncpg.exceptions import _base
        if isinstance(exc, (asyncpg.ClientConfigurationError, _base.DataError)):
            return False        # a DSN relay cannot use, an argument it cannot send: the call is wrong, not the time
        return isinstance(exc, (asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError,
                                asyncpg.AdminShutdownError, asyncpg.TooManyConnectionsError, asyncpg.InterfaceError,
                                asyncpg.InternalClientError))
    if isinstance(exc, ConnectionError):     # the database server's socket refused or reset
        return True
    return isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS


_SQLITE_BUSY = frozenset({5, 6})      # SQLITE_BUSY, SQLITE_LOCKED: another process holds the file now
# A server not up yet, or a network not up yet (a machine still booting). Not a bare ConnectionError without an
# errno: asyncpg raises one for a server that refuses the TLS it was asked for (sslmode), a setting.
_NETWORK_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EHOSTUNREACH,
                             errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN, errno.ETIMEDOUT})


def unreachable_at_start(exc: BaseException) -> bool:
    """True if `exc`, met opening the database at start, says it cannot be reached now and may be later (down,
    starting, failing over, out of connections, a name server not answering, a file another process holds): worth
    starting again. Narrower than is_unavailable: at start, what a wrong setting also causes (a file relay may not
    open or write, a DSN it cannot use, a host name that does not exist) is the setting's fault."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return code is not None and code & 0xFF in _SQLITE_BUSY
    if isinstance(exc, socket.gaierror):
        return exc.errno == socket.EAI_AGAIN
    if isinstance(exc, TimeoutError) or (isinstance(exc, OSError) and exc.errno in _NETWORK_ERRNOS):
        return True
    if isinstance(exc, OSError) and exc.errno is None and str(exc).startswith("Multiple exceptions"):
        return True     # asyncio's connect to a name with several addresses (localhost: ::1 and 127.0.0.1), all down
    if type(exc).__module__.startswith("asyncpg"):
        import asyncpg
        return isinstance(exc, (asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError,
                                asyncpg.TooManyConnectionsError))
    return False


def describe(exc: BaseException) -> str:
    """`Type: message`, the way an outage names its cause in logs, job errors and /readyz."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class Outage:
    """The trouble of one resource (`what`), shared by every loop that calls it. Not thread-safe: one event loop."""

    def __init__(self, what: str, log: logging.Logger, *, base: float = 0.1, cap: float = 5.0,
                 log_interval: float = 30.0, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self.log = log
        self.base = base
        self.cap = cap
        self.log_interval = log_interval
        self._monotonic = monotonic
        self.failures = 0                 # since the last success
        self._error: str | None = None    # the latest failure, described
        self._since: float | None = None  # when the current run of failures began
        self._resume_at = 0.0
        self._unlogged = 0                # failures no log line has counted yet
        self._last_line: float | None = None
        self._announced = False           # a line said this outage began; one must say it ended

    @property
    def failing(self) -> bool:
        return self.failures > 0

    def failed(self, exc: BaseException, during: str) -> float:
        """Count a failure; log it if a line is due. Returns the delay before the next try."""
        now = self._monotonic()
        self.failures += 1
        self._unlogged += 1
        self._error = describe(exc)
        if self._since is None:
            self._since = now
        delay = backoff(self.failures, self.base, self.cap)
        self._resume_at = now + delay
        if self._last_line is None or now - self._last_line >= self.log_interval:
            self._log_failure(exc, during, now)
        return delay

    def _log_failure(self, exc: BaseException, during: str, now: float) -> None:
        if self._announced:
            self.log.warning("%s still failing (%s): %d failures in the last %.0f s, %d since it began %.0f s ago; "
                             "latest: %s", self.what, during, self._unlogged, now - (self._last_line or now),
                             self.failures, now - (self._since or now), self._error, exc_info=exc)
        else:
            self.log.warning("%s failed (%s): %s; retrying with backoff up to %g s, logging at most every %g s",
                             self.what, during, self._error, self.cap, self.log_interval, exc_info=exc)
        self._announced = True
        self._last_line = now
        self._unlogged = 0

    def succeeded(self) -> None:
        """A call went through: reset the backoff, and say the outage ended if its start was logged."""
        if not self.failures:
            return
        now = self._monotonic()
        if self._announced:
            self.log.warning("%s recovered after %d failures in %.1f s", self.what, self.failures,
                             now - (self._since or now))
            self._unlogged = 0
        # Failures of an outage too short to be logged (rate limit) stay in _unlogged for the next line.
        self.failures = 0
        self._error = None
        self._since = None
        self._resume_at = 0.0
        self._announced = False

    def remaining(self) -> float:
        """Seconds left before the next try is due (0 when not failing)."""
        return max(0.0, self._resume_at - self._monotonic()) if self.failures else 0.0

    def problem(self) -> str | None:
        """For /readyz: what is failing and for how long; None while calls succeed."""
        if not self.failures:
            return None
        seconds = self._monotonic() - (self._since or self._monotonic())
        return f"{self._error} ({self.failures} failures in {seconds:.0f} s)"
