"""The reads in the input formats of the reference MRMC software, so a statistician can check our numbers.

- MRMCaov (R; Smith & Hillis): a long data frame with one row per reader × test × case,
  ``reader, treatment, case, truth, rating`` — the layout of its own ``VanDyke`` example — read by
  ``mrmc(empirical_auc(truth, rating), treatment, reader, case, data = read.csv("mrmcaov.csv"))``.
- iMRMC (FDA/DIDSR; Gallas): free description lines, ``NR/N0/N1/NM`` summary lines, then
  ``BEGIN DATA:`` and ``readerID,caseID,modalityID,score`` rows, the truth given as
  ``-1,caseID,0,truth`` rows (the layout of the example files in its repository).

The treatments/modalities are the two rounds: ``without_AI`` (round 1) and ``with_AI`` (round 2).
"""

from __future__ import annotations

import re

import pandas as pd

from cldlr.common.text import csv_text

TREATMENTS = {1: "without_AI", 2: "with_AI"}
MRMCAOV_COLUMNS = ("reader", "treatment", "case", "truth", "rating")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def mrmcaov_csv(reads: pd.DataFrame, truth: dict[str, int]) -> str:
    """The reads as MRMCaov's long format (CSV text, spreadsheet-safe cells); ``rating`` is the ROC score."""
    ordered = reads.sort_values(["round", "reader", "case"], kind="stable")
    rows = [(r.reader, TREATMENTS[int(r.round)], r.case, truth[r.case], _number(r.score)) for r in ordered.itertuples()]
    return csv_text(MRMCAOV_COLUMNS, rows)


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _ids(names: list[str]) -> dict[str, str]:
    """Each name as an iMRMC id (letters, digits, ``_.-`` only), kept distinct."""
    out: dict[str, str] = {}
    for k, name in enumerate(names):
        safe = _UNSAFE.sub("_", name) or "_"
        out[name] = safe if safe not in out.values() else f"{safe}_{k + 1}"
    return out


def imrmc_text(reads: pd.DataFrame, truth: dict[str, int], *, score: str = "likelihood") -> str:
    """The reads as an iMRMC input file (``.imrmc``); reader and case ids made safe for its comma format."""
    cases = sorted(reads["case"].unique())
    readers = list(dict.fromkeys(reads["reader"]))
    reader_id, case_id = _ids(readers), _ids(cases)
    positives = sum(truth[c] for c in cases)
    lines = [f"cldlr reader study: modality 1 = {TREATMENTS[1]} (round 1), 2 = {TREATMENTS[2]} (round 2); "
             f"score = {score}; truth 1 = malignant",
             "", f"NR: {len(readers)}", f"N0: {len(cases) - positives}", f"N1: {positives}", "NM: 2", "", "BEGIN DATA:"]
    lines += [f"-1,{case_id[c]},0,{truth[c]}" for c in cases]
    ordered = reads.sort_values(["reader", "case", "round"], kind="stable")
    lines += [f"{reader_id[r.reader]},{case_id[r.case]},{int(r.round)},{_number(r.score)}" for r in ordered.itertuples()]
    return "\n".join(lines) + "\n"


__all__ = ["MRMCAOV_COLUMNS", "TREATMENTS", "imrmc_text", "mrmcaov_csv"]
