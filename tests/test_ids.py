"""Ids: ULID layout (time-sortable, 80 random bits), Crockford base32, never repeated, fork-safe."""

from __future__ import annotations

import os

from relay import ids

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _decode(text: str) -> int:
    value = 0
    for char in text:
        value = value * 32 + CROCKFORD.index(char)
    return value


def test_ulid_carries_its_millisecond_and_sorts_by_time() -> None:
    now = 1_795_330_699.123
    text = ids.ulid(now)
    assert len(text) == 26 and set(text) <= set(CROCKFORD)
    assert _decode(text[:10]) == int(now * 1000)
    later = [ids.ulid(now + step * 0.005) for step in range(1, 50)]    # 5 ms apart: float rounding cannot tie
    assert later == sorted(later) and text < later[0]


def test_ids_do_not_repeat_and_have_their_prefix() -> None:
    made = [ids.new_id("tsk", 1_795_330_699.0) for _ in range(20_000)]     # same millisecond: randomness alone
    assert len(set(made)) == len(made)
    assert all(m.startswith("tsk_") and len(m) == 30 for m in made)
    assert len({_decode(m[14:]) for m in made}) == len(made)


def test_a_forked_child_never_mints_the_parents_next_id() -> None:
    """The random pool is dropped in a forked child: parent and child draw different bytes."""
    ids.ulid()                                   # the pool now holds unused bytes
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:                                 # child: report its next id and leave at once
        os.write(write, ids.ulid(0.0).encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child and child != ids.ulid(0.0)


def test_the_first_id_of_any_millisecond_has_its_26_digits() -> None:
    """Millisecond -1 (a test clock before 1970) is a millisecond like any other, not 'none minted yet'."""
    ids._minter._forget()            # as in a fresh process
    assert len(ids.ulid(-0.001)) == 26 and len(ids.ulid(-0.001)) == 26
