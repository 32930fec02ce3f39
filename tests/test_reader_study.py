"""Reader study: de-identified packets, reads validation, Table 3 statistics checked independently, simulation."""

from __future__ import annotations

import base64
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.stats import norm
from sklearn.metrics import roc_auc_score
from test_bundle import export_tiny, make_tiny_study, trust_pem

from cldlr.cli import main
from cldlr.common.evaluation.mrmc import mrmc_auc
from cldlr.simulations.reader_packet import READ_COLUMNS
from cldlr.simulations.reader_study import ReadsError, analyze_reads, compute_table3, read_reads, simulate_reads

DATA_URI = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.write_text(",".join(header) + "\n" + "".join(",".join(str(v) for v in r) + "\n" for r in rows))
    return path


def truth_and_scores(tmp_path: Path, n: int = 40, seed: int = 0, separation: float = 1.5) -> tuple[Path, Path, dict]:
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 2).astype(int)
    ai = norm.cdf(separation * (labels - 0.5) + rng.normal(size=n))
    cases = [f"C{i + 1:03d}" for i in range(n)]
    truth = write_csv(tmp_path / "truth.csv", ["case", "label"], [[c, "malignant" if y else "benign"]
                                                                 for c, y in zip(cases, labels)])
    scores = write_csv(tmp_path / "scores.csv", ["case", "ai_score", "threshold"],
                       [[c, f"{s:.6f}", 0.5] for c, s in zip(cases, ai)])
    return truth, scores, {"cases": cases, "labels": labels, "ai": np.round(ai, 6)}


# ---------------------------------------------------------------------------- packet

def model(bundle: Path) -> list[str]:
    """``--model BUNDLE --trust centre.pem``: the bundle and the test centre's key the coordinator trusts."""
    return ["--model", str(bundle), "--trust", str(trust_pem(bundle.parent))]


@pytest.fixture
def packet(tmp_path):
    study = make_tiny_study(tmp_path, n_patients=16)
    bundle = export_tiny(study, tmp_path / "bundle")
    out = tmp_path / "packet"
    assert main(["reader-study", "packet", *model(bundle), "--site", str(study.site.root),
                 "--out", str(out), "--seed", "3"]) == 0
    return study, bundle, out


def test_packet_is_de_identified_self_contained_and_complete(packet):
    study, _, out = packet
    test_rows = study.site.frame[study.site.frame["split"] == "test"]
    key = pd.read_csv(out / "key.csv")
    assert sorted(key["image_id"]) == sorted(test_rows["image_id"]) and list(key["case"]) == sorted(key["case"])
    assert key["case"].str.fullmatch(r"C\d{3}").all()
    truth = dict(zip(test_rows["image_id"], test_rows["label"]))
    assert (key["label"] == key["image_id"].map(truth)).all()
    n = len(key)
    for round_no, per_case in ((1, 2), (2, 3)):
        page = (out / f"round{round_no}.html").read_text()
        uris = DATA_URI.findall(page)
        assert len(uris) == per_case * n
        Image.open(io.BytesIO(base64.b64decode(uris[0]))).verify()  # a real PNG
        text = DATA_URI.sub("", page)
        for image_id in study.site.frame["image_id"]:
            assert image_id not in page and image_id not in text
        assert not re.search(r"(src|href)=\"(?!data:)", page) and "http" not in text.lower()
        assert [int(c[1:]) for c in re.findall(r'id="(C\d+)"', page)] != [] and all(c in page for c in key["case"])
        assert ("AI score" in page) == (round_no == 2)
    order = [re.findall(r'id="(C\d+)"', (out / f"round{r}.html").read_text()) for r in (1, 2)]
    assert order[0] == sorted(order[0]) and sorted(order[1]) == order[0] and order[1] != order[0]
    template = pd.read_csv(out / "reads_template.csv")
    assert tuple(template.columns) == READ_COLUMNS  # the reading app's format
    assert len(template) == 2 * n and set(template["case"]) == set(key["case"])


def test_packet_scores_match_the_model_and_the_seed_fixes_the_key(packet, tmp_path):
    study, bundle, out = packet
    expected = dict(zip(study.site.frame["image_id"], study.direct_scores()["cldlr"]))
    key = pd.read_csv(out / "key.csv").merge(pd.read_csv(out / "model_scores.csv"), on="case")
    np.testing.assert_allclose(key["ai_score"], key["image_id"].map(expected), atol=1e-6)
    again = tmp_path / "again"
    assert main(["reader-study", "packet", *model(bundle), "--site", str(study.site.root),
                 "--out", str(again), "--seed", "3"]) == 0
    assert (again / "key.csv").read_text() == (out / "key.csv").read_text()
    other = tmp_path / "other"
    assert main(["reader-study", "packet", *model(bundle), "--site", str(study.site.root),
                 "--out", str(other), "--seed", "4"]) == 0
    assert (other / "key.csv").read_text() != (out / "key.csv").read_text()


def test_packet_to_table3_end_to_end(packet, tmp_path, capsys):
    _, _, out = packet
    reads = tmp_path / "reads.csv"
    assert main(["reader-study", "simulate-reads", "--truth", str(out / "key.csv"), "--model-scores",
                 str(out / "model_scores.csv"), "--out", str(reads), "--readers", "2"]) == 0
    table = tmp_path / "table3"
    assert main(["reader-study", "analyze", str(reads), "--truth", str(out / "key.csv"), "--model-scores",
                 str(out / "model_scores.csv"), "--out", str(table)]) == 0
    assert "CLDLR model" in capsys.readouterr().out
    assert {p.name for p in table.iterdir()} == {"table3.md", "table3.json", "reader_roc.png", "mrmcaov.csv", "reads.imrmc"}
    assert Image.open(table / "reader_roc.png").size[0] > 1000  # Fig. 6: operating points and the readers' ROC curves
    md = (table / "table3.md").read_text()
    assert "## MRMC analysis (Obuchowski–Rockette, Hillis' degrees of freedom)" in md
    for row in ("| AUC | random, random | DeLong |", "| AUC | random, random | jackknife |", "| AUC | fixed, random |",
                "| AUC | random, fixed |", "| Sensitivity | random, random |", "| Specificity | random, random |",
                "| without AI | ", "| with AI | "):
        assert row in md, row
    result = json.loads((table / "table3.json").read_text())
    assert result["score"] == "0-100 likelihood of malignancy" and result["mrmc"]["readers"] == 2
    assert set(result["reading"]["birads4"]) == {"4a", "4b", "4c"} and result["reading"]["median_seconds"]["round1"] > 0


# ---------------------------------------------------------------------------- statistics

def _naive_delong(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided p of the paired DeLong test from pairwise placements (O(n·m), independent of cldlr)."""
    def placements(s):
        pos, neg = s[y == 1], s[y == 0]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        return psi.mean(axis=1), psi.mean(axis=0)
    (v10a, v01a), (v10b, v01b) = placements(a), placements(b)
    s10, s01 = np.cov(np.vstack([v10a, v10b])), np.cov(np.vstack([v01a, v01b]))
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / v10a.size + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / v01a.size
    return float(2 * norm.sf(abs(v10a.mean() - v10b.mean()) / np.sqrt(var)))


def test_table3_matches_independent_computations(tmp_path):
    truth, scores, data = truth_and_scores(tmp_path)
    reads_path = simulate_reads(truth, scores, tmp_path / "reads.csv", readers=3, seed=1)
    out = analyze_reads(reads_path, truth, tmp_path / "t3", model_scores=scores)
    result = json.loads((out / "table3.json").read_text())
    reads = pd.read_csv(reads_path)
    y_of = dict(zip(data["cases"], data["labels"]))
    ai_of = dict(zip(data["cases"], data["ai"]))
    assert set(result["readers"]) == set(reads["reader"]) == {"junior-1", "senior-1", "junior-2"}
    for reader, entry in result["readers"].items():
        conf = {}
        for r in (1, 2):
            own = reads[(reads["reader"] == reader) & (reads["round"] == r)].sort_values("case")
            y = own["case"].map(y_of).to_numpy()
            m = entry[f"round{r}"]
            assert m["auc"] == pytest.approx(roc_auc_score(y, own["likelihood"]))
            tp = int(((own["malignant"] == 1) & (y == 1)).sum())
            tn = int(((own["malignant"] == 0) & (y == 0)).sum())
            fp, fn = int((y == 0).sum()) - tn, int((y == 1).sum()) - tp
            assert (m["tp"], m["tn"], m["fp"], m["fn"]) == (tp, tn, fp, fn)
            assert m["accuracy"] == pytest.approx((tp + tn) / len(y))
            assert m["sensitivity"] == pytest.approx(tp / (tp + fn)) and m["specificity"] == pytest.approx(tn / (tn + fp))
            assert m["ppv"] == pytest.approx(tp / (tp + fp)) and m["npv"] == pytest.approx(tn / (tn + fn))
            assert m["auc_ci_low"] < m["auc"] < m["auc_ci_high"]
            conf[r] = own["likelihood"].to_numpy(float)
        assert entry["round2_vs_round1"]["p"] == pytest.approx(_naive_delong(y, conf[2], conf[1]), rel=1e-9)
        assert entry["round2_vs_round1"]["delta_auc"] == pytest.approx(roc_auc_score(y, conf[2]) - roc_auc_score(y, conf[1]))
        ai = own["case"].map(ai_of).to_numpy()
        assert entry["vs_model"]["round2"]["p"] == pytest.approx(_naive_delong(y, conf[2], ai), rel=1e-9)
    assert result["model"]["auc"] == pytest.approx(roc_auc_score(data["labels"], data["ai"]))
    assert result["reader_mean"]["round1"]["auc"] == pytest.approx(
        np.mean([e["round1"]["auc"] for e in result["readers"].values()]))
    md = (out / "table3.md").read_text()
    assert md.count("| 1 (without AI) |") == 4 and md.count("| 2 (with AI) |") == 4 and "| CLDLR model |" in md


def test_simulated_readers_are_realistic(tmp_path):
    truth, scores, data = truth_and_scores(tmp_path, n=400, separation=2.5)
    reads = pd.read_csv(simulate_reads(truth, scores, tmp_path / "reads.csv", readers=4, seed=0))
    assert len(reads) == 4 * 2 * 400 and reads["likelihood"].between(0, 100).all() and reads["confidence"].isna().all()
    assert reads["likelihood"].nunique() > 50 and (reads["seconds"] > 0).all() and reads["comment"].isna().all()
    bands = pd.cut(reads["likelihood"], [-1, 10, 50, 100], labels=["4a", "4b", "4c"]).astype(str)
    assert (reads["birads4"] == bands).all() and set(reads["birads4"]) == {"4a", "4b", "4c"}
    assert ((reads["likelihood"] > 50) == (reads["malignant"] == 1)).mean() > 0.97  # the call and the likelihood agree
    result = compute_table3(reads.astype({"case": str}), dict(zip(data["cases"], data["labels"])))
    auc = {(name, r): e[f"round{r}"]["auc"] for name, e in result["readers"].items() for r in (1, 2)}
    assert min(auc["senior-1", 1], auc["senior-2", 1]) > max(auc["junior-1", 1], auc["junior-2", 1])
    gains = {name: auc[name, 2] - auc[name, 1] for name in result["readers"]}
    assert all(g > 0 for g in gains.values())  # an AI better than every reader helps every reader
    assert min(gains["junior-1"], gains["junior-2"]) > max(gains["senior-1"], gains["senior-2"])
    assert (reads.iloc[:400]["case"].tolist() != sorted(data["cases"]))  # each round in its own shuffled order


# ---------------------------------------------------------------------------- bad reads

GOOD = [["R1", 1, "C001", 0, 2], ["R1", 2, "C001", 0, 1], ["R1", 1, "C002", 1, 4], ["R1", 2, "C002", 1, 5],
        ["R1", 1, "C003", 1, 3], ["R1", 2, "C003", 0, 3], ["R1", 1, "C004", 0, 1], ["R1", 2, "C004", 0, 2]]
HEADER = ["reader", "round", "case", "malignant", "confidence"]


@pytest.mark.parametrize(("row", "message"), [
    (["R1", 1, "C999", 0, 2], r"reads\.csv:10: column 'case': 'C999' is an unknown case"),
    (["R1", 1, "C002", 0, 2], r"reads\.csv:10: columns 'reader, round, case': duplicate read of case C002 by R1 "
                              r"in round 1 \(first at line 4\)"),
    (["R2", 1, "C001", 0, 2], r"reads\.csv:10: column 'round': reader R2 read case C001 in round 1 but not in round 2"),
    (["R1", 3, "C001", 0, 2], r"reads\.csv:10: column 'round': '3' is not 1 \(without AI\) or 2"),
    (["R1", 1, "C001", 2, 2], r"reads\.csv:10: column 'malignant': '2' is not 0 \(benign\) or 1"),
    (["R1", 1, "C001", 1, 7], r"reads\.csv:10: column 'confidence': '7' is not an integer 1-5"),
    (["R1", 1, "C001", 1, "4b"], r"reads\.csv:10: column 'confidence': '4b' is not an integer"),
    (["", 1, "C001", 1, 3], r"reads\.csv:10: column 'reader': '' is empty"),
])
def test_each_bad_read_is_reported_with_line_and_column_and_nothing_is_written(tmp_path, row, message):
    truth, scores, _ = truth_and_scores(tmp_path, n=4)
    reads = write_csv(tmp_path / "reads.csv", HEADER, GOOD + [row])
    out = tmp_path / "t3"
    with pytest.raises(ReadsError, match=message) as info:
        analyze_reads(reads, truth, out, model_scores=scores)
    assert "nothing was written" in str(info.value) and not out.exists()


def test_all_errors_are_listed_together_and_the_cli_exits_2(tmp_path, capsys):
    truth, scores, _ = truth_and_scores(tmp_path, n=4)
    bad = [r[:] for r in GOOD]
    bad[0][4], bad[3][2], bad[5] = 9, "C404", ["R1", 1, "C003", 1, 3]
    reads = write_csv(tmp_path / "reads.csv", HEADER, bad)
    assert main(["reader-study", "analyze", str(reads), "--truth", str(truth), "--out", str(tmp_path / "t3")]) == 2
    err = capsys.readouterr().err
    for expected in ("reads.csv:2: column 'confidence'", "reads.csv:5: column 'case'", "reads.csv:7: columns",
                     "reads.csv:4: column 'round': reader R1 read case C002 in round 1 but not in round 2"):
        assert expected in err
    assert not (tmp_path / "t3").exists()


def test_header_truth_and_score_file_errors(tmp_path):
    truth, scores, _ = truth_and_scores(tmp_path, n=4)
    with pytest.raises(ReadsError, match=r"reads\.csv:1: missing column\(s\) confidence"):
        read_reads(write_csv(tmp_path / "reads.csv", HEADER[:-1], [r[:-1] for r in GOOD]), {"C001": 0})
    bad_truth = write_csv(tmp_path / "t.csv", ["case", "label"], [["C001", "benign"], ["C001", "malignant"],
                                                                  ["C002", "maybe"], ["C003", 1]])
    with pytest.raises(ReadsError, match=r"t\.csv:3: column 'case': C001 appears twice(.|\n)*t\.csv:4: column 'label'"):
        analyze_reads(tmp_path / "reads.csv", bad_truth, tmp_path / "t3")
    bad_scores = write_csv(tmp_path / "s.csv", ["case", "ai_score"], [["C001", 1.5], ["C002", 0.2], ["C009", 0.1]])
    reads = write_csv(tmp_path / "reads.csv", HEADER, GOOD)
    with pytest.raises(ReadsError, match=r"s\.csv:2: column 'ai_score'(.|\n)*s\.csv:4: column 'case': unknown case "
                                         r"'C009'(.|\n)*no AI score for case\(s\) C001, C003, C004"):
        analyze_reads(reads, truth, tmp_path / "t3", model_scores=bad_scores)
    assert not (tmp_path / "t3").exists()


def test_a_bad_value_does_not_also_report_its_partner_round_as_missing(tmp_path):
    bad = [r[:] for r in GOOD]
    bad[0][4] = 0
    with pytest.raises(ReadsError) as info:
        read_reads(write_csv(tmp_path / "reads.csv", HEADER, bad), {c: i % 2 for i, c in enumerate(
            ["C001", "C002", "C003", "C004"])})
    assert "1 invalid row(s)" in str(info.value) and "column 'confidence': '0'" in str(info.value)


# ---------------------------------------------------------------------------- the reading app's format and MRMC

NEW_GOOD = [["R1", 1, "C001", 0, "4a", 8, "", 31.5, ""], ["R1", 2, "C001", 0, "4A", 5, 1, "", "looks like a cyst"],
            ["R1", 1, "C002", 1, "4c", 80, "", 12, ""], ["R1", 2, "C002", 1, "4c", 91, "", 9.25, '"quoted", comma'],
            ["R1", 1, "C003", 1, "4b", 45, "", 20, ""], ["R1", 2, "C003", 0, "4b", 30, "", 0, ""],
            ["R1", 1, "C004", 0, "4a", 3, "", 41, ""], ["R1", 2, "C004", 0, "4b", 12, "", 18, ""]]


def write_new(path: Path, rows: list[list]) -> Path:
    import csv
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows([list(READ_COLUMNS)] + rows)
    return path


def test_new_format_reads_use_the_likelihood_and_keep_the_extra_columns(tmp_path):
    truth, _, _ = truth_and_scores(tmp_path, n=4)
    frame = read_reads(write_new(tmp_path / "reads.csv", NEW_GOOD), {"C001": 0, "C002": 1, "C003": 0, "C004": 1})
    assert frame.attrs["score"] == "likelihood" and frame["score"].tolist() == [8, 5, 80, 91, 45, 30, 3, 12]
    assert frame["birads4"].tolist()[:2] == ["4a", "4a"] and frame["confidence"].isna().sum() == 7
    assert math.isnan(frame["seconds"][1]) and frame["seconds"][5] == 0 and frame["comment"][3] == '"quoted", comma'


@pytest.mark.parametrize(("cells", "message"), [
    ({4: "4d"}, r"reads\.csv:10: column 'birads4': '4d' is not a BI-RADS 4 sub-category 4a, 4b or 4c"),
    ({5: 101}, r"reads\.csv:10: column 'likelihood': '101' is not an integer 0-100"),
    ({5: "50.5"}, r"reads\.csv:10: column 'likelihood': '50\.5' is not an integer 0-100"),
    ({5: ""}, r"reads\.csv:10: column 'likelihood': '' is not an integer 0-100"),
    ({6: 7}, r"reads\.csv:10: column 'confidence': '7' is not empty or an integer 1-5"),
    ({7: -1}, r"reads\.csv:10: column 'seconds': '-1' is not a reading time in seconds"),
    ({7: "inf"}, r"reads\.csv:10: column 'seconds': 'inf' is not a reading time"),
    ({3: "yes"}, r"reads\.csv:10: column 'malignant': 'yes' is not 0 \(benign\) or 1"),
])
def test_each_bad_new_format_read_is_reported_and_nothing_is_written(tmp_path, cells, message):
    truth, scores, _ = truth_and_scores(tmp_path, n=4)
    row = ["R2", 1, "C001", 0, "4a", 10, "", 5, ""]
    for k, v in cells.items():
        row[k] = v
    reads = write_new(tmp_path / "reads.csv", NEW_GOOD + [row])
    with pytest.raises(ReadsError, match=message):
        analyze_reads(reads, truth, tmp_path / "t3", model_scores=scores)
    assert not (tmp_path / "t3").exists()


def test_a_new_format_header_needs_its_required_columns(tmp_path):
    path = tmp_path / "reads.csv"
    path.write_text("reader,round,case,malignant,birads4,confidence\nR1,1,C001,0,4a,2\n")
    with pytest.raises(ReadsError, match=r"reads\.csv:1: missing column\(s\) likelihood"):
        read_reads(path, {"C001": 0})


def test_legacy_reads_still_analyse_with_the_confidence_as_score(tmp_path):
    truth, scores, _ = truth_and_scores(tmp_path, n=4)
    rows = GOOD + [["R2"] + r[1:] for r in GOOD]
    rows[9][4] = 5  # R2 differs from R1 in one read, so the two readers' AUCs differ
    out = analyze_reads(write_csv(tmp_path / "reads.csv", HEADER, rows), truth, tmp_path / "t3", model_scores=scores)
    result = json.loads((out / "table3.json").read_text())
    assert result["score"] == "1-5 confidence score" and "AUC from the 1-5 confidence score" in (out / "table3.md").read_text()
    assert result["mrmc"]["analyses"]["auc_delong"]["fom"][0] == [result["readers"][r]["round1"]["auc"] for r in ("R1", "R2")]
    assert "reading" in result and "median_seconds" not in result["reading"]


def test_mrmc_rows_and_exports_agree_with_an_independent_assembly(tmp_path):
    truth, scores, data = truth_and_scores(tmp_path, n=60, separation=2.0)
    reads_path = simulate_reads(truth, scores, tmp_path / "reads.csv", readers=4, seed=5)
    out = analyze_reads(reads_path, truth, tmp_path / "t3", model_scores=scores)
    result = json.loads((out / "table3.json").read_text())
    reads = pd.read_csv(reads_path)
    y = np.array(data["labels"])
    readers = list(dict.fromkeys(reads["reader"]))
    cube = np.array([[reads[(reads["round"] == r) & (reads["reader"] == who)].set_index("case").loc[data["cases"],
                                                                                              "likelihood"]
                      for who in readers] for r in (1, 2)], float)
    for cov in ("delong", "jackknife"):
        direct = mrmc_auc(y, cube, covariance=cov).random_readers_random_cases
        stored = result["mrmc"]["analyses"][f"auc_{cov}"]["random_readers_random_cases"]
        assert stored["global_test"]["p"] == pytest.approx(direct.global_test.p)
        assert stored["global_test"]["df2"] == pytest.approx(direct.global_test.df2)
        assert stored["differences"][0]["estimate"] == pytest.approx(direct.differences[0].estimate)
    assert result["reader_mean"]["round2"]["auc_ci_low"] == pytest.approx(
        mrmc_auc(y, cube).random_readers_random_cases.means[1].ci_low)
    with_model = np.stack([cube[1], np.broadcast_to(data["ai"], cube[1].shape)])
    assert result["mrmc"]["analyses"]["model_vs_readers_round2"]["random_readers_random_cases"]["global_test"]["p"] == \
        pytest.approx(mrmc_auc(y, with_model).random_readers_random_cases.global_test.p)
    # MRMCaov's long format read back gives the same analysis
    long = pd.read_csv(out / "mrmcaov.csv")
    assert list(long.columns) == ["reader", "treatment", "case", "truth", "rating"] and len(long) == len(reads)
    back = long.pivot_table(index=["treatment", "reader"], columns="case", values="rating")
    back = back.loc[[("without_AI", r) for r in readers] + [("with_AI", r) for r in readers], data["cases"]]
    assert np.array_equal(back.to_numpy().reshape(cube.shape), cube)
    assert (long.drop_duplicates("case").set_index("case").loc[data["cases"], "truth"] == y).all()
    # iMRMC: header, BEGIN DATA:, one truth row per case, then reader,case,modality,score
    text = (out / "reads.imrmc").read_text().splitlines()
    begin = text.index("BEGIN DATA:")
    assert {"NR: 4", "N0: 30", "N1: 30", "NM: 2"} <= set(text[:begin])
    rows = [line.split(",") for line in text[begin + 1:]]
    truth_rows = [r for r in rows if r[0] == "-1"]
    assert {(r[1], int(r[3])) for r in truth_rows} == set(zip(data["cases"], y.tolist())) and len(truth_rows) == 60
    scored = {(r[0], r[1], int(r[2])): float(r[3]) for r in rows if r[0] != "-1"}
    assert len(scored) == len(reads) and scored[(readers[1], data["cases"][7], 2)] == cube[1, 1, 7]


def test_mrmc_uses_the_cases_every_reader_read(tmp_path):
    truth, scores, data = truth_and_scores(tmp_path, n=40)
    reads_path = simulate_reads(truth, scores, tmp_path / "reads.csv", readers=3, seed=1)
    reads = pd.read_csv(reads_path)
    dropped = reads[~((reads["reader"] == "senior-1") & reads["case"].isin(data["cases"][:6]))]
    dropped.to_csv(reads_path, index=False)
    out = analyze_reads(reads_path, truth, tmp_path / "t3")
    result = json.loads((out / "table3.json").read_text())
    assert (result["mrmc"]["cases"], result["mrmc"]["cases_not_read_by_all"]) == (34, 6)
    assert "(6 case(s) read by fewer are left out)" in (out / "table3.md").read_text()
    assert len(result["readers"]["junior-1"]["cases"]) == 40  # the per-reader rows keep all of a reader's cases


def test_simulated_reads_are_deterministic_and_seeded(tmp_path):
    truth, scores, _ = truth_and_scores(tmp_path, n=30)
    a = simulate_reads(truth, scores, tmp_path / "a.csv", readers=2, seed=3).read_text()
    assert simulate_reads(truth, scores, tmp_path / "b.csv", readers=2, seed=3).read_text() == a
    assert simulate_reads(truth, scores, tmp_path / "c.csv", readers=2, seed=4).read_text() != a
    assert a.splitlines()[0] == ",".join(READ_COLUMNS)


def test_one_reader_gets_the_fixed_reader_analysis_only(tmp_path):
    truth, scores, _ = truth_and_scores(tmp_path, n=30)
    reads = simulate_reads(truth, scores, tmp_path / "reads.csv", readers=1, seed=2)
    out = analyze_reads(reads, truth, tmp_path / "t3", model_scores=scores)
    md = (out / "table3.md").read_text()
    assert "With one reader only the fixed-reader analysis applies." in md and "| AUC | fixed, random |" in md
    assert "| AUC | random, random |" not in md and "CLDLR model alone against the readers" not in md
    assert "| nan" not in md and "nan |" not in md
    assert json.loads((out / "table3.json").read_text())["mrmc"]["analyses"]["auc_delong"]["random_readers_random_cases"] is None
