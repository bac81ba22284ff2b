"""Prefixed, time-sortable, unguessable ids (ULID layout: 48-bit ms time + 80 random bits)."""

from __future__ import annotations

import os
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def ulid(now: float | None = None) -> str:
    """A 26-character ULID string; sorts by creation time (ms), random within a millisecond."""
    ms = int((time.time() if now is None else now) * 1000)
    rand = int.from_bytes(os.urandom(10), "big")
    return _encode(ms, 10) + _encode(rand, 16)


def new_id(prefix: str, now: float | None = None) -> str:
    """An id like `tsk_01JD…`."""
    return f"{prefix}_{ulid(now)}"
