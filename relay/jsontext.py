"""JSON text in relay's hot paths (stored rows, webhook bodies, API answers): orjson, and the standard library
wherever orjson would not give back the same value.

Why: JSON was about 5 % of relay's CPU per task under bench.throughput (pre-rendered; 470-520 µs a task over 35
encodes and decodes, counted in the relay process; 190 µs with this module). A task object of 940 bytes took the
standard library's C encoder 10.6 µs and orjson 0.8 µs; reading it back 7.8 against 2.5 µs.

What differs from `json.dumps(value, separators=(",", ":"))`, and why it is safe:
- Non-ASCII is written as UTF-8, not as \\u escapes (webhook bodies and answers were already written so; stored
  text too now, so the console's metadata search finds "café" in tasks stored since, as written).
- Floats in their shortest spelling ("1e-7", not "1e-07"): the same number.
- NaN and ±Infinity are written as null where orjson writes the value. They are not JSON (a strict parser refused
  the text they were in), and none reaches here: request bodies refuse them, relay.costs drops them.
- A value orjson cannot write exactly (an integer beyond 64 bits, a lone surrogate, a key that is not a string) is
  written by the standard library, byte for byte as before; so is one the standard library refuses (a dataclass,
  a datetime: orjson is told to pass them on), which still raises TypeError: a bug is not stored as a dict.
  orjson has no such switch for a plain Enum or a UUID, which it writes by value; relay passes neither here.
- orjson reads integers beyond 64 bits as floats and refuses NaN and lone surrogates, so `loads` gives it only text
  that `dumps` wrote with orjson, which it marks with a trailing newline (whitespace JSON allows after a value; the
  standard library never leaves one). Any other text (the standard library's, rows written by earlier versions of
  relay) is read by `json.loads`, as before.

Input from outside (request bodies, provider answers) is still parsed by relay.validation and
relay.providers.parsing with the standard library's own checks.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

_COMPACT = json.JSONEncoder(separators=(",", ":"))   # one encoder: json.dumps builds one per call
_UTF8 = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
# What the standard library refuses, orjson must not write either: passed on, it raises, and the fallback raises too.
_STRICT = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME
_MARKED = _STRICT | orjson.OPT_APPEND_NEWLINE


def dumps(value: Any) -> str:
    """Compact JSON text to store: what `loads` reads back as the same value."""
    try:
        return orjson.dumps(value, option=_MARKED).decode()
    except orjson.JSONEncodeError:      # beyond 64 bits, a lone surrogate, a key that is not a string
        return _COMPACT.encode(value)


def loads(text: str | bytes) -> Any:
    """A value `dumps` (or the standard library) wrote."""
    if text[-1:] in ("\n", b"\n"):
        return orjson.loads(text)
    return json.loads(text)


def http_body(value: Any) -> bytes:
    """Compact UTF-8 JSON for an HTTP body (an answer, a webhook)."""
    try:
        return orjson.dumps(value, option=_STRICT)
    except orjson.JSONEncodeError:
        try:
            return _UTF8.encode(value).encode()
        except UnicodeEncodeError:
            # A lone surrogate (a provider's "\ud800" escape) has no UTF-8 form: sent escaped, as it came.
            return _COMPACT.encode(value).encode()
