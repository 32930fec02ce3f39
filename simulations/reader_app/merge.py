"""The coordinator's merge: the readers' exported reads become one checked reads file for the analysis.

Every problem is reported at once as ``file:line: column 'x': …`` (or ``file: …`` for a whole file) and
nothing is written while any remains: each case read exactly once per reader and round, case ids from
the key, both rounds complete, and the wash-out between a reader's round-1 completion and round-2 start
(from the session log the app saves beside each export; by the reader's browser clock, so a protocol
check, not a proof) at least ``washout_days``, unless the coordinator's unlock code opened round 2.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cldlr.common.errors import CldlrError
from cldlr.common.io import atomic_write_text
from cldlr.common.text import csv_text
from cldlr.simulations.reader_app.page import READER_ID
from cldlr.simulations.reader_packet import BIRADS4, CONFIDENCE_LEVELS, READ_COLUMNS

log = logging.getLogger(__name__)

MAX_ERRORS = 50
WASHOUT_POLICIES = ("error", "warn", "off")


class ReadsFileError(CldlrError):
    """A reads export, its log or the key is invalid; the message lists every problem found."""


@dataclass
class MergeResult:
    """What the merge wrote and found: the merged file, the readers, and the warnings (also logged)."""

    path: Path
    readers: list[str]
    cases: int
    warnings: list[str] = field(default_factory=list)
    washout: dict[str, str] = field(default_factory=dict)


def _bad(value: str, what: str) -> str:
    return f"{value!r} is {what}"


def _check_cell(column: str, value: str, cases: set[str]) -> str | None:
    """Why ``value`` is invalid for ``column`` (None when it is valid)."""
    if column == "reader":
        return None if READER_ID.match(value) else _bad(value, "not a reader id (letters, digits, '.', '_', '-')")
    if column == "round":
        return None if value in ("1", "2") else _bad(value, "not 1 (without AI) or 2 (with AI)")
    if column == "case":
        return None if value in cases else _bad(value, "an unknown case (not in the key)")
    if column == "malignant":
        return None if value in ("0", "1") else _bad(value, "not 0 (benign) or 1 (malignant)")
    if column == "birads4":
        return None if value.lower() in BIRADS4 else _bad(value, "not a BI-RADS 4 sub-category (4a, 4b or 4c)")
    if column == "likelihood":
        return None if value.isdigit() and int(value) <= 100 else _bad(value, "not an integer likelihood 0-100")
    if column == "confidence":
        return None if value in ("", *map(str, CONFIDENCE_LEVELS)) else _bad(value, "not empty or an integer 1-5")
    if column == "seconds":
        try:
            ok = value == "" or (math.isfinite(float(value)) and float(value) >= 0)
        except ValueError:
            ok = False
        return None if ok else _bad(value, "not a reading time in seconds (a number >= 0)")
    return None  # comment: free text


def read_key_cases(path: str | Path) -> set[str]:
    """The case ids of the packet's ``key.csv`` (column ``case``)."""
    path = Path(path)
    if not path.is_file():
        raise ReadsFileError(f"{path}: no such file (give the packet's key.csv)")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if "case" not in (reader.fieldnames or []):
            raise ReadsFileError(f"{path}:1: no column 'case'; is this the packet's key.csv?")
        cases = [(row["case"] or "").strip() for row in reader]
    if not cases or "" in cases or len(set(cases)) != len(cases):
        raise ReadsFileError(f"{path}: column 'case' must hold one non-empty, distinct id per row")
    return set(cases)


def _read_export(path: Path, cases: set[str], errors: list[str]) -> list[tuple[int, dict[str, str]]]:
    if not path.is_file():
        errors.append(f"{path}: no such file")
        return []
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in READ_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            errors.append(f"{path}:1: missing column(s) {', '.join(missing)}; expected {', '.join(READ_COLUMNS)}")
            return []
        rows = []
        for row in reader:
            if None in row:
                errors.append(f"{path}:{reader.line_num}: more cells than the header has columns")
                continue
            cells = {c: (row[c] or "").strip() for c in READ_COLUMNS}
            cells["comment"] = row["comment"] or ""
            problems = [(c, why) for c in READ_COLUMNS if (why := _check_cell(c, cells[c], cases))]
            errors += [f"{path}:{reader.line_num}: column '{c}': {why}" for c, why in problems]
            if not problems:
                cells["birads4"] = cells["birads4"].lower()
                rows.append((reader.line_num, cells))
    return rows


def _when(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(value)) if value else None
    except ValueError:
        return None


def check_washout(log_path: Path, reader: str, washout_days: float) -> tuple[str, list[str]]:
    """A one-line summary of the reader's rounds and the wash-out problems found in their session log."""
    try:
        data = json.loads(log_path.read_text(encoding="utf-8"))
        r1, r2 = data["rounds"]["1"], data["rounds"]["2"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return "", [f"{log_path}: not a reading-app session log ({exc})"]
    problems = [f"{log_path}: the log is reader {data.get('reader')!r}'s, the reads are {reader!r}'s"] \
        if data.get("reader") != reader else []
    created, done1, start2 = _when(data.get("packet_created")), _when(r1.get("completed")), _when(r2.get("started"))
    if done1 is None or start2 is None:
        return "", problems + [f"{log_path}: round 1 finished {r1.get('completed')!r}, round 2 started "
                               f"{r2.get('started')!r}: both times are needed to check the wash-out"]
    gap = (start2 - done1).total_seconds() / 86400
    how = str(r2.get("unlocked_by") or "washout")
    summary = (f"{reader}: round 1 finished {done1.isoformat()}, round 2 started {start2.isoformat()} "
               f"({gap:.1f} days later; opened by {how})")
    if gap < 0 or (created is not None and done1 < created):
        problems.append(f"{log_path}: the times are out of order (packet {created}, round 1 finished {done1}, "
                        f"round 2 started {start2}): the browser's clock was wrong or changed")
    elif gap < washout_days and how != "code":
        problems.append(f"{log_path}: reader {reader} started round 2 {gap:.1f} days after finishing round 1; "
                        f"the wash-out is {washout_days:g} days")
    back = sum(int(r.get("clock_set_back") or 0) for r in (r1, r2))
    if back:
        problems.append(f"{log_path}: the browser's clock was set back {back} time(s) while reading")
    return summary, problems


def _completeness(rows: dict[tuple[str, str, str], tuple[Path, int]], cases: set[str], readers: list[str]) -> list[str]:
    errors = []
    for reader in readers:
        for round_no in ("1", "2"):
            missing = sorted(c for c in cases if (reader, round_no, c) not in rows)
            if missing:
                more = f" … ({len(missing)} in all)" if len(missing) > 10 else ""
                errors.append(f"reader {reader}: round {round_no} lacks case(s) {', '.join(missing[:10])}{more}")
    return errors


def merge_reads(reads: Sequence[str | Path], key: str | Path, out: str | Path, *, washout_days: float = 28.0,
                washout: str = "error", force: bool = False) -> MergeResult:
    """Check every export against the key (and its session log), then write the merged reads file atomically."""
    if washout not in WASHOUT_POLICIES:
        raise CldlrError(f"--washout {washout!r}: choose one of {', '.join(WASHOUT_POLICIES)}")
    if not reads:
        raise CldlrError("give at least one reads file (the readers' exported reads_*.csv)")
    if Path(out).exists() and not force:
        raise CldlrError(f"{out} exists; choose another --out or pass --force to replace it")
    cases = read_key_cases(key)
    errors: list[str] = []
    warnings: list[str] = []
    seen: dict[tuple[str, str, str], tuple[Path, int]] = {}
    merged: list[list[str]] = []
    readers: list[str] = []
    washout_lines: dict[str, str] = {}
    for path in map(Path, reads):
        rows = _read_export(path, cases, errors)
        in_file = sorted({cells["reader"] for _, cells in rows})
        if len(in_file) > 1:
            warnings.append(f"{path}: holds reads of several readers ({', '.join(in_file)}); the wash-out is not checked")
        for line, cells in rows:
            k = (cells["reader"], cells["round"], cells["case"])
            if k in seen:
                first, first_line = seen[k]
                errors.append(f"{path}:{line}: columns 'reader, round, case': reader {k[0]} read case {k[2]} in round "
                              f"{k[1]} twice (first at {first}:{first_line})")
                continue
            seen[k] = (path, line)
            merged.append([cells[c] for c in READ_COLUMNS])
        readers += [r for r in in_file if r not in readers]
        if len(in_file) == 1 and washout != "off":
            log_path = path.with_name(path.name.removesuffix(".csv") + ".log.json")
            if not log_path.is_file():
                warnings.append(f"{path}: no session log {log_path.name} beside it; the wash-out cannot be checked "
                                "(a browser renames a repeated download: give the pair matching names)")
            else:
                summary, problems = check_washout(log_path, in_file[0], washout_days)
                washout_lines[in_file[0]] = summary
                (errors if washout == "error" else warnings).extend(problems)
    errors += _completeness(seen, cases, readers) if merged else ["no reads in the given file(s)"]
    if errors:
        more = f"\n… and {len(errors) - MAX_ERRORS} more" if len(errors) > MAX_ERRORS else ""
        raise ReadsFileError(f"{len(errors)} problem(s) in the reads; nothing was written:\n"
                             + "\n".join(errors[:MAX_ERRORS]) + more)
    for message in warnings:
        log.warning("%s", message)
    merged.sort(key=lambda row: (row[0], int(row[1]), row[2]))
    atomic_write_text(out, csv_text(READ_COLUMNS, merged))
    log.info("merged %d reads of %d reader(s) on %d cases into %s", len(merged), len(readers), len(cases), out)
    return MergeResult(Path(out), readers, len(cases), warnings, washout_lines)


__all__ = ["WASHOUT_POLICIES", "MergeResult", "ReadsFileError", "check_washout", "merge_reads", "read_key_cases"]
