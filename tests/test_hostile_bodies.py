"""Bodies deeper than Python's JSON parser can follow are refused like any other over-deep body, naming the field."""

from __future__ import annotations

import pytest

from relay.errors import InvalidRequest
from relay.validation import MAX_JSON_DEPTH, parse_json_object


def _refusal(body: bytes) -> dict[str, object]:
    with pytest.raises(InvalidRequest) as caught:
        parse_json_object(body)
    error = caught.value.body()["error"]
    assert isinstance(error, dict)
    return error


@pytest.mark.parametrize("levels", [MAX_JSON_DEPTH + 1, 970, 50_000])
def test_deep_member_is_named_at_any_depth(levels: int) -> None:
    body = b'{"prompt": "x", "metadata": ' + b'{"a": ' * levels + b"1" + b"}" * (levels + 1)
    error = _refusal(body)
    assert error["field"] == "metadata" and "nested deeper" in str(error["message"])


def test_strings_that_look_like_brackets_do_not_confuse_the_scan() -> None:
    body = b'{"a": "[[{\\"", "b\\"c": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert _refusal(body)["field"] == 'b"c'


def test_a_deep_bare_array_names_no_field() -> None:
    error = _refusal(b"[" * 5000 + b"]" * 5000)
    assert "field" not in error and "nested deeper" in str(error["message"])
