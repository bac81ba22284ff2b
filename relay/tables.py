"""Terminal tables that stay readable when narrow: ids are never wrapped, the least useful columns go first.

rich's own fitting squeezes every column evenly once a table is too wide, which
folds a 30-character id over several lines and cuts `succeeded` to `succ…`.
Here the widths are decided before rich sees the table, in this order of
sacrifice: free text is cut with an ellipsis; secondary ids are shortened in
the middle (`sub_01…QZ7K9A`, ends kept: the random tail tells ids apart);
optional columns are dropped, highest `drop` first; as a last resort the
primary ids are shortened too. Every cell is then one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from rich.cells import cell_len
from rich.table import Table
from rich.text import Text

Cell = str | Text
Kind = Literal["id", "ref", "key", "text"]

# Colours of task and delivery statuses, and of subscription states, wherever the CLI shows them.
STATUS_STYLES = {"succeeded": "green", "failed": "red", "canceled": "yellow", "active": "green",
                 "failing": "yellow", "disabled": "red"}
REF_WIDTH = 14          # a shortened secondary id: sub_01…QZ7K9A
ID_MIN_WIDTH = 14
TEXT_MIN_WIDTH = 8


@dataclass(frozen=True)
class Column:
    """How a column may give way. kind: id (the row's own id, kept whole while anything else can give),
    ref (another object's id: shortened in the middle first), key (short values: never cut), text (cut)."""

    header: str
    kind: Kind = "key"
    drop: int = 0           # 0: always shown; otherwise dropped when narrow, highest first
    justify: Literal["left", "right"] = "left"
    min_width: int = TEXT_MIN_WIDTH     # text: cut no shorter than this before columns are dropped
    middle: bool = False                # text: cut in the middle (URLs: host and path end both stay)


def styled(status: str, text: str | None = None) -> Text:
    """`text` (default: the status itself) in the colour of `status`."""
    return Text(text if text is not None else status, style=STATUS_STYLES.get(status, "cyan"))


def shorten_middle(value: str, width: int) -> str:
    """`value` in at most `width` cells, an ellipsis in the middle (its start and its end survive)."""
    if len(value) <= width:
        return value
    if width <= 1:
        return "…"[:width]
    keep = width - 1
    # An id (tsk_…) keeps its prefix and two characters of time; its random tail is what tells ids apart.
    head = min(6, keep // 2) if value[3:4] == "_" and value[:3].isalpha() else (keep + 1) // 2
    return value[:head] + "…" + value[len(value) - (keep - head):]


def _overhead(count: int) -> int:
    """Borders and padding of a default rich table: one space each side of a cell, one rule between cells."""
    return 3 * count + 1


def _plain(cell: Cell) -> str:
    return cell.plain if isinstance(cell, Text) else cell


def fit_table(title: str | None, columns: Sequence[Column], rows: Sequence[Sequence[Cell]], width: int) -> Table:
    """A rich Table of `rows` no wider than `width` (when anything can make it so), one line per row."""
    natural = [max([cell_len(c.header)] + [cell_len(_plain(r[i])) for r in rows]) for i, c in enumerate(columns)]
    shown = list(range(len(columns)))
    # The width each column is held to; stages below lower these until the table fits.
    widths = list(natural)

    def total() -> int:
        return sum(widths[i] for i in shown) + _overhead(len(shown))

    def lower(kind: Kind) -> None:
        for i in shown:
            if columns[i].kind == kind:
                floor = REF_WIDTH if kind == "ref" else columns[i].min_width
                widths[i] = min(widths[i], max(floor, cell_len(columns[i].header)))

    lower("text")
    if total() > width:
        lower("ref")
    for i in sorted((i for i in shown if columns[i].drop), key=lambda i: -columns[i].drop):
        if total() <= width:
            break
        shown.remove(i)
    if total() > width:
        ids = [i for i in shown if columns[i].kind == "id"]
        excess = total() - width
        for i in ids:
            cut = min(excess, widths[i] - ID_MIN_WIDTH)
            if cut > 0:
                widths[i] -= cut
                excess -= cut
    # Room left over goes back to free text (up to its natural width), a cell at a time to each in turn.
    spare = width - total()
    growing = [i for i in shown if columns[i].kind == "text" and widths[i] < natural[i]]
    while spare > 0 and growing:
        for i in list(growing):
            if spare == 0:
                break
            widths[i] += 1
            spare -= 1
            if widths[i] >= natural[i]:
                growing.remove(i)

    table = Table(title=title)
    for i in shown:
        table.add_column(columns[i].header, width=widths[i], no_wrap=True, overflow="ellipsis",
                         justify=columns[i].justify)
    for row in rows:
        table.add_row(*(_cell(row[i], columns[i], widths[i]) for i in shown))
    return table


def _cell(value: Cell, column: Column, width: int) -> Text:
    # Text, never markup: an error message holding "[…]" must print as it came.
    text = value if isinstance(value, Text) else Text(value)
    if (column.kind in ("id", "ref") or column.middle) and cell_len(text.plain) > width:
        return Text(shorten_middle(text.plain, width), style=text.style)
    return text
