"""Prefixed, time-sortable, unguessable ids (ULID layout: 48-bit ms time + 80 random bits)."""

from __future__ import annotations

import os
import re
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32


# Two base32 digits per lookup: 13 steps for a 26-digit ULID instead of 26.
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]


def _encode(value: int, length: int) -> str:
    """`value` as `length` Crockford base32 digits (most significant first)."""
    pairs = []
    if length & 1:
        pairs.append(_ALPHABET[(value >> (5 * (length - 1))) & 31])
    for shift in range(10 * (length // 2) - 10, -1, -10):
        pairs.append(_PAIRS[(value >> shift) & 1023])
    return "".join(pairs)


class _RandomPool:
    """os.urandom read 4 KiB at a time: one system call per 409 ids instead of one per id (hot paths
    such as callback receipt mint two ids per request). Same kernel CSPRNG bytes, never reused."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._buffer = b""
        self._offset = 0
        self._lock = threading.Lock()    # ids are minted on the event loop and in worker threads
        # A forked child must not mint the parent's remaining bytes again.
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._buffer, self._offset = b"", 0

    def take(self, n: int) -> bytes:
        with self._lock:
            if self._offset + n > len(self._buffer):
                self._buffer, self._offset = os.urandom(self._size), 0
            start = self._offset
            self._offset += n
            return self._buffer[start:start + n]


_random = _RandomPool()


class _Monotonic:
    """Ids minted in the same millisecond still sort in minting order: the random part of each one is the
    previous one's plus a random step (the monotonic ULID), so "newest first" by id is never a coin toss."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ms = -1
        self._rand = 0
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._ms = -1

    def next(self, ms: int) -> int:
        with self._lock:
            if ms == self._ms and self._rand < _RAND_MAX - _STEP_MAX:
                self._rand += 1 + int.from_bytes(_random.take(4), "big")
            else:
                # A new millisecond (or the clock moved back, as injected test clocks do): a fresh random part.
                self._ms = ms
                self._rand = int.from_bytes(_random.take(10), "big")
            return (ms << 80) | self._rand


_RAND_MAX = (1 << 80) - 1
_STEP_MAX = 1 << 32
_monotonic = _Monotonic()


def ulid(now: float | None = None) -> str:
    """A 26-character ULID string; sorts by creation time (ms), then by minting order within this process."""
    ms = int((time.time() if now is None else now) * 1000)
    return _encode(_monotonic.next(ms), 26)


def new_id(prefix: str, now: float | None = None) -> str:
    """An id like `tsk_01JD…`."""
    return f"{prefix}_{ulid(now)}"


_ID = re.compile(r"([a-z]{3})_[0-9A-HJKMNP-TV-Z]{26}")


def is_id(value: str, prefix: str) -> bool:
    """True if `value` has the shape of an id this module makes with `prefix` (a cursor check)."""
    match = _ID.fullmatch(value)
    return match is not None and match.group(1) == prefix
