"""Hostile file names: escaped in the HTML pages, control characters neutralised in the terminal."""

from __future__ import annotations

from cbir_lib.query import Hit, render_html

EVIL = '"><script>alert(1)</script><img src=x onerror=alert(2)>\x1b[2J.jpg'


def test_the_query_page_escapes_every_name(tmp_path):
    page = render_html(str(tmp_path / EVIL), [Hit(1, 7, 0.9, str(tmp_path / EVIL))], {"model": EVIL, "index_run_id": "<b>i1</b>"})
    assert "<script>" not in page and "<img src=x" not in page
    assert "&lt;script&gt;" in page and "&lt;b&gt;i1&lt;/b&gt;" in page


def test_the_terminal_output_shows_control_characters_escaped():
    from jobs.query import printable

    assert printable(EVIL).endswith("\\x1b[2J.jpg") and "\x1b" not in printable(EVIL)
    assert printable("s3a://bucket/été 01.jpg") == "s3a://bucket/été 01.jpg"


def test_the_report_cells_escape_captions():
    from cbir_lib.evaluate.report import cell

    html = cell(None, EVIL)
    assert "<script>" not in html and "&lt;script&gt;" in html
