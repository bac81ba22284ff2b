"""The chaos scenario (tests/chaos/scenario.py) at a large size, as part of `python -m bench`.

    python -m bench.chaos [--size 300] [--kills 8] [--seed N] [--database sqlite|postgresql]

Load across all five dialects, injected provider faults, a failing subscriber, relay SIGKILLed and
restarted KILLS times; then every guarantee is checked (see the scenario's docstring). The bench
reports whether they all held and how long it took; it is skipped by `python -m bench --quick`.
On PostgreSQL the scenario makes (and drops) its own fresh database (tests/pg.py), one relay on it.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path
from typing import Any

from bench.common import Figure, Section, add_database_argument, timed, use_database

SIZE, KILLS = 300, 8


def available() -> bool:
    try:
        import tests.chaos.scenario  # noqa: F401
    except ImportError:
        return False
    return True


def measure(size: int, kills: int, seed: int) -> Any:
    from tests.chaos.scenario import run_chaos

    from bench import common

    with tempfile.TemporaryDirectory(prefix="relay-chaos-") as tmp:
        if common.DATABASE == "sqlite":
            return run_chaos(size=size, kills=kills, seed=seed, workdir=Path(tmp))
        return run_chaos(size=size, kills=kills, seed=seed, workdir=Path(tmp), database=common.DATABASE)


@timed
def run(quick: bool, size: int = SIZE, kills: int = KILLS, seed: int | None = None) -> Section:
    title = "Chaos at size"
    if quick:
        return Section("chaos", title, "Skipped (`--quick`).")
    if not available():
        return Section("chaos", title, "Skipped: tests/chaos/scenario.py is not importable.")
    seed = seed if seed is not None else random.SystemRandom().randrange(2**32)
    report = measure(size, kills, seed)
    held = not report.problems
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(report.outcomes.items()))
    faults = ", ".join(f"{k} {v}" for k, v in sorted(report.faults.items()) if v)
    lines = [
        f"`run_chaos(size={size}, kills={kills}, seed={seed})` from tests/chaos/scenario.py: {report.tasks} tasks "
        f"over the five dialects, provider faults, a subscriber down for seconds and others misbehaving, relay "
        f"SIGKILLed {kills} times and restarted on the same data dir; then every task, archived image, event and "
        f"delivery is checked. It took {report.seconds:.0f} s.", "",
        "| guarantees | tasks | outcomes | events | verified at subscribers | images verified | "
        "duplicate deliveries (same webhook-id) | submit outcome unknown after a kill |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
        f"| {'all held' if held else f'**{len(report.problems)} problems**'} | {report.tasks} | {outcomes} | "
        f"{report.events} | {report.events_verified} | {report.images_verified} | {report.duplicate_deliveries} | "
        f"{report.submit_unknown_after_kill} |", "", f"Faults injected: {faults}."]
    if not held:
        lines += ["", "Problems (first 20):", ""] + [f"    {p[:300]}" for p in report.problems[:20]]
    notes = ["This is a correctness run under load, not a speed measurement: the time is mostly the planned "
             "outages (relay down, subscriber down, delivery retries). A seed reproduces the plan (tasks, "
             "faults, kill moments), not every interleaving."]
    figures = {"tasks": report.tasks, "kills": kills, "problems": len(report.problems), "seconds": report.seconds,
               "seed": seed}
    summary = [Figure(f"chaos: {report.tasks} tasks, {kills} kills (seed {seed})",
                      "every guarantee held" if held else f"{len(report.problems)} problems",
                      "-", None, f"{report.seconds:.0f} s")]
    return Section("chaos", title, "\n".join(lines), notes, figures, summary)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--kills", type=int, default=KILLS)
    parser.add_argument("--seed", type=int, default=None)
    add_database_argument(parser)
    args = parser.parse_args()
    use_database(args.database)
    print(run(False, args.size, args.kills, args.seed).markdown())


if __name__ == "__main__":
    main()
