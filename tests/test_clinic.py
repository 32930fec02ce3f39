"""Using a bundle in the clinic and at an external hospital: imputation as in training, unlabelled folders,
descriptors computed from the mask, physical units, and sites whose columns differ from the bundle's schema."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml
from conftest import lesion_image
from PIL import Image
from test_bundle import CENTRE, TinyStudy, centre_trust, make_tiny_study, model_args

from cldlr.cli import main
from cldlr.client.importers.bus_bra import bus_bra_schema_yaml
from cldlr.client.importers.class_folders import import_class_folders
from cldlr.common.bundle import ClinicalInputError, export_bundle, load_bundle
from cldlr.common.data.columns import ColumnMapError, apply_column_map, parse_column_map
from cldlr.common.data.descriptors import all_descriptors, derive_from_mask, known_spacings
from cldlr.common.data.imaging import read_image, read_mask, read_spacing
from cldlr.common.data.lesion import descriptor_parameters, lesion_descriptors
from cldlr.common.data.schema import load_schema, schema_from_dict
from cldlr.common.data.scoring import read_site_for_scoring
from cldlr.common.data.site import read_site
from cldlr.common.data.units import parse_spacing
from cldlr.common.data.validation import validate_site
from cldlr.common.errors import ContractError, SchemaError
from cldlr.simulations.phantom import generate_phantom


def write_class_folders(src: Path, n: int = 10, seed: int = 0, size: int = 48) -> Path:
    """benign/ and malignant/ folders with ``<name>.png`` and ``<name>_mask.png`` (the BUSI layout)."""
    rng = np.random.default_rng(seed)
    for label in ("benign", "malignant"):
        (src / label).mkdir(parents=True)
        for i in range(n):
            image, mask = lesion_image(rng, size, label == "malignant")
            Image.fromarray(image).save(src / label / f"{label} ({i}).png")
            Image.fromarray((mask * 255).astype(np.uint8)).save(src / label / f"{label} ({i})_mask.png")
    return src


def export(study: TinyStudy, out: Path, training_spacing=None) -> Path:
    return export_bundle(out, model=study.model, model_config=study.model_cfg, data_config=study.data_cfg,
                         normalization=study.normalization, schema=study.schema, selected=study.selected,
                         encoder=study.encoder, fusion=study.fusion, threshold=0.4, model_card={"sites": ["site"]},
                         training_spacing=training_spacing, signer=CENTRE)


def edit_csv(site: Path, change) -> None:
    table = pd.read_csv(site / "clinical.csv", dtype=str, keep_default_na=False)
    change(table).to_csv(site / "clinical.csv", index=False)


@pytest.fixture
def descriptor_study(tmp_path):
    """A BUS-BRA-schema study (side, device, birads recorded; only mask descriptors selected) and its bundle."""
    import_class_folders(write_class_folders(tmp_path / "src", seed=1), tmp_path / "imported")
    site = tmp_path / "imported" / "src"
    rng = np.random.default_rng(0)
    edit_csv(site, lambda t: t.assign(side=rng.choice(["left", "right"], len(t)), device="ge-logiq-7", birads="4"))
    schema = tmp_path / "bus-bra.yaml"
    schema.write_text(bus_bra_schema_yaml())
    study = make_tiny_study(tmp_path, site_dir=site, schema_path=schema, selected=("ttw_ratio", "circularity", "width_px"))
    return study, export(study, tmp_path / "bundle")


# ---------------------------------------------------------------------------- 4: missing values as in training

def test_reader_packet_on_a_fresh_phantom_site_imputes_family_history_as_in_training(tmp_path):
    generate_phantom(tmp_path / "train", sites=1, images_per_site=24, seed=5, image_size=64)
    generate_phantom(tmp_path / "fresh", sites=1, images_per_site=24, seed=9, image_size=64)
    schema = tmp_path / "train" / "schema.yaml"
    study = make_tiny_study(tmp_path, site_dir=tmp_path / "train" / "site-1", schema_path=schema,
                            selected=("age", "family_history"))
    bundle = export(study, tmp_path / "bundle")
    fresh = tmp_path / "fresh" / "site-1"
    edit_csv(fresh, lambda t: t.assign(family_history=["" if i % 5 == 0 else v for i, v in enumerate(t.family_history)]))
    out = tmp_path / "packet"
    assert main(["reader-study", "packet", *model_args(bundle), "--site", str(fresh), "--out", str(out),
                 "--split", "all"]) == 0
    key = pd.read_csv(out / "key.csv", dtype=str, keep_default_na=False)
    fill = study.encoder.impute[study.selected.index("family_history")]
    raw = pd.read_csv(fresh / "clinical.csv", dtype=str, keep_default_na=False).set_index("image_id")
    empty = raw.loc[key["image_id"], "family_history"].to_numpy() == ""
    assert empty.sum() >= 5
    assert key["imputed"].tolist() == [f"family_history={fill:g}" if e else "" for e in empty]
    scores = pd.read_csv(out / "model_scores.csv", keep_default_na=False)
    assert (scores["fallback"] == "").all()


def test_imputed_value_scores_exactly_as_the_training_encoder_would(tmp_path):
    study = make_tiny_study(tmp_path)
    bundle = export(study, tmp_path / "bundle")
    edit_csv(study.site.root, lambda t: t.assign(palpable=["" if i == 2 else v for i, v in enumerate(t.palpable)]))
    out = tmp_path / "pred"
    assert main(["predict", *model_args(bundle), "--site", str(study.site.root), "--out", str(out)]) == 0
    table = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    fill = study.encoder.impute[study.selected.index("palpable")]
    assert table["imputed"].tolist() == [f"palpable={fill:g}" if i == 2 else "" for i in range(len(table))]
    frame = study.site.frame.copy()
    frame.loc[2, "palpable"] = np.nan  # the study's own encoder imputes a missing value
    np.testing.assert_allclose(table["ai_score"].astype(float), study.direct_scores(frame)["cldlr"], atol=1e-6)
    assert (table["fallback"] == "").all()
    assert json.loads((out / "summary.json").read_text())["n_imputed"] == 1
    r = study.site.frame.iloc[0]  # one lesion without palpable: imputed and said so; age (missing: error) still refuses
    lesion = tmp_path / "lesion.json"
    assert main(["predict", *model_args(bundle), "--image", r["image_path"], "--mask", r["mask_path"],
                 "--clinical", f"age={r['age']:g}", "--clinical", "side=left", "--out", str(lesion)]) == 0
    assert json.loads(lesion.read_text())["imputed"] == {"palpable": fill}
    with pytest.raises(ClinicalInputError, match="missing clinical value"):
        load_bundle(bundle, trust=centre_trust(bundle.parent)).predict(read_image(r["image_path"]),
                                                                       read_mask(r["mask_path"]), {"side": "left"})


# ---------------------------------------------------------------------------- 5: unlabelled clinic cases

def test_predict_site_scores_a_folder_without_labels_and_validate_says_what_it_serves(tmp_path, capsys):
    study = make_tiny_study(tmp_path)
    bundle = export(study, tmp_path / "bundle")
    clinic = tmp_path / "clinic"
    shutil.copytree(study.site.root, clinic)
    edit_csv(clinic, lambda t: t.drop(columns=["label", "split"]))
    schema = tmp_path / "schema.yaml"
    assert main(["validate", str(clinic), "--schema", str(schema)]) == 0
    said = capsys.readouterr().out
    assert "unlabelled: serves predict only" in said and "study" in said.splitlines()[-1]
    assert main(["validate", str(clinic), "--schema", str(schema), "--for", "study"]) == 1
    assert "required column 'label' is missing" in capsys.readouterr().out
    with pytest.raises(ContractError):
        read_site(clinic, study.schema)  # a study refuses it
    with pytest.raises(ContractError, match="no label"):
        _ = read_site(clinic, study.schema, purpose="predict").labels
    out = tmp_path / "pred"
    assert main(["predict", *model_args(bundle), "--site", str(clinic), "--out", str(out)]) == 0
    table = pd.read_csv(out / "predictions.csv")
    assert list(table["image_id"]) == list(study.site.frame["image_id"])
    np.testing.assert_allclose(table["ai_score"], study.direct_scores()["cldlr"], atol=1e-6)


def test_some_rows_without_label_serve_predict_only(tmp_path):
    study = make_tiny_study(tmp_path)
    edit_csv(study.site.root, lambda t: t.assign(label=["" if i < 3 else v for i, v in enumerate(t.label)]))
    report = validate_site(study.site.root, study.schema, purpose="any")
    assert report.ok and report.serves == ["predict"] and report.n_unlabelled == 3
    assert [p.code for p in report.warnings] == ["unknown-label"]
    study_report = validate_site(study.site.root, study.schema)
    assert [(p.code, p.row) for p in study_report.errors] == [("unknown-label", 2), ("unknown-label", 3),
                                                             ("unknown-label", 4)]


# ---------------------------------------------------------------------------- 6: parameters derived from the mask

def test_predict_image_and_mask_with_a_descriptor_only_bundle_needs_no_clinical_value(descriptor_study, tmp_path):
    study, bundle = descriptor_study
    r = study.site.frame.iloc[3]
    out = tmp_path / "lesion.json"
    assert main(["predict", *model_args(bundle), "--image", r["image_path"], "--mask", r["mask_path"],
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    computed = lesion_descriptors(read_mask(r["mask_path"]))
    assert result["derived"] == pytest.approx({n: computed[n] for n in study.selected})
    assert result["ai_score"] == pytest.approx(study.direct_scores()["cldlr"][3], abs=1e-5)
    assert result["fallback"] is None and result["imputed"] == {}
    wrong = tmp_path / "wrong.json"  # a recorded value wins (as in training) and a disagreement is a warning
    assert main(["predict", *model_args(bundle), "--image", r["image_path"], "--mask", r["mask_path"],
                 "--clinical", "width_px=3", "--out", str(wrong)]) == 0
    assert any("width_px: recorded 3 px but the mask gives" in w for w in json.loads(wrong.read_text())["warnings"])


def test_a_site_may_leave_derived_columns_out_and_gets_the_importers_values(descriptor_study, tmp_path):
    study, _ = descriptor_study
    bare = tmp_path / "bare"
    shutil.copytree(study.site.root, bare)
    names = [p.name for p in study.schema.derived_parameters]
    edit_csv(bare, lambda t: t.drop(columns=names))
    assert validate_site(bare, study.schema).ok
    filled = read_site(bare, study.schema).frame
    np.testing.assert_allclose(filled[names].to_numpy(float), study.site.frame[names].to_numpy(float), atol=1e-6)


def test_a_recorded_descriptor_that_disagrees_with_the_mask_is_a_warning(descriptor_study):
    study, _ = descriptor_study
    edit_csv(study.site.root, lambda t: t.assign(circularity=["0.1" if i == 1 else v for i, v in enumerate(t.circularity)]))
    report = validate_site(study.site.root, study.schema)
    assert report.ok
    assert [(p.code, p.row, p.column) for p in report.warnings] == [("derived-mismatch", 3, "circularity")]


def test_derived_parameters_are_checked_by_the_schema():
    entry = {"name": "width_px", "type": "numeric", "unit": "px", "range": [0, 10], "derived": "mask"}
    assert schema_from_dict({"name": "s", "parameters": [entry]}).parameters[0].derived == "mask"
    for bad, message in ((entry | {"unit": "mm"}), "width_px is in px"), ((entry | {"name": "age"}), "mask descriptor"), \
            ((entry | {"derived": "image"}), "derived must be one of mask"):
        with pytest.raises(SchemaError, match=message):
            schema_from_dict({"name": "s", "parameters": [bad]})


def test_schemas_without_derived_keep_their_fingerprint():
    """Keys added after version 1 (``derived``, ``dp_range``) enter the fingerprint only when set."""
    schema = load_schema(Path(__file__).resolve().parents[1] / "configs" / "schema" / "phantom.yaml")
    legacy = [{k: v for k, v in p.__dict__.items() if k not in ("derived", "dp_range")} for p in schema.parameters]
    import hashlib

    payload = json.dumps({"name": schema.name, "version": schema.version, "parameters": legacy}, sort_keys=True,
                         default=list)
    assert schema.fingerprint() == hashlib.sha256(payload.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- 7: physical units

def test_spacing_syntax_and_millimetre_descriptors():
    assert parse_spacing("0.1") == (0.1, 0.1) and parse_spacing(" 0.1x0.2 ") == (0.1, 0.2) and parse_spacing("") is None
    for bad in ("abc", "0", "-0.1", "0.1x0.2x0.3", "20"):
        with pytest.raises(ValueError, match="pixel spacing"):
            parse_spacing(bad)
    _, mask = lesion_image(np.random.default_rng(0), 64, True)
    px, mm = lesion_descriptors(mask), all_descriptors(mask, (0.1, 0.2))
    assert mm["width_mm"] == pytest.approx(px["width_px"] * 0.2) and mm["height_mm"] == pytest.approx(px["height_px"] * 0.1)
    assert mm["area_mm2"] == pytest.approx(px["area_px"] * 0.02) and mm["depth_mm"] == pytest.approx(px["depth_px"] * 0.1)
    assert all(mm[k] == px[k] for k in ("ttw_ratio", "circularity", "solidity", "convexity"))
    mm_params = schema_from_dict({"name": "mm", "parameters": descriptor_parameters(units="mm")}).parameters
    with pytest.raises(ValueError, match="width_mm, height_mm, area_mm2, depth_mm need"):
        derive_from_mask(mm_params, mask, None)


def test_dicom_pixel_spacing_is_read(tmp_path):
    image = sitk.GetImageFromArray(np.zeros((20, 30), np.uint8))
    image.SetSpacing((0.12, 0.1))  # (column, row): the DICOM writer derives PixelSpacing from it
    image.SetMetaData("0028|0030", "0.1\\0.12")
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(tmp_path / "x.dcm"))
    writer.Execute(image)
    assert read_spacing(tmp_path / "x.dcm") == (0.1, 0.12)


def test_millimetre_schema_needs_a_spacing_and_takes_it_from_the_site(tmp_path):
    import_class_folders(write_class_folders(tmp_path / "src"), tmp_path / "imported")
    site = tmp_path / "imported" / "src"
    schema = schema_from_dict({"name": "mm", "parameters": descriptor_parameters(units="mm")})
    edit_csv(site, lambda t: t[["image_id", "patient_id", "label"]])
    report = validate_site(site, schema)
    assert {p.code for p in report.errors} == {"derived-needs-spacing"} and len(report.errors) == 4 * 20
    edit_csv(site, lambda t: t.assign(spacing_mm="0.08"))
    assert validate_site(site, schema).ok
    frame = read_site(site, schema).frame
    mask = read_mask(frame["mask_path"].iloc[0])
    assert frame["width_mm"].iloc[0] == pytest.approx(lesion_descriptors(mask)["width_px"] * 0.08)
    assert known_spacings(frame) == [(0.08, 0.08)]
    edit_csv(site, lambda t: t.assign(spacing_mm=["oops" if i == 0 else v for i, v in enumerate(t.spacing_mm)]))
    assert [(p.code, p.row) for p in validate_site(site, schema).errors] == [("invalid-spacing", 2),
                                                                              ("derived-needs-spacing", 2),
                                                                              ("derived-needs-spacing", 2),
                                                                              ("derived-needs-spacing", 2),
                                                                              ("derived-needs-spacing", 2)]


def test_pixel_inputs_are_refused_at_another_spacing_unless_accepted(descriptor_study, tmp_path, capsys):
    study, _ = descriptor_study
    bundle = export(study, tmp_path / "spaced", training_spacing=[(0.1, 0.1)])
    r = study.site.frame.iloc[0]
    lesion = ["predict", *model_args(bundle), "--image", r["image_path"], "--mask", r["mask_path"]]
    assert main([*lesion, "--spacing", "0.2", "--out", str(tmp_path / "a.json")]) == 2
    err = capsys.readouterr().err
    assert "pixel-unit input(s) width_px" in err and "0.2 mm per pixel" in err and "--accept-pixel-units" in err
    assert main([*lesion, "--spacing", "0.2", "--accept-pixel-units", "--out", str(tmp_path / "b.json")]) == 0
    assert any("accepted" in w for w in json.loads((tmp_path / "b.json").read_text())["warnings"])
    assert main([*lesion, "--spacing", "0.1", "--out", str(tmp_path / "c.json")]) == 0
    assert json.loads((tmp_path / "c.json").read_text())["warnings"] == []
    assert main([*lesion, "--out", str(tmp_path / "d.json")]) == 0  # unknown here: can't compare, so a warning
    assert "pixel spacing is unknown" in json.loads((tmp_path / "d.json").read_text())["warnings"][0]
    clinic = tmp_path / "clinic"  # a site declares its spacing per image
    shutil.copytree(study.site.root, clinic)
    edit_csv(clinic, lambda t: t.assign(spacing_mm="0.3"))
    assert main(["predict", *model_args(bundle), "--site", str(clinic), "--out", str(tmp_path / "p")]) == 2
    assert "0.3 mm per pixel" in capsys.readouterr().err


# ---------------------------------------------------------------------------- 9: external schemas

def test_a_class_folders_site_is_scored_by_a_bundle_whose_schema_lists_side_device_birads(descriptor_study, tmp_path):
    study, bundle = descriptor_study
    import_class_folders(write_class_folders(tmp_path / "external", seed=7), tmp_path / "ext")
    external = tmp_path / "ext" / "external"
    header = pd.read_csv(external / "clinical.csv", nrows=0).columns
    assert not {"side", "device", "birads"} & set(header)
    with pytest.raises(ContractError):
        read_site(external, study.schema)  # the full schema wants them
    out = tmp_path / "pred"
    assert main(["predict", *model_args(bundle), "--site", str(external), "--out", str(out)]) == 0
    table = pd.read_csv(out / "predictions.csv")
    ext = read_site_for_scoring(external, study.schema, study.selected)
    assert len(table) == len(ext) == 20 and list(table["image_id"]) == list(ext.frame["image_id"])
    assert table["ai_score"].between(0, 1).all()


def test_a_missing_input_column_names_it_and_map_renames_without_copying(tmp_path, capsys):
    import_class_folders(write_class_folders(tmp_path / "src", seed=1), tmp_path / "imported")
    site = tmp_path / "imported" / "src"
    edit_csv(site, lambda t: t.assign(side=["left", "right"] * (len(t) // 2), device="ge-logiq-7", birads="4"))
    schema = tmp_path / "bus-bra.yaml"
    schema.write_text(bus_bra_schema_yaml())
    study = make_tiny_study(tmp_path, site_dir=site, schema_path=schema, selected=("side", "ttw_ratio"))
    bundle = export(study, tmp_path / "bundle")
    external = tmp_path / "external"
    shutil.copytree(site, external)
    edit_csv(external, lambda t: t.drop(columns=["device", "birads"]).rename(columns={"side": "Laterality"}))
    before = (external / "clinical.csv").read_bytes()
    assert main(["predict", *model_args(bundle), "--site", str(external), "--out", str(tmp_path / "a")]) == 2
    captured = capsys.readouterr()
    report = captured.out + captured.err
    assert "column 'side', an input of the model, is missing" in report and "--map SITE_COLUMN=side" in report
    out = tmp_path / "b"
    assert main(["predict", *model_args(bundle), "--site", str(external), "--out", str(out),
                 "--map", "Laterality=side"]) == 0
    np.testing.assert_allclose(pd.read_csv(out / "predictions.csv")["ai_score"], study.direct_scores()["cldlr"], atol=1e-6)
    assert (external / "clinical.csv").read_bytes() == before
    assert json.loads((out / "summary.json").read_text())["column_map"] == {"Laterality": "side"}


def test_column_map_syntax_and_collisions():
    assert parse_column_map(["Age=age", " pathology = label "]) == {"Age": "age", "pathology": "label"}
    for items, message in ((["age"], "SITE_COLUMN=SCHEMA_NAME"), (["a=x", "a=y"], "given twice"),
                           (["a=x", "b=x"], "both 'a' and 'b' map to 'x'")):
        with pytest.raises(ColumnMapError, match=message):
            parse_column_map(items)
    table = pd.DataFrame({"Age": ["1"], "age": ["2"]})
    with pytest.raises(ColumnMapError, match="lacks"):
        apply_column_map(table, {"AGE": "age"})
    with pytest.raises(ColumnMapError, match="already has"):
        apply_column_map(table, {"Age": "age"})
    assert list(apply_column_map(table, {"Age": "age0"}).columns) == ["age0", "age"]


def test_bus_bra_reference_schema_still_reads_every_descriptor_column(tmp_path):
    text = bus_bra_schema_yaml()
    assert (Path(__file__).resolve().parents[1] / "configs" / "schema" / "bus-bra.yaml").read_text() == text
    schema = schema_from_dict(yaml.safe_load(text))
    assert [p.name for p in schema.derived_parameters] == [p["name"] for p in descriptor_parameters()]
    assert all(p.unit in ("px", "px^2", "") for p in schema.derived_parameters)
