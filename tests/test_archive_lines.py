"""`relay archive FILE`: how a line of the file is read (relay.cli_archive.parse_line)."""

from __future__ import annotations

from typing import Any

from relay.cli_archive import parse_line, read_items


def body(line: str) -> dict[str, Any]:
    item = parse_line(1, line)
    assert item is not None and item.problem is None, item
    return item.body


def test_a_plain_link_keeps_its_commas_and_only_a_trailing_time_is_its_expiry() -> None:
    cloudinary = "https://res.cloudinary.com/demo/image/upload/w_100,h_100,c_fill/sample.png"
    assert body(cloudinary) == {"url": cloudinary}
    sized = "https://cdn.example/a.png?size=1,2"
    assert body(f"{sized},2026-11-29T10:00:00Z") == {"url": sized, "expires_at": "2026-11-29T10:00:00Z"}
    assert body(f"{sized} , 2026-11-29T10:00:00+01:00 ") == {"url": sized, "expires_at": "2026-11-29T10:00:00+01:00"}
    assert body("https://cdn.example/a.png,2026-11-29T10:00:00Z") == {
        "url": "https://cdn.example/a.png", "expires_at": "2026-11-29T10:00:00Z"}


def test_quoted_csv_provider_lines_json_lines_and_headers_read_as_before() -> None:
    items = read_items(['provider,provider_task_id', 'evolink,task-unified-1',
                        '"https://cdn.example/a,b.png",2026-11-29T10:00:00Z',
                        '{"url": "https://cdn.example/c.png", "metadata": {"k": "v"}}', '# a comment', '',
                        'not a link'])
    assert [(i.line, i.path, i.body, i.problem) for i in items] == [
        (2, "/v1/tasks", {"provider": "evolink", "provider_task_id": "task-unified-1"}, None),
        (3, "/v1/archives", {"url": "https://cdn.example/a,b.png", "expires_at": "2026-11-29T10:00:00Z"}, None),
        (4, "/v1/archives", {"url": "https://cdn.example/c.png", "metadata": {"k": "v"}}, None),
        (7, "", {}, "expected a URL, `provider,provider_task_id`, or a JSON object")]


def test_with_wait_a_line_not_finished_by_the_timeout_is_not_a_success() -> None:
    """`relay archive --wait` exits 0 only when every line is done: one still archiving when --timeout ran out is
    exit 1 (it was 0, the summary's "still in progress" aside)."""
    import io

    from rich.console import Console

    from relay.cli_archive import Item, report
    done = [Item(line=1, text="https://a/1.png", path="/v1/archives", id="arc_1", status="succeeded")]
    pending = [*done, Item(line=2, text="https://a/2.png", path="/v1/archives", id="arc_2", status="archiving")]
    quiet = Console(file=io.StringIO(), width=100)
    assert report(quiet, done, waited=True) == 0
    assert report(quiet, pending, waited=True) == 1
    assert report(quiet, pending, waited=False) == 0      # without --wait, accepted is done


def test_an_expiry_meant_but_malformed_is_a_problem_not_part_of_the_link() -> None:
    assert body('https://cdn.example/a.png,"2026-11-29T10:00:00Z"') == {
        "url": "https://cdn.example/a.png", "expires_at": "2026-11-29T10:00:00Z"}
    item = parse_line(3, "https://cdn.example/a.png,2026-13-01T10:00:00Z")
    assert item is not None and item.problem and "2026-13-01T10:00:00Z" in item.problem and not item.body


def test_dates_inside_a_links_query_stay_part_of_the_link() -> None:
    link = "https://cdn.example/r.png?range=2026-01-01,2026-01-31&sig=abc"
    assert body(link) == {"url": link}
    assert body("https://cdn.example/r.png?d=2026-01-01,2026-01-31") == {
        "url": "https://cdn.example/r.png?d=2026-01-01,2026-01-31"}
