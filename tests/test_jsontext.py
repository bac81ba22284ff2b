"""relay.jsontext: orjson's speed without its different values (big integers, lone surrogates, NaN)."""

from __future__ import annotations

import json
import math

import pytest

from relay import jsontext

BIG = 2 ** 64          # one past orjson's largest integer: it would read it back as a float


@pytest.mark.parametrize("value", [
    {"id": "tsk_1", "progress": 100, "ratio": 0.1, "tiny": 5e-324, "neg": -0.0, "none": None, "ok": True},
    [1, [2, [3, {"a": "é😀\u2028\x00"}]]],
    {"max": 2 ** 64 - 1, "min": -(2 ** 63), "float": 1e308},
    "a string", 0, [],
])
def test_what_orjson_writes_reads_back_the_same(value: object) -> None:
    text = jsontext.dumps(value)
    assert text.endswith("\n")             # the mark: written by orjson, so orjson reads it
    assert jsontext.loads(text) == value
    assert json.loads(text) == value       # and it is plain JSON to any other reader


@pytest.mark.parametrize("value", [
    {"n": BIG}, {"n": -(2 ** 63) - 1}, [10 ** 30], {"s": "\ud800"}, {"\udfff": 1},
])
def test_what_orjson_cannot_write_is_written_and_read_as_before(value: object) -> None:
    text = jsontext.dumps(value)
    assert text == json.dumps(value, separators=(",", ":"))     # byte for byte the standard library's
    assert jsontext.loads(text) == value


def test_keys_that_are_not_strings_are_written_as_the_standard_library_writes_them() -> None:
    assert jsontext.dumps({1: "a", None: "b"}) == '{"1":"a","null":"b"}'


def test_text_without_the_mark_is_read_by_the_standard_library() -> None:
    """Rows written before relay.jsontext (or by the standard library): a big integer stays an integer."""
    read = jsontext.loads('{"n":18446744073709551616,"m":%s}' % ("9" * 40))
    assert read == {"n": BIG, "m": int("9" * 40)}
    assert isinstance(read["n"], int)
    assert jsontext.loads(b'{"s":"\\ud800"}') == {"s": "\ud800"}


def test_nan_and_infinity_are_written_as_null() -> None:
    assert jsontext.loads(jsontext.dumps({"a": math.nan, "b": math.inf})) == {"a": None, "b": None}
    assert jsontext.http_body([math.nan, -math.inf]) == b"[null,null]"


def test_http_bodies_are_compact_utf8_without_the_mark() -> None:
    assert jsontext.http_body({"a": "é", "b": [1, 2]}) == '{"a":"é","b":[1,2]}'.encode()
    assert jsontext.http_body({"n": BIG}) == b'{"n":18446744073709551616}'
    # A lone surrogate has no UTF-8 form: escaped, as it came.
    assert jsontext.http_body({"s": "\ud800", "t": "é"}) == b'{"s":"\\ud800","t":"\\u00e9"}'


def test_the_sign_of_zero_survives() -> None:
    assert math.copysign(1, jsontext.loads(jsontext.dumps({"z": -0.0}))["z"]) == -1


def test_a_body_with_a_big_integer_is_still_utf8() -> None:
    """The middle way of http_body: the standard library, without \\u escapes, when orjson cannot write the value."""
    assert jsontext.http_body({"n": BIG, "t": "é"}) == '{"n":18446744073709551616,"t":"é"}'.encode()


def test_what_the_standard_library_refuses_is_refused() -> None:
    """orjson would write a dataclass or a datetime; relay's stored rows and bodies must not take them silently."""
    import dataclasses
    import datetime

    @dataclasses.dataclass
    class Thing:
        a: int

    for value in (Thing(1), {"at": datetime.datetime(2026, 1, 1)}):
        with pytest.raises(TypeError):
            jsontext.dumps(value)
        with pytest.raises(TypeError):
            jsontext.http_body(value)


def test_subscription_events_stored_by_earlier_versions_read_back() -> None:
    assert jsontext.loads('["task.*", "archive.succeeded"]') == ["task.*", "archive.succeeded"]
