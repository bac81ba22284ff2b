"""Shared pieces of the fuzz tests: provider-like bodies, API.md's error shape, one harness across examples.

Hypothesis runs a sync function once per example, so the async harness is opened
once on a private event loop and every example runs its coroutine on that loop
(`InLoop.run`). No example touches the network: the simulator is in process and
the SSRF guard's resolver is replaced by one that answers 127.0.0.1 (allow-listed)
for every name, so registering a subscriber URL never asks real DNS.

The hostile values of issue 8 live here too, each with a verdict (`VALID`: relay must
accept it, `INVALID`: relay must refuse it with a 4xx naming the field, `EITHER`: a
judgement call, but whatever relay accepts must read back, list and deliver): URLs
(`urls`, `url_samples`, `sink_urls`), RFC 3339 times (`RFC3339_EDGES`,
`rfc3339_times`), JSON nested and widened near and past relay's limits
(`nested_json`, `deep_value`, `wide_value`), long and odd text (`HOSTILE_TEXT`), odd
cursors and ids (`IDS`); `inject_hostile` swaps them into any generated value and
`register_hostile_hooks` into every case a schemathesis schema generates.

`RELAY_FUZZ_EXAMPLES=N` multiplies every example count of the fuzz tests by N and,
when N > 1, draws fresh random examples (printed for reproduction) instead of the
CI run's fixed ones: `RELAY_FUZZ_EXAMPLES=20 pytest tests/test_roundtrip.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import httpx
import requests
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from relay.providers import PROVIDER_KINDS
from tests.harness import Harness, harness

T = TypeVar("T")

# API.md: the codes an error may carry, and which codes each status may carry (405 has no code of
# its own in API.md; relay answers it as invalid_request, like the 400 of a non-JSON callback).
# 415 unsupported_media_type (a /v1 body that is not JSON by its Content-Type) is an addition to API.md's list.
ERROR_CODES = frozenset({"invalid_request", "unauthorized", "not_found", "conflict", "payload_too_large",
                         "unsupported_media_type", "rate_limited", "unsupported", "internal"})
CODES_FOR_STATUS = {400: {"invalid_request"}, 401: {"unauthorized"}, 404: {"not_found"},
                    405: {"invalid_request"}, 409: {"conflict"}, 413: {"payload_too_large"},
                    415: {"unsupported_media_type"}, 422: {"invalid_request", "unsupported"},
                    429: {"rate_limited"}, 500: {"internal"}}

# Bounded and reproducible: the same examples on every run and machine; no example database on disk.
# RELAY_FUZZ_EXAMPLES=N (N > 1): N times the examples, random ones, with the blob to reproduce a failure.
SCALE = max(1, int(os.environ.get("RELAY_FUZZ_EXAMPLES", "1") or "1"))
FUZZ = settings(deadline=None, derandomize=SCALE == 1, database=None, print_blob=SCALE > 1,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.data_too_large])


def scaled(examples: int) -> int:
    """An example count of the CI run, times RELAY_FUZZ_EXAMPLES."""
    return examples * SCALE


# ---- provider-like bodies -------------------------------------------------------------------------------
# Every status word any dialect uses, so mutated bodies often carry a status some parser knows.
STATUS_WORDS = sorted({word for kind in PROVIDER_KINDS for word in getattr(__import__(
    f"relay.providers.{kind}", fromlist=["STATUSES"]), "STATUSES", {})} | {"IN_QUEUE", "COMPLETED", "success"})
URLS = ["https://cdn.test/i.png", "http://cdn.test/i.png", "ftp://cdn.test/i.png", "https://", "", " https://x/y ",
        "data:image/png;base64,iVBORw0KGgo=", "data:image/png;base64,!!!", "data:;base64,", "data:text/plain,hi",
        "javascript:alert(1)", "//cdn.test/i.png"]
ODD_NUMBERS = [0, -1, 1, 100, 101, 1e308, -1e308, 2**63, -(2**63), 0.5, 99.9, float("nan"), float("inf"),
               float("-inf"), "50", "1e400", "-5", "NaN", "Infinity", "9" * 400, "²"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30),
                    st.sampled_from(STATUS_WORDS), st.sampled_from(URLS), st.sampled_from(ODD_NUMBERS))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=12), inner, max_size=5), max_leaves=20)
TYPED: list[tuple[type, st.SearchStrategy[Any]]] = [
    (type(None), st.none()), (bool, st.booleans()), (int, st.integers()), (float, st.floats()),
    (str, st.text(max_size=20)), (list, st.lists(SCALARS, max_size=3)),
    (dict, st.dictionaries(st.text(max_size=8), SCALARS, max_size=3))]


def retyped(value: Any) -> st.SearchStrategy[Any]:
    """A value of another JSON type than `value` (a list where an object was, a string where a number was, …)."""
    return st.one_of([strategy for kind, strategy in TYPED if type(value) is not kind])


@st.composite
def near(draw: st.DrawFn, value: Any, depth: int = 0) -> Any:
    """`value` with some of its parts dropped, retyped, replaced or recursed into; extra keys sometimes."""
    action = draw(st.sampled_from(["keep", "recurse", "recurse", "recurse", "recurse", "retype", "replace"]))
    if action == "keep" or depth > 6:
        return value
    if action == "retype":
        return draw(retyped(value))
    if action == "replace":
        return draw(JSON)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            fate = draw(st.sampled_from(["keep", "keep", "keep", "keep", "keep", "drop", "mutate", "mutate", "null"]))
            if fate == "keep":
                out[key] = item
            elif fate == "mutate":
                out[key] = draw(near(item, depth + 1))
            elif fate == "null":
                out[key] = None
        if draw(st.booleans()):
            out[draw(st.sampled_from([*value, "status", "id", "error", "data", "images", "url"]))] = draw(JSON)
        return out
    if isinstance(value, list):
        items = [draw(near(item, depth + 1)) for item in value if draw(st.integers(0, 4))]
        return items + draw(st.lists(JSON, max_size=2)) if draw(st.booleans()) else items
    if isinstance(value, str):
        spellings = st.sampled_from(STATUS_WORDS).flatmap(
            lambda s: st.sampled_from([s, s.upper(), s.title(), f" {s} "]))
        return draw(st.one_of(spellings, st.sampled_from(URLS), st.text(max_size=20)))
    return draw(st.one_of(st.sampled_from(ODD_NUMBERS), SCALARS))


def as_bytes(value: Any) -> bytes:
    # allow_nan: json.loads reads NaN/Infinity, and so does every provider parser; they must cope.
    return json.dumps(value, allow_nan=True).encode()


# ---- hostile values (issue 8) ---------------------------------------------------------------------------
# Each sample carries a verdict; a value made of parts takes the worst of its parts' verdicts.
VALID, EITHER, INVALID = 0, 1, 2
Tagged = tuple[str, int]


class Long(str):
    """A long string that shows itself briefly (in Hypothesis' reports of failing examples)."""

    def __repr__(self) -> str:
        return f"<{len(self)} chars: {str.__repr__(self[:40])}…>"


def clip(text: str) -> str:
    return Long(text) if len(text) > 100 else text


def _clipped(samples: list[Tagged]) -> list[Tagged]:
    return [(clip(text), verdict) for text, verdict in samples]


URL_SCHEMES: list[Tagged] = [
    ("http", VALID), ("https", VALID), ("HTTP", EITHER), ("hTtPs", EITHER), ("ftp", INVALID), ("file", INVALID),
    ("javascript", INVALID), ("ws", INVALID), ("gopher", INVALID)]
# Hosts that `ssrf_resolver` answers with loopback (allow-listed in tests): a delivery to them reaches a local sink.
LOOPBACK_HOSTS: list[Tagged] = _clipped([
    ("example.com", VALID), ("cdn.example.com", VALID), ("EXAMPLE.COM", VALID), ("example.com.", VALID),
    ("a-b.example", VALID), ("localhost", VALID), ("127.0.0.1", VALID), ("bücher.example", VALID),
    ("xn--bcher-kva.example", VALID), ("a" * 63 + ".example", VALID), (".".join(["b" * 61] * 4), VALID),
    ("ß.example", EITHER), ("a。b.example", EITHER), ("a_b.example", EITHER), ("1.2.3.4.5", EITHER),
    ("0x7f.1", EITHER), ("127.1", EITHER), ("2130706433", EITHER), ("xn--ls8h.example", EITHER)])
OTHER_HOSTS: list[Tagged] = _clipped([
    ("[::1]", VALID), ("[0:0:0:0:0:0:0:1]", EITHER), ("[::ffff:127.0.0.1]", EITHER),
    # not a host a request can go to: empty labels, bad brackets, zone ids, invalid IDNA / punycode, spaces
    ("a..b", INVALID), (".a.example", INVALID), ("-a.example", INVALID), ("a-.example", INVALID),
    ("a" * 64 + ".example", INVALID), (".".join(["c" * 63] * 4) + ".example", INVALID), ("[::1", INVALID),
    ("::1]", INVALID), ("[fe80::1%25eth0]", INVALID), ("[fe80::1%eth0]", INVALID), ("[::g]", INVALID),
    ("[1.2.3.4]", INVALID), ("xn--a.example", INVALID), ("xn--.example", INVALID), ("xn--zz-.example", INVALID),
    ("☃.example", INVALID), ("😀.example", INVALID), ("ex ample.com", INVALID), ("exa\tmple.com", INVALID),
    ("ex%61mple.com", INVALID), ("", INVALID),
    # refused by the SSRF guard: private, metadata, unspecified; names that resolve there (see ssrf_resolver)
    ("10.0.0.1", INVALID), ("169.254.169.254", INVALID), ("[::ffff:169.254.169.254]", INVALID),
    ("0.0.0.0", INVALID), ("[::]", INVALID), ("192.168.0.1", INVALID), ("private.internal", INVALID),
    ("metadata.internal", INVALID)])
URL_PORTS: list[Tagged] = [
    ("", VALID), (":80", VALID), (":8080", VALID), (":65535", VALID), (":1", VALID), (":", EITHER),
    (":0080", EITHER), (":0", INVALID), (":65536", INVALID), (":99999", INVALID), (":-1", INVALID),
    (":8a", INVALID), (":١٢", INVALID), (":" + "9" * 30, INVALID)]
URL_USERINFO: list[Tagged] = [
    ("", VALID), ("user@", EITHER), ("user:pass@", EITHER), (":@", EITHER), ("@", EITHER),
    ("a%40b:c%3Ad@", EITHER), ("us er@", INVALID)]
# After host and port: paths, queries and fragments that a request can still be sent with (or not).
URL_TAILS: list[Tagged] = _clipped([
    ("", VALID), ("/", VALID), ("/hook", VALID), ("/a/b?c=d", VALID), ("/p#frag", VALID), ("/a;b=c,d", VALID),
    ("?" + "q" * 1500, VALID), ("/%20", EITHER), ("/%zz", EITHER), ("/%", EITHER), ("/%00", EITHER),
    ("/ü/😀", EITHER), ("?q=%zz&&=", EITHER), ("/\\x", EITHER), ("/..%2f..%2fetc", EITHER),
    ("/" + "a" * 2100, INVALID), ("/a b", INVALID), ("/a\x00", INVALID), ("/a\nb", INVALID)])
WHOLE_URLS: list[Tagged] = [
    ("http://[::1/x", INVALID), ("http://a..b/x", INVALID), ("http:///x", INVALID), ("http://", INVALID),
    ("https:", INVALID), ("//example.com/x", INVALID), ("example.com/x", INVALID), ("", INVALID),
    ("javascript:alert(1)", INVALID), ("data:image/png;base64,iVBORw0KGgo=", INVALID),
    (" http://example.com/x", INVALID), ("http://example.com/x ", INVALID), ("http://example.com:80:80/x", INVALID),
    ("http://[::1]:99999/x", INVALID), ("http://user@:80/x", INVALID), ("http:/example.com/x", EITHER),
    ("http:\\\\example.com\\x", EITHER), ("https://example.com/ref.png", VALID)]
MAX_URL_CHARS = 2048


def _pick(options: list[Tagged]) -> st.SearchStrategy[Tagged]:
    """Half the time a valid option, so that a composed value often has exactly one hostile part."""
    valid = [o for o in options if o[1] == VALID]
    return st.one_of(st.sampled_from(valid), st.sampled_from(options)) if valid else st.sampled_from(options)


@st.composite
def urls(draw: st.DrawFn) -> Tagged:
    """A URL for any URL field (webhook_url, images, mask, a subscription's url) and its verdict."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.sampled_from(WHOLE_URLS))
    parts = [draw(_pick(URL_SCHEMES)), draw(_pick(URL_USERINFO)), draw(_pick(LOOPBACK_HOSTS + OTHER_HOSTS)),
             draw(_pick(URL_PORTS)), draw(_pick(URL_TAILS))]
    scheme, userinfo, host, port, tail = (text for text, _ in parts)
    url = f"{scheme}://{userinfo}{host}{port}{tail}"
    verdict = max(v for _, v in parts)
    return clip(url), INVALID if len(url) > MAX_URL_CHARS else verdict


def url_samples() -> list[Tagged]:
    """Every URL sample once: the whole ones, and each part's options with the other parts valid."""
    base = {"scheme": "http", "userinfo": "", "host": "example.com", "port": "", "tail": "/hook"}
    parts = {"scheme": URL_SCHEMES, "userinfo": URL_USERINFO, "host": LOOPBACK_HOSTS + OTHER_HOSTS,
             "port": URL_PORTS, "tail": URL_TAILS}
    out = list(WHOLE_URLS)
    for name, options in parts.items():
        for text, verdict in options:
            url = "{scheme}://{userinfo}{host}{port}{tail}".format(**{**base, name: text})
            out.append((clip(url), INVALID if len(url) > MAX_URL_CHARS else verdict))
    return out


@st.composite
def sink_urls(draw: st.DrawFn, port: int, tag: str) -> Tagged:
    """A hostile-looking URL that, if accepted, leads to a local sink on `port` with a path starting /`tag`."""
    parts = [draw(st.sampled_from([("http", VALID), ("HTTP", EITHER)])),
             draw(_pick([u for u in URL_USERINFO if u[1] != INVALID])), draw(_pick(LOOPBACK_HOSTS)),
             draw(_pick([t for t in URL_TAILS if t[1] != INVALID and not t[0].startswith("/..")]))]
    scheme, userinfo, host, tail = (text for text, _ in parts)
    return clip(f"{scheme}://{userinfo}{host}:{port}/{tag}{tail}"), max(v for _, v in parts)


# RFC 3339 and its neighbours. Relay works in years 1-9999 UTC: an instant outside them is refused.
RFC3339_EDGES: list[Tagged] = [
    ("2026-01-01T00:00:00Z", VALID), ("2026-01-01T00:00:00.123456Z", VALID), ("2026-01-01T00:00:00+00:00", VALID),
    ("2026-01-01T05:30:00+05:30", VALID), ("0001-01-01T00:00:00Z", VALID), ("9999-12-31T23:59:59Z", VALID),
    ("9999-12-31T23:59:59.999999Z", VALID), ("1970-01-01T00:00:00Z", VALID), ("1969-12-31T23:59:59Z", VALID),
    ("2026-01-01T00:00:00-23:59", VALID), ("2026-01-01T00:00:00+23:59", VALID), ("2024-02-29T12:00:00Z", VALID),
    ("0001-01-01T23:59:00+23:59", VALID), ("9999-12-31T00:00:00-23:59", VALID),
    ("2026-01-01t00:00:00z", EITHER), ("2026-01-01 00:00:00Z", EITHER), ("2026-01-01T00:00:00", EITHER),
    ("2016-12-31T23:59:60Z", EITHER), ("2026-01-01T00:00:00.123456789Z", EITHER), ("2026-01-01T00:00Z", EITHER),
    ("2026-01-01", EITHER), ("20260101T000000Z", EITHER), ("2026-W01-1", EITHER), ("2026-001", EITHER),
    ("2026-01-01T24:00:00Z", EITHER), ("2026-01-01T00:00:00-00:00", EITHER), ("２０２６-01-01T00:00:00Z", EITHER),
    ("2026-01-01T00:00:00,5Z", EITHER), ("+2026-01-01T00:00:00Z", EITHER), ("1700000000", EITHER),
    ("2026-01-01T00:00:00.١Z", EITHER), ("2026-01-01T00:00:00.1234567890Z", EITHER),
    ("2026-01-01T00:00:00+05:30:00", EITHER), ("2026-01-01T00:00:00 Z", EITHER), ("2026-01-01T00:00:00+0530", EITHER),
    ("9999-12-31T23:59:59-23:59", INVALID), ("0001-01-01T00:00:00+00:01", INVALID),
    ("9999-12-31T23:59:59.999999-00:01", INVALID), ("2026-13-01T00:00:00Z", INVALID),
    ("2026-02-30T00:00:00Z", INVALID), ("2025-02-29T00:00:00Z", INVALID), ("2026-01-01T25:00:00Z", INVALID),
    ("2026-01-01T00:60:00Z", INVALID), ("2026-01-01T00:00:00+24:00", INVALID), ("2026-01-01T00:00:00+99:99", INVALID),
    ("0000-01-01T00:00:00Z", INVALID), ("10000-01-01T00:00:00Z", INVALID), ("", INVALID), ("now", INVALID),
    ("yesterday", INVALID), ("1e10", INVALID), (Long("9" * 5000), INVALID), ("2026-01-01T00:00:00Z\x00", INVALID),
    ("-2026-01-01T00:00:00Z", INVALID), ("2026-01-01T00:00:00ZZ", INVALID)]
_MIN_UTC = datetime(1, 1, 1, tzinfo=UTC)
_MAX_UTC = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)


@st.composite
def rfc3339_times(draw: st.DrawFn) -> Tagged:
    """An RFC 3339 time (an edge of the list above, or any instant written with any offset up to ±23:59)."""
    if draw(st.booleans()):
        return draw(st.sampled_from(RFC3339_EDGES))
    local = draw(st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59, 999999)))
    minutes = draw(st.one_of(st.sampled_from([0, 1439, -1439, 60, -60]), st.integers(-1439, 1439)))
    spelled = draw(st.sampled_from(["offset", "Z", "z"])) if minutes == 0 else "offset"
    sign, value = ("-" if minutes < 0 else "+"), abs(minutes)
    zone = {"Z": "Z", "z": "z"}.get(spelled, f"{sign}{value // 60:02d}:{value % 60:02d}")
    separator, verdict = draw(st.sampled_from([("T", VALID), ("T", VALID), ("t", EITHER), (" ", EITHER)]))
    text = f"{local.year:04d}-{local.month:02d}-{local.day:02d}{separator}{local:%H:%M:%S}" + \
        draw(st.sampled_from(["", f".{local.microsecond:06d}"])) + zone
    if spelled == "z":
        verdict = max(verdict, EITHER)
    try:
        utc = local.replace(tzinfo=timezone(timedelta(minutes=minutes))).astimezone(UTC)
        in_range = _MIN_UTC <= utc <= _MAX_UTC
    except OverflowError:
        in_range = False
    return text, verdict if in_range else INVALID


def nested_json(depth: int, shape: str = "object", leaf: bytes = b"1") -> bytes:
    """JSON text `depth` containers deep, built as bytes (no Python value that deep, no recursion)."""
    opens = {"object": b'{"a":', "list": b"[", "mixed": b'{"a":['}[shape]
    closes = {"object": b"}", "list": b"]", "mixed": b"]}"}[shape]
    return opens * depth + leaf + closes * depth


def deep_value(depth: int, leaf: Any = 1) -> Any:
    """A Python value `depth` objects deep (for generated cases; keep it far below the recursion limit)."""
    value = leaf
    for _ in range(depth):
        value = {"a": value}
    return value


def wide_value(items: int) -> dict[str, int]:
    return {f"k{i}": i for i in range(items)}


# Text that has broken things: NUL, line and paragraph separators, BOM, bidi overrides, astral characters,
# strings at and past the 32,000-character limit, template and injection look-alikes, an escape as plain text.
HOSTILE_SAMPLES = [clip(text) for text in (
    "", " ", "\x00", "\u2028\u2029", "\ufeff", "\u202e", "𝟙", "😀" * 10, "é" * 300, "\r\n", "<script>", "%s%n",
    "{{7*7}}", "' OR 1=1 --", "../../etc/passwd", "\\ud800", "a" * 32_000, "a" * 32_001, "😀" * 16_000, "\U0010ffff")]
HOSTILE_TEXT = st.one_of(st.sampled_from(HOSTILE_SAMPLES), st.text(max_size=40))
# For query strings and paths: what fits in a URL (httpx refuses URLs over 64 KiB before sending them).
SHORT_HOSTILE_TEXT = st.one_of(st.sampled_from([t for t in HOSTILE_SAMPLES if len(t) < 1000]), st.text(max_size=40))
# Lone surrogates: Python holds them, JSON carries them as escapes, UTF-8 cannot. Raw bodies only: schemathesis
# re-validates some cases with a validator that cannot take them.
LONE_SURROGATES = ["\ud800", "a\udfffb", "\udbff\udbff", "\udc00" * 3]
CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
ID_PREFIXES = ["tsk", "evt", "sub", "dlv", "img", "job", "xyz", "TSK"]
ODD_CURSORS = ["", "garbage", "tsk_", "tsk_" + "0" * 26, "evt_" + "0" * 26, "tsk_" + "7" + "Z" * 25,
               "evt_" + "7" + "Z" * 25, "tsk_01jd" + "a" * 22, "tsk_01JD" + "I" * 22, "tsk_" + "0" * 27, "%00",
               "\x00", "../", "' OR 1=1 --", " tsk_" + "0" * 26, "tsk_" + "0" * 26 + "\n", "null", "-1", "9" * 400]
# A well-formed id of some prefix (known or not to relay) or an odd cursor.
IDS = st.one_of(st.sampled_from(ODD_CURSORS), st.builds(
    lambda prefix, body: f"{prefix}_{body}", st.sampled_from(ID_PREFIXES),
    st.text(alphabet=CROCKFORD, min_size=26, max_size=26)))
URL_FIELDS = frozenset({"url", "webhook_url", "mask", "images"})
TIME_FIELDS = frozenset({"since", "until"})
ID_FIELDS = frozenset({"cursor", "after", "task_id", "subscription_id", "event_id", "delivery_id", "image_id"})


def hostile_for(name: str | None, *, short: bool = False) -> st.SearchStrategy[Any]:
    """A hostile replacement for the value of field `name` (a URL for URL fields, a time for times, …).

    `short`: no text too long for a URL (query parameters). Plain `str`s (not `Long`): schemathesis validates them.
    """
    return _hostile_for(name, short=short).map(lambda value: str(value) if isinstance(value, str) else value)


def _hostile_for(name: str | None, *, short: bool) -> st.SearchStrategy[Any]:
    if name in URL_FIELDS:
        return urls().map(lambda tagged: tagged[0])
    if name in TIME_FIELDS:
        return rfc3339_times().map(lambda tagged: tagged[0])
    if name in ID_FIELDS:
        return IDS
    if name == "metadata":
        return st.one_of(st.integers(0, 300).map(deep_value), st.integers(1000, 1100).map(wide_value),
                         st.builds(lambda text: {"s": text}, HOSTILE_TEXT))
    return SHORT_HOSTILE_TEXT if short else HOSTILE_TEXT


@st.composite
def inject_hostile(draw: st.DrawFn, value: Any, name: str | None = None, *, rate: int = 6,
                   short: bool = False) -> Any:
    """`value` with about one string (or metadata object) in `rate` swapped for a hostile one of its field."""
    if isinstance(value, str) or (name == "metadata" and isinstance(value, dict)):
        return draw(hostile_for(name, short=short)) if draw(st.integers(1, rate)) == 1 else value
    if isinstance(value, dict):
        return {key: draw(inject_hostile(item, key, rate=rate, short=short)) for key, item in value.items()}
    if isinstance(value, list):
        return [draw(inject_hostile(item, name, rate=rate, short=short)) for item in value]
    return value


def register_hostile_hooks(schema: Any) -> None:
    """Every case `schema` generates (stateless or stateful) gets hostile values in some body and query fields."""

    def flatmap_body(context: Any, body: Any) -> st.SearchStrategy[Any]:
        return inject_hostile(body)

    def flatmap_query(context: Any, query: Any) -> st.SearchStrategy[Any]:
        return inject_hostile(query, short=True) if isinstance(query, dict) else st.just(query)

    schema.hooks.register_hook_with_name(flatmap_body, "flatmap_body")
    schema.hooks.register_hook_with_name(flatmap_query, "flatmap_query")


# ---- the network and API.md's error shape -----------------------------------------------------------------
async def loopback_resolver(host: str, port: int) -> list[str]:
    """Every name resolves to loopback (allow-listed in tests): no DNS query, no outside traffic."""
    return ["127.0.0.1"]


# Names that a hostile probe would point at internal addresses (DNS it controls), for the SSRF checks.
INTERNAL_NAMES = {"private.internal": "10.0.0.7", "metadata.internal": "169.254.169.254"}


async def ssrf_resolver(host: str, port: int) -> list[str]:
    """As `loopback_resolver`, except that the INTERNAL_NAMES resolve to the refused addresses they name."""
    return [INTERNAL_NAMES.get(host.rstrip(".").lower(), "127.0.0.1")]


def _refuse(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_json(response: httpx.Response) -> Any:
    """The body as JSON any client can read: UTF-8, no NaN/Infinity (Python's parser accepts those)."""
    return json.loads(response.content.decode("utf-8"), parse_constant=_refuse)


def error_shape_problem(response: httpx.Response) -> str | None:
    """None when `response` carries API.md's error shape with a code fit for its status; else what is wrong."""
    if not response.headers.get("content-type", "").startswith("application/json"):
        return f"content-type {response.headers.get('content-type')!r} is not JSON"
    try:
        body = strict_json(response)
    except ValueError:
        return "the body is not strict JSON"
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict):
        return f"not {{'error': {{...}}}}: {body!r}"[:300]
    error = body["error"]
    if not set(error) <= {"code", "message", "field"}:
        return f"unexpected keys {sorted(set(error) - {'code', 'message', 'field'})}"
    if error.get("code") not in ERROR_CODES:
        return f"unknown code {error.get('code')!r}"
    if response.status_code in CODES_FOR_STATUS and error["code"] not in CODES_FOR_STATUS[response.status_code]:
        return f"code {error['code']!r} does not belong to status {response.status_code}"
    if not isinstance(error.get("message"), str) or not error["message"]:
        return "message is missing or empty"
    if "field" in error and not isinstance(error["field"], str):
        return f"field is not a string: {error['field']!r}"
    if "Traceback" in error["message"]:
        return "the message carries a stack trace"
    return None


async def send_case(client: httpx.AsyncClient, case: Any, headers: dict[str, str] | None) -> httpx.Response:
    """Send a schemathesis case through `client` (in process), serialized as `requests` would send it."""
    kwargs = case.as_transport_kwargs(base_url=str(client.base_url), headers=headers)
    prepared = requests.Request(
        method=kwargs["method"], url=kwargs["url"], headers=kwargs.get("headers"), params=kwargs.get("params"),
        cookies=kwargs.get("cookies"), json=kwargs.get("json"), data=kwargs.get("data"),
        files=kwargs.get("files")).prepare()
    raw = [(k.encode("latin-1"), v.encode("latin-1") if isinstance(v, str) else v)
           for k, v in prepared.headers.items() if k.lower() != "content-length"]
    body = prepared.body.encode() if isinstance(prepared.body, str) else prepared.body
    return await client.request(prepared.method or "GET", prepared.url or str(client.base_url), headers=raw,
                                content=body or b"")


class InLoop:
    """An event loop and a relay harness (no background worker) that outlive single Hypothesis examples."""

    def __init__(self, data_dir: Path, *, resolver: Any = loopback_resolver, **env: Any) -> None:
        self.data_dir = data_dir
        self.resolver = resolver
        self.env = env
        self.loop = asyncio.new_event_loop()
        self.stack = contextlib.AsyncExitStack()
        self.h: Harness

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def __enter__(self) -> InLoop:
        try:
            self.h = self.run(self.stack.enter_async_context(harness(self.data_dir, run_worker=False, **self.env)))
        except BaseException:
            self.loop.close()
            raise
        self.h.runtime.guard.resolver = self.resolver
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.run(self.stack.aclose())
            self.run(self.loop.shutdown_asyncgens())
            self.run(self.loop.shutdown_default_executor())
        finally:
            self.loop.close()
