"""Clinical parameter selection (the seed study's Table 1, P < alpha) from additive per-class sums.

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

import dataclasses
import functools
import logging
import math
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from .errors import SchemaError
from .schema import Parameter, Schema

log = logging.getLogger(__name__)

CLASSES = ("benign", "malignant")
BINARY_LEVELS = ("no", "yes")
N_MOMENTS = 5  # n, Σz, Σz², Σz³, Σz⁴
MIN_NORMALITY_N = 8  # scipy's skewtest needs n >= 8


def levels_of(parameter: Parameter) -> tuple[str, ...]:
    """Display levels of a binary (no/yes for 0/1) or categorical parameter."""
    return BINARY_LEVELS if parameter.type == "binary" else parameter.levels


def bin_index(values: np.ndarray, value_range: tuple[float, float], n_bins: int) -> np.ndarray:
    """Bin of each value on ``n_bins`` equal bins over the closed range (the top edge joins the last bin)."""
    low, high = value_range
    if high <= low:
        return np.zeros(len(values), dtype=np.int64)
    index = np.floor((np.asarray(values, dtype=np.float64) - low) / (high - low) * n_bins)
    return np.clip(index, 0, n_bins - 1).astype(np.int64)


def _scale(parameter: Parameter) -> tuple[float, float]:
    """Centre and half-width of the range: the agreed shift/scale of the moment sums."""
    low, high = parameter.range  # type: ignore[misc]
    half = (high - low) / 2.0
    return (low + high) / 2.0, half if half > 0 else 1.0


@dataclass(frozen=True)
class StatisticsLayout:
    """What every site and the centre agree on: parameters (schema order, with ranges) and bins."""

    parameters: tuple[Parameter, ...]
    n_bins: int = 1000
    #: (name, low, high) of numeric histograms that use a refined range instead of the schema's
    histogram_ranges: tuple[tuple[str, float, float], ...] = ()

    def histogram_range(self, parameter: Parameter) -> tuple[float, float]:
        for name, low, high in self.histogram_ranges:
            if name == parameter.name:
                return low, high
        return parameter.range  # type: ignore[return-value]

    def with_histogram_ranges(self, ranges: dict[str, tuple[float, float]] | None) -> StatisticsLayout:
        if not ranges:
            return self
        return dataclasses.replace(self, histogram_ranges=tuple(
            (name, float(low), float(high)) for name, (low, high) in sorted(ranges.items())))

    @classmethod
    def from_schema(cls, schema: Schema, n_bins: int = 1000) -> StatisticsLayout:
        """Layout of the schema's model parameters; a numeric one without ``range`` is an error."""
        for p in schema.model_parameters:
            if p.type == "numeric" and p.range is None:
                raise SchemaError(
                    f"schema {schema.source or schema.name}: numeric parameter {p.name!r} has no range; federated "
                    f"statistics bin it on bins every site agrees on: add `range: [low, high]` to {p.name!r}"
                )
        if n_bins < 1:
            raise ValueError(f"n_bins must be at least 1, got {n_bins}")
        return cls(schema.model_parameters, int(n_bins))

    def block_size(self, parameter: Parameter) -> int:
        """Length of one class block: n_missing, then moments + histogram or level counts."""
        return 1 + (N_MOMENTS + self.n_bins if parameter.type == "numeric" else len(levels_of(parameter)))

    @property
    def size(self) -> int:
        """Length of the flat vector: two class sizes, then two class blocks per parameter."""
        return 2 + 2 * sum(self.block_size(p) for p in self.parameters)


@dataclass(frozen=True, eq=False)
class ClassStatistics:
    """Additive sums of one parameter within one class."""

    n_missing: float
    counts: np.ndarray  # histogram over the range (numeric) or counts per level
    moments: np.ndarray | None = None  # numeric only: n, Σz, Σz², Σz³, Σz⁴

    def to_vector(self) -> np.ndarray:
        parts = [np.array([self.n_missing])] + ([self.moments] if self.moments is not None else []) + [self.counts]
        return np.concatenate(parts).astype(np.float64)

    def __add__(self, other: ClassStatistics) -> ClassStatistics:
        moments = None if self.moments is None else self.moments + other.moments  # type: ignore[operator]
        return ClassStatistics(self.n_missing + other.n_missing, self.counts + other.counts, moments)


@dataclass(frozen=True, eq=False)
class ParameterStatistics:
    """Per-class sums for every model parameter of the schema; travels as ONE flat vector."""

    layout: StatisticsLayout
    class_sizes: np.ndarray  # rows per class (benign, malignant), missing values included
    by_parameter: dict[str, tuple[ClassStatistics, ClassStatistics]]

    def to_vector(self) -> np.ndarray:
        """Flat float64 vector; every entry's magnitude is at most the site's row count (SecAgg+ bound)."""
        blocks = [np.asarray(self.class_sizes, dtype=np.float64)]
        for p in self.layout.parameters:
            blocks.extend(s.to_vector() for s in self.by_parameter[p.name])
        return np.concatenate(blocks)

    @classmethod
    def from_vector(cls, vec: np.ndarray, layout: StatisticsLayout) -> ParameterStatistics:
        """Inverse of :meth:`to_vector` (e.g. after secure summation) for the same layout."""
        vec = np.asarray(vec, dtype=np.float64).ravel()
        if vec.size != layout.size:
            raise ValueError(f"statistics vector has {vec.size} entries but the layout needs {layout.size}; "
                             "were the sites using the same schema and n_bins?")
        pos, by = 2, {}
        for p in layout.parameters:
            pair = []
            for _ in CLASSES:
                block = vec[pos:pos + layout.block_size(p)]
                pos += block.size
                if p.type == "numeric":
                    pair.append(ClassStatistics(block[0], block[1 + N_MOMENTS:].copy(), block[1:1 + N_MOMENTS].copy()))
                else:
                    pair.append(ClassStatistics(block[0], block[1:].copy()))
            by[p.name] = (pair[0], pair[1])
        return cls(layout, vec[:2].copy(), by)

    def __add__(self, other: ParameterStatistics) -> ParameterStatistics:
        if other.layout != self.layout:
            raise ValueError("cannot add statistics computed with different schemas, ranges or n_bins")
        by = {name: (a[0] + b[0], a[1] + b[1]) for (name, a), b in zip(self.by_parameter.items(), other.by_parameter.values())}
        return ParameterStatistics(self.layout, self.class_sizes + other.class_sizes, by)


def sum_statistics(parts: list[ParameterStatistics]) -> ParameterStatistics:
    """Sum of site statistics (what secure aggregation of their vectors yields)."""
    if not parts:
        raise ValueError("sum_statistics needs at least one site's statistics")
    return functools.reduce(operator.add, parts)


def _column_codes(series: pd.Series, p: Parameter) -> np.ndarray:
    """Float values (numeric) or level indices (binary/categorical), NaN where missing."""
    missing = series.isna().to_numpy()
    if p.type == "numeric":
        values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64)
        bad = ~missing & ~np.isfinite(values)
        if p.range is not None:
            bad |= ~missing & ((values < p.range[0]) | (values > p.range[1]))
        what = f"finite numbers in the range {p.range}"
    else:
        lookup = {0.0: 0, 1.0: 1} if p.type == "binary" else {level: i for i, level in enumerate(p.levels)}
        values = np.array([np.nan if m else lookup.get(v, -1) for v, m in zip(series.tolist(), missing)], dtype=np.float64)
        bad = values < 0
        what = "0/1" if p.type == "binary" else f"one of {list(p.levels)}"
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"parameter {p.name!r}, row {row}: value {series.iloc[row]!r} is not valid (expected {what}, "
                         "parsed as by cldlr.common.contract.read_site)")
    return values


def _class_statistics(values: np.ndarray, p: Parameter, n_bins: int, hist_range: tuple[float, float] | None = None) -> ClassStatistics:
    present = values[~np.isnan(values)]
    n_missing = float(values.size - present.size)
    if p.type != "numeric":
        return ClassStatistics(n_missing, np.bincount(present.astype(np.int64), minlength=len(levels_of(p))).astype(np.float64))
    centre, half = _scale(p)
    z = (present - centre) / half
    moments = np.array([np.sum(z**k) for k in range(N_MOMENTS)], dtype=np.float64)
    counts = np.bincount(bin_index(present, hist_range or p.range, n_bins), minlength=n_bins).astype(np.float64)  # type: ignore[arg-type]
    return ClassStatistics(n_missing, counts, moments)


def compute_statistics(frame: pd.DataFrame, labels: np.ndarray, schema: Schema, n_bins: int = 1000,
                       *, local_ranges: bool = False,
                       histogram_ranges: dict[str, tuple[float, float]] | None = None) -> ParameterStatistics:
    """Local per-class sums of every model parameter (columns as in ``SiteData.frame``).

    ``histogram_ranges`` (from :func:`refined_histogram_ranges` of a first pass) narrows the
    numeric histograms to where the data lie; values outside fall into the edge bins.

    ``local_ranges=True`` lets a single-site run bin a numeric parameter that has no schema range
    over the site's own min/max; federated runs must leave it off so every site bins alike.
    """
    labels = np.asarray(labels)
    if labels.shape != (len(frame),) or not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be one 0/1 (benign/malignant) per frame row ({len(frame)}), got shape {labels.shape}")
    params = list(schema.model_parameters)
    missing_cols = [p.name for p in params if p.name not in frame.columns]
    if missing_cols:
        raise ValueError(f"frame lacks the schema parameter column(s) {', '.join(missing_cols)}")
    codes = {p.name: _column_codes(frame[p.name], p) for p in params}
    if local_ranges:
        for i, p in enumerate(params):
            if p.type == "numeric" and p.range is None:
                seen = codes[p.name][~np.isnan(codes[p.name])]
                params[i] = dataclasses.replace(p, range=(float(seen.min()), float(seen.max())) if seen.size else (0.0, 1.0))
    layout = StatisticsLayout.from_schema(dataclasses.replace(schema, parameters=tuple(params)), n_bins)
    layout = layout.with_histogram_ranges(histogram_ranges)
    by = {p.name: (_class_statistics(codes[p.name][labels == 0], p, n_bins, layout.histogram_range(p)),
                   _class_statistics(codes[p.name][labels == 1], p, n_bins, layout.histogram_range(p)))
          for p in layout.parameters}
    sizes = np.array([np.sum(labels == 0), np.sum(labels == 1)], dtype=np.float64)
    return ParameterStatistics(layout, sizes, by)


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


def refined_histogram_ranges(stats: ParameterStatistics, width_sd: float = 5.0) -> dict[str, tuple[float, float]]:
    """Per numeric parameter: pooled mean ± ``width_sd`` SD, inside the schema range.

    The first pass bins over the schema's physical range, which can be far wider than the data
    (an area range of 0–4·10⁶ px² for lesions of 10⁴ px²), so all values could share a few bins
    and Mann–Whitney would see only ties. The second pass bins where the data lie; every site
    gets the same refined bins from the centre, so the test stays identical to a pooled run.
    """
    ranges = {}
    for p in stats.layout.parameters:
        if p.type != "numeric":
            continue
        b, m = stats.by_parameter[p.name]
        total = b + m
        mean, sd = _mean_sd(total, p)
        if not (math.isfinite(mean) and math.isfinite(sd) and sd > 0):
            continue
        low, high = p.range  # type: ignore[misc]
        ranges[p.name] = (max(low, mean - width_sd * sd), min(high, mean + width_sd * sd))
    return ranges


def select_clinical(frame: pd.DataFrame, labels: np.ndarray, schema: Schema, *, alpha: float = 0.05,
                    normality_alpha: float = 0.05, n_bins: int = 1000) -> SelectionResult:
    """The single-site path: the same two passes a federation makes (schema bins, then refined bins)."""
    first = compute_statistics(frame, labels, schema, n_bins)
    second = compute_statistics(frame, labels, schema, n_bins, histogram_ranges=refined_histogram_ranges(first))
    return select_parameters(second, alpha=alpha, normality_alpha=normality_alpha)


def _counts(values: np.ndarray) -> np.ndarray:
    """Counts back from a (possibly securely summed, quantised) vector: nearest non-negative integer."""
    return np.clip(np.rint(values), 0, None).astype(np.int64)


def _mean_sd(s: ClassStatistics, p: Parameter) -> tuple[float, float]:
    n, s1, s2 = s.moments[:3]  # type: ignore[index]
    centre, half = _scale(p)
    mean = s1 / n if n > 0 else math.nan
    var = max(s2 - s1 * mean, 0.0) / (n - 1) if n > 1 else math.nan
    return centre + half * mean, half * math.sqrt(var)


def _numeric_row(p: Parameter, b: ClassStatistics, m: ClassStatistics, n_bins: int, normality_alpha: float) -> dict[str, Any]:
    (mean_b, sd_b), (mean_m, sd_m) = _mean_sd(b, p), _mean_sd(m, p)
    norm_p = [normaltest_from_moments(s.moments)[1] for s in (b, m)]  # type: ignore[arg-type]
    def text(mean: float, sd: float) -> str:
        return "–" if math.isnan(mean) else f"{mean:.2f} ± " + ("–" if math.isnan(sd) else f"{sd:.2f}")

    row: dict[str, Any] = {"benign": text(mean_b, sd_b), "malignant": text(mean_m, sd_m),
                           "normality_p_benign": norm_p[0], "normality_p_malignant": norm_p[1]}
    if min(b.moments[0], m.moments[0]) < 1:  # type: ignore[index]
        return {**row, "test": "not testable", "note": "a class has no observed value"}
    if all(q >= normality_alpha for q in norm_p):  # NaN (n < 8, constant) compares False
        res = sps.ttest_ind_from_stats(mean_b, sd_b, b.moments[0], mean_m, sd_m, m.moments[0], equal_var=False)  # type: ignore[index]
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
    "BINARY_LEVELS", "CLASSES", "ClassStatistics", "ParameterStatistics", "SelectionResult", "StatisticsLayout",
    "bin_index", "compute_statistics", "levels_of", "normaltest_from_moments", "select_parameters", "sum_statistics",
]
