"""`mypy --strict relay` stays clean: run as a test, so the README's one test command keeps it so."""

from __future__ import annotations

import sys
from pathlib import Path

from mypy import api

ROOT = Path(__file__).resolve().parent.parent


def test_relay_type_checks_strictly(tmp_path: Path) -> None:
    """Every module of relay passes mypy --strict (the cache goes to a temp dir: the checkout stays clean)."""
    limit = sys.getrecursionlimit()     # mypy raises it to 16384 and leaves it so: later tests must not inherit that
    try:
        out, err, status = api.run(["--strict", "--cache-dir", str(tmp_path / "mypy-cache"), str(ROOT / "relay")])
    finally:
        sys.setrecursionlimit(limit)
    assert status == 0, out + err
