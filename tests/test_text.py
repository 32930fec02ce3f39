"""Spreadsheet-safe CSV cells and literal Markdown names."""

from __future__ import annotations

import csv
import io

import pytest

from cldlr.common.text import csv_text, markdown_text, spreadsheet_cell


@pytest.mark.parametrize("cell", ['=HYPERLINK("x","click")', "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx", "=1"])
def test_formula_cells_are_neutralised(cell: str) -> None:
    assert spreadsheet_cell(cell) == "'" + cell


@pytest.mark.parametrize("cell", ["-1.5", "+3e-2", "0.25", "abc", "a=b", ""])
def test_numbers_and_plain_text_are_kept(cell: str) -> None:
    assert spreadsheet_cell(cell) == cell


def test_csv_text_round_trips_and_neutralises() -> None:
    text = csv_text(["id", "score"], [['=HYPERLINK("x","click")', -0.5], ["a,b", None]])
    rows = list(csv.reader(io.StringIO(text)))
    assert rows == [["id", "score"], ['\'=HYPERLINK("x","click")', "-0.5"], ["a,b", ""]]


def test_markdown_names_render_literally() -> None:
    assert markdown_text("a|b*c_\n$x$") == r"a\|b\*c\_ \$x\$"
