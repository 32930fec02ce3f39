"""Clinical parameter selection (the seed study's Table 1, P < alpha) from additive per-class sums.

The sums come from :mod:`cldlr.common.clinical.stats`.

A federation only sees sums over sites (SecAgg+), so every test here is computed from sufficient
statistics that add up: per class and parameter, numeric ones keep n, Σz, Σz², Σz³, Σz⁴ (with
z = (x − centre) / half-width of the schema ``range``, so every entry is bounded by n and the
sums stay well conditioned) and a histogram on ``n_bins`` equal bins over the range; binary and
categorical ones keep counts per level. A single site runs the very same code (local sums →
:func:`select_parameters`), so single-site and federated selections coincide by construction.

Rules (stated once, used everywhere):

* Numeric: the D'Agostino–Pearson K² omnibus test (``scipy.stats.normaltest``, rebuilt from the
  moment sums) runs on each class; when both classes have n ≥ 8 and P ≥ ``normality_alpha`` the
  parameter gets Welch's t-test (unequal variances, from n, Σx, Σx²), otherwise the two-sided
  Mann–Whitney U test with tie correction and continuity correction (scipy's ``"asymptotic"``).
  Mann–Whitney is computed on the binned values (one bin = one tie group), i.e. it equals scipy's
  test on the bin indices exactly; with 1000 bins it is within ~1e-3 of the test on raw values.
* Binary / categorical: ``scipy.stats.chi2_contingency`` (Yates' correction on 2×2 tables, as
  scipy does by default) on the class × level table, levels seen in neither class dropped;
  Fisher's exact test when that table is 2×2 and an expected count is < 5. A larger table with a
  small expected count keeps chi-square and is flagged in the row's ``note``.
* Missing values are excluded per parameter and counted in ``n_missing``; parameters with
  ``model_input: false`` (BI-RADS) never enter the statistics, hence can never be selected.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from cldlr.common.clinical.stats import (
    BINARY_LEVELS,
    CLASSES,
    ClassStatistics,
    ParameterStatistics,
    class_mean_sd,
    compute_statistics,
    levels_of,
    refined_histogram_ranges,
)
from cldlr.common.data.schema import Parameter, Schema

log = logging.getLogger(__name__)

MIN_NORMALITY_N = 8  # scipy's skewtest needs n >= 8


def normaltest_from_moments(moments: np.ndarray) -> tuple[float, float]:
    """D'Agostino–Pearson K² and its P from [n, Σz, Σz², Σz³, Σz⁴] (any shift/scale of the data).

    Same formulas as ``scipy.stats.normaltest`` (skewtest² + kurtosistest², χ² with 2 df), fed
    with the biased sample skewness and kurtosis; NaN for n < 8 or a constant sample.
    """
    n, s1, s2, s3, s4 = (float(v) for v in moments)
    if n < MIN_NORMALITY_N:
        return math.nan, math.nan
    mu = s1 / n
    m2 = s2 / n - mu**2
    if m2 <= 1e-12 * max(s2 / n, 1e-300):
        return math.nan, math.nan
    m3 = s3 / n - 3 * mu * s2 / n + 2 * mu**3
    m4 = s4 / n - 4 * mu * s3 / n + 6 * mu**2 * s2 / n - 3 * mu**4
    skew, kurt = m3 / m2**1.5, m4 / m2**2
    # skewness test (D'Agostino 1970)
    y = skew * math.sqrt((n + 1) * (n + 3) / (6.0 * (n - 2)))
    beta2 = 3.0 * (n**2 + 27 * n - 70) * (n + 1) * (n + 3) / ((n - 2.0) * (n + 5) * (n + 7) * (n + 9))
    w2 = -1 + math.sqrt(2 * (beta2 - 1))
    delta, alpha = 1 / math.sqrt(0.5 * math.log(w2)), math.sqrt(2.0 / (w2 - 1))
    z_skew = delta * math.asinh(y / alpha)
    # kurtosis test (Anscombe & Glynn 1983)
    expected = 3.0 * (n - 1) / (n + 1)
    var_b2 = 24.0 * n * (n - 2) * (n - 3) / ((n + 1) ** 2 * (n + 3) * (n + 5))
    x = (kurt - expected) / math.sqrt(var_b2)
    sqrt_beta1 = 6.0 * (n * n - 5 * n + 2) / ((n + 7) * (n + 9)) * math.sqrt(6.0 * (n + 3) * (n + 5) / (n * (n - 2) * (n - 3)))
    a = 6.0 + 8.0 / sqrt_beta1 * (2.0 / sqrt_beta1 + math.sqrt(1 + 4.0 / sqrt_beta1**2))
    denom = 1 + x * math.sqrt(2 / (a - 4.0))
    if denom == 0:
        return math.nan, math.nan
    term2 = math.copysign(((1 - 2.0 / a) / abs(denom)) ** (1 / 3.0), denom)
    z_kurt = (1 - 2 / (9.0 * a) - term2) / math.sqrt(2 / (9.0 * a))
    k2 = z_skew**2 + z_kurt**2
    return k2, float(sps.chi2.sf(k2, 2))


def select_clinical(frame: pd.DataFrame, labels: np.ndarray, schema: Schema, *, alpha: float = 0.05,
                    normality_alpha: float = 0.05, n_bins: int = 1000) -> SelectionResult:
    """The single-site path: the same two passes a federation makes (schema bins, then refined bins)."""
    first = compute_statistics(frame, labels, schema, n_bins)
    second = compute_statistics(frame, labels, schema, n_bins, histogram_ranges=refined_histogram_ranges(first))
    return select_parameters(second, alpha=alpha, normality_alpha=normality_alpha)


def _counts(values: np.ndarray) -> np.ndarray:
    """Counts back from a (possibly securely summed, quantised) vector: nearest non-negative integer."""
    counts: np.ndarray = np.clip(np.rint(values), 0, None).astype(np.int64)
    return counts


def _numeric_row(p: Parameter, b: ClassStatistics, m: ClassStatistics, n_bins: int, normality_alpha: float) -> dict[str, Any]:
    (mean_b, sd_b), (mean_m, sd_m) = class_mean_sd(b, p), class_mean_sd(m, p)
    norm_p = [normaltest_from_moments(s.numeric_moments)[1] for s in (b, m)]
    def text(mean: float, sd: float) -> str:
        return "–" if math.isnan(mean) else f"{mean:.2f} ± " + ("–" if math.isnan(sd) else f"{sd:.2f}")

    row: dict[str, Any] = {"benign": text(mean_b, sd_b), "malignant": text(mean_m, sd_m),
                           "normality_p_benign": norm_p[0], "normality_p_malignant": norm_p[1]}
    n_b, n_m = b.numeric_moments[0], m.numeric_moments[0]
    if min(n_b, n_m) < 1:
        return {**row, "test": "not testable", "note": "a class has no observed value"}
    if all(q >= normality_alpha for q in norm_p):  # NaN (n < 8, constant) compares False
        res = sps.ttest_ind_from_stats(mean_b, sd_b, n_b, mean_m, sd_m, n_m, equal_var=False)
        return {**row, "test": "t-test (Welch)", "statistic": float(res.statistic), "p": float(res.pvalue)}
    bins = np.arange(n_bins)
    x, y = np.repeat(bins, _counts(b.counts)), np.repeat(bins, _counts(m.counts))
    res = sps.mannwhitneyu(x, y, alternative="two-sided", use_continuity=True, method="asymptotic")
    return {**row, "test": "Mann-Whitney U", "statistic": float(res.statistic), "p": float(res.pvalue)}


def _level_row(p: Parameter, b: ClassStatistics, m: ClassStatistics) -> dict[str, Any]:
    table = np.vstack([_counts(b.counts), _counts(m.counts)])
    levels = []
    for i, level in enumerate(levels_of(p)):
        cells = [f"{c[i]} ({100.0 * c[i] / max(c.sum(), 1):.1f}%)" for c in table]
        levels.append({"level": level, "benign": cells[0], "malignant": cells[1]})
    row: dict[str, Any] = {"levels": levels, "benign": "; ".join(f"{lv['level']} {lv['benign']}" for lv in levels),
                           "malignant": "; ".join(f"{lv['level']} {lv['malignant']}" for lv in levels)}
    seen = table[:, table.sum(axis=0) > 0]
    if seen.shape[1] < 2 or (seen.sum(axis=1) == 0).any():
        return {**row, "test": "not testable", "note": "fewer than two observed levels or an empty class"}
    small = bool((sps.contingency.expected_freq(seen) < 5).any())
    if small and seen.shape == (2, 2):
        res = sps.fisher_exact(seen)
        return {**row, "test": "Fisher exact", "statistic": float(res.statistic), "p": float(res.pvalue)}
    res = sps.chi2_contingency(seen, correction=True)
    note = "expected count < 5 in a table larger than 2×2: chi-square is approximate" if small else ""
    return {**row, "test": "chi-square", "statistic": float(res.statistic), "p": float(res.pvalue), "note": note}


def _format_p(p: float | None) -> str:
    return "–" if p is None or not math.isfinite(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")


@dataclass(frozen=True)
class SelectionResult:
    """Selected parameter names (schema order) and one Table 1 row per model parameter."""

    selected: list[str]
    table: list[dict[str, Any]]
    class_sizes: tuple[int, int]
    alpha: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-able copy (non-finite statistics such as an infinite odds ratio become None)."""
        def clean(v: Any) -> Any:
            return None if isinstance(v, float) and not math.isfinite(v) else v
        return {"selected": list(self.selected), "alpha": self.alpha, "class_sizes": list(self.class_sizes),
                "table": [{k: clean(v) for k, v in row.items()} for row in self.table]}

    def to_markdown(self) -> str:
        """The seed's Table 1: one row per parameter (level sub-rows for categories) and a legend."""
        nb, nm = self.class_sizes
        lines = [f"| Parameter | Benign (n={nb}) | Malignant (n={nm}) | Test | Statistic | P | Missing | Selected |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in self.table:
            name = f"{r['parameter']} ({r['unit']})" if r["unit"] else r["parameter"]
            stat = "–" if r["statistic"] is None or not math.isfinite(r["statistic"]) else f"{r['statistic']:.3f}"
            sub = r.get("levels") or []
            cells = ("", "") if sub else (r["benign"], r["malignant"])
            lines.append(f"| {name} | {cells[0]} | {cells[1]} | {r['test']} | {stat} | {_format_p(r['p'])} "
                         f"| {r['n_missing']} | {'yes' if r['selected'] else 'no'} |")
            lines.extend(f"| &nbsp;&nbsp;{lv['level']} | {lv['benign']} | {lv['malignant']} | | | | | |" for lv in sub)
        notes = [f"{r['parameter']}: {r['note']}" for r in self.table if r.get("note")]
        lines += ["", f"Numeric: mean ± SD; Welch's t-test when both classes pass the D'Agostino–Pearson normality test "
                  f"(n ≥ {MIN_NORMALITY_N}), otherwise Mann–Whitney U. Binary/categorical: n (%); chi-square (Yates "
                  f"correction for 2×2), Fisher's exact test for a 2×2 table with an expected count < 5. "
                  f"Selected: P < {self.alpha:g}. Parameters with model_input: false (BI-RADS) are excluded."]
        return "\n".join(lines + [f"- {n}" for n in notes]) + "\n"


def select_parameters(stats: ParameterStatistics, *, alpha: float = 0.05, normality_alpha: float = 0.05) -> SelectionResult:
    """Table 1 and the parameters with P < ``alpha`` (rules in the module docstring).

    ``statistic`` is Welch's t (benign − malignant), the benign class's U, χ², or Fisher's odds
    ratio (rows benign/malignant, columns in level order) depending on ``test``.
    """
    rows = []
    for p in stats.layout.parameters:
        b, m = stats.by_parameter[p.name]
        row = _numeric_row(p, b, m, stats.layout.n_bins, normality_alpha) if p.type == "numeric" else _level_row(p, b, m)
        base = {"parameter": p.name, "type": p.type, "unit": p.unit, "statistic": None, "p": None, "note": "",
                "n_missing": int(_counts(np.array([b.n_missing + m.n_missing]))[0])}
        row = {**base, **row}
        p_value = row["p"]
        row["selected"] = bool(p_value is not None and math.isfinite(p_value) and p_value < alpha)
        rows.append(row)
    log.info("clinical selection (P < %g): %s", alpha, ", ".join(r["parameter"] for r in rows if r["selected"]) or "none")
    sizes = _counts(stats.class_sizes)
    return SelectionResult([r["parameter"] for r in rows if r["selected"]], rows, (int(sizes[0]), int(sizes[1])), alpha)


__all__ = [
    "BINARY_LEVELS", "CLASSES", "ClassStatistics", "ParameterStatistics", "SelectionResult", "compute_statistics",
    "levels_of", "normaltest_from_moments", "select_clinical", "select_parameters",
]
