"""Logging for the command line, and the redaction that keeps secrets out of every log line.

URLs carry secrets in two places: the userinfo (`https://user:PASS@host/`) and
the query (presigned image links, `?token=` webhook URLs). httpx logs every
request URL at INFO, exception messages quote URLs, and relay's own messages
name them. So:

    redact_url(url)      one URL without its userinfo, query and fragment:
                         https://user:pw@h/p?x=1#f  →  https://***@h/p?***#***
    redact_text(text)    every URL found in free text redacted like that (also
                         percent-encoded ones), plus `Bearer …`/`Basic …`
                         credentials, `whsec_`/`whsk_`/`rk_`/`sk-` keys and the
                         token of relay's own callback paths
    RedactingFilter      a logging.Filter that rewrites a record's formatted
                         message, exception text and stack text with
                         redact_text before any formatter sees them
    configure_logging    the CLI's setup: one stderr handler with that filter,
                         httpx/httpcore request lines off unless at DEBUG;
                         JSON lines (JsonFormatter) or text (TextFormatter)
    log_context          the ids of the work at hand (job, task, delivery, event)
                         for every line logged inside it (a ContextVar, so
                         per asyncio task); `extra=` fields win over it

Every line carries the ids that are known where it is logged: `task_id`,
`event_id`, `delivery_id`, `job_id` (and `provider`, `kind`, … where they
apply). Their values go through redact_text like the message.

Redaction is deliberately cautious: a URL whose authority does not parse
(`http://user:pa/ss@host`, which no client would send) loses its whole
authority, and an encoded `?` (`%3F`) starts the query as a raw one would.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any, TextIO
from urllib.parse import unquote

from relay.models import Event, Task, TaskStatus

REDACTED = "***"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")
# The ids a text line shows after its message, in this order (a JSON line carries every extra field).
ID_FIELDS = ("task_id", "event_id", "delivery_id", "job_id")

_CONTEXT: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar("relay_log_context", default={})
# What every LogRecord has before `extra=`: the rest of a record's attributes are its fields.
# (uvicorn adds `color_message`, its message with terminal colours: noise in a JSON line.)
_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "color_message"}

# Loggers whose INFO lines are one per request, URL included: kept at WARNING unless debugging.
CHATTY_LOGGERS = ("httpx", "httpcore")
# uvicorn may install its own handlers (relay demo, or anything using uvicorn's default log
# config), which bypass the root handler: its loggers get the filter themselves.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")

# A URL in free text: a scheme, "://", then everything up to white space or a quoting character.
_URL = re.compile(r"""[A-Za-z][A-Za-z0-9+.\-]*://[^\s"'<>`]*""")
# A percent-encoded URL ("https%3A%2F%2F…", also double-encoded): ends where a raw `&` would end it.
_ENCODED_URL = re.compile(r"""[A-Za-z][A-Za-z0-9+.\-]*%(?:25)*3[Aa]%(?:25)*2[Ff]%(?:25)*2[Ff][^\s"'<>`&]*""")
# Punctuation that usually closes the sentence around a URL rather than belonging to it.
_TRAILING = ".,;:!)]}"
_AUTHORITY_END = re.compile(r"[/\\?#]")
_QUERY_START = re.compile(r"\?|%3[Ff]")
_PORT = re.compile(r"(?::[0-9]*)?")
_TOKENS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Authorization values. "Basic" only with a padded-length base64 run, so prose ("Basic authentication") stays.
    (re.compile(r"\b((?i:bearer))(\s+)[A-Za-z0-9\-._~+/]{8,}=*"), rf"\1\2{REDACTED}"),
    (re.compile(r"\b(Basic)(\s+)(?:[A-Za-z0-9+/]{4}){2,}(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?(?![\w+/=])"),
     rf"\1\2{REDACTED}"),
    (re.compile(r"\b(whsec_|whsk_|rk_)[A-Za-z0-9+/=_\-]+"), rf"\1{REDACTED}"),
    (re.compile(r"\b(sk-)[A-Za-z0-9_\-]{12,}"), rf"\1{REDACTED}"),
    # /callbacks/{provider}/{task id}/{token}: the token is an HMAC that lets anyone post callbacks.
    (re.compile(r"(/callbacks/[^/\s?#]+/[^/\s?#]+/)[^/\s?#\"'<>]+"), rf"\1{REDACTED}"),
)
_QUICK = re.compile(r"://|:\\/\\/|%(?:25)*3[Aa]|bearer|basic|whsec_|whsk_|rk_|sk-|/callbacks/", re.IGNORECASE)


def redact_url(url: str) -> str:
    """`url` without the secrets it may carry: userinfo, query and fragment become `***`.

    Scheme, host, port and path stay, so the line still says where the request went.
    Text that is not a URL (no "://") is returned unchanged.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = _AUTHORITY_END.search(rest)
    authority, tail = (rest[:end.start()], rest[end.start():]) if end else (rest, "")
    at = authority.rfind("@")
    if at < 0:
        # An encoded "@" is not a delimiter to a parser, but it is one to a reader of the log.
        encoded = authority.lower().rfind("%40")
        at, width = (encoded, 3) if encoded >= 0 else (-1, 0)
    else:
        width = 1
    host = authority[at + width:] if at >= 0 else authority
    userinfo = f"{REDACTED}@" if at >= 0 else ""
    if not _plausible_host(host):
        # Not a host[:port] any client would connect to (`http://user:pa/ss@h`): keep nothing of it.
        query = f"?{REDACTED}" if _QUERY_START.search(tail) or "#" in tail else ""
        return f"{scheme}://{REDACTED}{query}"
    return f"{scheme}://{userinfo}{host}{_redact_tail(tail)}"


def _plausible_host(host: str) -> bool:
    """host, host:port, [v6] or [v6]:port with a numeric port."""
    if host.startswith("["):
        close = host.find("]")
        return close > 0 and _PORT.fullmatch(host[close + 1:]) is not None
    _name, colon, port = host.partition(":")
    return not colon or port.isdigit() or port == ""


def _redact_tail(tail: str) -> str:
    """Path kept; query (raw `?` or encoded `%3F`) and fragment replaced."""
    fragment = tail.find("#")
    path, frag = (tail[:fragment], f"#{REDACTED}") if fragment >= 0 else (tail, "")
    query = _QUERY_START.search(path)
    if query is not None:
        path = f"{path[:query.start()]}?{REDACTED}"
    return path + frag


def redact_text(text: str) -> str:
    """`text` with every URL redacted (see redact_url) and credentials and keys replaced by `***`."""
    if not _QUICK.search(text):
        return text
    if ":\\/\\/" in text:
        text = text.replace(":\\/\\/", "://")     # a URL inside JSON that escapes its slashes
    text = _ENCODED_URL.sub(_redact_encoded_match, text)
    text = _URL.sub(_redact_match, text)
    for pattern, replacement in _TOKENS:
        text = pattern.sub(replacement, text)
    return text


def _redact_match(match: re.Match[str]) -> str:
    found = match.group(0)
    body = found.rstrip(_TRAILING)
    trailing = found[len(body):]
    if "?" in body or "#" in body:
        trailing = ""       # the query swallows trailing punctuation: it may be part of a secret
        body = found
    return redact_url(body) + trailing


def _redact_encoded_match(match: re.Match[str]) -> str:
    found = match.group(0)
    decoded = found
    for _ in range(4):       # a URL encoded into a parameter of a URL encoded into …
        once = unquote(decoded)
        if once == decoded:
            break
        decoded = once
    return redact_url(decoded)


@contextlib.contextmanager
def log_context(**fields: str | None) -> Iterator[None]:
    """Every line logged inside (this asyncio task and the tasks it starts) carries these fields."""
    token = _CONTEXT.set({**_CONTEXT.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def context_field(name: str) -> str | None:
    """A field of the current log_context (e.g. the kind of the job being run), None outside one."""
    return _CONTEXT.get().get(name)


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's extra fields (`extra=` and log_context), without logging's own attributes."""
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRIBUTES and not k.startswith("_")}


class ContextFilter(logging.Filter):
    """Copies the current log_context onto the record; a field given with `extra=` is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _CONTEXT.get().items():
            if key not in record.__dict__:
                setattr(record, key, value)
        return True


class RedactingFilter(logging.Filter):
    """Rewrites a record so that nothing formatted from it carries a secret; never drops a record.

    The formatted message replaces `msg` (and `args` is emptied), and the exception and stack
    text are formatted here and redacted: formatters reuse `exc_text` once it is set, so every
    handler after this filter prints the redacted form.
    """

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001
            # A broken log call (arguments that do not fit the format): logging would print them in
            # its error report unredacted; print them as the line instead, redacted.
            message = f"{record.msg!s} (log arguments did not fit: {record.args!r})"
        record.msg, record.args = redact_text(message), ()
        for key, value in record_fields(record).items():
            if isinstance(value, str):
                setattr(record, key, redact_text(value))
            elif not isinstance(value, int | float | bool | type(None)):
                # Anything else is printed through its repr: redact that (a dict of headers, a URL object).
                setattr(record, key, redact_text(repr(value)))
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return True


class TextFormatter(logging.Formatter):
    """FORMAT, then the ids the record carries: `… task succeeded task_id=tsk_… event_id=evt_…`."""

    def __init__(self) -> None:
        super().__init__(FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        line = super().formatMessage(record)
        ids = [f"{name}={record.__dict__[name]}" for name in ID_FIELDS if record.__dict__.get(name)]
        return f"{line} {' '.join(ids)}" if ids else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (RFC 3339, UTC, ms), level, logger, message, every extra field
    (the ids among them), and `exception` / `stack` text when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        for key, value in record_fields(record).items():
            line.setdefault(key, value if isinstance(value, str | int | float | bool | type(None)) else repr(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        return json.dumps(line, ensure_ascii=False, default=str)


def default_format(stream: TextIO) -> str:
    """text on a terminal (a person reads it), else json (a log collector does)."""
    try:
        return "text" if stream.isatty() else "json"
    except (AttributeError, ValueError):     # no isatty, or a closed stream
        return "json"


class _RelayHandler(logging.StreamHandler[TextIO]):
    """The handler configure_logging installs (so a second call replaces it instead of adding one)."""


def parse_level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    value = logging.getLevelName(level.strip().upper())
    return value if isinstance(value, int) else logging.INFO


def configure_logging(level: str | int = "info", *, stream: TextIO | None = None,
                      fmt: str | None = None) -> logging.Handler:
    """Log to stderr (or `stream`) at `level` through RedactingFilter; returns the handler.

    `fmt`: "text" or "json" (None: text on a terminal, else json). httpx and httpcore log one line
    per request with its URL; below DEBUG they are set to WARNING. At DEBUG they log everything,
    redacted like every other line.
    """
    numeric = parse_level(level)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _RelayHandler)]:
        root.removeHandler(old)
    out = stream if stream is not None else sys.stderr
    if fmt is None:
        fmt = default_format(out)
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    handler = _RelayHandler(out)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())     # first: the context's ids are redacted with the rest
    handler.addFilter(RedactingFilter())
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if numeric <= logging.DEBUG else logging.WARNING)
    # aiosqlite logs every statement with its parameters at DEBUG: request bodies and metadata, which
    # no log level of relay's should print.
    logging.getLogger("aiosqlite").setLevel(logging.INFO)
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(RedactingFilter())
    return handler


_tasks_log = logging.getLogger("relay.tasks")


def log_task_status(task: Task, status: TaskStatus, event: Event | None) -> None:
    """A Store status listener (Store.on_task_status): one line per task created and per status change."""
    fields = {"task_id": task.id, "provider": task.provider, "status": status.value}
    if event is not None:
        fields["event_id"] = event.id
    if event is None:
        _tasks_log.info("task %s created for %s", task.id, task.provider, extra=fields)
    elif status == TaskStatus.FAILED and task.error:
        fields["error_code"] = str(task.error.get("code", ""))
        _tasks_log.info("task %s failed: %s: %s", task.id, task.error.get("code"), task.error.get("message"),
                        extra=fields)
    else:
        _tasks_log.info("task %s %s (%s)", task.id, status.value, event.type, extra=fields)
