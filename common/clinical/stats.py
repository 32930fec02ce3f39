"""Clinical parameter statistics as additive per-class sums: what a federation adds up (SecAgg+).

A federation only sees sums over sites, so every clinical test (:mod:`cldlr.common.clinical.selection`) is
computed from sufficient statistics that add up: per class and parameter, numeric ones keep n,
Σz, Σz², Σz³, Σz⁴ (with z = (x − centre) / half-width of the schema ``range``, so every entry is
bounded by n and the sums stay well conditioned) and a histogram on ``n_bins`` equal bins over
the range (a second pass bins where the data lie: :func:`refined_histogram_ranges`); binary and
categorical ones keep counts per level. Missing values are excluded per parameter and counted;
parameters with ``model_input: false`` (BI-RADS) never enter the statistics.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cldlr.common.data.schema import Parameter, Schema
from cldlr.common.errors import SchemaError

CLASSES = ("benign", "malignant")
BINARY_LEVELS = ("no", "yes")
N_MOMENTS = 5  # n, Σz, Σz², Σz³, Σz⁴


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


def _value_range(parameter: Parameter) -> tuple[float, float]:
    """The schema range of a numeric parameter: its bins and moment scaling are defined on it."""
    if parameter.range is None:
        raise SchemaError(f"numeric parameter {parameter.name!r} has no range; add `range: [low, high]` to it in the schema")
    return parameter.range


def _scale(parameter: Parameter) -> tuple[float, float]:
    """Centre and half-width of the range: the agreed shift/scale of the moment sums."""
    low, high = _value_range(parameter)
    half = (high - low) / 2.0
    return (low + high) / 2.0, half if half > 0 else 1.0


@dataclass(frozen=True)
class StatisticsLayout:
    """What every site and the centre agree on: parameters (schema order, with ranges) and bins."""

    parameters: tuple[Parameter, ...]
    n_bins: int = 1000
    #: (name, low, high) of numeric histograms that use a refined range instead of the schema's
    histogram_ranges: tuple[tuple[str, float, float], ...] = ()

    def histogram_range(self, parameter: Parameter) -> tuple[float, float] | None:
        """Where a numeric histogram's bins lie: the refined range if the centre sent one, else the schema's.

        ``None`` for a binary or categorical parameter, which has levels instead of a range.
        """
        for name, low, high in self.histogram_ranges:
            if name == parameter.name:
                return low, high
        return parameter.range

    def with_histogram_ranges(self, ranges: dict[str, tuple[float, float]] | None) -> StatisticsLayout:
        """The layout of the second pass, whose histograms bin where the data lie (no ranges: unchanged)."""
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

    @property
    def numeric_moments(self) -> np.ndarray:
        """The moment sums, which only a numeric parameter has (asking a level parameter for them is a bug)."""
        if self.moments is None:
            raise ValueError("these class statistics have no moment sums: they are of a binary or categorical parameter")
        return self.moments

    def to_vector(self) -> np.ndarray:
        """Flat form in the order :meth:`ParameterStatistics.from_vector` reads: n_missing, moments, counts."""
        parts = [np.array([self.n_missing])] + ([self.moments] if self.moments is not None else []) + [self.counts]
        return np.concatenate(parts).astype(np.float64)

    def __add__(self, other: ClassStatistics) -> ClassStatistics:
        moments = None if self.moments is None else self.moments + other.numeric_moments
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

    @classmethod
    def from_noisy_vector(cls, vec: np.ndarray, layout: StatisticsLayout) -> ParameterStatistics:
        """:meth:`from_vector` of a DP-noised sum, repaired so every test stays defined.

        Counts (class sizes, missing counts, n, histogram bins, level counts) are rounded and
        clamped to ≥ 0; each numeric block's n is at least 1 and its even moments are clamped so
        that Σz² ≥ (Σz)²/n and Σz⁴ ≥ (Σz²)²/n (a variance and a kurtosis ≥ 0); odd moments stay.
        """
        vec = np.asarray(vec, dtype=np.float64).ravel().copy()
        if vec.size != layout.size:
            raise ValueError(f"statistics vector has {vec.size} entries but the layout needs {layout.size}")
        vec[:2] = np.maximum(np.rint(vec[:2]), 1.0)
        pos = 2
        for p in layout.parameters:
            for _ in CLASSES:
                size = layout.block_size(p)
                block = vec[pos:pos + size]  # a view: repaired in place
                block[0] = max(np.rint(block[0]), 0.0)
                if p.type == "numeric":
                    n = block[1] = max(np.rint(block[1]), 1.0)
                    block[2] = np.clip(block[2], -n, n)
                    block[3] = np.clip(block[3], block[2] ** 2 / n, n)
                    block[4] = np.clip(block[4], -n, n)
                    block[5] = np.clip(block[5], block[3] ** 2 / n, n)
                    block[1 + N_MOMENTS:] = np.maximum(np.rint(block[1 + N_MOMENTS:]), 0.0)
                else:
                    block[1:] = np.maximum(np.rint(block[1:]), 0.0)
                pos += size
        return cls.from_vector(vec, layout)

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
        values: np.ndarray = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64)
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
                         "parsed as by cldlr.common.data.site.read_site)")
    return values


def _class_statistics(values: np.ndarray, p: Parameter, n_bins: int,
                      hist_range: tuple[float, float] | None = None) -> ClassStatistics:
    present = values[~np.isnan(values)]
    n_missing = float(values.size - present.size)
    if p.type != "numeric":
        return ClassStatistics(n_missing, np.bincount(present.astype(np.int64), minlength=len(levels_of(p))).astype(np.float64))
    centre, half = _scale(p)
    z = (present - centre) / half
    moments = np.array([np.sum(z**k) for k in range(N_MOMENTS)], dtype=np.float64)
    counts = np.bincount(bin_index(present, hist_range or _value_range(p), n_bins), minlength=n_bins).astype(np.float64)
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


def noisy_sums_view(frame: pd.DataFrame, schema: Schema) -> tuple[pd.DataFrame, Schema]:
    """The frame and schema a site's noisy statistics are computed on (whole-study DP).

    Each numeric value is clipped into its parameter's public ``dp_range``, which then serves as
    its range (:meth:`~cldlr.common.data.schema.Schema.for_noisy_sums`): one patient still moves
    every sum by at most the protocol's bound, on a scale near where the data lie.
    """
    view = schema.for_noisy_sums()
    if view is schema:
        return frame, schema
    clipped = frame.copy()
    for p in schema.parameters:
        if p.dp_range is not None and p.name in clipped.columns:
            values = pd.to_numeric(clipped[p.name], errors="coerce")
            clipped[p.name] = values.clip(lower=p.dp_range[0], upper=p.dp_range[1])
    return clipped, view


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
        mean, sd = class_mean_sd(total, p)
        if not (math.isfinite(mean) and math.isfinite(sd) and sd > 0):
            continue
        low, high = _value_range(p)
        ranges[p.name] = (max(low, mean - width_sd * sd), min(high, mean + width_sd * sd))
    return ranges


def class_mean_sd(s: ClassStatistics, p: Parameter) -> tuple[float, float]:
    """Mean and SD of a numeric parameter in its own units, from one class's moment sums (NaN when n is too small)."""
    n, s1, s2 = s.numeric_moments[:3]
    centre, half = _scale(p)
    mean = s1 / n if n > 0 else math.nan
    var = max(s2 - s1 * mean, 0.0) / (n - 1) if n > 1 else math.nan
    return centre + half * mean, half * math.sqrt(var)
