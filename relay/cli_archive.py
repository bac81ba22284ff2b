"""`relay archive FILE`: bulk import of image links to archive and provider tasks to adopt.

FILE (or `-` for stdin) holds one item per line, in any of these forms (blank lines and `#` comments skipped):

    https://cdn.example/a.png                          a link (POST /v1/archives)
    https://cdn.example/a.png,2026-11-29T10:00:00Z     CSV: a link and when it dies (a link may hold commas:
                                                       only an RFC 3339 time after the last one is its expiry)
    evolink,task-unified-1764…                         CSV: provider,provider_task_id (POST /v1/tasks, adopted)
    {"url": "https://…", "expires_at": "…", "metadata": {…}}          JSON lines
    {"provider": "apimart", "provider_task_id": "task_01K…"}

Each line is sent with an Idempotency-Key derived from its content, and relay itself keeps one archive per
link and one task per provider task: an interrupted import (Ctrl-C) is finished by running it again, and
a rerun creates nothing new. `--wait` then follows every item to its outcome. The summary counts what was
new, what relay knew already, and lists every failure with its line and reason.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from relay.cli_client import EXIT_FAILED, RelayClient, UsageError, error_of
from relay.cli_ops import positive_count, positive_seconds
from relay.clock import parse_rfc3339
from relay.tables import Column, fit_table, styled

TERMINAL = ("succeeded", "failed", "canceled")
KEY_PREFIX = "relay-archive-"
EXIT_INTERRUPTED = 130


@dataclass
class Item:
    """One line of the file: what to send where, or why it cannot be sent."""

    line: int
    text: str
    path: str = ""                      # /v1/archives | /v1/tasks
    body: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None          # unreadable line: never sent
    # Filled in as the import goes:
    id: str | None = None
    status: str | None = None
    created: bool = False
    error: str | None = None

    @property
    def kind(self) -> str:
        return "adopt" if self.path == "/v1/tasks" else "link"

    @property
    def idempotency_key(self) -> str:
        """Derived from what the line asks for (its canonical JSON), so a rerun sends the same key."""
        canonical = json.dumps({"path": self.path, "body": self.body}, sort_keys=True, separators=(",", ":"))
        return KEY_PREFIX + hashlib.sha256(canonical.encode()).hexdigest()[:48]


def parse_line(number: int, text: str) -> Item | None:
    """The item of one line (None for blank lines and comments); an Item with `problem` when unreadable."""
    stripped = text.strip().lstrip("\ufeff")
    if not stripped or stripped.startswith("#"):
        return None
    item = Item(line=number, text=stripped)
    if stripped.startswith("{"):
        try:
            data = json.loads(stripped)
        except ValueError as exc:
            item.problem = f"not valid JSON: {exc}"
            return item
        return _from_fields(item, data if isinstance(data, dict) else {})
    if _is_url(stripped):
        # A link may hold commas itself (https://res.cloudinary.com/…/w_100,h_100/a.png, ?size=1,2): only a last
        # field that is a time is its expiry; anything else is part of the link.
        link, _, last = stripped.rpartition(",")
        when = last.strip().strip('"')
        if link and _is_time(when):
            return _from_fields(item, {"url": link.strip(), "expires_at": when})
        if link and _DATE_LIKE.fullmatch(when):
            item.problem = f"the expiry {when!r} is not an RFC 3339 time like 2026-11-29T10:00:00Z"
            return item
        return _from_fields(item, {"url": stripped})
    fields = [f.strip() for f in next(csv.reader([stripped]))]      # quoted CSV, provider,provider_task_id
    if _is_url(fields[0]):
        if len(fields) > 2:
            item.problem = "a link line is `URL` or `URL,expires_at`"
            return item
        return _from_fields(item, {"url": fields[0], **({"expires_at": fields[1]} if len(fields) == 2 else {})})
    if len(fields) == 2:
        return _from_fields(item, {"provider": fields[0], "provider_task_id": fields[1]})
    item.problem = "expected a URL, `provider,provider_task_id`, or a JSON object"
    return item


def _is_url(text: str) -> bool:
    return text.lower().startswith(("http://", "https://"))


# Meant as an expiry, even if not a valid one: a date and a time, nothing else (a link's own "…?range=
# 2026-01-01,2026-01-31&sig=…" or "…?d=2026-01-01,2026-01-31" is part of the link).
_DATE_LIKE = re.compile(r"\d{4}-\d{1,2}-\d{1,2}[Tt ][0-9:.,+\-Zz]+")


def _is_time(text: str) -> bool:
    try:
        parse_rfc3339(text)
    except ValueError:
        return False
    return True


def _from_fields(item: Item, data: dict[str, Any]) -> Item:
    if "url" in data:
        item.path = "/v1/archives"
        item.body = {k: data[k] for k in ("url", "expires_at", "metadata", "webhook_url") if k in data}
    elif "provider" in data and "provider_task_id" in data:
        item.path = "/v1/tasks"
        item.body = {k: data[k] for k in ("provider", "provider_task_id", "metadata", "webhook_url") if k in data}
    else:
        item.problem = 'a JSON line needs "url", or "provider" and "provider_task_id"'
    return item


def is_header(item: Item) -> bool:
    """A CSV header row (`provider,provider_task_id`; `url` alone is not a URL and fails to parse as one)."""
    return item.body.get("provider") == "provider" and item.body.get("provider_task_id") == "provider_task_id"


def read_items(lines: Iterable[str]) -> list[Item]:
    items = []
    for number, text in enumerate(lines, start=1):
        item = parse_line(number, text)
        if item is None or is_header(item) or (item.problem and number == 1 and item.text.lower() == "url"):
            continue
        items.append(item)
    return items


# ---- submitting and waiting --------------------------------------------------------------------------
def submit(client: httpx.Client, item: Item) -> None:
    """Send one item; its id and status, or its error, are recorded on it. Never raises for the API's refusals."""
    response = client.post(item.path, json=item.body, headers={"idempotency-key": item.idempotency_key})
    failure = error_of(response)
    if failure is not None:        # (a refused key or an unreachable relay raised already: relay.cli_client)
        item.error = str(failure)
        return
    body = response.json()
    item.id, item.status = body.get("id"), body.get("status")
    item.created = response.status_code == 202
    if item.status in ("failed", "canceled"):
        item.error = _reason(body)


def _reason(body: dict[str, Any]) -> str:
    error = body.get("error") or {}
    return f"{error.get('code', 'failed')}: {error.get('message', '')}".strip()


def run_all(items: list[Item], work: Callable[[Item], None], progress: Progress, description: str,
            concurrency: int) -> None:
    """Run `work` on every item, `concurrency` at a time, advancing one bar. Ctrl-C stops it at once."""
    bar = progress.add_task(description, total=len(items))
    pool = ThreadPoolExecutor(max_workers=concurrency)
    try:
        pending: set[Future[None]] = set()
        queue = iter(items)
        for item in queue:
            pending.add(pool.submit(work, item))
            if len(pending) >= concurrency * 2:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                _advance(progress, bar, done)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            _advance(progress, bar, done)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _advance(progress: Progress, bar: Any, done: set[Future[None]]) -> None:
    for future in done:
        future.result()         # a CliError (relay unreachable, key refused) ends the import
        progress.advance(bar)


def wait_outcomes(client: httpx.Client, items: list[Item], progress: Progress, timeout: float,
                  interval: float = 0.5) -> None:
    """Poll every submitted, unfinished item until it ends or `timeout` passes."""
    watched = [i for i in items if i.id and i.status not in TERMINAL]
    bar = progress.add_task("waiting for outcomes", total=len(watched))
    deadline = time.monotonic() + timeout
    while True:
        for item in watched:
            if item.status in TERMINAL:
                continue
            response = client.get(f"{'/v1/archives' if item.kind == 'link' else '/v1/tasks'}/{item.id}")
            if response.status_code != 200:
                continue
            body = response.json()
            item.status = body.get("status")
            if item.status in TERMINAL:
                progress.advance(bar)
                if item.status != "succeeded":
                    item.error = _reason(body)
        if all(i.status in TERMINAL for i in watched) or time.monotonic() > deadline:
            return
        time.sleep(interval)


# ---- the report ----------------------------------------------------------------------------------------
def summary_rows(items: list[Item], waited: bool) -> list[tuple[str, int]]:
    sent = [i for i in items if i.id]
    rows = [("lines read", len(items)), ("new", sum(i.created for i in sent)),
            ("known already (not duplicated)", sum(not i.created for i in sent)),
            ("not accepted", sum(1 for i in items if not i.id))]
    if waited:
        rows += [("succeeded", sum(i.status == "succeeded" for i in sent)),
                 ("failed", sum(i.status in ("failed", "canceled") for i in sent)),
                 ("still in progress", sum(i.status not in TERMINAL for i in sent))]
    else:
        rows += [("failed already", sum(i.status in ("failed", "canceled") for i in sent))]
    return rows


def report(console: Console, items: list[Item], waited: bool) -> int:
    """Print the summary and the failures; the exit code (1 when anything failed, or with --wait when anything had
    not finished by --timeout: 0 says every line is done)."""
    summary = fit_table("relay archive: summary", (Column("what", "text"), Column("count", justify="right")),
                        [(what, f"{n:,}") for what, n in summary_rows(items, waited)], console.width)
    console.print(summary)
    failures = [i for i in items if i.problem or i.error]
    if failures:
        columns = (Column("line", justify="right"), Column("kind"), Column("id", "ref", drop=2),
                   Column("item", "text", drop=1, middle=True), Column("reason", "text", min_width=16))
        rows = [(str(i.line), i.kind if not i.problem else "?", i.id or "", i.text,
                 styled("failed", i.problem or i.error or "")) for i in failures]
        console.print(fit_table(f"failures ({len(failures)})", columns, rows, console.width))
    unfinished = waited and any(i.id and i.status not in TERMINAL for i in items)
    return EXIT_FAILED if failures or unfinished else 0


def cmd_archive(args: argparse.Namespace, client_of: Callable[[argparse.Namespace], RelayClient]) -> int:
    if args.concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    try:
        if args.file == "-":
            items = read_items(sys.stdin.read().splitlines())
        else:
            with open(args.file, encoding="utf-8", errors="replace") as handle:
                items = read_items(handle.read().splitlines())
    except OSError as exc:
        raise UsageError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    console = Console(stderr=True)
    sendable = [i for i in items if not i.problem]
    with client_of(args) as client:
        try:
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=console) as progress:
                run_all(sendable, lambda item: submit(client, item), progress, "submitting", args.concurrency)
                if args.wait:
                    wait_outcomes(client, sendable, progress, args.timeout)
        except KeyboardInterrupt:
            done = sum(1 for i in sendable if i.id or i.error)
            console.print(f"[yellow]interrupted[/yellow] after {done} of {len(sendable)} lines; run the same "
                          "command again to finish: lines already sent are not duplicated")
            return EXIT_INTERRUPTED
    code = report(console, items, args.wait)
    if args.json:
        print(json.dumps([{"line": i.line, "kind": i.kind, "id": i.id, "status": i.status, "created": i.created,
                           "error": i.problem or i.error} for i in items], indent=2))
    return code


def add_command(sub: Any, client_opts: Callable[[argparse.ArgumentParser], None],
                client_of: Callable[[argparse.Namespace], RelayClient]) -> None:
    """Register `relay archive` (called once by relay.cli.build_parser)."""
    p = sub.add_parser("archive", help="bulk import: archive the links, adopt the provider tasks of a file",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    client_opts(p)
    p.add_argument("file", help="a file of links or provider,provider_task_id lines (plain, CSV or JSON lines; "
                                "- for stdin)")
    p.add_argument("--wait", action="store_true", help="wait for every item's outcome before the summary")
    p.add_argument("--timeout", type=positive_seconds, default=600.0, help="seconds --wait waits at most (default 600)")
    p.add_argument("--concurrency", type=positive_count, default=8, help="requests in flight at once (default 8)")
    p.add_argument("--json", action="store_true", help="also print every line's outcome as JSON on stdout")
    p.set_defaults(func=lambda args: cmd_archive(args, client_of))

