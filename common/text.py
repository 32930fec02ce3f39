"""Text that leaves the project: CSV cells a spreadsheet will not execute, Markdown that renders names literally.

Ids, site names and reader names come from files a site (or an attacker) controls. A CSV cell such as
``=HYPERLINK("x","click")`` is a formula when a clinician opens the file in a spreadsheet (OWASP "CSV
injection"), and ``|`` or ``*`` in a name changes a Markdown table. Every CSV and Markdown file the project
writes goes through these functions, so the defence lives in one place.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

#: First characters that make a spreadsheet treat a cell as a formula (or split it, for tab and CR).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>$~])")


def spreadsheet_cell(value: Any) -> str:
    """One CSV cell as text, with a leading ``'`` on any non-numeric text a spreadsheet would run as a formula.

    Plain numbers (``-1.5``, ``+3e-2``) are left alone so numeric columns stay numeric; ``None`` and NaN
    become an empty cell.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = str(value)
    if text.startswith(FORMULA_START) and not _NUMBER.match(text):
        return "'" + text
    return text


def csv_text(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A whole CSV document (header + rows, newline line ends) with every cell through :func:`spreadsheet_cell`."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([spreadsheet_cell(c) for c in columns])
    for row in rows:
        writer.writerow([spreadsheet_cell(v) for v in row])
    return buffer.getvalue()


def markdown_text(value: Any) -> str:
    """A name or id as literal Markdown: special characters backslash-escaped, line breaks flattened."""
    text = " ".join(str(value).split())
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)
