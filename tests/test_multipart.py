"""The multipart parser (OpenAI-compatible edits, the simulator): limits hold before any work is done."""

from __future__ import annotations

import tracemalloc

import pytest

from relay.errors import InvalidRequest
from relay.multipart import MAX_PARTS, parse

BOUNDARY = "abQR"


def form(parts: int) -> bytes:
    one = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="f"\r\n\r\nvalue\r\n'.encode()
    return one * parts + f"--{BOUNDARY}--\r\n".encode()


def test_a_form_within_the_limit_parses() -> None:
    parts = parse(BOUNDARY, form(MAX_PARTS))
    assert len(parts) == MAX_PARTS


def test_one_part_too_many_is_refused() -> None:
    with pytest.raises(InvalidRequest, match=f"more than {MAX_PARTS} parts"):
        parse(BOUNDARY, form(MAX_PARTS + 1))


def test_a_body_of_delimiters_is_refused_without_splitting_it() -> None:
    """5 MB of nothing but boundaries: refused using no more memory than a fraction of the body (split first,
    it took about 8x the body: a cheap way to exhaust memory with a few concurrent requests)."""
    body = b"--" + (f"--{BOUNDARY}".encode() * (5_000_000 // 6)) + b"--"
    tracemalloc.start()
    try:
        with pytest.raises(InvalidRequest, match="parts"):
            parse(BOUNDARY, body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < len(body) // 10, peak
