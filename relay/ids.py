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


class _Minter:
    """The ULIDs of this process: time, then a random part drawn from os.urandom, read 4 KiB at a time
    (one system call per few hundred ids instead of one per id: callback receipt mints two per request).

    Ids minted in the same millisecond still sort in minting order: the random part of each one is the
    previous one's plus a random step (the monotonic ULID), so "newest first" by id is never a coin toss.
    One lock covers the bytes and the step (ids are minted on the event loop and in worker threads); the
    time digits of the last millisecond are kept, so an id minted in the same one encodes only its random
    part."""

    def __init__(self, pool_size: int = 4096) -> None:
        self._pool_size = pool_size
        self._forget()
        # A forked child must neither mint the parent's remaining bytes again nor continue its sequence.
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        # A new lock too: a fork taken while another thread held the lock would leave the child's held forever.
        self._lock = threading.Lock()
        self._buffer, self._offset = b"", 0
        self._ms: int | None = None        # no millisecond minted yet (any int, negative ones too, is one)
        self._rand, self._time_digits = 0, ""

    def _take(self, n: int) -> int:
        """n fresh random bytes as an integer (the lock held)."""
        if self._offset + n > len(self._buffer):
            self._buffer, self._offset = os.urandom(self._pool_size), 0
        start = self._offset
        self._offset = start + n
        return int.from_bytes(self._buffer[start:start + n], "big")

    def ulid(self, ms: int) -> str:
        with self._lock:
            if ms == self._ms and self._rand < _RAND_MAX - _STEP_MAX:
                self._rand += 1 + self._take(4)
            else:
                # A new millisecond (or the clock moved back, as injected test clocks do): a fresh random part.
                self._ms, self._rand, self._time_digits = ms, self._take(10), _encode(ms, 10)
            rand, time_digits = self._rand, self._time_digits
        p = _PAIRS      # the 80 random bits as 16 digits, two per lookup, unrolled (ids are on every hot path)
        return (time_digits + p[rand >> 70] + p[(rand >> 60) & 1023] + p[(rand >> 50) & 1023]
                + p[(rand >> 40) & 1023] + p[(rand >> 30) & 1023] + p[(rand >> 20) & 1023]
                + p[(rand >> 10) & 1023] + p[rand & 1023])


_RAND_MAX = (1 << 80) - 1
_STEP_MAX = 1 << 32
_minter = _Minter()


def ulid(now: float | None = None) -> str:
    """A 26-character ULID string; sorts by creation time (ms), then by minting order within this process."""
    return _minter.ulid(int((time.time() if now is None else now) * 1000))


def new_id(prefix: str, now: float | None = None) -> str:
    """An id like `tsk_01JD…`."""
    return f"{prefix}_{ulid(now)}"


def id_range(prefix: str, since: float, until: float) -> tuple[str, str]:
    """(low, high): every id `new_id(prefix, now)` makes for a `now` in [since, until) sorts in [low, high), so a
    window of creation times can walk an index by id. (The range may also hold ids of the milliseconds at its
    edges: still filter by the time itself.) Times before 1970 or past the ids' 50 bits of milliseconds are held
    to those ends."""
    def digits(ms: int) -> str:
        return _encode(min(max(ms, 0), _MS_MAX), 10)
    return f"{prefix}_{digits(int(since * 1000))}", f"{prefix}_{digits(int(until * 1000) + 1)}"


_MS_MAX = (1 << 50) - 1


_ID = re.compile(r"([a-z]{3})_[0-9A-HJKMNP-TV-Z]{26}")


def is_id(value: str, prefix: str) -> bool:
    """True if `value` has the shape of an id this module makes with `prefix` (a cursor check)."""
    match = _ID.fullmatch(value)
    return match is not None and match.group(1) == prefix
