"""Multi-reader multi-case (MRMC) analysis: Obuchowski–Rockette with Hillis' degrees of freedom.

A reader study asks whether readers perform better with the AI than without it, for readers and
cases *like these*, not only for the five radiologists and the 100 lesions that took part. One
DeLong test per reader answers a narrower question. The Obuchowski–Rockette (OR) model treats the
figure of merit (FOM) θ̂_ij of test i and reader j as

    θ̂_ij = μ + τ_i + R_j + (τR)_ij + ε_ij,

with random reader effects R_j, (τR)_ij and an error ε_ij whose covariance across cases gives
σ²_ε (same test, same reader), Cov1 (other test, same reader), Cov2 (same test, other reader) and
Cov3 (other test, other reader). The covariances are estimated from the cases by DeLong's
structural components (empirical AUC only) or by the case jackknife (any FOM).

References (the formulas below cite them by these names):

- [OR] Obuchowski NA, Rockette HE (1995). Hypothesis testing of diagnostic accuracy for multiple
  readers and multiple tests: an ANOVA approach with dependent observations. Commun Stat Simul
  Comput 24(2):285-308.
- [H07] Hillis SL (2007). A comparison of denominator degrees of freedom methods for multiple
  observer ROC analysis. Stat Med 26(3):596-619 (the ddf used here; fixed-reader and fixed-case
  variants).
- [H08] Hillis SL, Berbaum KS, Metz CE (2008). Recent developments in the Dorfman-Berbaum-Metz
  procedure for multireader ROC study analysis. Acad Radiol 15(5):647-661 (single-test CIs).
- [DeLong] DeLong ER, DeLong DM, Clarke-Pearson DL (1988). Comparing the areas under two or more
  correlated ROC curves: a nonparametric approach. Biometrics 44(3):837-845.
- [MRMCaov] Smith BJ, Hillis SL (2020), SPIE 11316 113160K, R package MRMCaov 0.3.0: the reference
  implementation these functions are tested against (tests/test_mrmc.py).

No Python package offers this analysis, so it is written here with numpy/scipy and checked against
MRMCaov's output on its own example data to the printed precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats

from cldlr.common.evaluation.mrmc_fom import (
    BinaryMetric,
    FloatArray,
    auc_leave_one_out,
    binary_leave_one_out,
    delong_covariance,
    empirical_auc,
    fom_binary,
    jackknife_covariance,
)

Covariance = Literal["delong", "jackknife"]


@dataclass(frozen=True)
class VarianceComponents:
    """OR variance components [OR, H07]: readers' and test×reader variances, error variance, Cov1-3, mean squares."""

    var_r: float
    var_tr: float
    var_error: float
    cov1: float
    cov2: float
    cov3: float
    ms_t: float
    ms_r: float
    ms_tr: float


@dataclass(frozen=True)
class TestMean:
    """A test's reader-averaged FOM with its standard error, degrees of freedom (inf = normal) and CI."""

    test: str
    estimate: float
    se: float
    df: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class Difference:
    """``first − second`` (of tests, or of one reader's two tests) with SE, df (inf = normal), CI, t or z, P."""

    first: str
    second: str
    estimate: float
    se: float
    df: float
    ci_low: float
    ci_high: float
    statistic: float
    p: float
    reader: str | None = None


@dataclass(frozen=True)
class GlobalTest:
    """The test of equal FOMs across tests: F (df1, df2) or, for fixed readers, χ² (df1, df2 = inf)."""

    statistic: float
    df1: float
    df2: float
    p: float
    denominator: float


@dataclass(frozen=True)
class Analysis:
    """One factor-type analysis ("random readers, random cases" etc.); reader rows only for fixed readers."""

    factors: str
    global_test: GlobalTest
    differences: tuple[Difference, ...]
    means: tuple[TestMean, ...]
    reader_differences: tuple[Difference, ...] = ()
    reader_means: tuple[TestMean, ...] = ()


@dataclass(frozen=True)
class MRMCResult:
    """Everything an OR-Hillis analysis gives: the reader×test FOMs, their covariance, components and analyses."""

    tests: tuple[str, ...]
    readers: tuple[str, ...]
    fom: FloatArray  # (tests, readers)
    covariance: FloatArray  # (tests·readers)², index i·readers + j
    method: str
    components: VarianceComponents
    random_readers_random_cases: Analysis | None
    fixed_readers_random_cases: Analysis
    random_readers_fixed_cases: Analysis | None

    @property
    def correlations(self) -> tuple[float, float, float]:
        """Cov1-3 divided by the error variance (MRMCaov prints them as "Correlation")."""
        c = self.components
        return c.cov1 / c.var_error, c.cov2 / c.var_error, c.cov3 / c.var_error


# ----------------------------------------------------------------------------- OR-Hillis

def _averages(cov: FloatArray, t: int, r: int, test: int | None = None) -> tuple[float, float, float, float]:
    """σ²_ε, Cov1, Cov2, Cov3: means of the covariance entries by same/other test and reader [OR]."""
    tests, readers = np.repeat(np.arange(t), r), np.tile(np.arange(r), t)
    same_t, same_r = tests[:, None] == tests[None, :], readers[:, None] == readers[None, :]
    keep = np.ones_like(same_t) if test is None else (tests[:, None] == test) & (tests[None, :] == test)

    def mean(mask: NDArray[np.bool_]) -> float:
        return float(cov[mask & keep].mean()) if (mask & keep).any() else math.nan

    return mean(same_t & same_r), mean(~same_t & same_r), mean(same_t & ~same_r), mean(~same_t & ~same_r)


def variance_components(fom: FloatArray, cov: FloatArray) -> VarianceComponents:
    """Mean squares and OR components [OR; H07 eq. 5-7]:
    MS(T) = r Σ_i (θ̄_i· − θ̄)²/(t−1), MS(R) = t Σ_j (θ̄_·j − θ̄)²/(r−1),
    MS(T:R) = Σ_ij (θ̂_ij − θ̄_i· − θ̄_·j + θ̄)²/((t−1)(r−1)),
    σ̂²_TR = MS(T:R) − σ̂²_ε + Cov1 + Cov2 − Cov3, σ̂²_R = (MS(R) − MS(T:R))/t − Cov1 + Cov3.
    """
    t, r = fom.shape
    grand, by_test, by_reader = fom.mean(), fom.mean(axis=1), fom.mean(axis=0)
    ms_t = r * float(((by_test - grand) ** 2).sum()) / (t - 1)
    ms_r = t * float(((by_reader - grand) ** 2).sum()) / (r - 1) if r > 1 else math.nan
    resid = fom - by_test[:, None] - by_reader[None, :] + grand
    ms_tr = float((resid ** 2).sum()) / ((t - 1) * (r - 1)) if r > 1 else math.nan
    var, cov1, cov2, cov3 = _averages(cov, t, r)
    return VarianceComponents(var_r=(ms_r - ms_tr) / t - cov1 + cov3, var_tr=ms_tr - var + cov1 + cov2 - cov3,
                              var_error=var, cov1=cov1, cov2=cov2, cov3=cov3, ms_t=ms_t, ms_r=ms_r, ms_tr=ms_tr)


def _ci(estimate: float, se: float, df: float, alpha: float, bounded: bool) -> tuple[float, float]:
    q = float(stats.norm.ppf(1 - alpha / 2) if math.isinf(df) else stats.t.ppf(1 - alpha / 2, df))
    low, high = estimate - q * se, estimate + q * se
    return (max(low, 0.0), min(high, 1.0)) if bounded else (low, high)


def _p_two_sided(statistic: float, df: float) -> float:
    if math.isnan(statistic):
        return math.nan
    return float(2 * (stats.norm.sf(abs(statistic)) if math.isinf(df) else stats.t.sf(abs(statistic), df)))


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def _hillis_df(denominator: float, ms: float, dof: float) -> float:
    """Satterthwaite-type ddf of Hillis [H07]: denominator² / (MS²/dof); infinite when MS is 0."""
    return denominator ** 2 / (ms ** 2 / dof) if ms > 0 else math.inf


def _differences(names: tuple[str, ...], means: FloatArray, se: float, df: float, alpha: float) -> tuple[Difference, ...]:
    out = []
    for a, b in combinations(range(len(names)), 2):
        est = float(means[a] - means[b])
        stat = _ratio(est, se)
        out.append(Difference(names[a], names[b], est, se, df, *_ci(est, se, df, alpha, False), stat,
                              _p_two_sided(stat, df)))
    return tuple(out)


def _random_random(fom: FloatArray, cov: FloatArray, c: VarianceComponents, tests: tuple[str, ...],
                   alpha: float, bounded: bool) -> Analysis:
    """[H07, H08] F = MS(T)/[MS(T:R) + r·max(Cov2 − Cov3, 0)] on (t−1, ddf_H) df,
    ddf_H = [MS(T:R) + r·max(Cov2 − Cov3, 0)]² / {MS(T:R)²/((t−1)(r−1))};
    a test alone: SE² = [MS(R_i) + r·max(Cov2_i, 0)]/r on ddf [MS(R_i) + r·max(Cov2_i, 0)]²/{MS(R_i)²/(r−1)}.
    """
    t, r = fom.shape
    denominator = c.ms_tr + r * max(c.cov2 - c.cov3, 0.0)
    df2 = _hillis_df(denominator, c.ms_tr, (t - 1) * (r - 1))
    f = _ratio(c.ms_t, denominator)
    p = float(stats.f.sf(f, t - 1, df2)) if not math.isnan(f) else math.nan
    means = []
    for i, name in enumerate(tests):
        ms_ri = float(fom[i].var(ddof=1))
        den_i = ms_ri + r * max(_averages(cov, t, r, i)[2], 0.0)
        df_i, est = _hillis_df(den_i, ms_ri, r - 1), float(fom[i].mean())
        se = math.sqrt(den_i / r)
        means.append(TestMean(name, est, se, df_i, *_ci(est, se, df_i, alpha, bounded)))
    return Analysis("random readers, random cases", GlobalTest(f, t - 1, df2, p, denominator),
                    _differences(tests, fom.mean(axis=1), math.sqrt(2 / r * denominator), df2, alpha), tuple(means))


def _fixed_readers(fom: FloatArray, cov: FloatArray, c: VarianceComponents, tests: tuple[str, ...],
                   readers: tuple[str, ...], alpha: float, bounded: bool) -> Analysis:
    """[H07] χ²_(t−1) = (t−1)·MS(T)/[σ²_ε − Cov1 + (r−1)(Cov2 − Cov3)]; a test alone: SE² = [σ²_ε,i + (r−1)Cov2_i]/r;
    per reader, θ̂_ij − θ̂_i'j with SE² = Var_ij + Var_i'j − 2Cov, normal.
    """
    t, r = fom.shape
    denominator = c.var_error - c.cov1 + (r - 1) * (c.cov2 - c.cov3 if r > 1 else 0.0)
    x2 = _ratio((t - 1) * c.ms_t, denominator)
    p = float(stats.chi2.sf(x2, t - 1)) if not math.isnan(x2) else math.nan
    means = []
    for i, name in enumerate(tests):
        var_i, _, cov2_i, _ = _averages(cov, t, r, i)
        se, est = math.sqrt((var_i + ((r - 1) * cov2_i if r > 1 else 0.0)) / r), float(fom[i].mean())
        means.append(TestMean(name, est, se, math.inf, *_ci(est, se, math.inf, alpha, bounded)))
    reader_diffs, reader_means = [], []
    for j, reader in enumerate(readers):
        for a, b in combinations(range(t), 2):
            ia, ib = a * r + j, b * r + j
            est = float(fom[a, j] - fom[b, j])
            se = math.sqrt(max(cov[ia, ia] + cov[ib, ib] - 2 * cov[ia, ib], 0.0))
            stat = _ratio(est, se)
            reader_diffs.append(Difference(tests[a], tests[b], est, se, math.inf, *_ci(est, se, math.inf, alpha, False),
                                           stat, _p_two_sided(stat, math.inf), reader))
    for i, name in enumerate(tests):
        for j, reader in enumerate(readers):
            se = math.sqrt(max(cov[i * r + j, i * r + j], 0.0))
            reader_means.append(TestMean(f"{name}|{reader}", float(fom[i, j]), se, math.inf,
                                         *_ci(float(fom[i, j]), se, math.inf, alpha, bounded)))
    return Analysis("fixed readers, random cases", GlobalTest(x2, t - 1, math.inf, p, denominator),
                    _differences(tests, fom.mean(axis=1), math.sqrt(2 / r * denominator), math.inf, alpha),
                    tuple(means), tuple(reader_diffs), tuple(reader_means))


def _fixed_cases(fom: FloatArray, c: VarianceComponents, tests: tuple[str, ...], alpha: float,
                 bounded: bool) -> Analysis:
    """[H07] F = MS(T)/MS(T:R) on (t−1, (t−1)(r−1)) df; a test alone: SE² = MS(R_i)/r on r−1 df."""
    t, r = fom.shape
    df2 = float((t - 1) * (r - 1))
    f = _ratio(c.ms_t, c.ms_tr)
    p = float(stats.f.sf(f, t - 1, df2)) if not math.isnan(f) else math.nan
    means = []
    for i, name in enumerate(tests):
        se, est = math.sqrt(float(fom[i].var(ddof=1)) / r), float(fom[i].mean())
        means.append(TestMean(name, est, se, r - 1.0, *_ci(est, se, r - 1.0, alpha, bounded)))
    return Analysis("random readers, fixed cases", GlobalTest(f, t - 1, df2, p, c.ms_tr),
                    _differences(tests, fom.mean(axis=1), math.sqrt(2 * c.ms_tr / r), df2, alpha), tuple(means))


def or_hillis(fom: ArrayLike, covariance: ArrayLike, *, tests: tuple[str, ...] | None = None,
              readers: tuple[str, ...] | None = None, method: str = "", alpha: float = 0.05,
              bounded: bool = True) -> MRMCResult:
    """OR-Hillis from reader×test FOMs (t, r) and their covariance ((t·r)², index i·r + j), for all three
    factor types. ``bounded`` truncates the CIs of means to [0, 1] (AUC, sensitivity, specificity), as MRMCaov does.
    The random-reader analyses need at least two readers (None otherwise).
    """
    theta = np.asarray(fom, dtype=float)
    cov = np.asarray(covariance, dtype=float)
    t, r = theta.shape
    if t < 2:
        raise ValueError("an MRMC comparison needs at least two tests (modalities, rounds)")
    if cov.shape != (t * r, t * r):
        raise ValueError(f"the covariance must be {(t * r, t * r)} for {t} tests × {r} readers, got {cov.shape}")
    names = tests or tuple(str(i + 1) for i in range(t))
    who = readers or tuple(str(j + 1) for j in range(r))
    c = variance_components(theta, cov)
    random = r > 1
    return MRMCResult(
        tests=tuple(names), readers=tuple(who), fom=theta, covariance=cov, method=method, components=c,
        random_readers_random_cases=_random_random(theta, cov, c, names, alpha, bounded) if random else None,
        fixed_readers_random_cases=_fixed_readers(theta, cov, c, names, who, alpha, bounded),
        random_readers_fixed_cases=_fixed_cases(theta, c, names, alpha, bounded) if random else None)


def mrmc_auc(truth: ArrayLike, ratings: ArrayLike, *, covariance: Covariance = "delong",
             tests: tuple[str, ...] | None = None, readers: tuple[str, ...] | None = None,
             alpha: float = 0.05) -> MRMCResult:
    """OR-Hillis on the empirical AUC of ``ratings`` (tests, readers, cases), a fully crossed design."""
    scores = np.asarray(ratings, dtype=float)
    if scores.ndim != 3:
        raise ValueError(f"ratings must have shape (tests, readers, cases), got {scores.shape}")
    t, r, n = scores.shape
    flat = scores.reshape(t * r, n)
    fom = np.array([empirical_auc(truth, row) for row in flat]).reshape(t, r)
    if covariance == "delong":
        cov = delong_covariance(truth, flat)
    elif covariance == "jackknife":
        cov = jackknife_covariance(auc_leave_one_out(truth, flat))
    else:
        raise ValueError(f"covariance must be 'delong' or 'jackknife', got {covariance!r}")
    return or_hillis(fom, cov, tests=tests, readers=readers, method=covariance, alpha=alpha)


def mrmc_binary(truth: ArrayLike, decisions: ArrayLike, metric: BinaryMetric, *,
                tests: tuple[str, ...] | None = None, readers: tuple[str, ...] | None = None,
                alpha: float = 0.05) -> MRMCResult:
    """OR-Hillis on sensitivity or specificity of 0/1 ``decisions`` (tests, readers, cases), jackknife covariance."""
    d = np.asarray(decisions, dtype=float)
    if d.ndim != 3:
        raise ValueError(f"decisions must have shape (tests, readers, cases), got {d.shape}")
    t, r, n = d.shape
    flat = d.reshape(t * r, n)
    fom = fom_binary(truth, flat, metric).reshape(t, r)
    cov = jackknife_covariance(binary_leave_one_out(truth, flat, metric))
    return or_hillis(fom, cov, tests=tests, readers=readers, method="jackknife", alpha=alpha)


__all__ = ["Analysis", "Covariance", "Difference", "GlobalTest", "MRMCResult", "TestMean", "VarianceComponents",
           "mrmc_auc", "mrmc_binary", "or_hillis", "variance_components"]
