"""`relay serve --processes N`: N whole relays on one machine, one port and one PostgreSQL database.

The parent binds the listening socket once and forks N children. Each child is a complete relay, as
`relay serve` alone would be: its own Runtime (store pool, HTTP clients, worker) and uvicorn serving the
inherited socket, so the kernel hands every new connection to one of them and the workers share the
job queue through the database. SQLite is for one process, so this needs PostgreSQL (cli refuses).

The parent only supervises:
- SIGTERM or SIGINT: each child gets one SIGTERM and stops as `relay serve` does (finishes its requests,
  stops its worker; a leased job is picked up again by whoever runs next). A child still there after
  STOP_GRACE seconds, or after a second signal, is killed.
- A child that dies (a crash, the OOM killer, a SIGKILL) is started again at once; one that keeps dying
  soon after it started is restarted after a growing delay (up to MAX_BACKOFF s), so that a database
  that is down at start does not make it spin.
- A child that exits with EXIT_CANNOT_START (relay cannot start with these settings) stops them all:
  the parent exits with that code.
Each child sits in its own process group, so a terminal's Ctrl-C reaches the parent alone (which stops
the children once, gracefully), and a child stops by itself when its parent is gone (SIGKILLed).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Generator
from types import FrameType
from typing import NoReturn

import uvicorn

log = logging.getLogger("relay.processes")

STOP_GRACE = 20.0          # seconds a child has to stop after SIGTERM (uvicorn 3 s + worker 10 s + closing)
QUICK_EXIT = 5.0           # a child that dies sooner than this after its start counts as failing to start
MAX_BACKOFF = 30.0         # the longest wait before starting a failing child again
EXIT_CANNOT_START = 2      # a child's exit code for "these settings cannot work": no restart, stop all
BACKLOG = 2048


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket every child serves (inherited across fork). OSError when it cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class ChildServer(uvicorn.Server):
    """uvicorn in a supervised child: stops (gracefully) on SIGTERM/SIGINT or when its parent is gone.

    Unlike uvicorn's own handling, the signal is not raised again once the server has stopped, so the
    Runtime around the server is closed properly and the child exits 0.
    """

    def __init__(self, config: uvicorn.Config, parent_pid: int) -> None:
        super().__init__(config)
        self.parent_pid = parent_pid

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def on_tick(self, counter: int) -> bool:
        # Every 0.1 s: a parent SIGKILLed leaves us to init (or a subreaper); stop rather than serve alone.
        if os.getppid() != self.parent_pid:
            if not self.should_exit:
                log.warning("the supervising process %d is gone; stopping", self.parent_pid)
            self.should_exit = True
        return await super().on_tick(counter)


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class Supervisor:
    """Forks `count` children running `child_main(parent_pid) -> exit code`, and keeps them running."""

    def __init__(self, count: int, child_main: Callable[[int], int], *, stop_grace: float = STOP_GRACE,
                 on_exit: Callable[[int], None] | None = None) -> None:
        """`on_exit(pid)`: called in the parent when a child has exited (relay.metrics drops its live values)."""
        if count < 1:
            raise ValueError("count must be at least 1")
        self.count = count
        self.child_main = child_main
        self.on_exit = on_exit
        self.stop_grace = stop_grace
        self.parent_pid = os.getpid()
        self.slot_of: dict[int, int] = {}            # pid → slot (0 … count-1)
        self.started_at: dict[int, float] = {}       # slot → monotonic start time
        self.failures: dict[int, int] = {}           # slot → quick deaths in a row
        self.due: dict[int, float] = {}              # slot → monotonic time to start it (again)
        self.stopping = False
        self.kill_now = False
        self.stop_deadline = 0.0
        self.exit_code = 0
        self._signals = 0
        self._wake_r = -1
        self._wake_w = -1

    # ---- the parent ----------------------------------------------------------------------------------
    def run(self) -> int:
        """Start the children and supervise them until told to stop (SIGTERM/SIGINT); returns the exit code."""
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        previous_wakeup = signal.set_wakeup_fd(self._wake_w)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda sig, frame: None)  # wakes the loop
        try:
            for slot in range(self.count):
                self._spawn(slot)
            self._loop()
        finally:
            self._kill_all(signal.SIGKILL)        # only if something above raised: never leave children behind
            self._reap(block=True)
            signal.set_wakeup_fd(previous_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(self._wake_r)
            os.close(self._wake_w)
        return self.exit_code

    def _loop(self) -> None:
        signalled = 0
        while self.slot_of or (not self.stopping and self.due):
            now = time.monotonic()
            if self._signals > signalled:
                signalled = self._signals
                self._begin_stop(now)
            if self.stopping:
                if self.kill_now or now >= self.stop_deadline:
                    if self.slot_of:
                        log.warning("killing %d process(es) that did not stop", len(self.slot_of))
                    self._kill_all(signal.SIGKILL)
                    self.kill_now = False
                # (past the deadline: SIGKILLed, so the SIGCHLDs are near; look again shortly)
                timeout: float | None = max(0.0, self.stop_deadline - now) or 0.1
            else:
                for slot, at in sorted(self.due.items()):
                    if at <= now:
                        del self.due[slot]
                        self._spawn(slot)
                timeout = max(0.0, min(self.due.values()) - now) if self.due else None
            with contextlib.suppress(InterruptedError):
                select.select([self._wake_r], [], [], timeout)
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wake_r, 512):
                    pass
            self._reap(block=False)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        if self.stopping:
            self.kill_now = True          # a second signal: do not wait any longer
        self._signals += 1

    def _begin_stop(self, now: float) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.due.clear()
        self.stop_deadline = now + self.stop_grace
        log.info("stopping %d process(es)", len(self.slot_of))
        self._kill_all(signal.SIGTERM)

    def _kill_all(self, sig: int) -> None:
        for pid in list(self.slot_of):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _reap(self, *, block: bool) -> None:
        while self.slot_of:
            try:
                pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                self.slot_of.clear()
                return
            if pid == 0:
                return
            slot = self.slot_of.pop(pid, None)
            if slot is None:
                continue
            if self.on_exit is not None:
                self.on_exit(pid)
            self._exited(slot, pid, os.waitstatus_to_exitcode(status))

    def _exited(self, slot: int, pid: int, code: int) -> None:
        now = time.monotonic()
        if self.stopping:
            log.info("process %d (pid %d) %s", slot, pid, _describe(code))
            return
        if code == EXIT_CANNOT_START:
            log.error("process %d (pid %d) cannot start with these settings; stopping", slot, pid)
            self.exit_code = EXIT_CANNOT_START
            self._begin_stop(now)
            return
        quick = now - self.started_at.get(slot, now) < QUICK_EXIT
        failures = self.failures.get(slot, 0) + 1 if quick else 0
        self.failures[slot] = failures
        delay = min(MAX_BACKOFF, 0.5 * 2 ** (failures - 1)) if failures else 0.0
        log.warning("process %d (pid %d) %s; starting it again%s", slot, pid, _describe(code),
                    f" in {delay:g} s" if delay else "")
        self.due[slot] = now + delay

    def _spawn(self, slot: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self._child(slot)            # never returns
        self.slot_of[pid] = slot
        self.started_at[slot] = time.monotonic()
        log.info("process %d started (pid %d)", slot, pid)

    # ---- a child ------------------------------------------------------------------------------------
    def _child(self, slot: int) -> NoReturn:
        code = 1
        try:
            os.setpgid(0, 0)               # a terminal's Ctrl-C goes to the parent only
            signal.set_wakeup_fd(-1)
            os.close(self._wake_r)
            os.close(self._wake_w)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)      # until uvicorn serves: stopping = dying
            signal.signal(signal.SIGINT, signal.default_int_handler)
            code = self.child_main(self.parent_pid)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except KeyboardInterrupt:
            code = 0
        except BaseException:  # noqa: BLE001 - a child never returns into the parent's code: report, exit 1
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
