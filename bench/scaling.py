"""Scaling over processes: end-to-end tasks/s and deliveries/s with `relay serve --processes 1` vs `--processes 2`.

    python -m bench.scaling [--quick]
    python -m bench --only scaling --database postgresql

Always on PostgreSQL (several processes need it; whatever --database says) and always against
`relay simulate --prerendered` (one simulator for the whole run, reset between runs), so that the bench
measures relay rather than the simulator's Pillow drawing. Each relay gets a fresh database.

Two loads, each run with 1 and then 2 processes:
- tasks: the closed loop of bench.throughput (the same mix of the five dialects, IN_FLIGHT tasks in flight,
  latency = submit → the subscriber's receipt of task.succeeded), tasks/s over a fixed window after warm-up;
- fan-out: the same loop with FANOUT more subscriptions on every task event (`task.*`), each delivered to
  the same sink (in the bench process); deliveries/s = every delivery the sink received inside the window.

CPU time over each window, read from /proc/<pid>/stat: relay (the `relay serve` process and every child
it forked), the PostgreSQL backends connected to that relay's database, the simulator, and this process
(the bench driver and the sink); and the machine's busy cores, so "others" is what the rest of the
machine used meanwhile. The ratio 2 processes / 1 process is the figure (the aim: ≥ 1.6).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from bench import common
from bench.common import (CpuPids, Figure, Section, add_database_argument, cpu_share, database_for, postgres, ratio,
                          run_loop, start_relay, start_simulator, stop, timed, use_database)
from bench.throughput import IN_FLIGHT, POLL_EVERY, SIM_DURATION, WORKER_CONCURRENCY, through_relay

PROCESSES = (1, 2)
FANOUT = 8                  # subscriptions on task.* in the fan-out load (besides the terminal one)
LOADS = ("tasks", "fanout")
TITLE = "Scaling over processes, pre-rendered images"


# ---- which processes to account ------------------------------------------------------------------------
def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def descendants(pid: int) -> list[int]:
    """Every living process below `pid` (children of `relay serve --processes N`, and theirs)."""
    parents = {int(entry): _ppid(int(entry)) for entry in os.listdir("/proc") if entry.isdigit()}
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return sorted(found)


def pg_backends(database: str) -> list[int]:
    """PostgreSQL backends connected to `database` (their title: `postgres: … USER DATABASE HOST(PORT) STATE`)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            title = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if title.startswith("postgres: ") and f" {database} " in title:
            pids.append(int(entry))
    return pids


# ---- one run: a fresh relay with N processes under one load -------------------------------------------
def one_run(root: Path, sim: subprocess.Popen[bytes], sim_url: str, processes: int, load: str, warmup: float,
            seconds: float) -> dict[str, Any]:
    relay, base, data = start_relay(
        root, sim_url, name=f"{load}-{processes}", processes=processes, worker_concurrency=str(WORKER_CONCURRENCY),
        polling_initial_delay=str(POLL_EVERY), polling_max_delay="0.5", callbacks_safety_net_seconds="5")
    database = database_for(str(data)).rsplit("/", 1)[1]

    def more_cpu() -> CpuPids:
        pids: CpuPids = {f"relay child {pid}": pid for pid in descendants(relay.pid)}
        pids.update({f"postgres {pid}": pid for pid in pg_backends(database)})
        return pids

    try:
        stats = run_loop(through_relay(base, relay.pid, sim_url, sim.pid, warmup, seconds,
                                       fanout=FANOUT if load == "fanout" else 0, more_cpu=more_cpu))
    finally:
        stop(relay)
        httpx.post(f"{sim_url}/_sim/reset").raise_for_status()
    return summarize(stats, processes, load, seconds)


def summarize(stats: dict[str, Any], processes: int, load: str, seconds: float) -> dict[str, Any]:
    """Rates and, per part (relay, PostgreSQL, simulator, bench), CPU seconds, cores and ms per task/delivery."""
    cpu: dict[str, float] = stats["cpu"]
    parts = {
        "relay": sum(v for k, v in cpu.items() if k.startswith("relay")),
        "postgres": sum(v for k, v in cpu.items() if k.startswith("postgres")),
        "simulator": cpu.get("simulator", 0.0),
        "bench": cpu.get("driver", 0.0),
    }
    tracked = sum(parts.values())
    window_stat = stats["cpu_stat"]
    machine = cpu_share(window_stat[0], window_stat[1], tracked) if len(window_stat) == 2 else {}
    cores = os.cpu_count() or 1
    # Each relay process's cores: the parent alone for 1 process, the children (the parent only supervises).
    per_process = sorted((v / seconds for k, v in cpu.items() if k.startswith("relay child")), reverse=True) \
        or [parts["relay"] / seconds]
    return {
        "processes": processes, "load": load, "tasks_per_s": stats["per_second"],
        "deliveries_per_s": stats["deliveries"] / seconds, "p50": stats["p50"], "p99": stats["p99"],
        "completed": stats["completed"], "deliveries": stats["deliveries"], "failures": stats["failures"],
        "timeouts": stats["timeouts"], "errors": stats["errors"], "cpu": parts,
        "cores": {name: used / seconds for name, used in parts.items()}, "per_process": per_process,
        "others": machine.get("others", 0.0), "busy": machine.get("busy", 0.0) * cores,
        "steal": machine.get("steal", 0.0), "postgres_backends": sum(k.startswith("postgres") for k in cpu),
    }


def measure(quick: bool) -> tuple[list[dict[str, Any]], float]:
    """Every load with 1 and 2 processes; the results and the window's length (s)."""
    warmup, seconds = (3.0, 10.0) if quick else (5.0, 20.0)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sim, sim_url = start_simulator(root, SIM_DURATION)
        try:
            for load in LOADS:
                for processes in PROCESSES:
                    results.append(one_run(root, sim, sim_url, processes, load, warmup, seconds))
                    print(json.dumps({k: v for k, v in results[-1].items() if k != "errors"}, default=str),
                          file=sys.stderr, flush=True)
        finally:
            stop(sim)
    return results, seconds


# ---- report -------------------------------------------------------------------------------------------
def _ms(used: float, count: float) -> str:
    return f"{used / count * 1000:.1f}" if count else "-"


def build_section(results: list[dict[str, Any]], seconds: float) -> Section:
    by = {(r["load"], r["processes"]): r for r in results}
    t1, t2 = by[("tasks", 1)], by[("tasks", 2)]
    f1, f2 = by[("fanout", 1)], by[("fanout", 2)]
    task_ratio = ratio(t2["tasks_per_s"], t1["tasks_per_s"])
    delivery_ratio = ratio(f2["deliveries_per_s"], f1["deliveries_per_s"])
    lines = [
        f"`relay serve --processes 1` vs `--processes 2` on PostgreSQL, each on a fresh database, against one "
        f"`relay simulate --duration {SIM_DURATION} --prerendered` (reset between runs). Two loads, each measured "
        f"over a {seconds:.0f} s window after warm-up: **tasks**, the closed loop of the throughput section "
        f"({IN_FLIGHT} tasks in flight, the five dialects in turn, latency = POST /v1/tasks → the subscriber "
        f"receives that task's `task.succeeded`); **fan-out**, the same loop with {FANOUT} more subscriptions on "
        "`task.*`, so each task's events are delivered to each (deliveries/s: every webhook the sink received "
        f"in the window). Each process has {WORKER_CONCURRENCY} worker slots; the sink and the driver run in "
        "the bench process.", "",
        "| load | processes | tasks/s | deliveries/s | p50 ms | p99 ms | failed / timed out |",
        "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['load']} | {r['processes']} | {r['tasks_per_s']:.1f} | {r['deliveries_per_s']:.0f} | "
                     f"{r['p50']:.0f} | {r['p99']:.0f} | {r['failures']} / {r['timeouts']} |")
    lines += ["", f"Ratio 2 processes / 1 process: tasks/s **{task_ratio or 0:.2f}**, deliveries/s (fan-out load) "
                  f"**{delivery_ratio or 0:.2f}** (aim ≥ 1.6).", "",
              "CPU over each window (from /proc/<pid>/stat): relay = the `relay serve` process and its children; "
              "PostgreSQL = the backends connected to that relay's database; bench = the driver and the sink; "
              "others = the rest of the machine (other work, PostgreSQL's background processes, the kernel). "
              "Per unit = per task for the tasks load, per delivery for the fan-out load.", "",
              "| load | processes | CPU ms per unit: relay | PostgreSQL | simulator | bench | all four | cores used: "
              "relay (per process) | PostgreSQL | simulator | bench | others | machine busy (of "
              f"{os.cpu_count()}) |",
              "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in results:
        count = r["completed"] if r["load"] == "tasks" else r["deliveries"]
        cpu, cores = r["cpu"], r["cores"]
        split = " + ".join(f"{c:.2f}" for c in r["per_process"])
        lines.append(
            f"| {r['load']} | {r['processes']} | {_ms(cpu['relay'], count)} | {_ms(cpu['postgres'], count)} | "
            f"{_ms(cpu['simulator'], count)} | {_ms(cpu['bench'], count)} | {_ms(sum(cpu.values()), count)} | "
            f"{cores['relay']:.2f}{f' ({split})' if r['processes'] > 1 else ''} | {cores['postgres']:.2f} | "
            f"{cores['simulator']:.2f} | {cores['bench']:.2f} | {r['others']:.2f} | {r['busy']:.2f} |")
    errors: dict[str, int] = {}
    for r in results:
        for name, n in r["errors"].items():
            errors[name] = errors.get(name, 0) + n
    if errors:
        lines += ["", "Errors seen: " + "; ".join(f"{k} ×{v}" for k, v in errors.items())]
    notes = analysis(t1, t2, f1, f2)
    figures = {"tasks_per_s_1": t1["tasks_per_s"], "tasks_per_s_2": t2["tasks_per_s"],
               "tasks_ratio": task_ratio or 0.0, "deliveries_per_s_1": f1["deliveries_per_s"],
               "deliveries_per_s_2": f2["deliveries_per_s"], "deliveries_ratio": delivery_ratio or 0.0,
               "relay_cpu_ms_per_task_1": t1["cpu"]["relay"] / max(1, t1["completed"]) * 1000,
               "relay_cpu_ms_per_task_2": t2["cpu"]["relay"] / max(1, t2["completed"]) * 1000,
               "others_cores_max": max(r["others"] for r in results),
               "failures": sum(r["failures"] + r["timeouts"] for r in results)}
    meaning = "2 processes / 1 (aim ≥ 1.6)"
    summary = [
        Figure(f"tasks/s end to end, 2 vs 1 process ({IN_FLIGHT} in flight)",
               f"{t2['tasks_per_s']:.1f} tasks/s, p50 {t2['p50']:.0f} ms",
               f"1 process: {t1['tasks_per_s']:.1f} tasks/s, p50 {t1['p50']:.0f} ms", task_ratio, meaning),
        Figure(f"deliveries/s, {FANOUT + 1} subscriptions, 2 vs 1 process",
               f"{f2['deliveries_per_s']:.0f} deliveries/s", f"1 process: {f1['deliveries_per_s']:.0f} deliveries/s",
               delivery_ratio, meaning),
    ]
    return Section("scaling", TITLE, "\n".join(lines), notes, figures, summary)


def analysis(t1: dict[str, Any], t2: dict[str, Any], f1: dict[str, Any], f2: dict[str, Any]) -> list[str]:
    """Where the cores went, from the CPU figures: why the ratio is what it is, and what it could be."""
    cores = os.cpu_count() or 1
    notes = []
    measured: list[float] = []
    for load, one, two, unit, units, key, rate in (
            ("Tasks", t1, t2, "task", "tasks", "completed", "tasks_per_s"),
            ("Fan-out", f1, f2, "delivery", "deliveries", "deliveries", "deliveries_per_s")):
        per1 = {name: used / max(1, one[key]) * 1000 for name, used in one["cpu"].items()}
        per2 = {name: used / max(1, two[key]) * 1000 for name, used in two["cpu"].items()}
        all1, all2 = sum(per1.values()), sum(per2.values())
        rate1, rate2 = one[rate], two[rate]
        if not (all1 and all2 and rate1 and per2["relay"]):
            continue
        free = max(0.0, cores - two["others"])
        now = free / all2 * 1000                       # what the cores others left could carry at that cost
        # A quiet machine: one process is one event loop (≤ 1 core of relay); everything shares the cores.
        quiet1 = min(1000 / per1["relay"], cores * 1000 / all1)
        quiet2 = min(2000 / per2["relay"], cores * 1000 / all2)
        measured.append(rate2 / rate1)
        notes.append(
            f"{load}: CPU ms per {unit}, 1 → 2 processes: relay {per1['relay']:.1f} → {per2['relay']:.1f}, "
            f"PostgreSQL {per1['postgres']:.1f} → {per2['postgres']:.1f}, simulator {per1['simulator']:.1f} → "
            f"{per2['simulator']:.1f}, bench {per1['bench']:.1f} → {per2['bench']:.1f}; all {all1:.1f} → "
            f"{all2:.1f} (relay's share {per2['relay'] / all2:.0%}). With 2 processes the machine was "
            f"{two['busy']:.2f} of {cores} cores busy{' (saturated)' if two['busy'] >= 0.9 * cores else ''}: relay "
            f"{two['cores']['relay']:.2f} ({' + '.join(f'{c:.2f}' for c in two['per_process'])}), PostgreSQL "
            f"{two['cores']['postgres']:.2f}, simulator {two['cores']['simulator']:.2f}, bench "
            f"{two['cores']['bench']:.2f}, others {two['others']:.2f} (1 process: relay {one['cores']['relay']:.2f}, "
            f"others {one['others']:.2f}). At {all2:.1f} ms per {unit} the {free:.2f} cores others left carry at "
            f"most {now:.0f} {units}/s, {now / rate1:.2f}× the 1-process rate (measured {rate2 / rate1:.2f}×). On "
            f"a quiet {cores}-core machine: 1 process ≤ min(1 core / relay's {per1['relay']:.1f} ms, {cores} cores "
            f"/ {all1:.1f} ms) = {quiet1:.0f}/s, 2 processes ≤ {quiet2:.0f}/s, a ratio of at most "
            f"{quiet2 / quiet1:.2f}. The relay-CPU-bound ratio (each relay process with a core of its own, "
            f"PostgreSQL, simulator and bench elsewhere): 2 × {per1['relay']:.1f} / {per2['relay']:.1f} = "
            f"{2 * per1['relay'] / per2['relay']:.2f}.")
    if measured and max(measured) < 1.6:
        notes.append(
            f"Why below 1.6 on {cores} cores: with 1 process, PostgreSQL, the simulator and the bench already take "
            "most of what relay's one event loop leaves of the cores, and a second relay process only competes "
            "with them (and with any other work on the machine) for the same cores. The ratio that carries to a "
            "bigger machine is the relay-CPU-bound one above: how relay's CPU per task or delivery grows with a "
            "second process (claims contending in PostgreSQL, LISTEN/NOTIFY wake-ups, the shared per-subscription "
            "cap), not the end-to-end rate on a machine the load generators share.")
    notes += [
        "The \"others\" column is the rest of the machine during the window: other work (see the run's \"other "
        "cores\"), PostgreSQL's background processes (WAL writer, checkpointer) and the kernel. PostgreSQL counts "
        "only the backends connected to the bench's database when the window opened.",
        "With 2 processes the parent only supervises; the kernel hands each new connection to whichever child "
        "accepts it, and both workers claim jobs from the same queue, so the per-process split shows how evenly "
        "the work spread.",
    ]
    return notes


@timed
def run(quick: bool) -> Section:
    forced = not postgres()             # several processes need PostgreSQL, whatever the run's --database
    database, prerendered = common.DATABASE, common.PRERENDERED
    use_database("postgresql")
    common.PRERENDERED = True
    try:
        section = build_section(*measure(quick))
    finally:
        use_database(database)
        common.PRERENDERED = prerendered
    if forced:                          # as @timed names the sections of a --database postgresql run
        section.title += " (PostgreSQL)"
        for figure in section.summary:
            figure.name += " (PostgreSQL)"
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter windows, a smoke run")
    add_database_argument(parser)       # accepted for symmetry; this section always runs on PostgreSQL
    args = parser.parse_args()
    use_database(args.database)
    section = run(args.quick)
    print(section.markdown())
    print(json.dumps(section.figures, indent=2))


if __name__ == "__main__":
    main()
