"""Every relay benchmark in one run, each figure set against a baseline measured in the same run.

    python -m bench                  # the full run (6-11 min on 2 cores); writes docs/benchmarks.md, keeping its notes
    python -m bench --quick          # smaller sizes (about 1.5 min), a smoke run; prints, writes nothing
    python -m bench --only claims,memory [--write docs/benchmarks.md]
    python -m bench --database postgresql  # every section that starts relay runs on PostgreSQL

Sections (each also runs alone as `python -m bench.<name>`):
    callbacks   callback acknowledgement vs a bare Starlette 200 endpoint (wrk)
    throughput  tasks/s submit → subscriber receipt of task.succeeded vs a plain httpx loop on the simulator
    fanout      deliveries/s with 1/10/100 subscriptions vs plain httpx POSTs to the same sink
    archive     archive jobs (images/s, MB/s) vs a plain httpx download of the same URLs
    claims      job-claim latency with 10k vs 1M jobs rows
    history     a submit's, an API read's and a scrape's store operations with 2k vs 200k finished tasks stored
    reads       reading a task whose images wait inline (OpenAI's base64) vs one whose images are archived
    queue       no-op job throughput of relay's queue vs PgQueuer on PostgreSQL (and relay on SQLite)
    memory      RSS of relay serve, empty vs 100k stored tasks after reads
    chaos       tests/chaos at a large size (skipped with --quick)
    retention   API p99 while the housekeeping job sweeps 100k old tasks vs the same API idle
    scaling     tasks/s and deliveries/s with `relay serve --processes 2` vs 1 (always PostgreSQL, pre-rendered)

--database sqlite|postgresql (default sqlite): the store every relay of the run uses. On PostgreSQL
(the server of RELAY_BENCH_POSTGRES, else postgresql://postgres@127.0.0.1:5432/postgres) each relay
gets a fresh database, dropped when its section ends; section titles and figure names then say
"(PostgreSQL)". The queue section measures both backends and PgQueuer whichever is chosen.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench import (archive, callbacks, chaos, claims, common, fanout, history, memory, queue, reads, retention,
                   scaling, throughput)
from bench.common import (DATABASES, Section, add_database_argument, backend_label, machine, pg_version,
                          keeping_notes, use_database, write_section)

SECTIONS: dict[str, Callable[[bool], Section]] = {
    "callbacks": callbacks.run, "throughput": throughput.run, "fanout": fanout.run, "archive": archive.run,
    "claims": claims.run, "history": history.run, "reads": reads.run, "queue": queue.run, "memory": memory.run,
    "chaos": chaos.run,
    "retention": retention.run, "scaling": scaling.run,
}
DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"

OVERALL_NOTES = [
    "Ratios, not absolute numbers, are what carry to another machine: each baseline ran minutes apart "
    "from its figure on the same machine, under the same load from the rest of the bench.",
    "The machine has 2 cores shared by relay, the simulator, the subscriber sink and the bench driver, so "
    "most figures are CPU-bound and include the competition for those cores. Between quiet runs the "
    "figures moved by about ±10 % (end-to-end throughput up to ±20 %); with other work on the machine "
    "(the \"other cores\" above) much more, which is why every figure has its baseline from the same run.",
    "Where a ratio is far below 1, the section's notes say where the time goes; profiles were taken with "
    "py-spy (in the venv): `py-spy record -p <pid> --format raw -o out.txt` against the relay process "
    "during a run.",
]


def databases() -> str:
    """The database versions at hand: SQLite, and PostgreSQL when its server answers (the queue section and
    --database postgresql use it)."""
    found = f"SQLite {sqlite3.sqlite_version}"
    try:
        found += f", PostgreSQL {pg_version()}"
    except Exception:  # noqa: BLE001 - no server: the sections that need one say so themselves
        pass
    return found


def document(sections: list[Section], total: float, command: str) -> str:
    lines = ["# Benchmarks", "",
             f"Measured {time.strftime('%Y-%m-%d')} on {machine()}, {databases()}, relay on "
             f"{backend_label()}, from the repository root with", "",
             f"    .venv/bin/{command}", "",
             f"(total {total / 60:.1f} min; `python -m bench --quick` is a smoke run with smaller sizes, about "
             "1.5 min, whose figures are not kept here). Every figure is set against a baseline measured in the "
             "same run on the same machine. Each section also runs alone: `python -m bench.callbacks`, "
             "`bench.throughput`, `bench.fanout`, `bench.archive`, `bench.claims`, `bench.history`, `bench.reads`, "
             "`bench.queue`, "
             "`bench.memory`, "
             "`bench.chaos`, `bench.scaling`, `bench.retention`; `--database postgresql` runs them on PostgreSQL, `--prerendered` "
             "with pre-rendered simulator images (the PgQueuer baseline needs the `bench` extra: `pip install -e '.[bench]'`).",
             "", "## Summary", "",
             "| figure | relay | baseline (same run) | ratio | ratio is |", "|---|---|---|---:|---|"]
    for section in sections:
        for f in section.summary:
            shown = "-" if f.ratio is None else f"{f.ratio:.2f}"
            lines.append(f"| {f.name} | {f.value} | {f.baseline} | {shown} | {f.meaning} |")
    timed_sections = [s for s in sections if s.seconds >= 1]
    lines += ["", "Time per section (how busy the cores were meanwhile; cores used on average by processes "
              "other than the bench's, which should be near 0 for figures to be trusted (kernel writeback of the "
              "bench's own large files counts there too); CPU stolen by the hypervisor): " + ", ".join(
                  f"{s.key} {s.seconds:.0f} s ({s.cpu.get('busy', 0):.0%} busy, {s.cpu.get('others', 0):.2f} other "
                  f"cores, {s.cpu.get('steal', 0):.0%} steal)" for s in timed_sections) + ".", "",
              "Reading the numbers, overall:", ""] + [f"- {note}" for note in OVERALL_NOTES] + [""]
    return "\n".join(lines) + "\n" + "\n".join(section.markdown() for section in sections)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, a smoke run (about 1.5 min)")
    parser.add_argument("--only", default="", help=f"comma list of sections: {', '.join(SECTIONS)}")
    parser.add_argument("--write", type=Path, default=None,
                        help="write the report here (default: docs/benchmarks.md for a full run of every section); "
                             "with --only, replace just those sections in the file")
    parser.add_argument("--no-write", action="store_true", help="print only")
    add_database_argument(parser)
    parser.add_argument("--prerendered", action="store_true",
                        help="simulators serve pre-rendered images (relay simulate --prerendered): end-to-end "
                             "sections then measure relay rather than the simulator's Pillow drawing")
    args = parser.parse_args()
    use_database(args.database)
    common.PRERENDERED = args.prerendered
    chosen = [name.strip() for name in args.only.split(",") if name.strip()] or list(SECTIONS)
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    target = args.write
    # The run the file's summary is from: every section, on SQLite, drawing simulator.
    whole = chosen == list(SECTIONS) and args.database == DATABASES[0] and not args.prerendered
    if target is None and not args.quick and not args.no_write and chosen == list(SECTIONS):
        target = DOC
    if args.no_write:
        target = None

    started = time.monotonic()
    sections: list[Section] = []
    for name in chosen:
        print(f"bench: {name} … ({time.monotonic() - started:.0f} s so far)", file=sys.stderr, flush=True)
        began = time.monotonic()
        try:
            section = SECTIONS[name](args.quick)
        except Exception:  # noqa: BLE001 - one broken section must not lose the others' figures
            section = Section(name, name, "This section failed:\n\n```\n" + traceback.format_exc() + "```")
            section.seconds = time.monotonic() - began
        print(f"bench: {name} done in {section.seconds:.0f} s (other processes used "
              f"{section.cpu.get('others', 0):.2f} cores meanwhile): "
              + ", ".join(f"{k}={v:.3g}" for k, v in section.figures.items()), file=sys.stderr, flush=True)
        sections.append(section)
    total = time.monotonic() - started
    command = ("python -m bench" + (" --quick" if args.quick else "") + (f" --only {args.only}" if args.only else "")
               + (f" --database {args.database}" if args.database != DATABASES[0] else "")
               + (" --prerendered" if args.prerendered else ""))
    text = document(sections, total, command)
    print(text)
    print(f"bench: total {total:.0f} s", file=sys.stderr)
    if target is not None and not whole:
        # Part of a run, or a run on PostgreSQL: its sections are added (or replace those of an earlier such run
        # of the same day and database) under a title that says so; the rest of the file, the last full run on
        # SQLite with its summary, is kept as it was.
        day = time.strftime("%Y-%m-%d")
        kind = "partial run" if chosen != list(SECTIONS) else "full run"
        for section in sections:
            section.title += f" — {kind} {day}"
            section.body = (f"From a {kind} on {day}: `.venv/bin/{command}` on {machine()}, {databases()} "
                            f"({section.seconds:.0f} s; other processes used {section.cpu.get('others', 0):.2f} "
                            "cores meanwhile). Its figures are not in the summary table above, which is the last "
                            "full run's.\n\n" + section.body)
            write_section(target, section.title, section.markdown())
        print(f"bench: replaced {', '.join(chosen)} in {target} (its summary table is from the last full run)",
              file=sys.stderr)
    elif target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(keeping_notes(target.read_text() if target.exists() else "", text))
        print(f"bench: wrote {target} (its other sections kept after the run's)", file=sys.stderr)


if __name__ == "__main__":
    main()
