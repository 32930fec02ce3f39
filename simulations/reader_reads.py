"""The reader study's input files, validated row by row: the truth key, the model's scores and the reads.

Every problem is reported at once as ``file:line: column 'x': …`` and nothing is computed or
written while one remains. The reads file comes in two formats:

- the reading app's (``READ_COLUMNS``): a forced malignant 0/1 decision, the BI-RADS 4
  sub-category, a 0-100 likelihood of malignancy (the MRMC figure of merit's score), an optional
  legacy 1-5 confidence, the reading time in seconds (may be empty) and a free-text comment;
- the earlier hand-filled template (``LEGACY_READ_COLUMNS``): malignant 0/1 and a 1-5 confidence,
  which is then the score.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from cldlr.common.data.contract import parse_label
from cldlr.common.errors import CldlrError
from cldlr.simulations.reader_packet import CONFIDENCE_LEVELS, READ_COLUMNS

MAX_ERRORS = 50
#: The columns of reads files written before the reading app (confidence is then the ROC score).
LEGACY_READ_COLUMNS = ("reader", "round", "case", "malignant", "confidence")
#: Columns that only the reading app's format has; one of them in the header selects that format.
NEW_ONLY = ("birads4", "likelihood", "seconds", "comment")
#: Required in the reading app's format (confidence, seconds and comment may be left empty or absent).
REQUIRED = ("reader", "round", "case", "malignant", "birads4", "likelihood")
BIRADS4 = ("4a", "4b", "4c")


class ReadsError(CldlrError):
    """A reads, truth or model-score file has invalid rows; the message lists each one."""


def read_rows(path: Path, required: tuple[str, ...] | Callable[[list[str]], tuple[str, ...]]
              ) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The header and (line number, stripped cells) per data row; a missing column or a ragged row is an error.
    ``required`` may depend on the header (the reads file's two formats).
    """
    if not path.is_file():
        raise ReadsError(f"{path}: no such file")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = list(reader.fieldnames or [])
        required = required(header) if callable(required) else required
        missing = [c for c in required if c not in header]
        if missing:
            raise ReadsError(f"{path}:1: missing column(s) {', '.join(missing)}; expected {', '.join(required)}")
        rows = []
        for row in reader:
            if None in row:
                raise ReadsError(f"{path}:{reader.line_num}: more cells than the header has columns")
            rows.append((reader.line_num, {k: (v or "").strip() for k, v in row.items()}))
    return header, rows


def raise_errors(path: Path, errors: list[str]) -> None:
    """Raise one :class:`ReadsError` listing (the first ``MAX_ERRORS`` of) ``errors``, if there are any."""
    if errors:
        more = f"\n… and {len(errors) - MAX_ERRORS} more" if len(errors) > MAX_ERRORS else ""
        raise ReadsError(f"{path}: {len(errors)} invalid row(s); nothing was written:\n"
                         + "\n".join(errors[:MAX_ERRORS]) + more)


def read_truth(path: str | Path) -> dict[str, int]:
    """``case → label`` (0/1) from the packet's ``key.csv`` or any CSV with ``case`` and ``label``."""
    path, truth, errors = Path(path), {}, []
    for line, row in read_rows(path, ("case", "label"))[1]:
        label = parse_label(row["label"])
        if not row["case"]:
            errors.append(f"{path}:{line}: column 'case': empty")
        elif row["case"] in truth:
            errors.append(f"{path}:{line}: column 'case': {row['case']} appears twice")
        elif label is None:
            errors.append(f"{path}:{line}: column 'label': {row['label']!r} is not benign/malignant/0/1")
        else:
            truth[row["case"]] = label
    raise_errors(path, errors)
    if len(set(truth.values())) < 2:
        raise ReadsError(f"{path}: the truth holds only one class; a reader study needs benign and malignant cases")
    return truth


def read_model_scores(path: str | Path, truth: dict[str, int]) -> tuple[dict[str, float], float]:
    """``case → AI score`` in [0, 1] for every truth case, and the decision threshold (column, else 0.5)."""
    path, scores, thresholds, errors = Path(path), {}, set(), []
    for line, row in read_rows(path, ("case", "ai_score"))[1]:
        value = _number(row["ai_score"])
        if row["case"] not in truth:
            errors.append(f"{path}:{line}: column 'case': unknown case {row['case']!r} (not in the truth file)")
        elif not 0.0 <= value <= 1.0:
            errors.append(f"{path}:{line}: column 'ai_score': {row['ai_score']!r} is not a probability in [0, 1]")
        else:
            scores[row["case"]] = value
            threshold = _number(row.get("threshold") or "0.5")
            if math.isnan(threshold):
                errors.append(f"{path}:{line}: column 'threshold': {row['threshold']!r} is not a number")
            else:
                thresholds.add(threshold)
    absent = sorted(set(truth) - set(scores))
    errors += [f"{path}: no AI score for case(s) {', '.join(absent[:20])}"] if absent else []
    errors += [f"{path}: column 'threshold' holds several values {sorted(thresholds)}"] if len(thresholds) > 1 else []
    raise_errors(path, errors)
    return scores, thresholds.pop()


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _integer_in(low: int, high: int) -> Callable[[str], bool]:
    return lambda v: v.isascii() and v.isdigit() and low <= int(v) <= high


def _checks(truth: dict[str, int], new: bool) -> tuple[dict[str, Callable[[str], bool]], dict[str, str]]:
    scale = ", ".join(f"{k} {v}" for k, v in CONFIDENCE_LEVELS.items())
    checks: dict[str, Callable[[str], bool]] = {
        "reader": bool, "round": lambda v: v in ("1", "2"), "case": lambda v: v in truth,
        "malignant": lambda v: v in ("0", "1"), "confidence": _integer_in(1, 5)}
    expected = {"reader": "empty; give the reader's id", "round": "not 1 (without AI) or 2 (with AI)",
                "case": "an unknown case (not in the truth file)", "malignant": "not 0 (benign) or 1 (malignant)",
                "confidence": f"not an integer 1-5 ({scale})"}
    if new:
        checks.update({"birads4": lambda v: v.lower() in BIRADS4, "likelihood": _integer_in(0, 100),
                       "confidence": lambda v: v == "" or _integer_in(1, 5)(v),
                       "seconds": lambda v: v == "" or (math.isfinite(_number(v)) and _number(v) >= 0),
                       "comment": lambda v: True})
        expected.update({"birads4": "not a BI-RADS 4 sub-category 4a, 4b or 4c",
                         "likelihood": "not an integer 0-100 (the likelihood of malignancy in %)",
                         "confidence": f"not empty or an integer 1-5 ({scale})",
                         "seconds": "not a reading time in seconds (a number ≥ 0, or empty)", "comment": ""})
    return checks, expected


def read_reads(path: str | Path, truth: dict[str, int]) -> pd.DataFrame:
    """Validated reads, one row per reader, round and case, with the ROC ``score`` column (the likelihood, or for
    legacy files the confidence) and ``birads4``, ``likelihood``, ``confidence``, ``seconds``, ``comment`` (NaN or
    empty where absent). Every bad row is reported at once.
    """
    path, errors, seen, attempted, records = Path(path), [], {}, set(), []
    header, rows = read_rows(path, lambda h: REQUIRED if any(c in h for c in NEW_ONLY) else LEGACY_READ_COLUMNS)
    new = "likelihood" in header
    checks, expected = _checks(truth, new)
    columns = [c for c in READ_COLUMNS if c in header] if new else list(LEGACY_READ_COLUMNS)
    for line, row in rows:
        bad = [c for c in columns if not checks[c](row[c])]
        errors += [f"{path}:{line}: column '{c}': {row[c]!r} is {expected[c]}" for c in bad]
        key = (row["reader"], row["round"], row["case"])
        if not {"reader", "round", "case"} & set(bad):
            attempted.add(key)  # its partner round is not "missing" when only this row's values are bad
        if not bad and key in seen:
            errors.append(f"{path}:{line}: columns 'reader, round, case': duplicate read of case {key[2]} by "
                          f"{key[0]} in round {key[1]} (first at line {seen[key]})")
        elif not bad:
            seen[key] = line
            confidence = _number(row["confidence"]) if row.get("confidence") else math.nan
            likelihood = float(row["likelihood"]) if new else math.nan
            records.append({"reader": key[0], "round": int(key[1]), "case": key[2], "malignant": int(row["malignant"]),
                            "score": likelihood if new else confidence, "birads4": row.get("birads4", "").lower(),
                            "likelihood": likelihood, "confidence": confidence,
                            "seconds": _number(row["seconds"]) if row.get("seconds") else math.nan,
                            "comment": row.get("comment", "")})
    for (reader, round_no, case), line in seen.items():
        other = "2" if round_no == "1" else "1"
        if (reader, other, case) not in attempted:
            errors.append(f"{path}:{line}: column 'round': reader {reader} read case {case} in round {round_no} "
                          f"but not in round {other}")
    raise_errors(path, errors)
    if not records:
        raise ReadsError(f"{path}: no reads")
    frame = pd.DataFrame(records)
    frame.attrs["score"] = "likelihood" if new else "confidence"
    return frame


__all__ = ["BIRADS4", "LEGACY_READ_COLUMNS", "MAX_ERRORS", "REQUIRED", "ReadsError", "raise_errors",
           "read_model_scores", "read_reads", "read_rows", "read_truth"]
