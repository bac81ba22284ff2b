"""Proof under fire: the chaos scenario (tests/chaos/scenario.py) at a modest size, in the normal test run.

    .venv/bin/python -m pytest -m chaos                       # just this
    CHAOS_SEED=1234 .venv/bin/python -m pytest -n 0 -m chaos -s    # replay a seed, see the report (one process)
    CHAOS_SIZE=400 CHAOS_KILLS=10 …                           # bigger (bench/chaos.py runs it large)
    CHAOS_REPLICAS=3 CHAOS_REPLICAS_SIZE=100 …                # the replicas-on-PostgreSQL mode, bigger

The seed is random unless CHAOS_SEED is set; it is printed first, and in the failure message.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from .scenario import run_chaos

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(170)]


def test_tasks_faults_kills_and_a_failing_subscriber_lose_nothing(tmp_path: Path) -> None:
    """~50 tasks on all five dialects, provider faults, a subscriber down for seconds, relay SIGKILLed 3 times."""
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(2**32))
    size = int(os.environ.get("CHAOS_SIZE", "50"))
    kills = int(os.environ.get("CHAOS_KILLS", "3"))
    report = run_chaos(size=size, kills=kills, seed=seed, workdir=tmp_path)
    assert not report.problems, f"reproduce with CHAOS_SEED={seed}\n{report.summary()}"
    assert report.tasks == size and report.faults["relay_kills"] == kills
    assert report.events_verified > 0 and report.images_verified > 0


def test_replicas_on_postgresql_lose_nothing_when_one_is_killed(tmp_path: Path) -> None:
    """Replicas mode: 40 tasks, 2 relays on one fresh PostgreSQL database, random replicas SIGKILLed 3 times."""
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(2**32))
    size = int(os.environ.get("CHAOS_REPLICAS_SIZE", "40"))
    kills = int(os.environ.get("CHAOS_REPLICAS_KILLS", "3"))
    replicas = int(os.environ.get("CHAOS_REPLICAS", "2"))
    report = run_chaos(size=size, kills=kills, seed=seed, workdir=tmp_path, database="postgresql", replicas=replicas)
    assert not report.problems, f"reproduce with CHAOS_SEED={seed}\n{report.summary()}"
    assert report.tasks == size and report.faults["relay_kills"] == kills
    assert report.events_verified > 0 and report.images_verified > 0
