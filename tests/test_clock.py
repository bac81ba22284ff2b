"""relay.clock's RFC 3339 times: what rfc3339 writes, parse_rfc3339 reads back (to the millisecond, truncated),
over the whole range."""

from __future__ import annotations

import random

from relay.clock import parse_rfc3339, rfc3339


def test_times_round_trip_at_millisecond_precision() -> None:
    rng = random.Random(7)
    for ts in [0.0, 1_795_330_699.123, 253402300799.999, *(rng.uniform(-6.2e10, 2.5e11) for _ in range(2000))]:
        text = rfc3339(ts)
        assert text is not None and text.endswith("Z") and len(text) == 24
        assert abs(parse_rfc3339(text) - ts) < 0.0011      # truncated to the ms; floats near 9999 round


def test_years_before_1000_keep_four_digits() -> None:
    early = parse_rfc3339("0001-01-01T00:00:05Z")
    assert rfc3339(early) == "0001-01-01T00:00:05.000Z"
    assert rfc3339(parse_rfc3339("0999-12-31T23:59:59.5Z")) == "0999-12-31T23:59:59.500Z"
    assert rfc3339(None) is None
