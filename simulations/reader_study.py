"""Reader study (the seed's Table 3 and Fig. 6): radiologists without (round 1) and with (round 2) the AI.

Reads are validated row by row before anything is computed or written (:mod:`.reader_reads`).
Per reader and round the AUC (95 % DeLong CI) comes from the ROC score — the 0-100 likelihood of
the reading app, or the 1-5 confidence of legacy reads — and the threshold metrics from the
malignant 0/1 decision; paired DeLong tests compare round 2 with round 1 and each round with the
CLDLR model on the same cases. The MRMC rows (:mod:`.reader_mrmc`) answer the study's question for
readers and cases like these, and the reads are also written for MRMCaov and iMRMC
(:mod:`.reader_exports`) so a statistician can check them with their own tools.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cldlr.common.evaluation.figures import save_figure
from cldlr.common.evaluation.metrics import auc_ci, classification_metrics, delong_test, model_metrics, roc_curve_points
from cldlr.common.io import atomic_directory, check_output_apart, jsonable
from cldlr.common.text import markdown_text
from cldlr.simulations.reader_exports import imrmc_text, mrmcaov_csv
from cldlr.simulations.reader_mrmc import compute_mrmc, mean_auc_ci, mrmc_markdown, score_column, score_name
from cldlr.simulations.reader_reads import BIRADS4, ReadsError, read_model_scores, read_reads, read_truth
from cldlr.simulations.reader_simulate import PROFILES, simulate_reads

log = logging.getLogger(__name__)

ROUNDS = (1, 2)
OUTPUTS = ("table3.md", "table3.json", "reader_roc.png", "mrmcaov.csv", "reads.imrmc")


def _reader_metrics(y: np.ndarray, score: np.ndarray, malignant: np.ndarray) -> dict[str, Any]:
    auc, low, high = auc_ci(y, score)
    return {"auc": auc, "auc_ci_low": low, "auc_ci_high": high, **classification_metrics(y, malignant, 0.5)}


def _test(y: np.ndarray, a: np.ndarray, b: np.ndarray, auc_a: float, auc_b: float) -> dict[str, float]:
    z, p = delong_test(y, a, b)
    return {"delta_auc": auc_a - auc_b, "z": z, "p": p}


def _reading(reads: pd.DataFrame, truth: dict[str, int]) -> dict[str, Any]:
    """Median reading time per round and, per BI-RADS 4 sub-category and round, reads and malignancy rate."""
    out: dict[str, Any] = {}
    if "seconds" in reads and reads["seconds"].notna().any():
        out["median_seconds"] = {f"round{r}": float(reads.loc[reads["round"] == r, "seconds"].median()) for r in ROUNDS}
    if "birads4" in reads and reads["birads4"].isin(BIRADS4).any():
        malignant = reads["case"].map(truth)
        out["birads4"] = {c: {f"round{r}": {"reads": int(((reads["birads4"] == c) & (reads["round"] == r)).sum()),
                                            "malignant": int(((reads["birads4"] == c) & (reads["round"] == r)
                                                              & (malignant == 1)).sum())} for r in ROUNDS}
                          for c in BIRADS4}
    return out


def compute_table3(reads: pd.DataFrame, truth: dict[str, int], model: dict[str, float] | None = None,
                   threshold: float = 0.5) -> dict[str, Any]:
    """Per reader and round metrics, paired DeLong tests, reader means, the MRMC analysis and the model row."""
    column, readers = score_column(reads), {}
    for reader, own in reads.groupby("reader", sort=False):
        cases = sorted(own["case"].unique())
        y = np.array([truth[c] for c in cases])
        by_round = {r: own[own["round"] == r].set_index("case").loc[cases] for r in ROUNDS}
        score = {r: by_round[r][column].to_numpy(float) for r in ROUNDS}
        entry = {f"round{r}": _reader_metrics(y, score[r], by_round[r]["malignant"].to_numpy()) for r in ROUNDS}
        entry["round2_vs_round1"] = _test(y, score[2], score[1], entry["round2"]["auc"], entry["round1"]["auc"])
        if model is not None:
            ai = np.array([model[c] for c in cases])
            model_auc = auc_ci(y, ai)[0]
            entry["vs_model"] = {f"round{r}": _test(y, score[r], ai, entry[f"round{r}"]["auc"], model_auc) for r in ROUNDS}
        entry["cases"], entry["labels"] = cases, y.tolist()
        entry["scores"] = {f"round{r}": score[r].tolist() for r in ROUNDS}
        readers[str(reader)] = entry
    mrmc = compute_mrmc(reads, truth, model)
    keys = ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv")
    mean = {f"round{r}": {**{k: float(np.mean([e[f"round{r}"][k] for e in readers.values()])) for k in keys},
                          **mean_auc_ci(mrmc, r)} for r in ROUNDS}
    result: dict[str, Any] = {"score": score_name(reads), "readers": readers, "reader_mean": mean, "mrmc": mrmc,
                              "reading": _reading(reads, truth)}
    if model is not None:
        read = sorted(reads["case"].unique())
        y_all, ai_all = np.array([truth[c] for c in read]), np.array([model[c] for c in read])
        result["model"] = {**model_metrics(y_all, ai_all, threshold), "threshold": threshold, "cases": read,
                           "labels": y_all.tolist(), "scores": ai_all.tolist()}
    return result


def _f(v: float) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _p(v: float) -> str:
    return "–" if math.isnan(v) else ("<0.001" if v < 0.001 else f"{v:.3f}")


def _reading_markdown(reading: dict[str, Any]) -> list[str]:
    lines = []
    if "median_seconds" in reading:
        s = reading["median_seconds"]
        lines += ["", f"Median reading time per case: {s['round1']:.1f} s without AI, {s['round2']:.1f} s with AI."]
    if "birads4" in reading:
        lines += ["", "| BI-RADS 4 | Reads without AI (malignant %) | Reads with AI (malignant %) |", "|---|---|---|"]
        for category, rounds in reading["birads4"].items():
            cells = [f"{v['reads']} ({100 * v['malignant'] / v['reads']:.0f}%)" if v["reads"] else "0"
                     for v in rounds.values()]
            lines.append(f"| {category} | {cells[0]} | {cells[1]} |")
    return lines


def table3_markdown(result: dict[str, Any]) -> str:
    """Table 3, the DeLong table, the MRMC tables and the reading summary as Markdown."""
    head = ["| Reader | Round | AUC (95% CI) | Accuracy | Sensitivity | Specificity | PPV | NPV | Cases (malignant) |",
            "|---|---|---|---|---|---|---|---|---|"]

    def row(name: str, label: str, m: dict[str, Any]) -> str:
        ci = f" ({_f(m['auc_ci_low'])}–{_f(m['auc_ci_high'])})" if "auc_ci_low" in m else ""
        n = f"{m['n']} ({m['n_malignant']})" if "n" in m else ""
        return (f"| {name} | {label} | {_f(m['auc'])}{ci} | {_f(m['accuracy'])} | {_f(m['sensitivity'])} | "
                f"{_f(m['specificity'])} | {_f(m['ppv'])} | {_f(m['npv'])} | {n} |")

    titles = {1: "1 (without AI)", 2: "2 (with AI)"}
    names = {name: markdown_text(name) for name in result["readers"]}
    lines = head + [row(names[name], titles[r], e[f"round{r}"]) for name, e in result["readers"].items() for r in ROUNDS]
    lines += [row("Readers (mean)", titles[r], result["reader_mean"][f"round{r}"]) for r in ROUNDS]
    if "model" in result:
        lines.append(row("CLDLR model", f"threshold {result['model']['threshold']:g}", result["model"]))
    tests = ["", "Paired DeLong tests (same cases):", "", "| Reader | Comparison | ΔAUC | z | P |", "|---|---|---|---|---|"]
    for name, e in result["readers"].items():
        pairs = [("with AI − without AI", e["round2_vs_round1"])]
        pairs += [(f"{titles[r].split(' ', 1)[1][1:-1]} − CLDLR model", e["vs_model"][f"round{r}"])
                  for r in ROUNDS if "vs_model" in e]
        tests += [f"| {names[name]} | {what} | {_f(t['delta_auc'])} | {_f(t['z'])} | {_p(t['p'])} |" for what, t in pairs]
    notes = ["", f"AUC from the {result['score']}; 95% CI by DeLong (readers' mean: OR-Hillis, random readers and "
             "cases). Accuracy, sensitivity, specificity, PPV and NPV from the malignant 0/1 decision."]
    return "\n".join(lines + tests + notes + mrmc_markdown(result["mrmc"]) + _reading_markdown(result["reading"])) + "\n"


def plot_reader_roc(result: dict[str, Any], path: str | Path) -> Path:
    """The seed's Fig. 6: left, the model's ROC curve and each reader's round 1 (hollow) → round 2 (filled)
    operating point; right, each reader's empirical ROC curve from the score, without (dashed) and with AI (solid).
    """
    figure = Figure(figsize=(11, 5.6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    points, curves = figure.subplots(1, 2)
    if "model" in result:
        m = result["model"]
        fpr, tpr = roc_curve_points(m["labels"], m["scores"])
        for ax in (points, curves):
            ax.plot(fpr, tpr, color="black", linewidth=1.8, label=f"CLDLR model (AUC {m['auc']:.3f})")
        points.plot(1 - m["specificity"], m["sensitivity"], "*", color="black", markersize=12, label="model at threshold")
    for i, (name, e) in enumerate(result["readers"].items()):
        color = f"C{i % 10}"
        (x1, y1), (x2, y2) = ((1 - e[f"round{r}"]["specificity"], e[f"round{r}"]["sensitivity"]) for r in ROUNDS)
        arrow = {"arrowstyle": "->", "color": color, "lw": 1.3, "shrinkA": 5, "shrinkB": 5}
        points.annotate("", xy=(x2, y2), xytext=(x1, y1), arrowprops=arrow)
        points.plot(x1, y1, "o", markersize=9, markerfacecolor="none", markeredgecolor=color, markeredgewidth=1.8)
        points.plot(x2, y2, "o", markersize=9, color=color, label=f"{name}: without → with AI")
        for r, style in zip(ROUNDS, ("--", "-")):
            fpr, tpr = roc_curve_points(e["labels"], e["scores"][f"round{r}"])
            curves.plot(fpr, tpr, style, color=color, linewidth=1.2,
                        label=f"{name} {'with' if r == 2 else 'without'} AI ({e[f'round{r}']['auc']:.3f})")
    titles = ("Operating points: without (hollow) → with (filled) AI", f"Readers' ROC curves ({result['score']})")
    for ax, title in zip((points, curves), titles):
        ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1)
        ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.02), xlabel="1 − specificity", ylabel="Sensitivity", title=title)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize="x-small")
    return save_figure(figure, path)  # names as plain text: a reader called "$x$" is not mathtext


def analyze_reads(reads: str | Path, truth: str | Path, out: str | Path, *, model_scores: str | Path | None = None,
                  force: bool = False) -> Path:
    """Validate every input, then write ``OUTPUTS`` (Table 3, its JSON, Fig. 6, the MRMCaov and iMRMC files)."""
    check_output_apart(out, [reads, truth, model_scores])
    labels = read_truth(truth)
    model, threshold = read_model_scores(model_scores, labels) if model_scores is not None else (None, 0.5)
    frame = read_reads(reads, labels)
    unread = sorted(set(labels) - set(frame["case"]))
    if unread:
        log.warning("%d truth case(s) were read by nobody: %s", len(unread), ", ".join(unread[:10]))
    try:
        result = compute_table3(frame, labels, model, threshold)
    except ValueError as exc:  # e.g. a reader whose cases hold only one class
        raise ReadsError(f"{reads}: {exc}") from exc
    with atomic_directory(out, overwrite=force) as tmp:
        (tmp / "table3.md").write_text("# Table 3 — readers without and with AI\n\n" + table3_markdown(result), "utf-8")
        (tmp / "table3.json").write_text(json.dumps(jsonable(result, finite=True), indent=2) + "\n", "utf-8")
        plot_reader_roc(result, tmp / "reader_roc.png")
        (tmp / "mrmcaov.csv").write_text(mrmcaov_csv(frame, labels), "utf-8")
        (tmp / "reads.imrmc").write_text(imrmc_text(frame, labels, score=frame.attrs.get("score", "score")), "utf-8")
    log.info("reader study: %d reader(s), %d case(s) → %s", len(result["readers"]), frame["case"].nunique(), out)
    return Path(out)


__all__ = ["OUTPUTS", "PROFILES", "ReadsError", "analyze_reads", "compute_table3", "plot_reader_roc",
           "read_model_scores", "read_reads", "read_truth", "simulate_reads", "table3_markdown"]
