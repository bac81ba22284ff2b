"""relay.tables: tables fitted to a width, rendered by rich as a terminal of that width would show them."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from relay.tables import Column, fit_table, shorten_middle, styled

TASK_ID = "tsk_01KB4Z9X0Q8Y7W6V5T4S3R2P1N"
SUB_ID = "sub_01KB4Z9X0Q8Y7W6V5T4S3R2P1A"
COLUMNS = (Column("id", "id"), Column("status"), Column("subscription", "ref", drop=3),
           Column("age", drop=2), Column("error", "text", drop=1))
ROW = [TASK_ID, styled("succeeded"), SUB_ID, "12m", "connection_error: ConnectError: [Errno 111] Connection refused"]


def render(width: int) -> list[str]:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(fit_table("t", COLUMNS, [ROW], width))
    return out.getvalue().splitlines()


@pytest.mark.parametrize("width", [200, 100, 80, 60, 50])
def test_the_row_stays_one_line_with_its_id_and_status_whole(width: int) -> None:
    """From 200 down to 50 columns: no line wider than the terminal, the id and `succeeded` whole on one line."""
    lines = render(width)
    assert all(len(line) <= width for line in lines), "\n".join(lines)
    [row] = [line for line in lines if TASK_ID in line]
    assert "succeeded" in row


def test_columns_give_way_in_order() -> None:
    """Wide: everything whole. Narrower: text is cut, the secondary id shortened in the middle, then columns drop."""
    wide = "\n".join(render(200))
    assert SUB_ID in wide and "[Errno 111] Connection refused" in wide
    narrow = "\n".join(render(80))
    assert SUB_ID not in narrow and shorten_middle(SUB_ID, 14) in narrow and "connect…" in narrow
    narrower = "\n".join(render(60))
    assert "subscription" not in narrower and "age" not in narrower and "connection" in narrower
    assert "error" not in "\n".join(render(50))


def test_shorten_middle_keeps_the_prefix_and_the_tail() -> None:
    """An id keeps `sub_01` and its random tail; other text keeps both ends evenly; short values stay."""
    assert shorten_middle(SUB_ID, 14) == "sub_01…S3R2P1A"
    assert shorten_middle("http://127.0.0.1:8080/hooks/a", 15) == "http://…hooks/a"
    assert shorten_middle("short", 14) == "short"


def test_cells_are_text_not_markup() -> None:
    """A cell holding `[bold]` prints as written (an error message is never rich markup)."""
    out = io.StringIO()
    Console(file=out, width=80, color_system=None).print(
        fit_table(None, (Column("error", "text"),), [["[bold]HTTP 503[/bold]"]], 80))
    assert "[bold]HTTP 503[/bold]" in out.getvalue()
