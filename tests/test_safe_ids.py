"""Nothing a site folder says breaks out: safe ids, paths kept inside their folder, outputs apart from inputs.

The attacks of issue #14, each run through ``cldlr.cli.main`` as a hospital would run it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import write_schema, write_site
from PIL import Image
from test_bundle import model_args

from cldlr.cli import main
from cldlr.common.data.ids import MAX_ID_LENGTH, check_id, is_safe_id, suggest_id
from cldlr.common.data.schema import load_schema
from cldlr.common.data.validation import validate_site
from cldlr.common.errors import CldlrError, ContractError
from cldlr.common.io import atomic_directory, check_output_apart, contained_path

TRAVERSAL = "../../../../elsewhere/victim"
BAD_IDS = [TRAVERSAL, "/etc/passwd", "/tmp", "scan[1]", "scan*", "scan?", ".hidden", "-rf", "a b", "a/b", "a\\b",
           "=HYPERLINK(\"x\",\"click\")", "x" * (MAX_ID_LENGTH + 1), "é", "..", "."]


def _set_id(site: Path, row: int, column: str, value: str) -> None:
    table = pd.read_csv(site / "clinical.csv", dtype=str, keep_default_na=False)
    table.loc[row, column] = value
    table.to_csv(site / "clinical.csv", index=False)


@pytest.mark.parametrize("value", BAD_IDS)
def test_the_id_rule_refuses_every_unsafe_id_and_suggests_a_safe_one(value):
    assert not is_safe_id(value)
    with pytest.raises(ContractError, match="not a safe id .*letters, digits.*rename it, e.g. to"):
        check_id(value, "image_id")
    assert is_safe_id(suggest_id(value))


@pytest.mark.parametrize("value", ["p000_0", "bus_0001-l", "s1-p000-1", "A.B_c-9", "7", "x" * MAX_ID_LENGTH])
def test_ordinary_ids_are_safe(value):
    assert is_safe_id(value) and check_id(value) == value and suggest_id(value) == value


@pytest.mark.parametrize("column", ["image_id", "patient_id"])
@pytest.mark.parametrize("value", BAD_IDS)
def test_validate_reports_an_unsafe_id_as_a_row_problem_never_a_traceback(tmp_path, capsys, column, value):
    site = write_site(tmp_path / "site", n_patients=4)
    _set_id(site, 2, column, value)
    assert main(["validate", str(site), "--schema", str(write_schema(tmp_path / "s.yaml"))]) == 1
    lines = capsys.readouterr().out.splitlines()
    bad = [line for line in lines if "[unsafe-id]" in line]
    assert len(bad) == 1 and f"clinical.csv, line 4, column '{column}'" in bad[0], lines
    assert all(line.startswith(("ERROR", "WARNING", "site ")) for line in lines)  # one line per problem


def test_validate_locates_every_problem_of_an_unsafe_image_id(tmp_path):
    site = write_site(tmp_path / "site", n_patients=4)
    _set_id(site, 0, "image_id", "/etc/passwd")
    report = validate_site(site, load_schema(write_schema(tmp_path / "s.yaml")))
    assert [p.code for p in report.errors] == ["unsafe-id"]
    assert (report.errors[0].file, report.errors[0].row, report.errors[0].column) == ("clinical.csv", 2, "image_id")
    assert [p.code for p in report.warnings] == ["orphan-file", "orphan-file"]  # p000_0's files: no row names them


def _victim(root: Path) -> Path:
    """A binary lesion picture outside every site: the attack reads it as image and mask, then overwrites it."""
    path = root / "elsewhere" / "victim.png"
    path.parent.mkdir(parents=True)
    picture = np.zeros((48, 48), np.uint8)
    picture[14:34, 10:38] = 255
    Image.fromarray(picture).save(path)
    return path


def test_a_traversal_id_cannot_make_predict_read_or_write_outside_its_folders(study_bundle, tmp_path, capsys):
    _, bundle = study_bundle
    victim = _victim(tmp_path)
    before = victim.read_bytes()
    site = tmp_path / "a" / "b" / "site"
    shutil.copytree(tmp_path / "site", site)
    _set_id(site, 0, "image_id", TRAVERSAL)  # images/../../../../elsewhere/victim.png is the victim
    out = tmp_path / "a" / "b" / "out"  # out/overlays/../../../../elsewhere/victim.png too
    code = main(["predict", *model_args(bundle), "--site", str(site), "--out", str(out)])
    assert code == 2 and "unsafe-id" in capsys.readouterr().err
    assert victim.read_bytes() == before and not out.exists()


def test_a_symlinked_id_cannot_write_an_overlay_outside_the_output(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "link").symlink_to(outside)
    with pytest.raises(CldlrError, match="would leave"):
        contained_path(tmp_path / "out", "link/victim.png")
    for name in ("../x", "/etc/passwd", "", "."):
        with pytest.raises(CldlrError, match="would leave"):
            contained_path(tmp_path / "out", name)
    assert contained_path(tmp_path / "out", "case.png") == (tmp_path / "out" / "case.png").resolve()


# --- outputs apart from inputs, replaced atomically ------------------------------------------------------------
@pytest.fixture
def study_bundle(tmp_path):
    from test_bundle import export_tiny, make_tiny_study, trust_pem

    study = make_tiny_study(tmp_path)
    bundle = export_tiny(study, tmp_path / "bundle")
    trust_pem(bundle.parent)  # the site's trust file exists before any test takes its snapshot
    return study, bundle


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["site", "site/preds", "parent", "bundle", "bundle/x"])
def test_predict_refuses_an_output_that_is_contains_or_lies_inside_an_input(study_bundle, tmp_path, capsys, where):
    _, bundle = study_bundle
    site = tmp_path / "site"
    out = tmp_path if where == "parent" else tmp_path / where
    before = _tree(tmp_path)
    code = main(["predict", *model_args(bundle), "--site", str(site), "--out", str(out), "--force"])
    assert code == 2 and "apart from every input" in capsys.readouterr().err
    assert _tree(tmp_path) == before  # the site (clinical.csv, images/, masks/) and the bundle are intact


def test_packet_and_analysis_refuse_outputs_over_their_inputs(study_bundle, tmp_path, capsys):
    _, bundle = study_bundle
    site = tmp_path / "site"
    before = _tree(site)
    assert main(["reader-study", "packet", *model_args(bundle), "--site", str(site), "--out", str(site),
                 "--force"]) == 2
    assert _tree(site) == before and "apart from every input" in capsys.readouterr().err
    truth = tmp_path / "key.csv"
    truth.write_text("case,label\nC1,0\nC2,1\n")
    assert main(["reader-study", "simulate-reads", "--truth", str(truth), "--model-scores", str(truth),
                 "--out", str(truth)]) == 2
    assert main(["reader-study", "analyze", str(truth), "--truth", str(truth), "--out", str(tmp_path),
                 "--force"]) == 2
    assert truth.read_text() == "case,label\nC1,0\nC2,1\n"
    assert capsys.readouterr().err.count("apart from every input") == 2


def test_split_and_importers_refuse_an_output_over_their_source(tmp_path, tiny_schema_path, capsys):
    site = write_site(tmp_path / "site", n_patients=4)
    before = _tree(site)
    assert main(["split", str(site), str(site), "--schema", str(tiny_schema_path), "--force"]) == 2
    assert main(["import", "class-folders", str(site), str(tmp_path), "--force"]) == 2
    assert _tree(site) == before and capsys.readouterr().err.count("apart from every input") == 2


def test_check_output_apart_sees_through_links_and_dots(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "site")
    for out in (tmp_path / "alias", tmp_path / "x" / ".." / "site", tmp_path / "alias" / "out"):
        with pytest.raises(CldlrError, match="apart from every input"):
            check_output_apart(out, [tmp_path / "site"])
    assert check_output_apart(tmp_path / "out", [tmp_path / "site", None]) == (tmp_path / "out").resolve()


def test_forced_replacement_renames_the_old_folder_aside_and_keeps_it_on_failure(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("crash while building")
    assert _tree(out) == {"old.txt": b"old"}
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert _tree(out) == {"old.txt": b"old"}  # nothing replaced before the new folder is whole
    assert _tree(out) == {"new.txt": b"new"} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_forced_replacement_never_leaves_the_output_missing(tmp_path, monkeypatch):
    """The new folder is renamed in while the old one still exists aside: a failing rename puts the old one back."""
    import os

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real = os.replace
    calls: list[tuple[str, str]] = []

    def replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if Path(src).name.endswith(".partial"):
            raise OSError("disk gone")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk gone"), atomic_directory(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert calls[0][1] == "out" and calls[1][1] == "out"  # old aside first, then the new one in
    assert _tree(out) == {"old.txt": b"old"} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_single_lesion_predict_never_writes_over_its_image_mask_or_bundle(study_bundle, tmp_path, capsys):
    study, bundle = study_bundle
    row = study.site.frame.iloc[0]
    image = Path(row["image_path"])
    before = image.read_bytes()
    base = ["predict", *model_args(bundle), "--image", str(image), "--mask", row["mask_path"],
            "--clinical", f"age={row['age']:g}", "--clinical", f"palpable={int(row['palpable'])}",
            "--clinical", f"side={row['side']}"]
    assert main([*base, "--overlay", str(image)]) == 2
    assert main([*base, "--out", str(bundle / "x.json")]) == 2
    assert image.read_bytes() == before and not (bundle / "x.json").exists()
    assert capsys.readouterr().err.count("apart from every input") == 2


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "a b", ""])
def test_a_run_name_is_a_safe_id(tmp_path, name):
    from cldlr.common.config import Config
    from cldlr.common.errors import ConfigError
    from cldlr.common.runs import new_run_dir

    config = Config().replace(**{"run.name": name, "run.output_dir": str(tmp_path / "runs")})
    with pytest.raises(ConfigError, match="run.name .* is not a safe id"):
        new_run_dir(config)
    assert not (tmp_path / "escape").exists() and not (tmp_path / "runs").exists()
