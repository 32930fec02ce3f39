"""The measures as Markdown: Table 2, calibration, clinical utility, paired tests and subgroups.

``scopes[scope][model] = model_measures(...)`` (:mod:`.measures`), where a scope is a site, the
pooled sites or a study's test cohort. Every name that came from a site (site, model label,
subgroup level) goes through :func:`cldlr.common.text.markdown_text`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from cldlr.common.text import markdown_text

Scopes = Mapping[str, Mapping[str, Mapping[str, Any]]]
#: Thresholds at which the decision curve is tabulated (the figure shows them all).
TABLE_THRESHOLDS = (0.02, 0.05, 0.10, 0.20, 0.30, 0.50)


def fmt(value: Any, digits: int = 3) -> str:
    """A number for a table: ``–`` for None/NaN, fixed digits for floats."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def p_value(value: float) -> str:
    """A P value as tables show it."""
    return "–" if math.isnan(value) else ("<0.001" if value < 0.001 else f"{value:.3f}")


def table2(scopes: Scopes, threshold: float) -> str:
    """Table 2 per scope and model: AUC (95 % CI), accuracy, sensitivity, specificity, PPV, NPV, n."""
    lines = ["| Scope | Model | AUC (95% CI) | Accuracy | Sensitivity | Specificity | PPV | NPV | n (malignant) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for scope, models in scopes.items():
        for model, m in models.items():
            t = m["table2"]
            lines.append(f"| {markdown_text(scope)} | {markdown_text(model)} | {fmt(t['auc'])} ({fmt(t['auc_ci_low'])}–"
                         f"{fmt(t['auc_ci_high'])}) | {fmt(t['accuracy'])} | {fmt(t['sensitivity'])} | "
                         f"{fmt(t['specificity'])} | {fmt(t['ppv'])} | {fmt(t['npv'])} | {t['n']} ({t['n_malignant']}) |")
    return "\n".join(lines + ["", f"Threshold metrics at the bundle's threshold {threshold:g} (score ≥ threshold = "
                                  "malignant)."])


def calibration(scopes: Scopes) -> str:
    """Calibration intercept and slope, Brier and scaled Brier, mean predicted vs observed risk."""
    lines = ["| Scope | Model | Intercept | Slope | Brier | Scaled Brier | Mean predicted | Observed |",
             "|---|---|---|---|---|---|---|---|"]
    for scope, models in scopes.items():
        for model, m in models.items():
            c = m["calibration"]
            lines.append(f"| {markdown_text(scope)} | {markdown_text(model)} | {fmt(c['intercept'])} | {fmt(c['slope'])} | "
                         f"{fmt(c['brier'])} | {fmt(c['scaled_brier'])} | {fmt(c['mean_predicted'])} | "
                         f"{fmt(c['observed_rate'])} |")
    return "\n".join(lines + ["", "Perfect calibration: intercept 0 (calibration-in-the-large, logit offset), slope 1 "
                                  "(logistic recalibration on logit p); – where no maximum-likelihood fit exists "
                                  "(the scores separate the classes perfectly). Reliability bins with Wilson 95% CIs "
                                  "are in report.json and the calibration figure."])


def utility(scopes: Scopes) -> str:
    """Biopsies avoided at the fixed sensitivities (bootstrap CIs) and net benefit at a few thresholds."""
    lines = ["| Scope | Model | Target sensitivity | Threshold (95% CI) | Achieved sensitivity | Benign spared "
             "(specificity, 95% CI) | Biopsies avoided per 100 (95% CI) | Cancers missed |",
             "|---|---|---|---|---|---|---|---|"]
    boot = None
    for scope, models in scopes.items():
        for model, m in models.items():
            for op in m["operating_points"]:
                boot = op
                lines.append(
                    f"| {markdown_text(scope)} | {markdown_text(model)} | {op['target_sensitivity']:.0%} | "
                    f"{fmt(op['threshold'])} ({fmt(op['threshold_ci_low'])}–{fmt(op['threshold_ci_high'])}) | "
                    f"{fmt(op['sensitivity'])} | {fmt(op['specificity'])} ({fmt(op['specificity_ci_low'])}–"
                    f"{fmt(op['specificity_ci_high'])}) | {fmt(op['biopsies_avoided_per_100'], 1)} "
                    f"({fmt(op['biopsies_avoided_per_100_ci_low'], 1)}–{fmt(op['biopsies_avoided_per_100_ci_high'], 1)}) "
                    f"| {fmt(op['cancers_missed'], 1)} |")
    if boot is not None:
        lines += ["", f"Operating point: the highest threshold keeping the sensitivity at the target; benign lesions "
                      f"below it are biopsies avoided. CIs: percentile bootstrap over the units ({boot['n_boot']} "
                      f"resamples, seed {boot['seed']}), threshold re-derived in each."]
    lines += ["", "Net benefit (biopsy when score ≥ threshold) against biopsying all lesions:", "",
              "| Scope | Model | " + " | ".join(f"t={t:g}" for t in TABLE_THRESHOLDS) + " |",
              "|---|---|" + "---|" * len(TABLE_THRESHOLDS)]
    for scope, models in scopes.items():
        for label, curve in [*((m, v["decision_curve"]) for m, v in models.items()),
                             *(("Biopsy all", v["decision_curve"]) for v in list(models.values())[:1])]:
            key = "treat_all" if label == "Biopsy all" else "model"
            values = dict(zip((round(t, 4) for t in curve["thresholds"]), curve[key]))
            lines.append(f"| {markdown_text(scope)} | {markdown_text(label)} | "
                         + " | ".join(fmt(values.get(round(t, 4)), 3) for t in TABLE_THRESHOLDS) + " |")
    return "\n".join(lines)


def paired(tests: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """``tests[scope]["a vs b"] = {z, p, method}`` as one table."""
    lines = ["| Scope | Comparison | z | P | Method |", "|---|---|---|---|---|"]
    for scope, by_pair in tests.items():
        for pair, t in by_pair.items():
            lines.append(f"| {markdown_text(scope)} | {markdown_text(pair)} | {fmt(t['z'])} | {p_value(t['p'])} | "
                         f"{t['method']} |")
    return "\n".join(lines)


def subgroups(column: str, by_level: Mapping[str, Mapping[str, Any]], models: Sequence[str]) -> str:
    """One subgroup column: per level, n and per model AUC (95 % CI), sensitivity, specificity, Brier."""
    lines = [f"| {markdown_text(column)} | n (malignant) | Model | AUC (95% CI) | Sensitivity | Specificity | Brier |",
             "|---|---|---|---|---|---|---|"]
    for level, entry in by_level.items():
        for model in models:
            m = entry["models"][model]
            lines.append(f"| {markdown_text(level)} | {entry['n']} ({entry['n_malignant']}) | {markdown_text(model)} | "
                         f"{fmt(m['auc'])} ({fmt(m['auc_ci_low'])}–{fmt(m['auc_ci_high'])}) | {fmt(m['sensitivity'])} | "
                         f"{fmt(m['specificity'])} | {fmt(m['brier'])} |")
    return "\n".join(lines)


__all__ = ["TABLE_THRESHOLDS", "calibration", "fmt", "p_value", "paired", "subgroups", "table2", "utility"]
