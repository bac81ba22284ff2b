"""Shared bench helpers: free ports, child processes, wrk runs, machine description, report sections."""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

PYTHON = sys.executable
PROVIDERS = ("gmicloud", "apimart", "evolink", "pixazo", "openai")
KEY = "rk_bench_0123456789abcdefghij"
T = TypeVar("T")
CpuPids = dict[str, int | None]     # name → pid whose CPU time to read (None: this process)


# ---- the database relay runs on (python -m bench --database sqlite|postgresql) --------------------------
DATABASES = ("sqlite", "postgresql")
DATABASE = "sqlite"       # set by `python -m bench --database` (and each section's own --database) via use_database
# The server bench databases are created on (and dropped from): RELAY_BENCH_POSTGRES, a DSN naming any database
# the role may connect to, else the local one (trust auth, user postgres).
PG_ROOT = os.environ.get("RELAY_BENCH_POSTGRES") or "postgresql://postgres@127.0.0.1:5432/postgres"
PG_PREFIX = "relay_bench_"
# On a shared database relay refuses to start without an explicit signing secret of at least 32 characters.
SIGNING_SECRET = "bench-signing-secret-0123456789abcdefghij"
_databases: dict[str, str] = {}     # key (a data dir, a case) → DSN of its fresh database, this section's
# `relay simulate --prerendered` for every simulator the bench starts (python -m bench --prerendered): one drawn
# picture per size and format with a unique chunk per task, so end-to-end figures measure relay, not Pillow.
PRERENDERED = False


def use_database(name: str) -> None:
    if name not in DATABASES:
        raise SystemExit(f"--database must be one of {', '.join(DATABASES)} (got {name!r})")
    global DATABASE
    DATABASE = name


def postgres() -> bool:
    return DATABASE == "postgresql"


def backend_label(name: str | None = None) -> str:
    return {"sqlite": "SQLite", "postgresql": "PostgreSQL"}[name or DATABASE]


def in_thread(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to its end on a loop of its own in a helper thread: callable with or without a
    running loop in this thread (the in-process sections create databases from inside theirs)."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


def pg_dsn(database: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(PG_ROOT)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


def create_database() -> str:
    """A fresh PostgreSQL database `relay_bench_<random>` (from template0); its DSN. Drop it with drop_database."""
    import secrets

    name = PG_PREFIX + secrets.token_hex(6)
    _admin(f'CREATE DATABASE "{name}" TEMPLATE template0')
    return pg_dsn(name)


def drop_database(dsn: str) -> None:
    """DROP DATABASE … WITH (FORCE): also when a relay process left connections open."""
    name = dsn.rsplit("/", 1)[1].split("?", 1)[0]
    assert name.startswith(PG_PREFIX), name
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _admin(sql: str) -> None:
    """One statement on the server's maintenance database (CREATE/DROP DATABASE cannot run in a transaction)."""
    import asyncpg

    async def run() -> None:
        admin = await asyncpg.connect(PG_ROOT, timeout=10)
        try:
            await admin.execute(sql)
        finally:
            await admin.close()
    in_thread(run)


def database_for(key: str) -> str:
    """This section's fresh database for `key` (e.g. a relay's data dir: the same dir, the same database, as
    when a section restarts relay on its data), created on first use and dropped when the section ends."""
    if key not in _databases:
        _databases[key] = create_database()
    return _databases[key]


def database_env(key: str) -> dict[str, str]:
    """Environment for a relay on the chosen database: nothing on SQLite (the data dir's relay.db); on
    PostgreSQL a fresh database for `key` and the explicit signing secret relay then requires."""
    if not postgres():
        return {}
    return {"RELAY_STORAGE_DATABASE": database_for(key), "RELAY_AUTH_SIGNING_SECRET": SIGNING_SECRET}


def drop_section_databases() -> None:
    while _databases:
        _, dsn = _databases.popitem()
        drop_database(dsn)


def pg_version() -> str:
    import asyncpg

    async def ask() -> str:
        conn = await asyncpg.connect(PG_ROOT, timeout=10)
        try:
            return str(await conn.fetchval("SHOW server_version")).split()[0]
        finally:
            await conn.close()
    return in_thread(ask)


# ---- report sections ---------------------------------------------------------------------------------
@dataclass
class Figure:
    """One line of the summary table: relay's figure, the baseline measured in the same run, their ratio."""

    name: str
    value: str
    baseline: str
    ratio: float | None
    meaning: str = "relay / baseline"


@dataclass
class Section:
    """What each bench module's `run(quick)` returns: a part of docs/benchmarks.md and its key figures."""

    key: str
    title: str
    body: str                                    # markdown: how it was measured, tables
    notes: list[str] = field(default_factory=list)   # "reading the numbers" bullets
    figures: dict[str, float] = field(default_factory=dict)
    summary: list[Figure] = field(default_factory=list)
    seconds: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)   # busy / steal shares of the machine meanwhile

    def markdown(self) -> str:
        lines = [f"## {self.title}", SECTION_MARK.format(key=self.key), "", self.body.rstrip()]
        if self.notes:
            lines += ["", "Reading the numbers:", ""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def write_section(path: Path, title: str, text: str) -> None:
    """Replace the `## {title}` section of `path` (or add it), keeping everything else."""
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    start = doc.find(f"## {title}\n")
    if start >= 0:
        end = doc.find("\n## ", start + 1)
        doc = doc[:start] + text.rstrip() + "\n" + (doc[end:] if end >= 0 else "")
    else:
        doc = doc.rstrip() + "\n\n" + text.rstrip() + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc)


# Under the heading of every section a run writes (an HTML comment: not shown), and the title of a part of a run.
SECTION_MARK = "<!-- bench section: {key} -->"
PART_OF_A_RUN = re.compile(r" — (partial|full) run \d{4}-\d{2}-\d{2}$")


def sections_of(doc: str) -> list[tuple[str, str]]:
    """The `## ` sections of a markdown document, (title, text with its heading), in order."""
    found = []
    for piece in ("\n" + doc).split("\n## ")[1:]:
        title = piece.split("\n", 1)[0].strip()
        found.append((title, "## " + piece.rstrip() + "\n"))
    return found


def keeping_notes(old: str, new: str) -> str:
    """`new` (a full run's report) followed by every section of `old` it does not replace: the notes written by
    hand between runs (the rounds of work on a figure, with what was measured and why) and the partial runs of
    other days and databases. A section of the last full run is replaced whatever its title now (a section that
    failed is titled by its key): it carries its key (SECTION_MARK) and no run in its title. A full run used to
    write its report over the whole file, and the notes had to be put back by hand."""
    titles = {title for title, _ in sections_of(new)}
    keys = set(re.findall(SECTION_MARK.format(key=r"(\w+)"), new))

    def replaced(title: str, text: str) -> bool:
        mark = re.search(SECTION_MARK.format(key=r"(\w+)"), text)
        return title in titles or (mark is not None and mark.group(1) in keys and not PART_OF_A_RUN.search(title))
    kept = [text for title, text in sections_of(old) if not replaced(title, text)]
    return new.rstrip() + "\n" + "".join("\n" + text for text in kept)


def timed(run: Callable[..., Section]) -> Callable[..., Section]:
    """Wrap a module's run(quick, ...) so its Section carries its own wall time."""

    def wrapper(quick: bool, *args: Any, **kwargs: Any) -> Section:
        started, stat, own = time.monotonic(), cpu_stat(), own_cpu()
        try:
            section = run(quick, *args, **kwargs)
        finally:
            drop_section_databases()     # PostgreSQL: every database the section created
        section.seconds = time.monotonic() - started
        section.cpu = cpu_share(stat, cpu_stat(), own_cpu() - own)
        if postgres():
            # Sections keep their SQLite titles and figure names; a PostgreSQL run's are told apart.
            section.title += " (PostgreSQL)"
            for figure in section.summary:
                figure.name += " (PostgreSQL)"
        return section

    wrapper.__name__ = run.__name__
    wrapper.__doc__ = run.__doc__
    return wrapper


# ---- numbers ------------------------------------------------------------------------------------------
def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(pct / 100 * len(ordered)) - 1))]


def ratio(value: float, baseline: float) -> float | None:
    return None if not baseline or math.isnan(baseline) or math.isnan(value) else value / baseline


# ---- processes ----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 20.0, verify: bool = True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1, verify=verify).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up within {timeout}s")


def spawn(argv: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen[bytes]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    base.update(env or {})
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - the child keeps it
    return subprocess.Popen(argv, env=base, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_simulator(root: Path, duration: float, name: str = "sim") -> tuple[subprocess.Popen[bytes], str]:
    """`relay simulate` as a child process; returns it and its base URL."""
    port = free_port()
    proc = spawn([PYTHON, "-m", "relay", "simulate", "--port", str(port), "--duration", str(duration),
                  "--log-level", "warning", *(["--prerendered"] if PRERENDERED else [])], log=root / f"{name}.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/_sim/stats")
    except BaseException:
        stop(proc)
        raise
    return proc, url


def relay_env(data: Path, port: int, sim_url: str, role: str = "all", **extra: str) -> dict[str, str]:
    """Environment for `relay serve`: every dialect against `sim_url`, rate limits out of the way, on the
    chosen database (PostgreSQL: a fresh one per data dir)."""
    env = {"RELAY_STORAGE_DATA_DIR": str(data), "RELAY_SERVER_PORT": str(port), "RELAY_AUTH_API_KEYS": KEY,
           "RELAY_SERVER_ROLE": role, "RELAY_NETWORK_ALLOW": "127.0.0.0/8,::1/128,localhost",
           **database_env(str(data))}
    for kind in PROVIDERS:
        env[f"RELAY_PROVIDERS_{kind.upper()}_BASE_URL"] = f"{sim_url}/{kind}"
        env[f"RELAY_PROVIDERS_{kind.upper()}_RATE_LIMIT"] = "100000"
    env.update({f"RELAY_{k.upper()}": v for k, v in extra.items()})
    return env


PROBES = Path(__file__).parent / "probes"


def read_round_trips(path: Path) -> int | None:
    """The round trips to PostgreSQL the probed relay has made so far (bench/probes), None if not written yet."""
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def read_round_trips_by_statement(path: Path) -> dict[str, int] | None:
    """The probed relay's round trips so far by statement (bench/probes), None if not written yet."""
    try:
        return dict(json.loads(Path(f"{path}.statements").read_text()))
    except (OSError, ValueError):
        return None


def start_relay(root: Path, sim_url: str, name: str = "relay", role: str = "all", processes: int | None = None,
                round_trips: Path | None = None, **extra: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    """`relay serve [--processes N]` as a child process; returns it, its base URL and its data dir.
    `round_trips`: the file its database round trips are counted into (bench/probes; one process only)."""
    port, data = free_port(), root / f"data-{name}"
    env = relay_env(data, port, sim_url, role, **extra)
    if round_trips is not None:
        assert processes is None, "the probe counts in one process (forked children would not write it)"
        env.update({"PYTHONPATH": os.pathsep.join(filter(None, [str(PROBES), os.environ.get("PYTHONPATH")])),
                    "BENCH_ROUND_TRIPS_FILE": str(round_trips)})
    proc = spawn([PYTHON, "-m", "relay", "serve", "--log-level", "warning",
                  *(["--processes", str(processes)] if processes is not None else [])],
                 env=env, log=root / f"{name}.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz")
    except BaseException:
        stop(proc)
        raise
    return proc, url, data


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in KiB, from /proc/PID/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(rest.split()[0])
    return out


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time used so far by a process (this one when `pid` is None)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    return _stat_cpu_seconds(Path(f"/proc/{pid}/stat"))


def _stat_cpu_seconds(stat: Path) -> float:
    """User + system CPU seconds from a /proc …/stat file (a process's or one thread's)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds_or_none(pid: int | None) -> float | None:
    """cpu_seconds, or None when the process is gone."""
    try:
        return cpu_seconds(pid)
    except (OSError, ValueError, IndexError):
        return None


def loop_thread_cpu_or_none(pid: int | None) -> float | None:
    """CPU seconds of a process's main thread (relay's event loop), or None when it is gone or unknown."""
    if pid is None:
        return None
    try:
        return _stat_cpu_seconds(Path(f"/proc/{pid}/task/{pid}/stat"))
    except (OSError, ValueError, IndexError):
        return None


def cpu_stat() -> list[int]:
    """The machine's CPU time counters (ticks): user nice system idle iowait irq softirq steal."""
    return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]


def own_cpu() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def cpu_share(before: list[int], after: list[int], own: float = 0.0) -> dict[str, float]:
    """Between two cpu_stat() readings: busy and stolen (by the hypervisor) shares of all cores, and
    `others`, the cores used on average by processes that are not this bench (`own`: CPU seconds
    the bench and its reaped children used meanwhile)."""
    delta = [b - a for a, b in zip(before, after)]
    total = sum(delta) or 1
    busy = total - delta[3] - delta[4] - delta[7]
    cores = os.cpu_count() or 1
    seconds = total / cores / os.sysconf("SC_CLK_TCK")
    others = max(0.0, busy / os.sysconf("SC_CLK_TCK") - own) / seconds if seconds >= 1 else 0.0
    return {"busy": busy / total, "steal": delta[7] / total, "others": others}


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop (as relay and uvicorn do), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


async def closed_loop(one: Callable[[int], Awaitable[Any]], *, in_flight: int, warmup: float, measure: float,
                      cycle_timeout: float = 30.0,
                      cpu: CpuPids | Callable[[], CpuPids] | None = None,
                      at_window: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Keep `in_flight` calls of `one(i)` running; count those ending inside the measuring window.

    Returns completed (in the window), per_second, failures, and latency p50/p99 (ms) of calls that
    both started and ended inside the window; with `cpu` ({name: pid, None for this process}, or a
    function giving it, called when the window opens) also the CPU seconds each used during the window
    ("cpu"; a process gone by the window's end is left out) and the machine's cpu_stat() at the window's
    start and end ("cpu_stat"). `at_window("open")` and `at_window("close")` are called as the window opens and
    closes (to read other counters over it).
    """
    start = time.monotonic()
    window_start, window_end = start + warmup, start + warmup + measure
    latencies: list[float] = []
    counts = {"completed": 0, "failures": 0, "timeouts": 0}
    errors: dict[str, int] = {}

    async def lane(first: int) -> None:
        i = first
        while time.monotonic() < window_end:
            began = time.monotonic()
            try:
                await asyncio.wait_for(one(i), cycle_timeout)
            except TimeoutError:
                counts["timeouts"] += 1
            except Exception as exc:  # noqa: BLE001 - counted and shown, never hidden
                counts["failures"] += 1
                name = f"{type(exc).__name__}: {str(exc)[:120]}"
                errors[name] = errors.get(name, 0) + 1
            else:
                ended = time.monotonic()
                if window_start <= ended <= window_end:
                    counts["completed"] += 1
                    if began >= window_start:
                        latencies.append((ended - began) * 1000)
            i += in_flight

    used: dict[str, float] = {}
    used_by_loop: dict[str, float] = {}
    stats: list[list[int]] = []

    async def probe() -> None:
        await asyncio.sleep(max(0.0, window_start - time.monotonic()))
        pids = (cpu() if callable(cpu) else cpu) or {}
        read = {name: cpu_seconds_or_none(pid) for name, pid in pids.items()}
        before = {name: t for name, t in read.items() if t is not None}
        loops = {name: loop_thread_cpu_or_none(pid) for name, pid in pids.items()}
        stats.append(cpu_stat())
        if at_window is not None:
            at_window("open")
        await asyncio.sleep(max(0.0, window_end - time.monotonic()))
        stats.append(cpu_stat())
        if at_window is not None:
            at_window("close")
        after = {name: cpu_seconds_or_none(pids[name]) for name in before}
        used.update({name: t - before[name] for name, t in after.items() if t is not None})
        for name, began in loops.items():       # each process's main thread (relay's: its event loop)
            ended = loop_thread_cpu_or_none(pids[name])
            if began is not None and ended is not None:
                used_by_loop[name] = ended - began

    await asyncio.gather(probe(), *(lane(k) for k in range(in_flight)))
    return {**counts, "cpu": used, "loop_cpu": used_by_loop, "cpu_stat": stats,
            "per_second": counts["completed"] / measure,
            "p50": percentile(latencies, 50), "p99": percentile(latencies, 99), "errors": errors,
            "window": (window_start, window_end)}


# ---- profiles -----------------------------------------------------------------------------------------
PROFILE_CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("image verification (Pillow decode in inspect_image)", ("inspect_image",)),
    ("fsync + rename into the image store", ("_put_sync", "_fsync_dir")),
    ("SQLite statements (aiosqlite thread)", ("aiosqlite/core.py",)),
    ("HTTP server (uvicorn, Starlette: API and callbacks)", ("uvicorn", "starlette")),
    ("HTTP clients (httpx under the providers, aiohttp: every request)", ("httpx", "httpcore", "aiohttp")),
    ("store and delivery code (Python side)", ("relay/store", "relay/deliveries")),
]
# Leaf frames of threads waiting for work (py-spy counts some blocking waits as active).
IDLE_LEAVES = ("_connection_worker_thread (aiosqlite/core.py:59)", "_worker (concurrent/futures/thread.py:81)",
               "Runner.run (asyncio/runners.py")


def start_profile(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    """py-spy (from the venv) sampling `pid` for `seconds`, raw format; None when py-spy is missing."""
    spy = Path(PYTHON).parent / "py-spy"
    if not spy.exists():
        return None
    # --gil: only samples holding the GIL. relay's Python runs on about one core at a time whatever the machine
    # has, so where the GIL goes is where its throughput goes; without it, threads blocked in the disk or in
    # SQLite's C code (the GIL released) were counted as busy too.
    return subprocess.Popen([str(spy), "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "100", "--gil",
                             "--nonblocking", "--format", "raw", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def profile_breakdown(raw: Path) -> list[tuple[str, float]]:
    """Shares of a py-spy raw profile's non-idle samples by PROFILE_CATEGORIES (first match wins)."""
    counts: dict[str, int] = {}
    busy = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        if not frames or frames[-1].startswith(IDLE_LEAVES):
            continue
        busy += int(n)
        name = next((label for label, marks in PROFILE_CATEGORIES if any(m in f for f in frames for m in marks)),
                    "other (event loop, job and task logic, JSON)")
        counts[name] = counts.get(name, 0) + int(n)
    return sorted(((name, n / busy) for name, n in counts.items()), key=lambda x: -x[1]) if busy else []


# ---- machine ------------------------------------------------------------------------------------------
def machine() -> str:
    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}")


def wrk(url: str, *, body: str, connections: int, seconds: int, threads: int = 1) -> dict[str, float]:
    """POST `body` to `url` with wrk; returns requests/s and latency percentiles in ms."""
    if shutil.which("wrk") is None:
        raise SystemExit("bench needs wrk (Debian: apt-get install wrk)")
    script = Path(f"/tmp/relay-bench-{os.getpid()}.lua")
    escaped = body.replace("\\", "\\\\").replace('"', '\\"')
    script.write_text(f'wrk.method = "POST"\nwrk.body = "{escaped}"\n'
                      'wrk.headers["Content-Type"] = "application/json"\n')
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script),
                          url], capture_output=True, text=True, check=True).stdout
    script.unlink()
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "90", "99"):
        match = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)", out, re.M)
        if match:
            value, unit = float(match.group(1)), match.group(2)
            result[f"p{pct}"] = value / 1000 if unit == "us" else value * 1000 if unit == "s" else value
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["non2xx"] = float(errors.group(1)) if errors else 0.0
    return result


def add_database_argument(parser: Any) -> None:
    parser.add_argument("--database", choices=DATABASES, default="sqlite",
                        help="the store relay runs on; postgresql: a fresh database per relay on PG_ROOT "
                             "(RELAY_BENCH_POSTGRES, default the local server), dropped after the section")


def run_standalone(run: Callable[[bool], Section]) -> None:
    """`python -m bench.<section> [--quick] [--database …]`: run one section, print its table and figures as JSON."""
    import argparse
    import json

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    add_database_argument(parser)
    args = parser.parse_args()
    use_database(args.database)
    section = run(args.quick)
    print(section.markdown())
    print(json.dumps(section.figures, indent=2))
