"""The benchmark report's file: a full run replaces its own sections and keeps the notes written between runs."""

from __future__ import annotations

from bench.common import keeping_notes, sections_of

OLD = """# Benchmarks

Measured yesterday.

## Summary

| figure | old |

## Performance per process, first round

What was tried, and why it was kept.

## Callback acknowledgement

old figures

## Job claims (PostgreSQL) — partial run 2026-11-30

a partial run
"""

NEW = """# Benchmarks

Measured today.

## Summary

| figure | new |

## Callback acknowledgement

new figures
"""


def test_a_full_run_keeps_the_sections_it_does_not_replace() -> None:
    doc = keeping_notes(OLD, NEW)
    assert [title for title, _ in sections_of(doc)] == [
        "Summary", "Callback acknowledgement", "Performance per process, first round",
        "Job claims (PostgreSQL) — partial run 2026-11-30"]
    assert doc.startswith("# Benchmarks\n\nMeasured today.\n")
    assert "new figures" in doc and "| figure | new |" in doc
    assert "old figures" not in doc and "| figure | old |" not in doc and "Measured yesterday" not in doc
    assert "What was tried, and why it was kept." in doc and "a partial run" in doc


def test_a_first_run_writes_its_report_alone() -> None:
    assert keeping_notes("", NEW) == NEW


def test_a_section_of_the_last_full_run_is_replaced_whatever_its_title_now() -> None:
    """A section that failed is titled by its key; the last full run's section of that key goes all the same, its
    partial runs stay."""
    old = ("# Benchmarks\n\n## Summary\n\nold\n\n## Job claims\n<!-- bench section: claims -->\n\nold claims\n\n"
           "## Job claims (PostgreSQL) — partial run 2026-11-30\n<!-- bench section: claims -->\n\npg claims\n\n"
           "## A round of work\n\nnotes\n")
    new = "# Benchmarks\n\n## Summary\n\nnew\n\n## claims\n<!-- bench section: claims -->\n\nThis section failed\n"
    doc = keeping_notes(old, new)
    assert [title for title, _ in sections_of(doc)] == [
        "Summary", "claims", "Job claims (PostgreSQL) — partial run 2026-11-30", "A round of work"]
    assert "old claims" not in doc and "pg claims" in doc and "notes" in doc
