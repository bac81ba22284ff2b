"""Shared fixtures: a store per backend (the contract suite runs against each), a manual clock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.clock import ManualClock
from relay.store.base import Store
from relay.store.sqlite import SQLiteStore


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(params=["sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    backend: Store = SQLiteStore(tmp_path / "relay.db")
    await backend.open()
    try:
        yield backend
    finally:
        await backend.close()
