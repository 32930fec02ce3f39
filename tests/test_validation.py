"""Site validator: each contract fault is found alone, located (file/line/column), and all faults at once."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import write_site
from PIL import Image

from cldlr.cli import main
from cldlr.common.data.schema import Schema
from cldlr.common.data.validation import Problem, ValidationReport, validate_site

N_PATIENTS = 6  # 2 images each; p000 benign/train, p001 malignant/train, p004/p005 test


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return write_site(tmp_path / "site", n_patients=N_PATIENTS, images_per_patient=2, size=32, with_split=True)


# --- mutations: each introduces exactly one fault ---------------------------------------------------


def read_csv(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "clinical.csv", dtype=str, keep_default_na=False)


def write_csv(root: Path, table: pd.DataFrame) -> None:
    table.to_csv(root / "clinical.csv", index=False)


def set_cell(index: int, column: str, value: str) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        table = read_csv(root)
        table.loc[index, column] = value
        write_csv(root, table)
    return mutate


def drop_column(column: str) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        write_csv(root, read_csv(root).drop(columns=[column]))
    return mutate


def add_column(root: Path) -> None:
    table = read_csv(root)
    table["notes"] = "seen twice"
    write_csv(root, table)


def duplicate_first_row(root: Path) -> None:
    table = read_csv(root)
    write_csv(root, pd.concat([table, table.iloc[[0]]], ignore_index=True))


def empty_image_id(root: Path) -> None:
    set_cell(0, "image_id", "")(root)
    (root / "images" / "p000_0.png").unlink()  # else the now unreferenced files add orphan warnings
    (root / "masks" / "p000_0.png").unlink()


def header_only(root: Path) -> None:
    write_csv(root, read_csv(root).iloc[:0])
    for folder in ("images", "masks"):
        shutil.rmtree(root / folder)
        (root / folder).mkdir()


def extra_field(root: Path) -> None:
    with open(root / "clinical.csv", "a") as handle:
        handle.write("x,y,z,1,2,3,4,5,6,7,8,9,10\n")


def garbage(relative: str) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        (root / relative).write_bytes(b"\x89PNG this is not an image" * 10)
    return mutate


def unlink(relative: str) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        path = root / relative
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return mutate


def copy_as(relative: str, new_name: str) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        source = root / relative
        Image.open(source).save(source.with_name(new_name))
    return mutate


def write_mask(array_fn: Callable[[np.ndarray], np.ndarray], name: str = "p000_0.png") -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        original = np.asarray(Image.open(root / "masks" / "p000_0.png"))
        (root / "masks" / "p000_0.png").unlink()
        Image.fromarray(array_fn(original).astype(np.uint8)).save(root / "masks" / name)
    return mutate


def three_levels(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[: mask.shape[0] // 2][mask[: mask.shape[0] // 2] > 0] = 128
    return out


def gradient_mask(mask: np.ndarray) -> np.ndarray:
    return np.tile(np.linspace(0, 255, mask.shape[1]), (mask.shape[0], 1))


def bigger(mask: np.ndarray) -> np.ndarray:
    return np.pad(mask, ((0, 4), (0, 6)))


def orphan(root: Path) -> None:
    shutil.copy(root / "images" / "p000_0.png", root / "images" / "stray.png")


def sixteen_bit(root: Path) -> None:
    image = np.asarray(Image.open(root / "images" / "p000_0.png")).astype(np.uint16) * 250
    Image.fromarray(image).save(root / "images" / "p000_0.png")


def jpeg_image(root: Path) -> None:
    copy_as("images/p000_0.png", "p000_0.jpg")(root)
    (root / "images" / "p000_0.png").unlink()


def label_spellings(root: Path) -> None:
    table = read_csv(root)
    table["label"] = table["label"].map({"benign": "0", "malignant": "MALIGNANT"})
    write_csv(root, table)


CSV = "clinical.csv"
# (mutation, code, severity, file, row, column)
FAULTS = [
    pytest.param(unlink(""), "site-missing", "error", None, None, None, id="site-missing"),
    pytest.param(unlink(CSV), "clinical-missing", "error", CSV, None, None, id="clinical-missing"),
    pytest.param(extra_field, "csv-unreadable", "error", CSV, 2 * N_PATIENTS + 2, None, id="csv-extra-field"),
    pytest.param(lambda r: (r / CSV).write_bytes(b""), "csv-unreadable", "error", CSV, None, None, id="csv-empty"),
    pytest.param(header_only, "no-rows", "error", CSV, None, None, id="no-rows"),
    pytest.param(drop_column("label"), "missing-column", "error", CSV, 1, "label", id="missing-label-column"),
    pytest.param(drop_column("age"), "missing-parameter-column", "error", CSV, 1, "age", id="missing-param-column"),
    pytest.param(drop_column("birads"), "missing-parameter-column", "error", CSV, 1, "birads", id="missing-birads"),
    pytest.param(add_column, "unused-column", "warning", CSV, 1, "notes", id="unused-column"),
    pytest.param(duplicate_first_row, "duplicate-image-id", "error", CSV, 2 * N_PATIENTS + 2, "image_id", id="dup-id"),
    pytest.param(empty_image_id, "empty-image-id", "error", CSV, 2, "image_id", id="empty-image-id"),
    pytest.param(set_cell(2, "patient_id", " "), "empty-patient-id", "error", CSV, 4, "patient_id", id="empty-patient"),
    pytest.param(set_cell(3, "label", "maybe"), "unknown-label", "error", CSV, 5, "label", id="unknown-label"),
    pytest.param(set_cell(0, "split", "validation"), "unknown-split", "error", CSV, 2, "split", id="unknown-split"),
    pytest.param(set_cell(0, "split", ""), "missing-split", "error", CSV, 2, "split", id="empty-split"),
    pytest.param(set_cell(1, "age", "old"), "invalid-value", "error", CSV, 3, "age", id="age-not-a-number"),
    pytest.param(set_cell(1, "age", "150"), "out-of-range", "error", CSV, 3, "age", id="age-out-of-range"),
    pytest.param(set_cell(1, "size_mm", "-2"), "out-of-range", "error", CSV, 3, "size_mm", id="size-out-of-range"),
    pytest.param(set_cell(1, "age", "NaN"), "missing-value", "error", CSV, 3, "age", id="age-nan"),
    pytest.param(set_cell(1, "age", ""), "missing-value", "error", CSV, 3, "age", id="age-empty"),
    pytest.param(set_cell(2, "palpable", "maybe"), "invalid-value", "error", CSV, 4, "palpable", id="binary-bad"),
    pytest.param(set_cell(2, "side", "middle"), "invalid-value", "error", CSV, 4, "side", id="category-bad"),
    pytest.param(set_cell(2, "birads", "5"), "invalid-value", "error", CSV, 4, "birads", id="birads-not-model-input"),
    pytest.param(set_cell(1, "label", "malignant"), "patient-label-conflict", "error", CSV, 2, "label", id="two-labels"),
    pytest.param(set_cell(1, "split", "test"), "patient-split-leak", "error", CSV, 2, "split", id="both-splits"),
    pytest.param(unlink("images"), "images-folder-missing", "error", "images/", None, None, id="no-images-folder"),
    pytest.param(unlink("images/p000_1.png"), "image-missing", "error", "images/p000_1.*", 3, "image_id",
                 id="image-missing"),
    pytest.param(copy_as("images/p000_0.png", "p000_0.bmp"), "image-ambiguous", "error", "images/p000_0.png", 2,
                 "image_id", id="two-images"),
    pytest.param(garbage("images/p001_0.png"), "image-unreadable", "error", "images/p001_0.png", 4, "image_id",
                 id="corrupt-image"),
    pytest.param(unlink("masks/p000_1.png"), "mask-missing", "error", "masks/p000_1.*", 3, "image_id",
                 id="mask-missing"),
    pytest.param(copy_as("masks/p000_0.png", "p000_0.tif"), "mask-ambiguous", "error", "masks/p000_0.png", 2,
                 "image_id", id="two-masks"),
    pytest.param(garbage("masks/p001_0.png"), "mask-unreadable", "error", "masks/p001_0.png", 4, "image_id",
                 id="corrupt-mask"),
    pytest.param(write_mask(np.zeros_like), "mask-empty", "error", "masks/p000_0.png", 2, "image_id", id="mask-empty"),
    pytest.param(write_mask(bigger), "mask-size-mismatch", "error", "masks/p000_0.png", 2, "image_id",
                 id="mask-size"),
    pytest.param(write_mask(three_levels), "mask-not-binary", "error", "masks/p000_0.png", 2, "image_id",
                 id="mask-not-binary"),
    pytest.param(write_mask(gradient_mask, "p000_0.jpg"), "mask-not-binary", "warning", "masks/p000_0.jpg", 2,
                 "image_id", id="jpeg-mask-not-binary"),
    pytest.param(orphan, "orphan-file", "warning", "images/stray.png", None, None, id="orphan-image"),
]


def test_valid_site_is_ok(site: Path, tiny_schema: Schema) -> None:
    report = validate_site(site, tiny_schema)
    assert report.ok and report.problems == []
    assert (report.n_rows, report.n_patients) == (2 * N_PATIENTS, N_PATIENTS)
    assert "site OK" in report.format_text()


@pytest.mark.parametrize(("mutate", "code", "severity", "file", "row", "column"), FAULTS)
def test_each_fault_is_found_and_located(
    site: Path, tiny_schema: Schema, mutate: Callable[[Path], None], code: str, severity: str,
    file: str | None, row: int | None, column: str | None,
) -> None:
    mutate(site)
    report = validate_site(site, tiny_schema)
    assert [p.code for p in report.problems] == [code], report.format_text()
    problem = report.problems[0]
    assert (problem.severity, problem.file, problem.row, problem.column) == (severity, file, row, column)
    assert problem.message and problem.fix
    assert report.ok == (severity == "warning")
    line = report.format_text().splitlines()[0]
    for part in (file, row and f"line {row}", column):
        if part:
            assert str(part) in line


@pytest.mark.parametrize("mutate", [
    pytest.param(sixteen_bit, id="16-bit-image"),
    pytest.param(jpeg_image, id="jpeg-image"),
    pytest.param(label_spellings, id="labels-0-and-MALIGNANT"),
    pytest.param(set_cell(0, "size_mm", ""), id="impute-policy-empty"),
    pytest.param(set_cell(0, "palpable", "yes"), id="binary-yes"),
    pytest.param(drop_column("split"), id="no-split-column"),
])
def test_allowed_variants_stay_valid(site: Path, tiny_schema: Schema, mutate: Callable[[Path], None]) -> None:
    mutate(site)
    report = validate_site(site, tiny_schema)
    assert report.ok and report.problems == [], report.format_text()


def test_several_faults_are_all_reported(site: Path, tiny_schema: Schema) -> None:
    set_cell(0, "age", "150")(site)
    set_cell(4, "label", "maybe")(site)
    garbage("images/p003_0.png")(site)
    write_mask(bigger)(site)
    add_column(site)
    report = validate_site(site, tiny_schema)
    found = {(p.code, p.row) for p in report.problems}
    assert found == {("out-of-range", 2), ("unknown-label", 6), ("image-unreadable", 8), ("mask-size-mismatch", 2),
                     ("unused-column", 1)}
    assert (len(report.errors), len(report.warnings)) == (4, 1)
    assert report.summary() == f"4 errors, 1 warning in {2 * N_PATIENTS} rows"
    assert "NOT valid" in report.format_text()


def test_report_counts_and_dict() -> None:
    report = ValidationReport("s", [Problem("a", "error", "m", "f"), Problem("b", "warning", "m", "f", "x.csv", 3, "c")],
                              n_rows=1)
    assert report.summary() == "1 error, 1 warning in 1 row" and not report.ok
    data = json.loads(json.dumps(report.to_dict()))
    assert [p["code"] for p in data["problems"]] == ["a", "b"] and data["problems"][1]["row"] == 3


def test_cli_json_and_exit_codes(site: Path, tiny_schema_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(site), "--schema", str(tiny_schema_path)]) == 0
    assert "site OK" in capsys.readouterr().out
    set_cell(3, "label", "maybe")(site)
    assert main(["validate", str(site), "--schema", str(tiny_schema_path), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["n_rows"] == 2 * N_PATIENTS
    assert [(p["code"], p["row"], p["column"]) for p in data["problems"]] == [("unknown-label", 5, "label")]
    assert main(["validate", str(site), "--schema", str(site / "missing.yaml")]) == 2


def folder_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
            digest.update(str(path.stat().st_mtime_ns).encode())
    return digest.hexdigest()


def test_validation_does_not_modify_the_site(site: Path, tiny_schema: Schema) -> None:
    garbage("images/p002_0.png")(site)
    set_cell(0, "age", "")(site)
    before = folder_hash(site)
    assert not validate_site(site, tiny_schema).ok
    assert folder_hash(site) == before
