"""Validation of POST /v1/tasks bodies: JSON in, a normalized request out, or InvalidRequest naming the field."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import httpx
import idna

from relay.errors import InvalidRequest
from relay.models import (BACKGROUNDS, FORMATS, MODERATIONS, QUALITIES, RATIO_TO_PIXELS, SIZES_PIXELS,
                          GenerationRequest)
from relay.states import ALL_EVENT_TYPES, EVENT_TYPES, EVENT_WILDCARDS

MAX_PROMPT_CHARS = 32_000
MAX_METADATA_BYTES = 16 * 1024
MAX_INPUT_IMAGES = 16
MAX_URL_CHARS = 2048
# Limits on every JSON body, checked before any field: what relay accepts it must be able to store, read
# back, list and deliver, and a value nested a thousand levels deep breaks Python's JSON codec on the way out.
MAX_JSON_DEPTH = 32             # the body object itself is level 1
MAX_JSON_ITEMS = 1024           # object members and array items, all levels together
MAX_STRING_CHARS = 32_000       # any string, object keys included (the prompt's own limit)
# No text relay stores holds U+0000: PostgreSQL's text cannot (an error where SQLite would store it), and no
# prompt, name or id needs it. Refused where it comes in: JSON bodies here, paths and query strings
# (relay.web.app.refuse_nul), console forms (relay.web.console.guard.read_form).
NUL = "\x00"
_SURROGATE = re.compile("[\ud800-\udfff]")


def storable_text(text: str) -> str:
    """Text from outside that relay keeps but does not refuse (a provider's or a subscriber's): NULs and lone
    surrogates (no UTF-8 form: neither database can store one) replaced by U+FFFD."""
    if NUL in text:             # a memchr: cheap on a multi-MB base64 image too
        text = text.replace(NUL, "\ufffd")
    if text.isascii():          # the common case, and fast for a multi-MB base64 image
        return text
    return _SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text
ALLOWED_FIELDS = {"provider", "prompt", "size", "quality", "n", "background", "output_format", "output_compression",
                  "moderation", "images", "mask", "webhook_url", "webhook_events", "metadata"}
SIZE_CHOICES = (*SIZES_PIXELS, *RATIO_TO_PIXELS, "auto")


@dataclass(frozen=True)
class TaskInput:
    provider: str
    request: GenerationRequest
    webhook_url: str | None
    webhook_events: list[str] | None
    metadata: dict[str, Any] | None


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):        # 1e999: Python reads it as inf, which no JSON answer can echo
        raise ValueError(f"{text} is out of range")
    return value


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")     # Python's parser accepts NaN, Infinity and -Infinity


def parse_json_object(body: bytes) -> dict[str, Any]:
    """A request body as a JSON object within the limits above, or InvalidRequest naming the field."""
    try:
        data = json.loads(body, parse_float=_finite, parse_constant=_not_json)
    except RecursionError:
        # Nesting deeper than the parser's stack ("[[[[…", a few KiB): refused like any body over the depth
        # limit, naming the field that goes too deep so the client knows what to fix.
        field = _too_deep_field(body)
        raise InvalidRequest(f"{field or 'the body'} is nested deeper than {MAX_JSON_DEPTH} levels",
                             field=field) from None
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("the body must be a JSON object (strict JSON: no NaN or Infinity)") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    check_json_limits(data)
    return data


def _too_deep_field(body: bytes) -> str | None:
    """The top-level member of a body whose nesting passes MAX_JSON_DEPTH, found without parsing it.

    A scan of the raw bytes (iterative and string-aware, so no depth can overflow it): the member is the
    last string seen at level 1 before the level passed the limit. Only run on bodies the parser gave up
    on, so it costs nothing on the normal path.
    """
    depth = 0
    in_string = escaped = False
    start = 0
    last_key: bytes | None = None
    for index, byte in enumerate(body):
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:              # backslash
                escaped = True
            elif byte == 0x22:              # closing quote
                in_string = False
                if depth == 1:
                    last_key = body[start:index + 1]
        elif byte == 0x22:
            in_string, start = True, index
        elif byte in (0x5B, 0x7B):          # [ {
            depth += 1
            if depth > MAX_JSON_DEPTH:
                if last_key is None:
                    return None
                try:
                    key = json.loads(last_key)
                except ValueError:
                    return None
                return key if isinstance(key, str) else None
        elif byte in (0x5D, 0x7D):          # ] }
            depth -= 1
    return None


def check_json_limits(data: dict[str, Any]) -> None:
    """Depth, item count, string length and valid Unicode of a parsed body; the error names the top-level field.

    Iterative, so that no depth the parser accepted can overflow the stack here.
    """
    items = 0
    stack: list[tuple[Any, int, str | None]] = [(data, 1, None)]
    while stack:
        value, depth, field = stack.pop()
        if isinstance(value, str):
            _check_string(value, field)
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise InvalidRequest(f"{field or 'the body'} is nested deeper than {MAX_JSON_DEPTH} levels",
                                 field=field)
        items += len(value)
        if items > MAX_JSON_ITEMS:
            raise InvalidRequest(f"the body has more than {MAX_JSON_ITEMS} keys and list items", field=field)
        if isinstance(value, dict):
            for key, child in value.items():
                here = field if field is not None else key
                _check_string(key, here)
                stack.append((child, depth + 1, here))
        else:
            stack.extend((child, depth + 1, field) for child in value)


def _check_string(text: str, field: str | None) -> None:
    if len(text) > MAX_STRING_CHARS:
        raise InvalidRequest(f"{field or 'a key'} holds a string longer than {MAX_STRING_CHARS} characters",
                             field=field)
    try:
        # json.loads accepts "\ud800" escapes, which no UTF-8 text can hold: stored, such a string would break
        # every later answer that shows it (and every request relay makes with it).
        text.encode()
    except UnicodeEncodeError:
        raise InvalidRequest(f"{field or 'a key'} is not valid Unicode: a string holds a lone surrogate "
                             "(\\ud800-\\udfff)", field=field) from None
    if NUL in text:
        raise InvalidRequest(f"{field or 'a key'} holds a NUL character (\\u0000)", field=field)


def _choice(data: dict[str, Any], name: str, choices: tuple[str, ...]) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or value not in choices:
        raise InvalidRequest(f"{name} must be one of {', '.join(choices)}", field=name)
    return value


_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


def _url(value: Any, name: str, *, https_only: bool = False) -> str:
    """An absolute http(s) URL that every later step (storage, the SSRF guard, DNS, httpx) can handle."""
    schemes = ("https",) if https_only else ("http", "https")
    if not isinstance(value, str) or not value or len(value) > MAX_URL_CHARS:
        raise InvalidRequest(f"{name} must be a URL of at most {MAX_URL_CHARS} characters", field=name)
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in value):
        raise InvalidRequest(f"{name} must not contain spaces or control characters", field=name)
    try:
        # httpx's parser, not urllib's: it is the one that will send the request (and it checks IDNA).
        parsed = httpx.URL(value)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise InvalidRequest(f"{name} is not a valid URL: {exc}", field=name) from None
    if parsed.scheme not in schemes or not parsed.raw_host:
        raise InvalidRequest(f"{name} must be an absolute {' or '.join(schemes)} URL", field=name)
    authority = value.split("://", 1)[-1].split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    port_text = authority.rsplit("@", 1)[-1].rsplit("]", 1)[-1].partition(":")[2]
    if port_text and not (port_text.isascii() and port_text.isdigit()):
        # int() reads "١٢" (Arabic-Indic digits) as 12; no client sends it so: refuse what is not ASCII.
        raise InvalidRequest(f"{name} has a port that is not written in ASCII digits", field=name)
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise InvalidRequest(f"{name} has a port out of range (1-65535)", field=name)
    problem = host_problem(parsed.raw_host.decode("ascii"))
    if problem is not None:
        raise InvalidRequest(f"{name} has an invalid host: {problem}", field=name)
    return value


def host_problem(host: str) -> str | None:
    """Why `host` (ASCII, IDNA-encoded, as httpx gives it) cannot be looked up or connected to; None if it can."""
    if "%" in host:
        return "zone ids and percent signs are not allowed in a host"
    if ":" in host:        # a bracketed IPv6 literal: httpx has already checked its form
        return None
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253:
        return "a host name is 1 to 253 characters"
    for label in name.split("."):
        if not _LABEL.fullmatch(label):
            return f"{label!r} is not a DNS label (1-63 letters, digits, hyphens; no leading or trailing hyphen)"
        if label.startswith("xn--"):
            try:
                # httpx decodes punycode for every request it sends: "xn--ls8h" (an emoji) would fail there.
                idna.decode(label)
            except (idna.IDNAError, UnicodeError) as exc:
                return f"{label!r} is not valid IDNA: {exc}"
    return None


def parse_task_input(data: dict[str, Any], *, known_providers: list[str]) -> TaskInput:
    """Check every field of API.md's task request; unknown fields are refused (they are usually typos)."""
    unknown = sorted(set(data) - ALLOWED_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0]!r}", field=unknown[0])
    provider = data.get("provider")
    if not isinstance(provider, str) or not provider:
        raise InvalidRequest("provider is required", field="provider")
    if provider not in known_providers:
        raise InvalidRequest(f"unknown provider {provider!r}; configured providers: {', '.join(known_providers)}",
                             field="provider")
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRequest("prompt is required and must be a non-empty string", field="prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidRequest(f"prompt must be at most {MAX_PROMPT_CHARS} characters", field="prompt")
    size = _choice(data, "size", SIZE_CHOICES)
    if size is not None:
        size = RATIO_TO_PIXELS.get(size, size)
    n = data.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 10:
        raise InvalidRequest("n must be an integer from 1 to 10", field="n")
    compression = data.get("output_compression")
    if compression is not None and (isinstance(compression, bool) or not isinstance(compression, int)
                                    or not 0 <= compression <= 100):
        raise InvalidRequest("output_compression must be an integer from 0 to 100", field="output_compression")
    images = data.get("images")
    if images is None:
        images = []
    if not isinstance(images, list) or len(images) > MAX_INPUT_IMAGES:
        raise InvalidRequest(f"images must be a list of at most {MAX_INPUT_IMAGES} URLs", field="images")
    images = [_url(url, "images") for url in images]
    mask = data.get("mask")
    if mask is not None:
        mask = _url(mask, "mask")
    webhook_url = data.get("webhook_url")
    if webhook_url is not None:
        webhook_url = _url(webhook_url, "webhook_url")
    events = data.get("webhook_events")
    if events is not None:
        if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
            raise InvalidRequest("webhook_events must be a list of event types", field="webhook_events")
        for event in events:
            if event not in EVENT_TYPES and event not in ("task.*", "*"):
                raise InvalidRequest(f"unknown event type {event!r}; known: {', '.join(EVENT_TYPES)}, task.*",
                                     field="webhook_events")
        if webhook_url is None:
            raise InvalidRequest("webhook_events needs a webhook_url", field="webhook_events")
    metadata = _metadata(data)
    request = GenerationRequest(
        prompt=prompt, size=size, quality=_choice(data, "quality", QUALITIES), n=n,
        background=_choice(data, "background", BACKGROUNDS), output_format=_choice(data, "output_format", FORMATS),
        output_compression=compression, moderation=_choice(data, "moderation", MODERATIONS),
        images=tuple(images), mask=mask)
    return TaskInput(provider=provider, request=request, webhook_url=webhook_url, webhook_events=events,
                     metadata=metadata)


def _metadata(data: dict[str, Any]) -> dict[str, Any] | None:
    """`metadata`: a JSON object of at most 16 KiB, echoed back (tasks and archives)."""
    metadata = data.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise InvalidRequest("metadata must be a JSON object", field="metadata")
        if len(json.dumps(metadata, separators=(",", ":"), ensure_ascii=False).encode()) > MAX_METADATA_BYTES:
            raise InvalidRequest("metadata must be at most 16 KiB of JSON", field="metadata")
    return metadata


# ---- subscriptions (relay.deliveries) ------------------------------------------------------------
SUBSCRIPTION_FIELDS = {"url", "events", "description", "enabled", "signing"}
SIGNING_CHOICES = ("hmac", "ed25519")
MAX_DESCRIPTION_CHARS = 1024
MAX_EVENT_FILTERS = 32
REPLAY_STATUSES = ("failed", "canceled", "succeeded", "all")


@dataclass(frozen=True)
class SubscriptionInput:
    """Fields given in a create or update; None means "not given" (create fills defaults)."""

    url: str | None = None
    events: list[str] | None = None
    description: str | None = None
    enabled: bool | None = None
    signing: str | None = None
    given: frozenset[str] = frozenset()


def parse_subscription_input(data: dict[str, Any], *, partial: bool) -> SubscriptionInput:
    """POST (partial=False: url required, defaults filled) or PATCH (partial=True: only what is given)."""
    unknown = sorted(set(data) - SUBSCRIPTION_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0]!r}", field=unknown[0])
    if not partial and "url" not in data:
        raise InvalidRequest("url is required", field="url")
    url = _url(data["url"], "url") if "url" in data else None
    events = None
    if "events" in data or not partial:
        events = data.get("events", ["*"])
        if (not isinstance(events, list) or not events or len(events) > MAX_EVENT_FILTERS
                or not all(isinstance(e, str) for e in events)):
            raise InvalidRequest(f"events must be a non-empty list of at most {MAX_EVENT_FILTERS} event types",
                                 field="events")
        for event in events:
            if event not in ALL_EVENT_TYPES and event not in EVENT_WILDCARDS:
                raise InvalidRequest(f"unknown event type {event!r}; known: {', '.join(ALL_EVENT_TYPES)}, "
                                     f"{', '.join(EVENT_WILDCARDS)}", field="events")
        events = list(dict.fromkeys(events))
    description = data.get("description")
    if description is not None and (not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS):
        raise InvalidRequest(f"description must be a string of at most {MAX_DESCRIPTION_CHARS} characters",
                             field="description")
    enabled = data.get("enabled")
    if "enabled" in data and not isinstance(enabled, bool):
        raise InvalidRequest("enabled must be true or false", field="enabled")
    signing = data.get("signing")
    if "signing" in data:
        if partial:
            raise InvalidRequest("signing cannot be changed; create a new subscription", field="signing")
        if signing not in SIGNING_CHOICES:
            raise InvalidRequest(f"signing must be one of {', '.join(SIGNING_CHOICES)}", field="signing")
    if not partial:
        enabled = True if enabled is None else enabled
        signing = signing or "hmac"
    return SubscriptionInput(url=url, events=events, description=description, enabled=enabled, signing=signing,
                             given=frozenset(data))


@dataclass(frozen=True)
class ReplayInput:
    since: float
    until: float | None
    statuses: tuple[str, ...]


def parse_replay_input(data: dict[str, Any]) -> ReplayInput:
    """`{"since": RFC 3339, "until": RFC 3339 (optional), "status": failed|canceled|succeeded|all}`."""
    from relay.clock import parse_rfc3339

    unknown = sorted(set(data) - {"since", "until", "status"})
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0]!r}", field=unknown[0])
    times: dict[str, float | None] = {"since": None, "until": None}
    for name in times:
        value = data.get(name)
        if value is None:
            if name == "since":
                raise InvalidRequest("since is required (an RFC 3339 time)", field="since")
            continue
        try:
            times[name] = parse_rfc3339(value) if isinstance(value, str) else None
        except ValueError:
            times[name] = None
        if times[name] is None:
            raise InvalidRequest(f"{name} must be an RFC 3339 time like 2026-11-22T10:00:00Z", field=name)
    status = data.get("status", "failed")
    if status not in REPLAY_STATUSES:
        raise InvalidRequest(f"status must be one of {', '.join(REPLAY_STATUSES)}", field="status")
    since, until = times["since"], times["until"]
    assert since is not None
    if until is not None and until <= since:
        raise InvalidRequest("until must be after since", field="until")
    statuses = ("failed", "canceled", "succeeded") if status == "all" else (status,)
    return ReplayInput(since=since, until=until, statuses=statuses)


# ---- archives of any link (POST /v1/archives) and adopted tasks (POST /v1/tasks with provider_task_id) ----
ARCHIVE_FIELDS = {"url", "urls", "expires_at", "metadata", "webhook_url"}
MAX_ARCHIVE_URLS = 100
ADOPT_FIELDS = {"provider", "provider_task_id", "webhook_url", "webhook_events", "metadata"}
# Provider task ids go into the provider's URL path when polled: no slashes, dots-only or odd characters.
_PROVIDER_TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:~-]{0,199}")


@dataclass(frozen=True)
class ArchiveInput:
    urls: tuple[str, ...]
    expires_at: float | None        # None: read it from each link, else 24 h
    metadata: dict[str, Any] | None
    webhook_url: str | None
    many: bool                      # "urls" was given: the answer is a list


def parse_archive_input(data: dict[str, Any]) -> ArchiveInput:
    """`{"url": …}` or `{"urls": [… ≤100]}`, with optional `expires_at` (RFC 3339), `metadata`, `webhook_url`."""
    from relay.clock import parse_rfc3339

    unknown = sorted(set(data) - ARCHIVE_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0]!r}", field=unknown[0])
    if ("url" in data) == ("urls" in data):
        raise InvalidRequest("give either url (one link) or urls (a list of links)", field="url")
    if "url" in data:
        urls = [_url(data["url"], "url")]
    else:
        raw = data["urls"]
        if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_ARCHIVE_URLS:
            raise InvalidRequest(f"urls must be a list of 1 to {MAX_ARCHIVE_URLS} URLs", field="urls")
        urls = [_url(url, "urls") for url in raw]
    expires_at = None
    if data.get("expires_at") is not None:
        value = data["expires_at"]
        try:
            expires_at = parse_rfc3339(value) if isinstance(value, str) else None
        except ValueError:
            expires_at = None
        if expires_at is None:
            raise InvalidRequest("expires_at must be an RFC 3339 time like 2026-11-22T10:00:00Z", field="expires_at")
    webhook_url = data.get("webhook_url")
    if webhook_url is not None:
        webhook_url = _url(webhook_url, "webhook_url")
    return ArchiveInput(urls=tuple(urls), expires_at=expires_at, metadata=_metadata(data), webhook_url=webhook_url,
                        many="urls" in data)


@dataclass(frozen=True)
class AdoptInput:
    provider: str
    provider_task_id: str
    webhook_url: str | None
    webhook_events: list[str] | None
    metadata: dict[str, Any] | None


def is_adoption(data: dict[str, Any]) -> bool:
    """A POST /v1/tasks body that adopts a provider task instead of asking for a generation."""
    return "provider_task_id" in data


def parse_adopt_input(data: dict[str, Any], *, known_providers: list[str]) -> AdoptInput:
    """`provider` + `provider_task_id` (no prompt), with a task's optional webhook and metadata fields.

    The fields it shares with a task are checked by parse_task_input itself (one set of rules)."""
    unknown = sorted(set(data) - ADOPT_FIELDS)
    if unknown:
        field = unknown[0]
        reason = "is not taken when adopting a task (provider_task_id)" if field in ALLOWED_FIELDS else "is unknown"
        raise InvalidRequest(f"field {field!r} {reason}", field=field)
    provider_task_id = data.get("provider_task_id")
    if (not isinstance(provider_task_id, str) or not _PROVIDER_TASK_ID.fullmatch(provider_task_id)
            or ".." in provider_task_id):
        raise InvalidRequest("provider_task_id must be the provider's task id: 1 to 200 letters, digits and . _ : ~ -",
                             field="provider_task_id")
    shared = {k: v for k, v in data.items() if k != "provider_task_id"}
    parsed = parse_task_input({**shared, "prompt": "(adopted)"}, known_providers=known_providers)
    return AdoptInput(provider=parsed.provider, provider_task_id=provider_task_id, webhook_url=parsed.webhook_url,
                      webhook_events=parsed.webhook_events, metadata=parsed.metadata)
