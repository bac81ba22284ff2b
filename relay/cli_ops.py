"""The operator's commands: `tasks` (with --watch), `subscriptions`, `deliveries` (--failed, retry), `replay`.

Each talks to a running relay over its HTTP API through a RelayClient (relay.cli_client:
where relay is, which key, failures as exit codes) and prints tables fitted to the
terminal's width (relay.tables), or the API's JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any, TypeVar

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from relay.cli_client import (EXIT_CODES_HELP, EXIT_FAILED, EXIT_NOT_FOUND, NotFound, RelayClient, UsageError,
                              check, error_of)
from relay.clock import parse_rfc3339, rfc3339
from relay.progress import TERMINAL
from relay.tables import Column, fit_table, styled

Connect = Callable[[argparse.Namespace], RelayClient]
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d|w)")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def add_commands(sub: Any, client_opts: Callable[[argparse.ArgumentParser], None], connect: Connect) -> None:
    """Register the operator's subcommands on `sub` (argparse subparsers); `connect` opens the client."""
    def bind(command: Callable[[argparse.Namespace, RelayClient], int]) -> Callable[[argparse.Namespace], int]:
        def run(args: argparse.Namespace) -> int:
            with connect(args) as client:
                return command(args, client)
        return run

    p = sub.add_parser("tasks", help="list recent tasks (--watch: a live table)", epilog=EXIT_CODES_HELP)
    client_opts(p)
    p.add_argument("--status")
    p.add_argument("--provider")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--watch", action="store_true", help="refresh the table until Ctrl-C")
    p.add_argument("--until-done", action="store_true",
                   help="watch until every listed task has finished, then stop")
    p.add_argument("--interval", type=positive_seconds, default=1.0, help="seconds between refreshes of --watch")
    p.add_argument("--json", action="store_true", help="print the tasks as JSON")
    p.set_defaults(func=bind(cmd_tasks))

    p = sub.add_parser("subscriptions", help="list webhook subscriptions: state and last error",
                       epilog=EXIT_CODES_HELP)
    client_opts(p)
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true", help="print the subscriptions as JSON")
    p.set_defaults(func=bind(cmd_subscriptions))

    p = sub.add_parser("deliveries", help="list webhook deliveries (--failed: dead letters); `retry ID…`",
                       description="relay deliveries [--failed] [--subscription ID] lists deliveries, newest first; "
                                   "relay deliveries retry ID… attempts each again now.", epilog=EXIT_CODES_HELP)
    client_opts(p)
    p.add_argument("action", nargs="?", choices=("list", "retry"), default="list",
                   help="list (the default) or retry the deliveries given by id")
    p.add_argument("ids", nargs="*", metavar="ID", help="deliveries to retry (dlv_…)")
    p.add_argument("--failed", action="store_true", help="only failed deliveries (the dead letters)")
    p.add_argument("--status", choices=("pending", "succeeded", "failed", "canceled"))
    p.add_argument("--subscription", metavar="SUB", help="only this subscription's deliveries")
    p.add_argument("--task", metavar="TASK", help="only this task's deliveries")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--wait", action="store_true", help="retry: wait for each retried delivery to settle")
    p.add_argument("--timeout", type=positive_seconds, default=60.0, help="retry --wait: seconds to wait at most")
    p.add_argument("--json", action="store_true", help="print the deliveries as JSON")
    p.set_defaults(func=bind(cmd_deliveries))

    p = sub.add_parser("replay", epilog=EXIT_CODES_HELP,
                       help="send a subscription's deliveries again (default: the failed ones) since a time")
    client_opts(p)
    p.add_argument("subscription", metavar="SUB", help="the subscription (sub_…)")
    p.add_argument("--since", required=True, type=since_time,
                   help="an RFC 3339 time (2026-11-22T10:00:00Z) or an age (90s, 15m, 2h, 3d)")
    p.add_argument("--until", type=since_time, help="end of the window (default: now)")
    p.add_argument("--status", choices=("failed", "canceled", "succeeded", "all"), default="failed",
                   help="which deliveries to send again (default failed)")
    p.add_argument("--json", action="store_true", help="print the API's answer as JSON")
    p.set_defaults(func=bind(cmd_replay))


# ---- helpers --------------------------------------------------------------------------------------
T = TypeVar("T", int, float)


def _number_in(kind: type[T], ok: Callable[[T], bool], what: str) -> Callable[[str], T]:
    """An argparse type: `kind` of the argument, refused (a usage error naming it) unless `ok`."""
    def parse(value: str) -> T:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not {what}") from None
        if not ok(number):
            raise argparse.ArgumentTypeError(f"{value!r} is not {what}")
        return number
    return parse


positive_seconds = _number_in(float, lambda s: 0 < s < float("inf"), "a number of seconds above 0")
positive_count = _number_in(int, lambda n: n >= 1, "a whole number of at least 1")
port_number = _number_in(int, lambda p: 0 <= p <= 65535, "a port (0-65535)")


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")     # uvicorn's (trace: its own, wire level)


def since_time(value: str) -> str:
    """An RFC 3339 time, or an age such as `2h` (that long before now), as RFC 3339 UTC; for argparse."""
    match = _DURATION.fullmatch(value.strip())
    if match:
        try:
            stamp = rfc3339(time.time() - float(match[1]) * _UNITS[match[2]])
        except (OverflowError, ValueError, OSError):
            raise argparse.ArgumentTypeError(f"{value!r} reaches back before the year 1") from None
        assert stamp is not None
        return stamp
    try:
        parse_rfc3339(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is neither an RFC 3339 time (2026-11-22T10:00:00Z) nor an age (90s, 15m, 2h, 3d)") from None
    return value


def age(stamp: str | None, now: float | None = None) -> str:
    """How long ago an RFC 3339 time was, in one unit: 45s, 12m, 3h, 2d."""
    if not stamp:
        return ""
    seconds = max(0.0, (now if now is not None else time.time()) - parse_rfc3339(stamp))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def _params(**given: Any) -> dict[str, Any]:
    return {k: v for k, v in given.items() if v is not None}


# ---- tasks ----------------------------------------------------------------------------------------
TASK_COLUMNS = (Column("id", "id"), Column("provider"), Column("status"), Column("images", drop=3, justify="right"),
                Column("age", drop=2, justify="right"), Column("error", "text", drop=1))


def task_status(task: dict[str, Any]) -> Text:
    """The status, with the provider's progress while running: `running 40%`."""
    status = str(task["status"])
    progress = task.get("progress")
    shown = f"{status} {progress}%" if status == "running" and progress is not None else status
    return styled(status, shown)


def task_summary(task: dict[str, Any]) -> str:
    """One line on how a task ended: `tsk_… succeeded in 3.2 s: 1 image archived` (or its error)."""
    took = ""
    if task.get("completed_at") and task.get("created_at"):
        took = f" in {parse_rfc3339(task['completed_at']) - parse_rfc3339(task['created_at']):.1f} s"
    line = f"{task['id']} ({task['provider']}) {task['status']}{took}"
    if task["status"] == "succeeded":
        count = len(task.get("images") or [])
        return f"{line}: {count} image{'' if count == 1 else 's'} archived"
    error = task.get("error") or {}
    return f"{line}: {error.get('code')}: {error.get('message')}" if error else line


def tasks_table(tasks: list[dict[str, Any]], width: int, title: str) -> Table:
    now = time.time()
    rows = [[t["id"], t["provider"], task_status(t), str(len(t.get("images") or [])), age(t.get("created_at"), now),
             (t.get("error") or {}).get("code", "")] for t in tasks]
    return fit_table(title, TASK_COLUMNS, rows, width)


def cmd_tasks(args: argparse.Namespace, client: RelayClient) -> int:
    params = _params(limit=args.limit, status=args.status, provider=args.provider)

    def fetch() -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = check(client.get("/v1/tasks", params=params))["data"]
        return data

    console = Console()
    if not (args.watch or args.until_done):
        tasks = fetch()
        if args.json:
            _print_json(tasks)
        elif not tasks:
            console.print("no tasks" + (" match" if params.keys() - {"limit"} else " yet"))
        else:
            console.print(tasks_table(tasks, console.width, "relay tasks (newest first)"))
        return 0
    try:
        _watch(console, fetch, args.interval, args.until_done)
    except KeyboardInterrupt:
        pass    # Ctrl-C is how a watch ends
    return 0


def _watch(console: Console, fetch: Callable[[], list[dict[str, Any]]], interval: float, until_done: bool) -> None:
    """Refresh the table in place on a terminal; elsewhere (a pipe, a file) print it again whenever a task moved."""
    def title() -> str:
        stop = "until every task has finished" if until_done else "Ctrl-C to stop"
        return f"relay tasks (newest first) · {datetime.now(timezone.utc):%H:%M:%S} UTC · {stop}"

    def snapshots() -> Iterator[list[dict[str, Any]]]:
        while True:
            tasks = fetch()
            yield tasks
            if until_done and all(t["status"] in TERMINAL for t in tasks):     # none listed: none to wait for
                return
            time.sleep(interval)

    if console.is_terminal:
        with Live(console=console, auto_refresh=False) as live:
            for tasks in snapshots():
                live.update(tasks_table(tasks, console.width, title()), refresh=True)
        return
    shown: list[tuple[str, str, Any]] | None = None
    for tasks in snapshots():
        state = [(t["id"], t["status"], t.get("progress")) for t in tasks]
        if state != shown:
            console.print(tasks_table(tasks, console.width, title()))
            console.file.flush()
            shown = state


# ---- subscriptions --------------------------------------------------------------------------------
SUBSCRIPTION_COLUMNS = (Column("id", "id"), Column("state"), Column("url", "text", min_width=14, middle=True),
                        Column("events", "text", drop=1), Column("last error", "text", min_width=12))


def subscription_state(sub: dict[str, Any]) -> str:
    """active, failing (its latest attempts failed; still retried) or disabled (by hand, 410 Gone, or failing)."""
    if not sub.get("enabled", True):
        return "disabled"
    return "failing" if sub.get("failing_since") else "active"


def last_error(client: RelayClient, sub: dict[str, Any]) -> str:
    """The error of the subscription's most recently attempted delivery ("" if that one went through)."""
    if sub.get("disabled_reason") and not sub.get("failing_since"):
        reason = {"manual": "disabled by hand", "gone": "answered 410 Gone",
                  "failing": "failing too long"}.get(sub["disabled_reason"], sub["disabled_reason"])
    else:
        reason = ""
    recent = check(client.get("/v1/deliveries", params={"subscription_id": sub["id"], "limit": 20}))["data"]
    tried = [d for d in recent if d.get("last_attempt_at")]
    latest = max(tried, key=lambda d: d["last_attempt_at"], default=None)
    error = (latest or {}).get("last_error") or ""
    return " · ".join(part for part in (reason, error) if part)


def cmd_subscriptions(args: argparse.Namespace, client: RelayClient) -> int:
    subs: list[dict[str, Any]] = check(client.get("/v1/subscriptions", params={"limit": args.limit}))["data"]
    if args.json:
        _print_json(subs)
        return 0
    rows = []
    for sub in subs:
        state = subscription_state(sub)
        rows.append([sub["id"], styled(state), sub["url"], ",".join(sub.get("events") or []), last_error(client, sub)])
    console = Console()
    if not subs:
        console.print("no subscriptions yet (POST /v1/subscriptions creates one)")
        return 0
    console.print(fit_table("relay subscriptions", SUBSCRIPTION_COLUMNS, rows, console.width))
    return 0


# ---- deliveries -----------------------------------------------------------------------------------
def delivery_columns(one_subscription: bool) -> tuple[Column, ...]:
    subscription = () if one_subscription else (Column("subscription", "ref", drop=5),)
    return (Column("id", "id"), Column("status"), Column("event", drop=3), *subscription,
            Column("task", "ref", drop=4), Column("tries", drop=2, justify="right"),
            Column("last try", drop=6, justify="right"), Column("last error", "text", drop=1))


def delivery_row(d: dict[str, Any], one_subscription: bool, now: float) -> list[str | Text]:
    subscription = [] if one_subscription else [d.get("subscription_id") or "(task webhook_url)"]
    return [d["id"], styled(d["status"]), d["event_type"], *subscription, d["task_id"], str(d["attempts"]),
            age(d.get("last_attempt_at"), now), d.get("last_error") or ""]


def cmd_deliveries(args: argparse.Namespace, client: RelayClient) -> int:
    if args.action == "retry":
        return _retry(args, client)
    if args.ids:
        raise UsageError("give delivery ids only to `relay deliveries retry ID…`")
    status = "failed" if args.failed else args.status
    params = _params(limit=args.limit, status=status, subscription_id=args.subscription, task_id=args.task)
    found: list[dict[str, Any]] = check(client.get("/v1/deliveries", params=params))["data"]
    if args.json:
        _print_json(found)
        return 0
    one = args.subscription is not None
    now = time.time()
    what = "failed deliveries (dead letters)" if status == "failed" else "deliveries"
    title = f"relay {what}" + (f" of {args.subscription}" if one else "") + " (newest first)"
    console = Console()
    if not found:
        console.print(f"no {status + ' ' if status else ''}deliveries" + (f" of {args.subscription}" if one else ""))
        return 0
    console.print(fit_table(title, delivery_columns(one), [delivery_row(d, one, now) for d in found], console.width))
    if status == "failed" and found:
        console.print("retry: relay deliveries retry ID… --wait", highlight=False)
    return 0


RETRY_COLUMNS = (Column("delivery", "id"), Column("result"), Column("detail", "text"))


def _retry(args: argparse.Namespace, client: RelayClient) -> int:
    """POST …/retry for each id, then (--wait) follow each until it settles; one row per id."""
    if not args.ids:
        raise UsageError("relay deliveries retry needs at least one delivery id (dlv_…)")
    results: dict[str, tuple[str, str]] = {}
    queued: list[str] = []
    failures: list[int] = []
    for delivery_id in args.ids:
        response = client.post(f"/v1/deliveries/{delivery_id}/retry")
        failure = error_of(response)
        if failure is not None:
            failures.append(failure.exit_code)
            results[delivery_id] = ("not found" if isinstance(failure, NotFound) else "error", str(failure))
            continue
        queued.append(delivery_id)
        results[delivery_id] = ("queued", "attempting it again now")
    if args.wait and queued:
        for delivery_id, delivery in _settle(client, queued, args.timeout).items():
            result = delivery["status"]
            if result == "succeeded":
                detail = f"HTTP {delivery.get('last_status_code')} after {delivery['attempts']} attempts in all"
            elif result == "pending":
                detail = f"still retrying after {args.timeout:g} s: {delivery.get('last_error') or ''}"
            else:
                detail = delivery.get("last_error") or ""
            if result != "succeeded":
                failures.append(EXIT_FAILED)
            results[delivery_id] = (result, detail)
    colour_of = {"queued": "running", "not found": "failed", "error": "failed"}
    rows: list[list[str | Text]] = [[i, styled(colour_of.get(r, r), r), d] for i, (r, d) in results.items()]
    console = Console()
    console.print(fit_table("relay deliveries retry", RETRY_COLUMNS, rows, console.width))
    if not failures:
        return 0
    return EXIT_NOT_FOUND if all(code == EXIT_NOT_FOUND for code in failures) else EXIT_FAILED


def _settle(client: RelayClient, ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    """Each delivery once it is no longer pending, or as it is when `timeout` passes."""
    latest: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    waiting = list(ids)
    while True:
        for delivery_id in list(waiting):
            latest[delivery_id] = check(client.get(f"/v1/deliveries/{delivery_id}"))
            if latest[delivery_id]["status"] != "pending":
                waiting.remove(delivery_id)
        if not waiting or time.monotonic() >= deadline:
            return latest
        time.sleep(0.25)


# ---- replay ---------------------------------------------------------------------------------------
def cmd_replay(args: argparse.Namespace, client: RelayClient) -> int:
    body = _params(since=args.since, until=args.until, status=args.status)
    result = check(client.post(f"/v1/subscriptions/{args.subscription}/replay", json=body))
    if args.json:
        _print_json(result)
        return 0
    count = result.get("replayed", 0)
    which = "" if args.status == "all" else f"{args.status} "
    print(f"replayed {count} {which}deliver{'y' if count == 1 else 'ies'} of {args.subscription} "
          f"created {result.get('since')} – {result.get('until')}: each is being sent again")
    if result.get("has_more"):
        print("more deliveries match: run the same command again to replay the next batch")
    if count:
        print(f"follow them: relay deliveries --subscription {args.subscription}")
    return 0
