"""The command line: serve, simulate, demo, submit, check-config; the operator's commands are in relay.cli_ops."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from relay import __version__
from relay.cli_archive import add_command as add_archive_command
from relay.cli_client import CliError, RelayClient, check, connect
from relay.cli_ops import add_commands as add_operator_commands
from relay.cli_ops import LOG_LEVELS, port_number, positive_count, positive_seconds, task_summary
from relay.config import ConfigError, Settings, load_settings

GC_YOUNG_THRESHOLD = 10_000     # see _serve


def _settings(args: argparse.Namespace, **overrides: Any) -> Settings:
    """Settings from --config/$RELAY_CONFIG/defaults; command-line overrides go in as RELAY_* variables."""
    environ = dict(os.environ)
    for key, value in overrides.items():
        if value is not None:
            environ[f"RELAY_{key.upper()}"] = str(value)
    try:
        return load_settings(getattr(args, "config", None), environ)
    except ConfigError as exc:
        print(f"relay: configuration problems:\n{exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _logging(level: str, fmt: str | None = None) -> None:
    """One stderr handler whose lines carry no URL credentials, query strings or keys (relay.logs).

    `fmt` (--log-format), else $RELAY_LOG_FORMAT: text | json; neither: text on a terminal, else JSON lines.
    """
    from relay.logs import FORMATS, configure_logging

    fmt = fmt or os.environ.get("RELAY_LOG_FORMAT") or None
    if fmt is not None and fmt not in FORMATS:
        print(f"relay: the log format must be one of {', '.join(FORMATS)} (got {fmt!r})", file=sys.stderr)
        raise SystemExit(2)
    configure_logging(level, fmt=fmt)


# ---- serve ---------------------------------------------------------------------------------------
def server_config(app: Any, settings: Settings, log_level: str) -> Any:
    """uvicorn's settings for `relay serve` (a uvicorn.Config)."""
    import uvicorn

    from relay.web.httplimits import LimitedHttpToolsProtocol

    # log_config=None: uvicorn's lines go through the root handler of _logging (one format, redacted).
    return uvicorn.Config(app, host=settings.server.host, port=settings.server.port, log_level=log_level,
                          log_config=None,
                          ssl_certfile=settings.server.ssl_certfile, ssl_keyfile=settings.server.ssl_keyfile,
                          lifespan="on", access_log=False,
                          # One socket write per response instead of two (relay.web.corked), and a request
                          # head bounded in size and time (relay.web.httplimits).
                          http=LimitedHttpToolsProtocol,
                          # Jobs are leased, so a short grace loses nothing; idle keep-alive peers do not hold us.
                          timeout_graceful_shutdown=3,
                          # Whose X-Forwarded-For to believe (the client address the login limit counts by).
                          forwarded_allow_ips=list(settings.server.forwarded_allow_ips) or None)


async def _serve(settings: Settings, log_level: str, sockets: list[socket.socket] | None = None,
                 parent_pid: int | None = None) -> None:
    """One relay. `sockets`/`parent_pid`: a child of `relay serve --processes N` (relay.processes)."""
    import uvicorn

    from relay.runtime import api_key_file, open_runtime
    from relay.web.app import create_app

    async with open_runtime(settings) as runtime:
        if not settings.auth.api_keys and parent_pid is None:
            print(f"relay: no api_keys configured; using the generated key in {api_key_file(settings)}",
                  file=sys.stderr)
        role = settings.server.role
        app = create_app(runtime, run_worker=role in ("all", "worker"), serve_api=role in ("all", "api"))
        config = server_config(app, settings, log_level)
        # Everything built so far (modules, settings, the app) lives as long as the process: move it out
        # of the garbage collector's sight so its full collections only walk what requests allocate.
        gc.freeze()
        # And collect the young generation every 10,000 net allocations instead of 700: nearly everything a
        # request or a job allocates is freed by its reference count long before, so the default threshold
        # ran ~60 young collections a second under load, 4-5 % of relay's CPU (bench.throughput, pre-rendered,
        # gc.callbacks timing: 0.63-0.74 s of GC in a run against 0.06-0.08 s). Cycles still go within seconds.
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        if parent_pid is None:
            await uvicorn.Server(config).serve(sockets=sockets)
        else:
            from relay.processes import ChildServer
            await ChildServer(config, parent_pid).serve(sockets=sockets)


def cmd_serve(args: argparse.Namespace) -> int:
    from relay.runtime import DatabaseUnreachable, StartupError, startup_warnings

    settings = _settings(args, server_host=args.host, server_port=args.port, server_role=args.role)
    _logging(args.log_level, args.log_format)
    for warning in startup_warnings(settings):
        print(f"relay: {warning}", file=sys.stderr)
    if args.processes != 1:
        return _serve_processes(settings, args.processes, args.log_level)
    try:
        run_async(_serve(settings, args.log_level))
    except DatabaseUnreachable as exc:
        print(f"relay: cannot start yet: {exc}", file=sys.stderr)
        return 1        # worth starting again later (a service manager does): the settings are not at fault
    except StartupError as exc:
        print(f"relay: cannot start: {exc}", file=sys.stderr)
        return 2
    return 0


def _serve_processes(settings: Settings, count: int, log_level: str) -> int:
    """`relay serve --processes N`: N relays on one socket and one PostgreSQL database (relay.processes)."""
    from relay import metrics
    from relay.processes import EXIT_CANNOT_START, Supervisor, bind_socket
    from relay.runtime import DatabaseUnreachable, StartupError, api_key_file, resolve_api_keys, shared_database

    if count < 1:
        print(f"relay: --processes must be at least 1 (got {count})", file=sys.stderr)
        return 2
    if not shared_database(settings):
        print(f"relay: --processes {count} needs a PostgreSQL database (storage.database = \"postgresql://…\"): "
              "SQLite is for one process; run `relay serve` without --processes on SQLite", file=sys.stderr)
        return 2
    if not settings.auth.api_keys:
        # Generated once here, not raced for by N children.
        resolve_api_keys(settings)
        print(f"relay: no api_keys configured; using the generated key in {api_key_file(settings)}",
              file=sys.stderr)
    host, port = settings.server.host, settings.server.port
    try:
        sock = bind_socket(host, port)
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        print(f"relay: cannot listen on {host}:{port}: {reason}", file=sys.stderr)
        return 2
    bound = sock.getsockname()[1]
    print(f"relay: {count} processes serving http{'s' if settings.server.ssl_certfile else ''}://{host}:{bound}",
          file=sys.stderr)
    # Every child counts into files here and a scrape of any child sums them all (relay.metrics); a fresh
    # directory per run, so a previous run's counts (or another relay's) never leak in.
    metrics_dir = tempfile.mkdtemp(prefix="relay-metrics-")
    metrics.use_multiprocess_dir(metrics_dir)

    def child(parent_pid: int) -> int:
        try:
            run_async(_serve(settings, log_level, sockets=[sock], parent_pid=parent_pid))
        except DatabaseUnreachable as exc:
            print(f"relay: cannot start yet: {exc}", file=sys.stderr)
            return 1        # started again, after a growing delay (relay.processes), as after any crash
        except StartupError as exc:
            print(f"relay: cannot start: {exc}", file=sys.stderr)
            return EXIT_CANNOT_START
        return 0

    try:
        return Supervisor(count, child, on_exit=metrics.process_exited).run()
    finally:
        sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def run_async(main: Any) -> Any:
    """Run a coroutine on uvloop when it is installed (as uvicorn itself would), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


# ---- simulate ------------------------------------------------------------------------------------
def cmd_simulate(args: argparse.Namespace) -> int:
    import uvicorn

    from relay.simulator import SimulatorConfig, create_simulator_app

    _logging(args.log_level)
    public = f"http://{args.host}:{args.port}"
    app = create_simulator_app(SimulatorConfig(public_url=public, duration=args.duration, link_ttl=args.link_ttl,
                                               prerendered=args.prerendered))
    print(f"relay simulator on {public} (dialects: /gmicloud /apimart /evolink /pixazo /openai)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, log_config=None, access_log=False)
    return 0


# ---- client commands ----------------------------------------------------------------------------
def _client(args: argparse.Namespace) -> RelayClient:
    """A client for the relay of --url/--api-key, else of the config (relay.cli_client)."""
    return connect(_settings(args), url=args.url, key=args.api_key)


def cmd_submit(args: argparse.Namespace) -> int:
    from relay.progress import wait_for_tasks

    body: dict[str, Any] = {"provider": args.provider, "prompt": args.prompt}
    for name in ("size", "quality", "output_format", "background"):
        if getattr(args, name):
            body[name] = getattr(args, name)
    if args.n:
        body["n"] = args.n
    with _client(args) as client:
        task = check(client.post("/v1/tasks", json=body))
        if args.wait:
            final = wait_for_tasks(client, [task["id"]], timeout=args.timeout)
            task = final.get(task["id"], task)      # never read back within the timeout: as it was accepted
            # On stderr: stdout stays one JSON document for pipes.
            print(task_summary(task), file=sys.stderr)
    print(json.dumps(task, indent=2))
    return 0 if (not args.wait or task["status"] == "succeeded") else 1


def cmd_check_config(args: argparse.Namespace) -> int:
    """The settings (secrets hidden), and whether `relay serve` would start with them."""
    from relay.runtime import StartupError, check_startup, startup_warnings

    settings = _settings(args)
    print(json.dumps(settings.redacted(), indent=2))
    for warning in startup_warnings(settings):
        print(f"relay: {warning}", file=sys.stderr)
    try:
        check_startup(settings)
    except StartupError as exc:
        print(f"relay: relay serve would not start: {exc}", file=sys.stderr)
        return 2
    print(f"relay: configuration OK ({settings.source or 'embedded defaults'})", file=sys.stderr)
    return 0


def cmd_retention(args: argparse.Namespace) -> int:
    """`relay retention [--dry-run]`: one retention sweep now (relay.retention) on this config's database and image
    store, or with --dry-run what it would delete, as a table. Safe beside running relays (the same batches)."""
    from rich.console import Console
    from rich.table import Table

    from relay.clock import SystemClock
    from relay.images.store import open_image_store
    from relay.retention import Report, Sweeper, age_text
    from relay.runtime import StartupError, opened_store

    settings = _settings(args)
    _logging("warning")

    async def run() -> Report:
        store = await opened_store(settings)
        try:
            sweeper = Sweeper(store, open_image_store(settings.storage), settings.retention, now=SystemClock().now,
                              budget=float("inf"))
            return await (sweeper.preview() if args.dry_run else sweeper.sweep())
        finally:
            await store.close()

    try:
        report = run_async(run())
    except StartupError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    r = settings.retention
    ages = {"finished tasks": age_text(r.finished_tasks), "finished archives": age_text(r.finished_tasks),
            "events": age_text(r.events), "provider stats rows": age_text(r.events),
            "dead jobs of no task": age_text(r.events),
            "delivery attempts": age_text(r.delivery_attempts), "images expired": age_text(r.images),
            "image files": "no image left using them", "temporary files": "1 h"}
    table = Table(title="relay retention: would delete (dry run)" if args.dry_run else "relay retention: deleted")
    table.add_column("what")
    table.add_column("older than")
    table.add_column("rows" if args.dry_run else "deleted", justify="right")
    for what, n in report.rows():
        if args.dry_run and what == "image files":
            continue    # only a sweep can tell which files no kept image uses
        table.add_row(what, ages[what], f"{n:,}")
    Console().print(table)
    for problem in report.file_errors:
        print(f"relay: could not delete {problem}", file=sys.stderr)
    return 1 if report.file_errors else 0


def cmd_dev_cert(args: argparse.Namespace) -> int:
    from relay.devcert import make_dev_cert

    cert, key = make_dev_cert(Path(args.out), args.host or ["localhost", "127.0.0.1", "::1"])
    print(f"wrote {cert} and {key} (self-signed, for local use only). To serve HTTPS:\n"
          f"  RELAY_SERVER_SSL_CERTFILE={cert} RELAY_SERVER_SSL_KEYFILE={key} "
          f"RELAY_SERVER_PUBLIC_URL=https://localhost:8080 relay serve")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from relay.demo import run_demo
    from relay.runtime import StartupError

    _logging(args.log_level)
    try:
        return asyncio.run(run_demo(per_provider=args.per_provider, keep_running=args.keep_running,
                                    data_dir=Path(args.data_dir), port=args.port, timeout=args.timeout))
    except (StartupError, ConfigError) as exc:
        print(f"relay: cannot start the demo: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description="relay: one API for gpt-image-1.5 resellers")
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", "-c", help="TOML config file (default: $RELAY_CONFIG, else embedded defaults)")
        return p

    p = with_config(sub.add_parser("serve", help="run the API and the workers"))
    p.add_argument("--host")
    p.add_argument("--port", type=port_number)
    p.add_argument("--role", choices=("all", "api", "worker"))
    p.add_argument("--processes", type=int, default=1, metavar="N",
                   help="run N relay processes on this port (PostgreSQL only; default 1)")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    p.add_argument("--log-format", choices=("text", "json"),
                   help="text or JSON lines (default: $RELAY_LOG_FORMAT, else text on a terminal, JSON otherwise)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("simulate", help="run the provider simulator (all five dialects)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port_number, default=8700)
    p.add_argument("--duration", type=float, default=1.0, help="seconds a task takes")
    p.add_argument("--link-ttl", type=float, default=86400.0, help="seconds image links stay valid")
    p.add_argument("--prerendered", action="store_true",
                   help="serve one pre-rendered image per size and format with a unique chunk per task "
                        "(benchmarks: no Pillow drawing per image)")
    p.add_argument("--log-level", default="warning", choices=LOG_LEVELS)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("demo", help="relay + simulator in one command: submit to every dialect, archive, show")
    p.add_argument("--per-provider", type=positive_count, default=2)
    p.add_argument("--keep-running", action="store_true", help="leave relay up afterwards to explore")
    p.add_argument("--data-dir", default="./relay-demo-data")
    p.add_argument("--port", type=port_number, default=8080, help="relay's port (0: any free port)")
    p.add_argument("--timeout", type=positive_seconds, default=120.0)
    p.add_argument("--log-level", default="warning", choices=LOG_LEVELS)
    p.set_defaults(func=cmd_demo)

    def client_opts(p: argparse.ArgumentParser) -> None:
        with_config(p)
        p.add_argument("--url", help="relay's base URL (default from config: http://host:port)")
        p.add_argument("--api-key", help="API key (default: $RELAY_API_KEY, config, or the generated key)")

    p = sub.add_parser("submit", help="submit one task")
    client_opts(p)
    p.add_argument("prompt")
    p.add_argument("--provider", required=True)
    p.add_argument("--size")
    p.add_argument("--quality")
    p.add_argument("--output-format", dest="output_format")
    p.add_argument("--background")
    p.add_argument("-n", type=int)
    p.add_argument("--wait", action="store_true", help="show progress and wait for the end")
    p.add_argument("--timeout", type=positive_seconds, default=600.0)
    p.set_defaults(func=cmd_submit)

    # tasks (--watch), subscriptions, deliveries, replay: the operator's commands (relay.cli_ops).
    add_operator_commands(sub, client_opts, _client)
    add_archive_command(sub, client_opts, _client)     # relay archive FILE (relay.cli_archive)

    p = sub.add_parser("dev-cert", help="make a self-signed TLS certificate to serve HTTPS locally")
    p.add_argument("--out", default="./relay-data/tls", help="folder for cert.pem and key.pem")
    p.add_argument("--host", action="append", help="name or IP the certificate is for (repeatable)")
    p.set_defaults(func=cmd_dev_cert)

    p = with_config(sub.add_parser("check-config", help="validate the configuration and print it (secrets hidden)"))
    p.set_defaults(func=cmd_check_config)

    p = with_config(sub.add_parser("retention", help="delete what [retention] says is old now (--dry-run: show it)"))
    p.add_argument("--dry-run", action="store_true", help="count what would go; delete nothing")
    p.set_defaults(func=cmd_retention)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except CliError as exc:   # a client command's failure: one line and its exit code (relay.cli_client)
        print(f"relay: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # Whoever read stdout has gone (`relay tasks --json | head`): nothing more to say, and nothing at exit
        # either (Python's own flush of stdout would raise again).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
