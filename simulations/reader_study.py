"""Reader study (the seed's Table 3 and Fig. 6): radiologists without (round 1) and with (round 2) the AI.

Reads are validated row by row before anything is computed or written: every problem is reported
as ``file:line: column 'x': …``. Per reader and round the AUC (95 % DeLong CI) comes from the 1-5
confidence score, the threshold metrics from the malignant 0/1 decision; paired DeLong tests
compare round 2 with round 1 and each round with the CLDLR model on the same cases.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.stats import norm

from cldlr.common.data.contract import parse_label
from cldlr.common.errors import CldlrError
from cldlr.common.evaluation.figures import save_figure
from cldlr.common.evaluation.metrics import auc_ci, classification_metrics, delong_test, model_metrics, roc_curve_points
from cldlr.common.io import atomic_directory, atomic_write_text, check_output_apart, jsonable
from cldlr.common.text import csv_text, markdown_text
from cldlr.simulations.reader_packet import CONFIDENCE_LEVELS, READ_COLUMNS

log = logging.getLogger(__name__)

ROUNDS = (1, 2)
MAX_ERRORS = 50
#: Simulated reader profiles: discriminability d′ of the latent score and the weight given to the AI in round 2.
PROFILES = {"junior": (1.0, 0.5), "senior": (1.9, 0.25)}


class ReadsError(CldlrError):
    """A reads, truth or model-score file has invalid rows; the message lists each one."""


def _read_rows(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """(line number, stripped cells) per data row; a missing column or a ragged row is an error."""
    if not path.is_file():
        raise ReadsError(f"{path}: no such file")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ReadsError(f"{path}:1: missing column(s) {', '.join(missing)}; expected {', '.join(required)}")
        rows = []
        for row in reader:
            if None in row:
                raise ReadsError(f"{path}:{reader.line_num}: more cells than the header has columns")
            rows.append((reader.line_num, {k: (v or "").strip() for k, v in row.items()}))
    return rows


def _raise(path: Path, errors: list[str]) -> None:
    if errors:
        more = f"\n… and {len(errors) - MAX_ERRORS} more" if len(errors) > MAX_ERRORS else ""
        raise ReadsError(f"{path}: {len(errors)} invalid row(s); nothing was written:\n"
                         + "\n".join(errors[:MAX_ERRORS]) + more)


def read_truth(path: str | Path) -> dict[str, int]:
    """``case → label`` (0/1) from the packet's ``key.csv`` or any CSV with ``case`` and ``label``."""
    path, truth, errors = Path(path), {}, []
    for line, row in _read_rows(Path(path), ("case", "label")):
        label = parse_label(row["label"])
        if not row["case"]:
            errors.append(f"{path}:{line}: column 'case': empty")
        elif row["case"] in truth:
            errors.append(f"{path}:{line}: column 'case': {row['case']} appears twice")
        elif label is None:
            errors.append(f"{path}:{line}: column 'label': {row['label']!r} is not benign/malignant/0/1")
        else:
            truth[row["case"]] = label
    _raise(path, errors)
    if len(set(truth.values())) < 2:
        raise ReadsError(f"{path}: the truth holds only one class; a reader study needs benign and malignant cases")
    return truth


def read_model_scores(path: str | Path, truth: dict[str, int]) -> tuple[dict[str, float], float]:
    """``case → AI score`` in [0, 1] for every truth case, and the decision threshold (column, else 0.5)."""
    path, scores, thresholds, errors = Path(path), {}, set(), []
    for line, row in _read_rows(path, ("case", "ai_score")):
        try:
            value = float(row["ai_score"])
        except ValueError:
            value = math.nan
        if row["case"] not in truth:
            errors.append(f"{path}:{line}: column 'case': unknown case {row['case']!r} (not in the truth file)")
        elif not 0.0 <= value <= 1.0:
            errors.append(f"{path}:{line}: column 'ai_score': {row['ai_score']!r} is not a probability in [0, 1]")
        else:
            scores[row["case"]] = value
            try:
                thresholds.add(float(row.get("threshold") or 0.5))
            except ValueError:
                errors.append(f"{path}:{line}: column 'threshold': {row['threshold']!r} is not a number")
    absent = sorted(set(truth) - set(scores))
    errors += [f"{path}: no AI score for case(s) {', '.join(absent[:20])}"] if absent else []
    errors += [f"{path}: column 'threshold' holds several values {sorted(thresholds)}"] if len(thresholds) > 1 else []
    _raise(path, errors)
    return scores, thresholds.pop()


def read_reads(path: str | Path, truth: dict[str, int]) -> pd.DataFrame:
    """Validated reads (reader, round, case, malignant, confidence); every bad row is reported at once."""
    path, errors, seen, attempted, records = Path(path), [], {}, set(), []
    checks: dict[str, Callable[[str], bool]] = {
        "reader": bool, "round": lambda v: v in ("1", "2"), "case": lambda v: v in truth,
        "malignant": lambda v: v in ("0", "1"), "confidence": lambda v: v in {str(k) for k in CONFIDENCE_LEVELS}}
    expected = {"reader": "empty; give the reader's id", "round": "not 1 (without AI) or 2 (with AI)",
                "case": "an unknown case (not in the truth file)", "malignant": "not 0 (benign) or 1 (malignant)",
                "confidence": "not an integer 1-5 (" + ", ".join(f"{k} {v}" for k, v in CONFIDENCE_LEVELS.items()) + ")"}
    for line, row in _read_rows(path, READ_COLUMNS):
        bad = [c for c in READ_COLUMNS if not checks[c](row[c])]
        errors += [f"{path}:{line}: column '{c}': {row[c]!r} is {expected[c]}" for c in bad]
        key = (row["reader"], row["round"], row["case"])
        if not {"reader", "round", "case"} & set(bad):
            attempted.add(key)  # its partner round is not "missing" when only this row's values are bad
        if not bad and key in seen:
            errors.append(f"{path}:{line}: columns 'reader, round, case': duplicate read of case {key[2]} by "
                          f"{key[0]} in round {key[1]} (first at line {seen[key]})")
        elif not bad:
            seen[key] = line
            records.append({"reader": key[0], "round": int(key[1]), "case": key[2],
                            "malignant": int(row["malignant"]), "confidence": int(row["confidence"])})
    for (reader, round_no, case), line in seen.items():
        other = "2" if round_no == "1" else "1"
        if (reader, other, case) not in attempted:
            errors.append(f"{path}:{line}: column 'round': reader {reader} read case {case} in round {round_no} "
                          f"but not in round {other}")
    _raise(path, errors)
    if not records:
        raise ReadsError(f"{path}: no reads")
    return pd.DataFrame(records)


def _reader_metrics(y: np.ndarray, confidence: np.ndarray, malignant: np.ndarray) -> dict[str, Any]:
    auc, low, high = auc_ci(y, confidence)
    return {"auc": auc, "auc_ci_low": low, "auc_ci_high": high, **classification_metrics(y, malignant, 0.5)}


def _test(y: np.ndarray, a: np.ndarray, b: np.ndarray, auc_a: float, auc_b: float) -> dict[str, float]:
    z, p = delong_test(y, a, b)
    return {"delta_auc": auc_a - auc_b, "z": z, "p": p}


def compute_table3(reads: pd.DataFrame, truth: dict[str, int], model: dict[str, float] | None = None,
                   threshold: float = 0.5) -> dict[str, Any]:
    """Per reader and round metrics, paired DeLong tests, reader means and the model row (pure function)."""
    readers: dict[str, Any] = {}
    for reader, own in reads.groupby("reader", sort=False):
        cases = sorted(own["case"].unique())
        y = np.array([truth[c] for c in cases])
        by_round = {r: own[own["round"] == r].set_index("case").loc[cases] for r in ROUNDS}
        entry = {f"round{r}": _reader_metrics(y, by_round[r]["confidence"].to_numpy(),
                                              by_round[r]["malignant"].to_numpy()) for r in ROUNDS}
        conf = {r: by_round[r]["confidence"].to_numpy(float) for r in ROUNDS}
        entry["round2_vs_round1"] = _test(y, conf[2], conf[1], entry["round2"]["auc"], entry["round1"]["auc"])
        if model is not None:
            ai = np.array([model[c] for c in cases])
            model_auc = auc_ci(y, ai)[0]
            entry["vs_model"] = {f"round{r}": _test(y, conf[r], ai, entry[f"round{r}"]["auc"], model_auc) for r in ROUNDS}
        entry["cases"] = cases
        readers[str(reader)] = entry
    keys = ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv")
    mean = {f"round{r}": {k: float(np.mean([e[f"round{r}"][k] for e in readers.values()])) for k in keys}
            for r in ROUNDS}
    result: dict[str, Any] = {"confidence_scale": CONFIDENCE_LEVELS, "readers": readers, "reader_mean": mean}
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


def table3_markdown(result: dict[str, Any]) -> str:
    """Table 3 and the DeLong table as Markdown."""
    head = ["| Reader | Round | AUC (95% CI) | Accuracy | Sensitivity | Specificity | PPV | NPV | Cases (malignant) |",
            "|---|---|---|---|---|---|---|---|---|"]

    def row(name: str, label: str, m: dict[str, Any]) -> str:
        ci = f" ({_f(m['auc_ci_low'])}–{_f(m['auc_ci_high'])})" if "auc_ci_low" in m else ""
        n = f"{m['n']} ({m['n_malignant']})" if "n" in m else ""
        return (f"| {name} | {label} | {_f(m['auc'])}{ci} | {_f(m['accuracy'])} | {_f(m['sensitivity'])} | "
                f"{_f(m['specificity'])} | {_f(m['ppv'])} | {_f(m['npv'])} | {n} |")

    titles = {1: "1 (without AI)", 2: "2 (with AI)"}
    lines = head + [row(markdown_text(name), titles[r], e[f"round{r}"]) for name, e in result["readers"].items()
                    for r in ROUNDS]
    lines += [row("Readers (mean)", titles[r], result["reader_mean"][f"round{r}"]) for r in ROUNDS]
    if "model" in result:
        lines.append(row("CLDLR model", f"threshold {result['model']['threshold']:g}", result["model"]))
    tests = ["", "Paired DeLong tests (same cases):", "", "| Reader | Comparison | ΔAUC | z | P |", "|---|---|---|---|---|"]
    for name, e in result["readers"].items():
        pairs = [("with AI − without AI", e["round2_vs_round1"])]
        pairs += [(f"{titles[r].split(' ', 1)[1][1:-1]} − CLDLR model", e["vs_model"][f"round{r}"])
                  for r in ROUNDS if "vs_model" in e]
        tests += [f"| {markdown_text(name)} | {what} | {_f(t['delta_auc'])} | {_f(t['z'])} | {_p(t['p'])} |" for what, t in pairs]
    scale = ", ".join(f"{k} {v}" for k, v in CONFIDENCE_LEVELS.items())
    notes = ["", f"AUC from the confidence score ({scale}); 95% CI by DeLong. Accuracy, sensitivity, specificity, "
             "PPV and NPV from the malignant 0/1 decision."]
    return "\n".join(lines + tests + notes) + "\n"


def plot_reader_roc(result: dict[str, Any], path: str | Path) -> Path:
    """The seed's Fig. 6: the model's ROC curve, each reader's round 1 (hollow) → round 2 (filled) operating point."""
    figure = Figure(figsize=(6, 6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    if "model" in result:
        m = result["model"]
        fpr, tpr = roc_curve_points(m["labels"], m["scores"])
        ax.plot(fpr, tpr, color="black", linewidth=1.8, label=f"CLDLR model (AUC {m['auc']:.3f})")
        ax.plot(1 - m["specificity"], m["sensitivity"], "*", color="black", markersize=12, label="model at threshold")
    for i, (name, e) in enumerate(result["readers"].items()):
        color = f"C{i % 10}"
        (x1, y1), (x2, y2) = ((1 - e[f"round{r}"]["specificity"], e[f"round{r}"]["sensitivity"]) for r in ROUNDS)
        arrow = {"arrowstyle": "->", "color": color, "lw": 1.3, "shrinkA": 5, "shrinkB": 5}
        ax.annotate("", xy=(x2, y2), xytext=(x1, y1), arrowprops=arrow)
        ax.plot(x1, y1, "o", markersize=9, markerfacecolor="none", markeredgecolor=color, markeredgewidth=1.8)
        ax.plot(x2, y2, "o", markersize=9, color=color, label=f"{name}: without → with AI")
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1)
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.02), xlabel="1 − specificity", ylabel="Sensitivity",
           title="Readers without (hollow) and with (filled) AI")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return save_figure(figure, path)  # names as plain text: a reader called "$x$" is not mathtext


def analyze_reads(reads: str | Path, truth: str | Path, out: str | Path, *, model_scores: str | Path | None = None,
                  force: bool = False) -> Path:
    """Validate every input, then write ``table3.md``, ``table3.json`` and ``reader_roc.png`` into ``out``."""
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
    log.info("reader study: %d reader(s), %d case(s) → %s", len(result["readers"]), frame["case"].nunique(), out)
    return Path(out)


def simulate_reads(truth: str | Path, model_scores: str | Path, out: str | Path, *, readers: int = 3,
                   seed: int = 0) -> Path:
    """Realistic reads: per reader a binormal latent score (juniors d′≈1, seniors d′≈1.9) binned to 1-5;
    in round 2 the latent moves towards the AI score's probit (juniors lean more on it).
    """
    if readers < 1:
        raise CldlrError(f"--readers must be at least 1, got {readers}")
    check_output_apart(out, [truth, model_scores])
    labels = read_truth(truth)
    scores, _ = read_model_scores(model_scores, labels)
    cases = sorted(labels)
    y = np.array([labels[c] for c in cases], float)
    rng = np.random.default_rng(seed)

    def standard(v: np.ndarray) -> np.ndarray:
        return (v - v.mean()) / (v.std() or 1.0)

    ai = standard(norm.ppf(np.clip([scores[c] for c in cases], 1e-4, 1 - 1e-4)))
    rows: list[list[Any]] = []
    for r in range(readers):
        level = "junior" if r % 2 == 0 else "senior"
        d_prime, reliance = PROFILES[level]
        name = f"{level}-{r // 2 + 1}"
        first = standard(d_prime * rng.uniform(0.85, 1.15) * y + rng.normal(size=y.size))
        second = standard((1 - reliance) * (first + rng.normal(0, 0.3, y.size)) + reliance * ai)
        bias = rng.normal(-0.25, 0.15)  # BI-RADS 4 readers lean towards calling a lesion malignant
        cuts = bias + np.array([-1.0, -0.35, 0.35, 1.0])
        for round_no, latent in ((1, first), (2, second)):
            for k in rng.permutation(y.size):
                rows.append([name, round_no, cases[k], int(latent[k] > bias), 1 + int(np.searchsorted(cuts, latent[k]))])
    atomic_write_text(out, csv_text(READ_COLUMNS, rows))
    log.info("simulated %d reads by %d reader(s) on %d cases: %s", len(rows), readers, len(cases), out)
    return Path(out)


__all__ = ["PROFILES", "ReadsError", "analyze_reads", "compute_table3", "plot_reader_roc", "read_model_scores",
           "read_reads", "read_truth", "simulate_reads", "table3_markdown"]
