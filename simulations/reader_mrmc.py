"""The reader study's MRMC rows: readers with vs without the AI, for readers and cases like these.

Obuchowski–Rockette with Hillis' ddf (:mod:`cldlr.common.evaluation.mrmc`) on the cases that every
reader read in both rounds (a fully crossed design): the empirical AUC of the score (the 0-100
likelihood; the 1-5 confidence for legacy reads) with DeLong and jackknife covariances and all three
factor types, sensitivity and specificity of the malignant decision (jackknife), and the CLDLR model
against the readers' mean AUC in each round — the model entered as a second test that every reader
"reads" with the same score, RJafroc's 2T-RRRC, whose F and P equal its one-test 1T-RRRC analysis of
the reader − model differences (Chakraborty DP, Hillis SL, et al.).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

import numpy as np
import pandas as pd

from cldlr.common.evaluation.mrmc import MRMCResult, mrmc_auc, mrmc_binary
from cldlr.common.text import markdown_text

log = logging.getLogger(__name__)

ROUND_NAMES = ("without AI", "with AI")


def score_column(reads: pd.DataFrame) -> str:
    """The ROC score of a reads frame: ``score`` if set, else the likelihood where given, else the confidence."""
    if "score" in reads:
        return "score"
    if "likelihood" in reads and reads["likelihood"].notna().all():
        return "likelihood"
    return "confidence"


def score_name(reads: pd.DataFrame) -> str:
    """What the ROC score is, for the notes: "0-100 likelihood of malignancy" or "1-5 confidence score"."""
    kind = reads.attrs.get("score") or ("likelihood" if score_column(reads) == "likelihood" else "confidence")
    return "0-100 likelihood of malignancy" if kind == "likelihood" else "1-5 confidence score"


def crossed(reads: pd.DataFrame, truth: dict[str, int]) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """Readers, the cases every reader read, and the scores and decisions as (round, reader, case) arrays."""
    readers = [str(r) for r in dict.fromkeys(reads["reader"])]
    sets = [set(own["case"]) for _, own in reads.groupby("reader", sort=False)]
    cases = sorted(set.intersection(*sets)) if sets else []
    column = score_column(reads)
    table = reads[reads["case"].isin(cases)].set_index(["round", "reader", "case"])
    index = pd.MultiIndex.from_product([(1, 2), readers, cases])
    scores = table[column].astype(float).reindex(index).to_numpy().reshape(2, len(readers), len(cases))
    decisions = table["malignant"].astype(float).reindex(index).to_numpy().reshape(2, len(readers), len(cases))
    return readers, cases, scores, decisions


def _summary(result: MRMCResult) -> dict[str, Any]:
    return {"method": result.method, "tests": list(result.tests), "readers": list(result.readers),
            "fom": result.fom.tolist(), "components": asdict(result.components),
            **{name: None if getattr(result, name) is None else asdict(getattr(result, name))
               for name in ("random_readers_random_cases", "fixed_readers_random_cases", "random_readers_fixed_cases")}}


def compute_mrmc(reads: pd.DataFrame, truth: dict[str, int], model: dict[str, float] | None = None) -> dict[str, Any]:
    """The MRMC section of ``table3.json`` (empty ``analyses`` with a ``note`` when the design does not allow it)."""
    readers, cases, scores, decisions = crossed(reads, truth)
    y = np.array([truth[c] for c in cases], int)
    out: dict[str, Any] = {"score": score_name(reads), "readers": len(readers), "cases": len(cases),
                           "cases_not_read_by_all": int(reads["case"].nunique() - len(cases)), "analyses": {}}
    if out["cases_not_read_by_all"]:
        log.warning("MRMC: %d case(s) not read by every reader are left out", out["cases_not_read_by_all"])
    if y.sum() < 2 or (1 - y).sum() < 2:
        out["note"] = "fewer than two benign or two malignant cases were read by every reader: no MRMC analysis"
        return out
    names = ROUND_NAMES
    analyses = out["analyses"]
    for covariance in ("delong", "jackknife"):
        analyses[f"auc_{covariance}"] = _summary(mrmc_auc(y, scores, covariance=covariance, tests=names,
                                                          readers=tuple(readers)))
    for metric in ("sensitivity", "specificity"):
        analyses[metric] = _summary(mrmc_binary(y, decisions, metric, tests=names, readers=tuple(readers)))
    if model is not None:
        ai = np.array([model[c] for c in cases], float)
        for r, name in enumerate(names, start=1):
            both = np.stack([scores[r - 1], np.broadcast_to(ai, scores[r - 1].shape)])
            analyses[f"model_vs_readers_round{r}"] = _summary(mrmc_auc(
                y, both, covariance="delong", tests=(f"readers {name}", "CLDLR model"), readers=tuple(readers)))
    return out


def _f(v: float | None, digits: int = 3) -> str:
    return "–" if v is None or v != v else f"{v:.{digits}f}"


def _p(v: float | None) -> str:
    return "–" if v is None or v != v else ("<0.001" if v < 0.001 else f"{v:.3f}")


def _mean(m: dict[str, Any]) -> str:
    return f"{_f(m['estimate'])} ({_f(m['ci_low'])}–{_f(m['ci_high'])})"


def _change(d: dict[str, Any], sign: int) -> str:
    low, high = sorted((sign * d["ci_low"], sign * d["ci_high"]))
    return f"{sign * d['estimate']:+.3f} ({low:+.3f} to {high:+.3f})"


def _statistic(a: dict[str, Any]) -> str:
    g = a["global_test"]
    if g["df2"] is None or g["df2"] == float("inf"):
        return f"χ²({g['df1']:g}) = {_f(g['statistic'], 2)}"
    return f"F({g['df1']:g}, {g['df2']:.1f}) = {_f(g['statistic'], 2)}"


ROWS = (("AUC", "auc_delong", "random_readers_random_cases", "random, random", "DeLong"),
        ("AUC", "auc_jackknife", "random_readers_random_cases", "random, random", "jackknife"),
        ("AUC", "auc_delong", "fixed_readers_random_cases", "fixed, random", "DeLong"),
        ("AUC", "auc_delong", "random_readers_fixed_cases", "random, fixed", "–"),
        ("Sensitivity", "sensitivity", "random_readers_random_cases", "random, random", "jackknife"),
        ("Specificity", "specificity", "random_readers_random_cases", "random, random", "jackknife"))


def mrmc_markdown(mrmc: dict[str, Any]) -> list[str]:
    """The MRMC tables of ``table3.md``: the comparisons, the model against the readers, the variance components."""
    lines = ["", "## MRMC analysis (Obuchowski–Rockette, Hillis' degrees of freedom)", ""]
    if not mrmc["analyses"]:
        return lines + [mrmc.get("note", "no MRMC analysis"), ""]
    lines += [f"{mrmc['readers']} reader(s) × {mrmc['cases']} case(s) read by every reader in both rounds"
              + (f" ({mrmc['cases_not_read_by_all']} case(s) read by fewer are left out)" if mrmc["cases_not_read_by_all"]
                 else "") + f"; AUC = empirical AUC of the {mrmc['score']}, sensitivity and specificity of the "
              "malignant decision." + (" With one reader only the fixed-reader analysis applies."
                                       if mrmc["readers"] == 1 else ""), "",
              "| Figure of merit | Readers, cases | Covariance | Without AI (95% CI) | With AI (95% CI) | "
              "With − without AI (95% CI) | Test | P |", "|---|---|---|---|---|---|---|---|"]
    for fom, key, kind, factors, cov in ROWS:
        a = mrmc["analyses"][key][kind]
        if a is None:
            continue
        lines.append(f"| {fom} | {factors} | {cov} | {_mean(a['means'][0])} | {_mean(a['means'][1])} | "
                     f"{_change(a['differences'][0], -1)} | {_statistic(a)} | {_p(a['global_test']['p'])} |")
    model_rows = [(r, mrmc["analyses"].get(f"model_vs_readers_round{r}")) for r in (1, 2)]
    if any(a and a["random_readers_random_cases"] for _, a in model_rows):
        lines += ["", "The CLDLR model alone against the readers (OR-Hillis, random readers and cases, DeLong; the "
                  "model as a second test read alike by every reader, RJafroc's 2T-RRRC = 1T-RRRC):", "",
                  "| Round | Readers' mean AUC (95% CI) | CLDLR model AUC | Readers − model (95% CI) | Test | P |",
                  "|---|---|---|---|---|---|"]
        for r, a in model_rows:
            rr = a and a["random_readers_random_cases"]
            if rr:
                lines.append(f"| {ROUND_NAMES[r - 1]} | {_mean(rr['means'][0])} | {_f(rr['means'][1]['estimate'])} | "
                             f"{_change(rr['differences'][0], 1)} | {_statistic(rr)} | {_p(rr['global_test']['p'])} |")
    lines += ["", "OR variance components of the AUC:", "",
              "| Covariance | var(R) | var(T×R) | var(error) | Cov1 | Cov2 | Cov3 |", "|---|---|---|---|---|---|---|"]
    for cov in ("delong", "jackknife"):
        c = mrmc["analyses"][f"auc_{cov}"]["components"]
        lines.append(f"| {'DeLong' if cov == 'delong' else 'jackknife'} | "
                     + " | ".join("–" if c[k] != c[k] else f"{c[k]:.3e}"
                                  for k in ("var_r", "var_tr", "var_error", "cov1", "cov2", "cov3")) + " |")
    readers = mrmc["analyses"]["auc_delong"]["readers"]
    lines += ["", "Readers: " + ", ".join(markdown_text(r) for r in readers) + ". Random readers and cases: "
              "inference for readers and cases like these; fixed readers: for these readers; fixed cases: for these "
              "cases. The per-reader DeLong tests above are the fixed-reader comparisons of each reader alone."]
    return lines


def mean_auc_ci(mrmc: dict[str, Any], round_no: int) -> dict[str, float]:
    """``auc_ci_low``/``auc_ci_high`` of the readers' mean AUC in a round (random readers and cases, DeLong), if any."""
    a = (mrmc["analyses"].get("auc_delong") or {}).get("random_readers_random_cases")
    if not a:
        return {}
    m = a["means"][round_no - 1]
    return {"auc_ci_low": m["ci_low"], "auc_ci_high": m["ci_high"]}


__all__ = ["ROUND_NAMES", "compute_mrmc", "crossed", "mean_auc_ci", "mrmc_markdown", "score_column", "score_name"]
