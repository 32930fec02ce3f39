"""Renaming a site's columns to the schema's names on read (``--map SITE_COLUMN=SCHEMA_NAME``).

An external hospital's ``clinical.csv`` often calls a parameter otherwise (``Age`` for ``age``,
``pathology`` for ``label``). The mapping renames columns in the table read from disk, so the
site folder is never copied or edited; validation and the site reader apply the same mapping,
and every problem is then named by the schema's column (with the site's own name beside it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

from cldlr.common.errors import CldlrError


class ColumnMapError(CldlrError):
    """A ``--map`` entry is malformed, names a column the site lacks, or would collide with another."""


def parse_column_map(items: Sequence[str]) -> dict[str, str]:
    """``["Age=age", "pathology=label"]`` → ``{"Age": "age", "pathology": "label"}`` (site column → schema name)."""
    mapping: dict[str, str] = {}
    targets: dict[str, str] = {}
    for item in items:
        source, sep, target = item.partition("=")
        source, target = source.strip(), target.strip()
        if not sep or not source or not target:
            raise ColumnMapError(f"--map {item!r}: expected SITE_COLUMN=SCHEMA_NAME, e.g. --map Age=age")
        if source in mapping:
            raise ColumnMapError(f"--map {source} is given twice ({mapping[source]!r} and {target!r})")
        if target in targets:
            raise ColumnMapError(f"--map: both {targets[target]!r} and {source!r} map to {target!r}; keep one")
        mapping[source], targets[target] = target, source
    return mapping


def apply_column_map(table: pd.DataFrame, mapping: Mapping[str, str] | None, where: str = "clinical.csv") -> pd.DataFrame:
    """``table`` with its columns renamed by ``mapping``; a missing source or a collision is an error naming both."""
    if not mapping:
        return table
    missing = [source for source in mapping if source not in table.columns]
    if missing:
        raise ColumnMapError(f"{where}: --map names column(s) {', '.join(map(repr, missing))} that the header lacks "
                             f"(it has: {', '.join(map(str, table.columns))}); spell them as in the header")
    kept = set(table.columns) - set(mapping)
    clash = [target for target in mapping.values() if target in kept]
    if clash:
        raise ColumnMapError(f"{where}: --map renames onto {', '.join(map(repr, clash))}, which the header already "
                             "has; map that column away too, or drop this --map")
    return table.rename(columns=dict(mapping))


__all__ = ["ColumnMapError", "apply_column_map", "parse_column_map"]
