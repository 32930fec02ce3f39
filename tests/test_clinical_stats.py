"""Clinical selection from additive sums agrees with scipy on raw data and with itself across sites."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_SCHEMA, write_site
from scipy import stats as sps

from cldlr.common.clinical.selection import normaltest_from_moments, select_parameters
from cldlr.common.clinical.stats import (
    ParameterStatistics,
    StatisticsLayout,
    class_mean_sd,
    compute_statistics,
    noisy_sums_view,
    sum_statistics,
)
from cldlr.common.data.schema import Schema, schema_from_dict
from cldlr.common.data.site import read_site
from cldlr.common.errors import SchemaError


def make_frame(n: int = 200, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Synthetic parsed frame: age differs by class (normal), size_mm skewed, palpable differs."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    frame = pd.DataFrame({
        "age": np.clip(rng.normal(45 + 8 * y, 7), 18, 100),
        "size_mm": np.clip(rng.exponential(10 + 3 * y), 0, 100),
        "palpable": (rng.random(n) < 0.3 + 0.4 * y).astype(float),
        "side": rng.choice(["left", "right"], n).astype(object),
        "birads": np.where(y == 1, "4c", "4a"),
    })
    return frame, y


def row_of(result, name: str) -> dict:
    return next(r for r in result.table if r["parameter"] == name)


def binned(values: np.ndarray, low: float, high: float, n_bins: int) -> np.ndarray:
    """Independent binning: np.digitize on explicit edges (interior edges only)."""
    return np.digitize(values, np.linspace(low, high, n_bins + 1)[1:-1])


@pytest.mark.parametrize("n,dist", [(8, "normal"), (25, "normal"), (400, "normal"), (60, "exponential"), (300, "uniform")])
def test_normaltest_from_moments_matches_scipy(n: int, dist: str) -> None:
    rng = np.random.default_rng(n)
    x = getattr(rng, dist)(size=n) * 7 + 50
    z = (x - 59.0) / 41.0  # any agreed shift/scale
    moments = np.array([np.sum(z**k) for k in range(5)])
    k2, p = normaltest_from_moments(moments)
    ref = sps.normaltest(x)
    assert k2 == pytest.approx(ref.statistic, rel=1e-7)
    assert p == pytest.approx(ref.pvalue, rel=1e-6, abs=1e-12)


def test_normaltest_undefined_below_eight_and_for_constants() -> None:
    assert np.isnan(normaltest_from_moments(np.array([7.0, 1, 1, 1, 1]))[1])
    assert np.isnan(normaltest_from_moments(np.array([20.0, 10, 5, 2.5, 1.25]))[1])  # constant 0.5


def test_welch_t_test_matches_scipy(tiny_schema: Schema) -> None:
    frame, y = make_frame()
    y = (np.arange(len(y)) % 4 != 0).astype(int)  # unbalanced classes with unequal spread: Welch ≠ Student
    rng = np.random.default_rng(1)
    frame["age"] = np.where(y == 1, rng.normal(55, 12, len(y)), rng.normal(48, 4, len(y))).clip(18, 100)
    row = row_of(select_parameters(compute_statistics(frame, y, tiny_schema)), "age")
    assert row["test"] == "t-test (Welch)"
    ref = sps.ttest_ind(frame.age[y == 0], frame.age[y == 1], equal_var=False)
    assert row["statistic"] == pytest.approx(ref.statistic, rel=1e-9)
    assert row["p"] == pytest.approx(ref.pvalue, rel=1e-6)
    assert row["selected"] and row["p"] < 0.05
    mean, sd = frame.age[y == 0].mean(), frame.age[y == 0].std(ddof=1)
    assert row["benign"] == f"{mean:.2f} ± {sd:.2f}"


@pytest.mark.parametrize("n_bins", [10, 1000])
def test_mann_whitney_equals_scipy_on_binned_values(tiny_schema: Schema, n_bins: int) -> None:
    frame, y = make_frame()
    row = row_of(select_parameters(compute_statistics(frame, y, tiny_schema, n_bins=n_bins)), "size_mm")
    assert row["test"] == "Mann-Whitney U"  # exponential data fail the normality test
    b, m = (binned(frame.size_mm[y == c].to_numpy(), 0, 100, n_bins) for c in (0, 1))
    ref = sps.mannwhitneyu(b, m, alternative="two-sided", use_continuity=True, method="asymptotic")
    assert row["statistic"] == pytest.approx(ref.statistic, rel=1e-12)
    assert row["p"] == pytest.approx(ref.pvalue, rel=1e-10)


def test_mann_whitney_with_1000_bins_close_to_raw_values(tiny_schema: Schema) -> None:
    frame, y = make_frame(n=600, seed=3)
    row = row_of(select_parameters(compute_statistics(frame, y, tiny_schema)), "size_mm")
    raw = sps.mannwhitneyu(frame.size_mm[y == 0], frame.size_mm[y == 1], method="asymptotic")
    assert row["test"] == "Mann-Whitney U"
    assert abs(row["p"] - raw.pvalue) < 1e-3


def test_small_class_uses_mann_whitney_even_when_normal(tiny_schema: Schema) -> None:
    frame, y = make_frame(n=14)  # 7 per class: below the normality test's n >= 8
    assert row_of(select_parameters(compute_statistics(frame, y, tiny_schema)), "age")["test"] == "Mann-Whitney U"


def test_chi_square_matches_scipy_with_yates(tiny_schema: Schema) -> None:
    frame, y = make_frame()
    result = select_parameters(compute_statistics(frame, y, tiny_schema))
    for name in ("palpable", "side"):
        row = row_of(result, name)
        table = pd.crosstab(y, frame[name]).to_numpy()
        ref = sps.chi2_contingency(table)
        assert row["test"] == "chi-square"
        assert row["statistic"] == pytest.approx(ref.statistic, rel=1e-12)
        assert row["p"] == pytest.approx(ref.pvalue, rel=1e-12)
    assert row_of(result, "palpable")["selected"]


def test_fisher_exact_for_sparse_two_by_two(tiny_schema: Schema) -> None:
    frame, y = make_frame(n=20)
    frame["palpable"] = (np.arange(20) % 5 == 0).astype(float)  # 4 "yes" → expected counts < 5
    row = row_of(select_parameters(compute_statistics(frame, y, tiny_schema)), "palpable")
    ref = sps.fisher_exact(pd.crosstab(y, frame.palpable).to_numpy())
    assert row["test"] == "Fisher exact"
    assert row["p"] == pytest.approx(ref.pvalue, rel=1e-12)
    assert row["statistic"] == pytest.approx(ref.statistic, rel=1e-12)


def test_larger_sparse_table_keeps_chi_square_and_flags_it() -> None:
    schema = schema_from_dict({"name": "s", "version": 1, "parameters": [
        {"name": "shape", "type": "categorical", "levels": ["oval", "round", "irregular"]}]})
    y = np.arange(30) % 2
    frame = pd.DataFrame({"shape": ["irregular" if i % 10 == 0 else ("oval" if i % 3 else "round") for i in range(30)]})
    row = select_parameters(compute_statistics(frame, y, schema)).table[0]
    ref = sps.chi2_contingency(pd.crosstab(y, frame["shape"]).to_numpy())
    assert row["test"] == "chi-square" and "expected count < 5" in row["note"]
    assert row["p"] == pytest.approx(ref.pvalue, rel=1e-12)


def test_birads_never_selected_even_when_perfectly_predictive(tiny_schema: Schema) -> None:
    frame, y = make_frame()
    assert (frame.birads == np.where(y == 1, "4c", "4a")).all()
    stats = compute_statistics(frame, y, tiny_schema)
    result = select_parameters(stats)
    assert "birads" not in stats.by_parameter
    assert "birads" not in result.selected and all(r["parameter"] != "birads" for r in result.table)
    assert result.selected == [p.name for p in tiny_schema.model_parameters if p.name in result.selected]


def test_missing_values_excluded_and_counted(tiny_schema: Schema) -> None:
    frame, y = make_frame()
    frame.loc[:9, "age"] = np.nan
    frame.loc[:4, "side"] = None
    result = select_parameters(compute_statistics(frame, y, tiny_schema))
    age, side = row_of(result, "age"), row_of(result, "side")
    assert age["n_missing"] == 10 and side["n_missing"] == 5 and row_of(result, "palpable")["n_missing"] == 0
    keep = frame.age.notna()
    ref = sps.ttest_ind(frame.age[keep & (y == 0)], frame.age[keep & (y == 1)], equal_var=False)
    assert age["p"] == pytest.approx(ref.pvalue, rel=1e-6)
    sub = frame.side.notna()
    assert side["p"] == pytest.approx(sps.chi2_contingency(pd.crosstab(y[sub], frame.side[sub]).to_numpy()).pvalue, rel=1e-12)


def test_union_equals_sum_of_parts_and_vector_round_trip(tiny_schema: Schema) -> None:
    frame, y = make_frame(n=300, seed=5)
    frame.loc[[3, 150, 299], "size_mm"] = np.nan
    union = compute_statistics(frame, y, tiny_schema)
    cuts = [(0, 70), (70, 190), (190, 300)]
    parts = [compute_statistics(frame.iloc[a:b], y[a:b], tiny_schema) for a, b in cuts]
    summed = sum_statistics(parts)
    np.testing.assert_allclose(summed.to_vector(), union.to_vector(), rtol=1e-12, atol=1e-9)
    vec = union.to_vector()
    assert vec.dtype == np.float64 and vec.size == union.layout.size
    np.testing.assert_array_equal(ParameterStatistics.from_vector(vec, union.layout).to_vector(), vec)
    secure_sum = np.sum([p.to_vector() for p in parts], axis=0)  # what SecAgg+ hands the server
    a = select_parameters(union)
    b = select_parameters(ParameterStatistics.from_vector(secure_sum, StatisticsLayout.from_schema(tiny_schema)))
    assert a.selected == b.selected
    for ra, rb in zip(a.table, b.table):
        assert ra["test"] == rb["test"] and ra["n_missing"] == rb["n_missing"]
        assert ra["p"] == pytest.approx(rb["p"], rel=1e-9)


def test_single_site_from_contract_equals_federation_of_its_patients(tmp_path, tiny_schema: Schema) -> None:
    site = read_site(write_site(tmp_path / "site", n_patients=24, images_per_patient=1), tiny_schema, check=False)
    whole = select_parameters(compute_statistics(site.frame, site.labels, tiny_schema))
    thirds = [site.subset(np.arange(len(site)) % 3 == k) for k in range(3)]
    fed = select_parameters(sum_statistics([compute_statistics(s.frame, s.labels, tiny_schema) for s in thirds]))
    assert whole.selected == fed.selected
    assert [r["p"] for r in whole.table] == pytest.approx([r["p"] for r in fed.table], rel=1e-9)


def test_mismatched_layouts_and_vectors_are_refused(tiny_schema: Schema) -> None:
    frame, y = make_frame()
    a, b = compute_statistics(frame, y, tiny_schema), compute_statistics(frame, y, tiny_schema, n_bins=50)
    with pytest.raises(ValueError, match="different"):
        a + b
    with pytest.raises(ValueError, match="layout needs"):
        ParameterStatistics.from_vector(a.to_vector()[:-1], a.layout)
    with pytest.raises(ValueError, match="at least one"):
        sum_statistics([])


def test_numeric_without_range_needs_one_for_federation() -> None:
    data = copy.deepcopy(TINY_SCHEMA)
    del data["parameters"][1]["range"]
    schema = schema_from_dict(data)
    frame, y = make_frame()
    with pytest.raises(SchemaError, match=r"size_mm.*range: \[low, high\]"):
        compute_statistics(frame, y, schema)
    local = compute_statistics(frame, y, schema, local_ranges=True)
    assert local.layout.parameters[1].range == (frame.size_mm.min(), frame.size_mm.max())
    assert row_of(select_parameters(local), "size_mm")["test"] == "Mann-Whitney U"


def test_moments_or_a_range_a_parameter_lacks_are_named_not_a_type_error(tiny_schema: Schema) -> None:
    frame, y = make_frame()
    stats = compute_statistics(frame, y, tiny_schema)
    with pytest.raises(ValueError, match="no moment sums"):
        class_mean_sd(stats.by_parameter["side"][0], tiny_schema.get("side"))
    unranged = dataclasses.replace(tiny_schema.get("age"), range=None)
    with pytest.raises(SchemaError, match=r"'age' has no range; add `range: \[low, high\]`"):
        class_mean_sd(stats.by_parameter["age"][0], unranged)


def test_invalid_values_name_parameter_and_row(tiny_schema: Schema) -> None:
    frame, y = make_frame()
    frame.loc[7, "age"] = 150.0
    with pytest.raises(ValueError, match="'age', row 7"):
        compute_statistics(frame, y, tiny_schema)
    frame, y = make_frame()
    frame.loc[2, "side"] = "middle"
    with pytest.raises(ValueError, match="'side', row 2"):
        compute_statistics(frame, y, tiny_schema)
    with pytest.raises(ValueError, match="labels"):
        compute_statistics(frame, y[:-1], tiny_schema)


def test_table_one_markdown(tiny_schema: Schema) -> None:
    frame, y = make_frame()
    result = select_parameters(compute_statistics(frame, y, tiny_schema), alpha=0.01)
    text = result.to_markdown()
    assert f"Benign (n={int((y == 0).sum())})" in text and f"Malignant (n={int((y == 1).sum())})" in text
    for row in result.table:
        assert f"| {row['parameter']}" in text and row["test"] in text
    assert "&nbsp;&nbsp;left" in text and "&nbsp;&nbsp;yes" in text and "birads" not in text
    assert row_of(result, "age")["benign"] in text
    assert "P < 0.01" in text
    assert result.to_dict()["selected"] == result.selected


def test_refined_bins_separate_values_that_share_one_schema_bin() -> None:
    """A schema range far wider than the data puts every value in one bin; the second pass fixes it."""
    import pandas as pd

    from cldlr.common.clinical.selection import select_clinical
    from cldlr.common.clinical.stats import refined_histogram_ranges
    from cldlr.common.data.schema import schema_from_dict

    schema = schema_from_dict({"name": "wide", "version": 1, "parameters": [
        {"name": "area", "type": "numeric", "range": [0, 1e8]}]})
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 60)
    frame = pd.DataFrame({"area": np.concatenate([rng.lognormal(9, 0.5, 60), rng.lognormal(9.6, 0.5, 60)])})
    first = compute_statistics(frame, labels, schema)
    assert np.count_nonzero(first.by_parameter["area"][0].counts) == 1  # all in bin 0
    low, high = refined_histogram_ranges(first)["area"]
    assert 0 <= low < frame["area"].min() * 2 and frame["area"].max() / 2 < high < 1e8
    row = select_clinical(frame, labels, schema).table[0]
    assert row["test"] == "Mann-Whitney U" and row["p"] < 1e-3
    raw = sps.mannwhitneyu(frame["area"][labels == 0], frame["area"][labels == 1], method="asymptotic")
    assert abs(row["p"] - raw.pvalue) < 1e-3


def _with_size(**extra) -> dict:
    data = copy.deepcopy(TINY_SCHEMA)
    data["parameters"][1].update(extra)  # size_mm, range [0, 100]
    return data


def test_a_dp_range_is_public_inside_the_range_and_changes_only_the_noisy_view() -> None:
    plain = schema_from_dict(copy.deepcopy(TINY_SCHEMA), "s")
    dp = schema_from_dict(_with_size(dp_range=[0, 40]), "s")
    assert plain.for_noisy_sums() is plain and dp.for_noisy_sums().get("size_mm").range == (0.0, 40.0)
    assert dp.get("size_mm").range == (0.0, 100.0)  # validation keeps the schema's range
    assert schema_from_dict(dp.to_dict(), "s") == dp and dp.fingerprint() != plain.fingerprint()
    assert schema_from_dict(plain.to_dict(), "s").fingerprint() == plain.fingerprint()
    frame = pd.DataFrame({"size_mm": [5.0, 39.0, 60.0, None], "age": [40, 50, 60, 70]})
    clipped, view = noisy_sums_view(frame, dp)
    assert view.get("size_mm").range == (0.0, 40.0) and frame["size_mm"].iloc[2] == 60.0
    assert clipped["size_mm"].iloc[:3].tolist() == [5.0, 39.0, 40.0] and np.isnan(clipped["size_mm"].iloc[3])
    assert noisy_sums_view(frame, plain)[0] is frame


@pytest.mark.parametrize(("extra", "message"), [
    ({"dp_range": [0, 120]}, r"size_mm\): dp_range \[0\.0, 120\.0\] must lie inside the parameter's range \[0\.0, 100\.0\]"),
    ({"dp_range": [10, 10]}, r"dp_range must be \[low, high\] with low < high"),
    ({"dp_range": "0-40"}, r"size_mm\): dp_range must be \[low, high\]"),
    ({"dp_range": [0, 40], "range": None}, r"must lie inside the parameter's range \(none given\)"),
])
def test_a_bad_dp_range_is_refused_naming_the_parameter(extra: dict, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        schema_from_dict(_with_size(**extra), "s")
