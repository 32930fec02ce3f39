"""OR-Hillis MRMC analysis checked against the reference software, MRMCaov 0.3.0 (Smith & Hillis).

Expected values are literals with their source named:

- "JSS" — printed output in MRMCaov's own paper/vignette (repository brian-j-smith/MRMCaov,
  docs/jss/MRMCaov.tex, sections "Covariance Estimation Methods", "Fixed Factors" and "Binary Metrics"),
  checked to the printed precision (every printed digit).
- "run" — MRMCaov 0.3.0 run in R 4.2 (``summary(mrmc(empirical_auc(truth, rating), treatment, reader,
  case, data = ..., cov = DeLong|jackknife))``, ``fixed(reader)``, ``fixed(case)``), printed with
  ``options(digits = 10)``; checked to those printed 10 significant digits.

The Van Dyke (MRMCaov ``VanDyke``, RJafroc ``dataset02``) and Franken (MRMCaov ``Franken``, RJafroc
``dataset03``) data are read from ``../shared/data/mrmc/`` (their README gives source and licence);
those tests skip when the folder is absent. The SMALL data set below is this project's own (4 readers,
2 tests, 24 cases, many ties) and its reference values come from a "run", so the comparison always runs.
"""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cldlr.common.evaluation.metrics import delong_test
from cldlr.common.evaluation.mrmc import mrmc_auc, mrmc_binary, or_hillis
from cldlr.common.evaluation.mrmc_fom import (
    auc_leave_one_out,
    binary_leave_one_out,
    delong_covariance,
    empirical_auc,
    jackknife_covariance,
)

MRMC_DATA = Path(os.environ.get("CLDLR_MRMC_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mrmc")

#: Project-made example: ratings 1-5 of 24 cases (13 negative, then 11 positive) per (reader, test).
SMALL_TRUTH = "000000000000011111111111"
SMALL = {(1, 1): "431411135214153451445312", (1, 2): "421312224213244454534525",
         (2, 1): "154425335324423454544133", (2, 2): "151513235123325455545535",
         (3, 1): "134331112535245552554255", (3, 2): "122322221424315353545554",
         (4, 1): "432215225133233355134323", (4, 2): "213214212141545255344534"}


def printed(expected: str) -> pytest.approx:
    """``pytest.approx`` that holds exactly when the value agrees with ``expected`` to its last printed digit."""
    exponent = Decimal(expected).as_tuple().exponent
    assert isinstance(exponent, int)
    return pytest.approx(float(expected), abs=10.0 ** exponent / 2 * (1 + 1e-9), rel=0)


def small() -> tuple[np.ndarray, np.ndarray]:
    truth = np.array([int(c) for c in SMALL_TRUTH])
    ratings = np.array([[[int(c) for c in SMALL[(j, i)]] for j in range(1, 5)] for i in (1, 2)], float)
    return truth, ratings


def load(name: str) -> tuple[np.ndarray, np.ndarray]:
    path = MRMC_DATA / f"{name}.csv"
    if not path.is_file():
        pytest.skip(f"{name} example data not present at {path} (../shared/data/mrmc, see the module docstring)")
    data = pd.read_csv(path)
    cases = sorted(data["case"].unique())
    ratings = data.pivot_table(index=["treatment", "reader"], columns="case", values="rating").loc[:, cases]
    truth = data.drop_duplicates("case").set_index("case").loc[cases, "truth"].to_numpy()
    return truth, ratings.to_numpy().reshape(data["treatment"].nunique(), data["reader"].nunique(), len(cases))


def check(actual: dict[str, float], expected: dict[str, str]) -> None:
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert actual[key] == printed(value), key


def summary(result, analysis: str) -> dict[str, float]:
    """The numbers MRMCaov's ``summary()`` prints, under its names."""
    a = getattr(result, analysis)
    c, d, m = result.components, a.differences[0], a.means
    out = {"F": a.global_test.statistic, "df2": a.global_test.df2, "p": a.global_test.p, "diff": d.estimate,
           "diff_se": d.se, "diff_low": d.ci_low, "diff_high": d.ci_high, "mean1": m[0].estimate, "mean2": m[1].estimate,
           "se1": m[0].se, "se2": m[1].se, "low1": m[0].ci_low, "high1": m[0].ci_high, "low2": m[1].ci_low,
           "high2": m[1].ci_high}
    if analysis != "random_readers_fixed_cases":
        out.update(var_r=c.var_r, var_tr=c.var_tr, error=c.var_error, cov1=c.cov1, cov2=c.cov2, cov3=c.cov3)
    if analysis == "random_readers_random_cases":
        out.update(df1=m[0].df, df2_2=m[1].df)
    if analysis == "fixed_readers_random_cases":
        del out["df2"]
    return out


# ---------------------------------------------------------------------------- the project's own example (always runs)

@pytest.mark.parametrize(("covariance", "analysis", "expected"), [
    ("delong", "random_readers_random_cases", dict(  # run
        var_r="0.0004488300161", var_tr="0.0004373176357", error="0.0092987432148", cov1="0.0036231906206",
        cov2="0.0012123657229", cov3="0.0001241910770", F="7.88753205", df2="10.44879206", p="0.01780483977",
        diff="-0.1923076923", diff_se="0.06847406139", diff_low="-0.34399379205", diff_high="-0.04062159257",
        mean1="0.6547202797", mean2="0.8470279720", se1="0.07637824020", se2="0.03282313882", df1="6.263731326",
        df2_2="17.269655547", low1="0.4697204406", high1="0.8397201188", low2="0.7778594810", high2="0.9161964630")),
    ("jackknife", "random_readers_random_cases", dict(  # run
        var_r="0.0002912070134", var_tr="0.0002270463638", error="0.0097259041039", cov1="0.0037832121774",
        cov2="0.0012716323372", cov3="0.0001265896311", F="7.700731472", df2="10.96186378", p="0.01811739412",
        diff="-0.1923076923", diff_se="0.06929959022", diff_low="-0.34489982848", diff_high="-0.03971555614",
        mean1="0.6547202797", mean2="0.8470279720", se1="0.07690226242", se2="0.03340013894", df1="6.437407427",
        df2_2="18.516390498", low1="0.4696035399", high1="0.8398370196", low2="0.7769968947", high2="0.9170590493")),
    ("delong", "fixed_readers_random_cases", dict(  # run
        var_r="0.0004488300161", var_tr="0.0004373176357", error="0.0092987432148", cov1="0.0036231906206",
        cov2="0.0012123657229", cov3="0.0001241910770", F="8.273362848", p="0.004023092202",
        diff="-0.1923076923", diff_se="0.06685834477", diff_low="-0.32334764013", diff_high="-0.06126774448",
        mean1="0.6547202797", mean2="0.8470279720", se1="0.06589966111", se2="0.04609940191",
        low1="0.5255593173", high1="0.7838812421", low2="0.7566748046", high2="0.9373811395")),
    ("jackknife", "random_readers_fixed_cases", dict(  # run
        F="14.72019465", df2="3", p="0.03121909527", diff="-0.1923076923", diff_se="0.05012332583",
        diff_low="-0.35182248540", diff_high="-0.03279289922", mean1="0.6547202797", mean2="0.8470279720",
        se1="0.06353919103", se2="0.02119041706", low1="0.4525102160", high1="0.8569303435", low2="0.7795906076",
        high2="0.9144653365")),
])
def test_small_example_matches_mrmcaov(covariance, analysis, expected):
    truth, ratings = small()
    check(summary(mrmc_auc(truth, ratings, covariance=covariance), analysis), expected)


def test_small_example_fixed_reader_rows_match_mrmcaov():
    truth, ratings = small()
    frrc = mrmc_auc(truth, ratings, covariance="jackknife").fixed_readers_random_cases
    # run: "Reader-specific 95% CIs and tests" and "Single reader 95% CIs" (jackknife)
    expected = [("-0.21328671329", "0.08803758692", "-2.4226778669", "0.015406581590"),
                ("-0.29720279720", "0.10388541069", "-2.8608713700", "0.004224784251"),
                ("-0.05594405594", "0.11113937737", "-0.5033684484", "0.614705250379"),
                ("-0.20279720280", "0.12902239707", "-1.5717984428", "0.115997302802")]
    for row, (est, se, z, p) in zip(frrc.reader_differences, expected, strict=True):
        assert (row.estimate, row.se, row.statistic, row.p) == (printed(est), printed(se), printed(z), printed(p))
    single = {m.test: m for m in frrc.reader_means}
    assert single["2|1"].estimate == printed("0.8951048951") and single["2|1"].se == printed("0.06338916843")
    assert single["2|1"].ci_low == printed("0.7708644080") and single["2|1"].ci_high == 1.0  # truncated at 1
    assert single["1|2"].ci_low == printed("0.2577024727") and single["1|2"].ci_high == printed("0.7353045203")


# ---------------------------------------------------------------------------- Van Dyke and Franken (shared data)

def test_van_dyke_delong_matches_the_printed_output():
    truth, ratings = load("VanDyke")
    result = mrmc_auc(truth, ratings, covariance="delong")
    assert result.fom.shape == (2, 5) and ratings.shape[2] == 114
    check(summary(result, "random_readers_random_cases"), dict(  # JSS, "DeLong method"
        var_r="0.0015364254", var_tr="0.0002045840", error="0.0007921325", cov1="0.0003420090", cov2="0.0003395265",
        cov3="0.0002358497", F="4.484854", df2="15.06611", p="0.05123303", diff="-0.04380032", diff_se="0.0206825",
        diff_low="-0.0878671960", diff_high="0.0002665519", mean1="0.8970370", mean2="0.9408374",
        se1="0.03307642", se2="0.02150464", df1="12.59597", df2_2="12.56530", low1="0.8253461", high1="0.9687280",
        low2="0.8942155", high2="0.9874592"))
    assert result.correlations == (printed("0.4317573"), printed("0.4286234"), printed("0.2977402"))
    assert result.random_readers_random_cases.global_test.denominator == printed("0.001069415")
    assert result.components.ms_tr == printed("0.0005510306") and result.components.ms_t == printed("0.004796171")


def test_van_dyke_jackknife_random_and_fixed_readers_match_mrmcaov():
    truth, ratings = load("VanDyke")
    result = mrmc_auc(truth, ratings, covariance="jackknife")
    rrrc = summary(result, "random_readers_random_cases")  # run
    assert (rrrc["F"], rrrc["df2"], rrrc["p"]) == (printed("4.456318693"), printed("15.25967459"), printed("0.05166568582"))
    assert (rrrc["diff_low"], rrrc["diff_high"]) == (printed("-0.0879594985666"), printed("0.0003588544442"))
    check(summary(result, "fixed_readers_random_cases"), dict(  # JSS, "Fixed readers"
        var_r="0.0015349993", var_tr="0.0002004025", error="0.0008022883", cov1="0.0003466137", cov2="0.0003440748",
        cov3="0.0002390284", F="5.475953", p="0.01927984", diff="-0.04380032", diff_se="0.01871748",
        diff_low="-0.08048591", diff_high="-0.00711473", mean1="0.8970370", mean2="0.9408374", se1="0.02428971",
        se2="0.01677632", low1="0.8494301", high1="0.9446440", low2="0.9079564", high2="0.9737183"))
    frrc = result.fixed_readers_random_cases
    reader5 = frrc.reader_differences[4]  # JSS: reader 5, 1 - 2
    assert (reader5.reader, reader5.estimate, reader5.se, reader5.ci_low, reader5.ci_high, reader5.statistic, reader5.p) == (
        "5", printed("-0.10016103"), printed("0.04405746"), printed("-0.186512066"), printed("-0.013809995"),
        printed("-2.2734182"), printed("0.02300099"))
    single = {m.test: m for m in frrc.reader_means}
    assert single["1|4"].estimate == printed("0.9731079") and single["1|4"].se == printed("0.0173388332")
    assert single["1|4"].ci_low == printed("0.9391244") and single["1|4"].ci_high == 1.0


def test_van_dyke_fixed_cases_and_binary_sensitivity_match_the_printed_output():
    truth, ratings = load("VanDyke")
    check(summary(mrmc_auc(truth, ratings), "random_readers_fixed_cases"), dict(  # JSS, "Fixed cases"
        F="8.704", df2="4", p="0.04195875", diff="-0.04380032", diff_se="0.01484629", diff_low="-0.08502022",
        diff_high="-0.00258042", mean1="0.8970370", mean2="0.9408374", se1="0.02482994", se2="0.01615303",
        low1="0.8280981", high1="0.9659760", low2="0.8959894", high2="0.9856854"))
    sens = mrmc_binary(truth, ratings >= 3, "sensitivity")  # JSS, "Binary Metrics" (rating >= 3)
    check(summary(sens, "random_readers_random_cases"), dict(
        var_r="0.0049747475", var_tr="0.0007828283", error="0.0023681257", cov1="0.0009943883", cov2="0.0010145903",
        cov3="0.0006604938", F="6.689493", df2="15.71732", p="0.02008822", diff="-0.09777778", diff_se="0.03780451",
        diff_low="-0.1780371", diff_high="-0.0175185", mean1="0.8222222", mean2="0.9200000", se1="0.05893747",
        se2="0.03741657", df1="14.456811", df2_2="7.575855", low1="0.6961876", high1="0.9482568", low2="0.8328691",
        high2="1.0000000"))
    spec = mrmc_binary(truth, ratings >= 3, "specificity").random_readers_random_cases  # run
    assert (spec.global_test.statistic, spec.global_test.df2, spec.global_test.p) == (
        printed("0.2017205577"), printed("5.572641311"), printed("0.6702700973"))


@pytest.mark.parametrize(("covariance", "expected"), [
    ("delong", dict(var_r="4.229141364e-05", var_tr="-7.027636348e-04", error="1.506854989e-03", cov1="7.820730233e-04",
                    cov2="4.792514482e-04", cov3="5.074357585e-04", df1="69.05902454", df2_2="249.78340207",
                    se1="0.02430916221", se2="0.02347622604")),
    ("jackknife", dict(var_r="0.0000377556789", var_tr="-0.0007127629357", error="0.0015257762493",
                       cov1="0.0007916821470", cov2="0.0004836376727", cov3="0.0005125091474", df1="70.12178787",
                       df2_2="253.64402828", se1="0.02440215193", se2="0.02356641649")),
])
def test_franken_matches_mrmcaov_where_cov2_is_below_cov3(covariance, expected):
    truth, ratings = load("Franken")
    result = summary(mrmc_auc(truth, ratings, covariance=covariance), "random_readers_random_cases")  # run
    # Cov2 < Cov3: the max(·, 0) makes the denominator MS(T:R) and the ddf (t−1)(r−1) = 3
    check({k: result[k] for k in expected}, expected)
    assert (result["F"], result["df2"], result["p"]) == (printed("4.694057725"), 3.0, printed("0.1188378575"))
    assert (result["mean1"], result["mean2"]) == (printed("0.8477498869"), printed("0.8368950701"))


# ---------------------------------------------------------------------------- independent checks

@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=8, max_size=30), st.integers(0, 2**32 - 1))
def test_leave_one_out_aucs_equal_recomputing_without_the_case(scores, seed):
    rng = np.random.default_rng(seed)
    truth = np.array([0, 0, 1, 1] + list(rng.integers(0, 2, len(scores) - 4)))
    ratings = np.vstack([scores, rng.permutation(scores)]).astype(float)
    loo = auc_leave_one_out(truth, ratings)
    for k in range(truth.size):
        keep = np.arange(truth.size) != k
        if len(set(truth[keep])) == 2:
            assert loo[k, 0] == pytest.approx(empirical_auc(truth[keep], ratings[0, keep]))
    assert jackknife_covariance(loo).shape == (2, 2)


def test_fixed_reader_comparisons_are_the_paired_delong_tests():
    truth, ratings = small()
    a, b = ratings[0, 0], ratings[1, 0]
    pairs = np.array([[(x > y) + 0.5 * (x == y) for y in a[truth == 0]] for x in a[truth == 1]])
    assert empirical_auc(truth, a) == pytest.approx(pairs.mean())  # Mann-Whitney with ties ½
    assert delong_covariance(truth, ratings.reshape(8, -1)).shape == (8, 8)
    frrc = mrmc_auc(truth, ratings, covariance="delong").fixed_readers_random_cases
    assert frrc.reader_differences[0].p == pytest.approx(delong_test(truth, a, b)[1])


def test_binary_jackknife_runs_over_the_cases_of_its_class():
    truth = np.array([0, 0, 0, 1, 1, 1, 1])
    decisions = np.array([[0, 1, 0, 1, 1, 0, 1]])
    sens = binary_leave_one_out(truth, decisions, "sensitivity")
    assert sens[:, 0].tolist() == pytest.approx([2 / 3, 2 / 3, 1.0, 2 / 3])
    spec = binary_leave_one_out(truth, decisions, "specificity")
    assert spec[:, 0].tolist() == pytest.approx([1 / 2, 1.0, 1 / 2])


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="only malignant cases"):
        empirical_auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="only 0 \\(benign\\) and 1"):
        empirical_auc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="tests, readers, cases"):
        mrmc_auc([0, 1], np.zeros((2, 2)))
    with pytest.raises(ValueError, match="at least two tests"):
        or_hillis(np.zeros((1, 3)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="covariance must be"):
        or_hillis(np.zeros((2, 3)), np.zeros((5, 5)))
    truth, ratings = small()
    one = mrmc_auc(truth, ratings[:, :1])
    assert one.random_readers_random_cases is None and one.fixed_readers_random_cases.global_test.p < 0.05
