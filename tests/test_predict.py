"""``cldlr predict``: one lesion (JSON + overlay) and a whole site (CSV + overlays), through ``cldlr.cli.main``."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_bundle import export_tiny, make_tiny_study, trust_pem

from cldlr.cli import main
from cldlr.client.predict import parse_clinical_args
from cldlr.common.errors import CldlrError


@pytest.fixture
def study_bundle(tmp_path):
    study = make_tiny_study(tmp_path)
    return study, export_tiny(study, tmp_path / "bundle")


def model(bundle) -> list[str]:
    """``--model BUNDLE --trust centre.pem``: the bundle and the test centre's key this site trusts."""
    return ["--model", str(bundle), "--trust", str(trust_pem(bundle.parent))]


def _lesion_args(study, row: int, **override: str | None) -> list[str]:
    """CLI arguments for one lesion of the tiny site; ``name=None`` leaves that clinical value out."""
    r = study.site.frame.iloc[row]
    values = {"age": f"{r['age']:g}", "palpable": str(int(r["palpable"])), "side": r["side"], **override}
    args = ["--image", r["image_path"], "--mask", r["mask_path"]]
    for name, value in values.items():
        args += [] if value is None else ["--clinical", f"{name}={value}"]
    return args


def test_single_lesion_json_and_overlay(study_bundle, tmp_path):
    study, bundle = study_bundle
    expected = study.direct_scores()
    out = tmp_path / "result" / "lesion.json"
    assert main(["predict", *model(bundle), *_lesion_args(study, 5), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["ai_score"] == pytest.approx(expected["cldlr"][5], abs=1e-5)
    assert result["dlr_score"] == pytest.approx(expected["dlr"][5], abs=1e-5)
    assert result["clinical_score"] == pytest.approx(expected["clinical"][5], abs=1e-5)
    assert result["predicted_class"] == ("malignant" if result["ai_score"] >= 0.4 else "benign")
    assert result["threshold"] == 0.4 and result["fallback"] is None
    assert result["overlay"] == str(out.with_name("lesion_overlay.png"))
    overlay = np.asarray(Image.open(result["overlay"]))
    assert overlay.shape == (32, 32, 3) and overlay.dtype == np.uint8
    assert len(result["model"]["bundle_id"]) == 64


def test_single_lesion_prints_json_and_writes_overlay_in_cwd(study_bundle, tmp_path, monkeypatch, capsys):
    study, bundle = study_bundle
    monkeypatch.chdir(tmp_path)
    assert main(["predict", *model(bundle), *_lesion_args(study, 0)]) == 0
    result = json.loads(capsys.readouterr().out)
    image_id = study.site.frame["image_id"].iloc[0]
    assert (tmp_path / f"{image_id}_overlay.png").is_file() and 0 <= result["ai_score"] <= 1


def test_missing_clinical_value_is_an_error_or_an_explicit_dlr_fallback(study_bundle, tmp_path, capsys):
    study, bundle = study_bundle
    args = _lesion_args(study, 1, age=None)
    out = tmp_path / "fallback.json"
    assert main(["predict", *model(bundle), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "missing clinical value(s): age (a number in [18, 100] years)" in err and "--allow-missing-clinical" in err
    assert not out.exists()
    assert main(["predict", *model(bundle), *args, "--out", str(out), "--allow-missing-clinical"]) == 0
    result = json.loads(out.read_text())
    assert result["fallback"] == "dlr" and result["ai_score"] == result["dlr_score"]
    assert result["clinical_score"] is None and "age" in result["warnings"][0]


@pytest.mark.parametrize(("name", "value", "message"), [
    ("age", "abc", "clinical parameter 'age': 'abc' is not a number; expected a number in [18, 100] years"),
    ("side", "up", "clinical parameter 'side': 'up' is not one of the levels left, right"),
    ("palpable", "maybe", "clinical parameter 'palpable': 'maybe' is not binary"),
    ("height", "170", "unknown clinical parameter(s) height"),
])
def test_invalid_clinical_values_name_the_parameter(study_bundle, capsys, name, value, message):
    study, bundle = study_bundle
    assert main(["predict", *model(bundle), *_lesion_args(study, 0, **{name: value})]) == 2
    assert message in capsys.readouterr().err


def test_clinical_argument_syntax():
    assert parse_clinical_args(["age=54", "side=left"]) == {"age": "54", "side": "left"}
    with pytest.raises(CldlrError, match="NAME=VALUE"):
        parse_clinical_args(["age54"])
    with pytest.raises(CldlrError, match="given twice"):
        parse_clinical_args(["age=54", "age=55"])


def test_site_folder_predictions_csv_and_overlays(study_bundle, tmp_path, capsys):
    study, bundle = study_bundle
    expected = study.direct_scores()
    out = tmp_path / "pred"
    assert main(["predict", *model(bundle), "--site", str(study.site.root), "--out", str(out)]) == 0
    table = pd.read_csv(out / "predictions.csv")
    assert list(table["image_id"]) == list(study.site.frame["image_id"])
    np.testing.assert_allclose(table["ai_score"], expected["cldlr"], atol=1e-6)
    np.testing.assert_allclose(table["dlr_score"], expected["dlr"], atol=1e-6)
    assert (table["predicted_class"] == np.where(table["ai_score"] >= 0.4, "malignant", "benign")).all()
    assert all((out / p).is_file() for p in table["overlay"]) and table["fallback"].isna().all()
    assert main(["predict", *model(bundle), "--site", str(study.site.root), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["predict", *model(bundle), "--site", str(study.site.root), "--out", str(out),
                 "--split", "test", "--force"]) == 0
    test_ids = study.site.frame.loc[study.site.frame["split"] == "test", "image_id"]
    assert list(pd.read_csv(out / "predictions.csv")["image_id"]) == list(test_ids)


def test_site_with_a_missing_impute_value_is_imputed_not_refused(study_bundle, tmp_path, capsys):
    # changed on purpose (issue 15, item 4): a missing value under missing: impute is imputed with the training
    # encoder's value and listed, instead of needing --allow-missing-clinical (tests/test_clinic.py checks the score)
    study, bundle = study_bundle
    csv_path = study.site.root / "clinical.csv"
    raw = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    raw.loc[2, "palpable"] = ""  # palpable has missing: impute in the schema, so the site still validates
    raw.to_csv(csv_path, index=False)
    out = tmp_path / "pred"
    assert main(["predict", *model(bundle), "--site", str(study.site.root), "--out", str(out)]) == 0
    table = pd.read_csv(out / "predictions.csv")
    assert table["fallback"].isna().all() and table["imputed"].notna().tolist() == [i == 2 for i in range(len(table))]
    assert json.loads((out / "summary.json").read_text())["n_dlr_fallback"] == 0
    raw.loc[2, "age"] = ""  # age has missing: error: the site is refused before anything is scored
    raw.to_csv(csv_path, index=False)
    assert main(["predict", *model(bundle), "--site", str(study.site.root), "--out", str(tmp_path / "p2")]) == 2
    captured = capsys.readouterr()
    assert "age is empty" in captured.out + captured.err


def test_predict_argument_errors(study_bundle, capsys):
    study, bundle = study_bundle
    r = study.site.frame.iloc[0]
    assert main(["predict", *model(bundle), "--image", r["image_path"]]) == 2
    assert "--image needs --mask" in capsys.readouterr().err
    assert main(["predict", *model(bundle), "--site", str(study.site.root)]) == 2
    assert "--site needs --out" in capsys.readouterr().err
