"""A probe for the relay processes the bench starts (their PYTHONPATH names this folder): counts relay's round
trips to PostgreSQL and writes the running total to $BENCH_ROUND_TRIPS_FILE ten times a second, and a tally by
statement (its first characters) to that file's name + ".statements" (JSON).

A round trip is one asyncpg call on a connection: a statement (execute, fetch, fetchrow, fetchval), a BEGIN or
a COMMIT (asyncpg sends each as a statement of its own), or one executemany (pipelined: one wait for all its
rows). Pool calls end in these. Timed figures of one run move by ±10 % on these machines; this count moves by
what the code sends, so it shows a change in the statements per task that the timing would hide. Without the
variable nothing is loaded (the interpreter looks for a sitecustomize module on every start).
"""

import importlib.util
import os

_OUT = os.environ.get("BENCH_ROUND_TRIPS_FILE")


STATEMENT_HEAD = 60     # characters of a statement that name it in the tally by statement


def _install(out: str) -> None:
    import functools
    import json
    import re
    import threading
    import time

    import asyncpg.connection

    literal = re.compile(r"'[^']*'")

    count = [0]
    by_statement: dict[str, int] = {}

    def counted(method):  # type: ignore[no-untyped-def]
        prefix = "executemany: " if method.__name__ == "executemany" else ""

        heads: dict[object, str] = {}      # statement → its name in the tally, made once per statement text
        shapes: dict[str, str] = {}        # the same by the text with its literals blanked

        @functools.wraps(method)
        async def call(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            count[0] += 1
            sql = args[0] if args else ""
            head = heads.get(sql)
            if head is None:
                # A literal (a row lock sent with BEGIN inlines its key: PostgresTx.lock) must not make every key
                # a statement of its own in the tally: it is named with its literals blanked.
                shape = literal.sub("'…'", str(sql))
                head = shapes.get(shape)
                if head is None:
                    head = shapes[shape] = prefix + " ".join(shape.split())[:STATEMENT_HEAD]
                if shape == sql:    # a text with a literal in it may be one of a kind (a task's id): not kept
                    heads[sql] = head
            by_statement[head] = by_statement.get(head, 0) + 1
            return await method(self, *args, **kwargs)
        return call

    for name in ("execute", "executemany", "fetch", "fetchrow", "fetchval"):
        setattr(asyncpg.connection.Connection, name, counted(getattr(asyncpg.connection.Connection, name)))

    def write() -> None:
        while True:
            try:
                with open(out + ".tmp", "w") as fh:
                    fh.write(str(count[0]))
                os.replace(out + ".tmp", out)
                with open(out + ".statements.tmp", "w") as fh:
                    json.dump(dict(by_statement), fh)
                os.replace(out + ".statements.tmp", out + ".statements")
            except OSError:
                pass        # tried again at the next tick; the bench reads whatever was written last
            time.sleep(0.1)

    threading.Thread(target=write, name="bench-round-trips", daemon=True).start()


def _chain() -> None:
    """Run the sitecustomize this one hides (the next on sys.path), as the interpreter would have."""
    import importlib.machinery
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.machinery.PathFinder.find_spec(
        "sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != here])
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


if _OUT:
    _install(_OUT)
_chain()
