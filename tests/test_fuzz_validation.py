"""Property-based fuzzing: broken site folders get a located report, never a traceback; nothing writes outside its output.

``validate_site`` (what ``cldlr validate`` calls) is fed generated ``clinical.csv`` files — random bytes,
other encodings, missing/duplicate/junk columns, wrong types, huge numbers, quotes and line breaks,
unsafe ids — and random image bytes. Every problem must name its file, and its row and column when it
is about a row. ``predict --site`` and ``reader-study packet`` run on sites with generated ids and
must leave every file outside their output folder as it was.
"""

from __future__ import annotations

import csv
import io
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_SCHEMA, lesion_image, write_schema
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cldlr.cli import main
from cldlr.common.data.schema import load_schema
from cldlr.common.data.validation import ValidationReport, validate_site

FUZZ = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])
COLUMNS = ["image_id", "patient_id", "label", "split", *(p["name"] for p in TINY_SCHEMA["parameters"])]
HOSTILE_IDS = ["../../../../elsewhere/victim", "../x", "/etc/passwd", "/tmp/x", "a/b", "x*", "x?", "[x]", ".x", "-x",
               "=HYPERLINK(\"x\",\"click\")", "a b", "é", "x" * 200, "..", ".", "~", "$HOME", "a\\b", "C:x"]
#: Codes of the problems that are about one row of clinical.csv (they need its line and column).
ROW_CODES = {"empty-image-id", "unsafe-id", "duplicate-image-id", "empty-patient-id", "unknown-label", "missing-split",
             "unknown-split", "invalid-value", "out-of-range", "missing-value", "image-missing", "image-ambiguous",
             "image-unreadable", "mask-missing", "mask-ambiguous", "mask-unreadable", "mask-empty",
             "mask-size-mismatch", "mask-not-binary"}


def _cell() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(["", "benign", "malignant", "0", "1", "train", "test", "left", "4a", "nan", "inf", "-inf",
                         "1e309", "9" * 400, "-0", "0x10", "1,5", " 54 ", '"', '""', "'", "\n", "\r\n", ",", "\x00",
                         "\ufeff", "NULL", "yes", "None", "p000_0", "P000"]),
        st.sampled_from(HOSTILE_IDS),
        st.text(max_size=12),
        st.integers(min_value=-10**30, max_value=10**30).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
    )


def _csv(header: list[str], rows: list[list[str]], quoting: int) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, quoting=quoting, escapechar="\\")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


@st.composite
def clinical_bytes(draw: st.DrawFn) -> bytes:
    """A clinical.csv as a hospital export could break it."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=300))
    header = draw(st.lists(st.one_of(st.sampled_from(COLUMNS), st.text(max_size=6)), max_size=12))
    if draw(st.booleans()):
        header = COLUMNS + header[:2]  # mostly well-formed: the row checks get exercised
    rows = draw(st.lists(st.lists(_cell(), min_size=0, max_size=len(header) + 2), max_size=6))
    quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONE]))
    try:
        text = _csv(header, rows, quoting)
    except csv.Error:  # QUOTE_NONE cannot write a record of one empty field
        text = _csv(header, rows, csv.QUOTE_MINIMAL)
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16", "cp1252"]))
    return text.encode(encoding, errors="replace")


def _check_report(report: ValidationReport) -> None:
    """Every problem is located and formats as one line; the text report is one line per problem plus a summary."""
    for problem in report.problems:
        assert problem.file, problem
        if problem.code in ROW_CODES:
            assert problem.row is not None and problem.row >= 2 and problem.column, problem
        assert "\n" not in problem.format() and "\r" not in problem.format(), problem
    assert len(report.format_text().splitlines()) == len(report.problems) + 1
    assert report.ok == (not report.errors)


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def schema_path(fuzz_root: Path) -> Path:
    return write_schema(fuzz_root / "schema.yaml")


def _fresh_site(root: Path) -> Path:
    site = Path(tempfile.mkdtemp(dir=root)) / "site"
    for folder in ("images", "masks"):
        (site / folder).mkdir(parents=True)
    image, mask = lesion_image(np.random.default_rng(0), 32, False)
    Image.fromarray(image).save(site / "images" / "p000_0.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(site / "masks" / "p000_0.png")
    return site


@FUZZ
@given(data=clinical_bytes())
def test_validate_never_raises_on_a_broken_clinical_csv(fuzz_root, schema_path, data):
    site = _fresh_site(fuzz_root)
    (site / "clinical.csv").write_bytes(data)
    report = validate_site(site, load_schema(schema_path))
    _check_report(report)
    shutil.rmtree(site.parent)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@FUZZ
@given(image=st.binary(max_size=400), mask=st.binary(max_size=400),
       prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"II*\x00", b"BM", b"\xff\xd8\xff"]),
       ext=st.sampled_from([".png", ".tif", ".bmp", ".jpg", ".dcm", ".nii", ".nrrd"]))
def test_validate_never_raises_on_random_image_bytes(fuzz_root, schema_path, image, mask, prefix, ext):
    site = _fresh_site(fuzz_root)
    (site / "images" / "p000_0.png").unlink()
    (site / "images" / f"p000_0{ext if ext not in ('.nii', '.nrrd') else '.png'}").write_bytes(prefix + image)
    (site / "masks" / "p000_0.png").unlink()
    (site / "masks" / f"p000_0{ext}").write_bytes(prefix + mask)
    (site / "clinical.csv").write_text("image_id,patient_id,label,age,size_mm,palpable,side,birads\n"
                                       "p000_0,P000,benign,50,10,0,left,4a\n")
    report = validate_site(site, load_schema(schema_path))
    _check_report(report)
    assert not report.ok and all(p.file.startswith(("images/p000_0.", "masks/p000_0.")) for p in report.errors)
    shutil.rmtree(site.parent)


def test_the_cli_prints_one_line_per_problem_for_a_crafted_site(fuzz_root, schema_path, capsys):
    site = _fresh_site(fuzz_root)
    rows = [["../../../../elsewhere/victim", "P1", "benign", "50", "", "", "", "4a"],
            ["/etc/passwd", "P2", "malignant", "50", "", "", "", "4a"],
            ["x*", "=HYPERLINK(\"x\",\"click\")", "benign", "1e309", "", "", "", "4a"],
            ["p000_0", "P3", "maybe", "50", "", "", "", "4z"]]
    (site / "clinical.csv").write_text(
        "image_id,patient_id,label,age,size_mm,palpable,side,birads\n" + "\n".join(",".join(
            f'"{c.replace(chr(34), chr(34) * 2)}"' for c in r) for r in rows) + "\n")
    assert main(["validate", str(site), "--schema", str(schema_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 8 and lines[-1].startswith(f"site {site} is NOT valid: 7 errors")
    assert [line.split(": ", 1)[0] for line in lines[:-1]] == [
        "ERROR   clinical.csv, line 2, column 'image_id'", "ERROR   clinical.csv, line 3, column 'image_id'",
        "ERROR   clinical.csv, line 4, column 'image_id'", "ERROR   clinical.csv, line 4, column 'patient_id'",
        "ERROR   clinical.csv, line 4, column 'age'", "ERROR   clinical.csv, line 5, column 'label'",
        "ERROR   clinical.csv, line 5, column 'birads'"]


# --- commands write nothing outside their output folder ---------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bundle(fuzz_root: Path) -> tuple[Path, Path]:
    from test_bundle import export_tiny, make_tiny_study

    study = make_tiny_study(fuzz_root / "study", n_patients=8)
    return study.site.root, export_tiny(study, fuzz_root / "study" / "bundle")


def _snapshot(root: Path, skip: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_relative_to(skip)}


def _crafted_site(source: Path, root: Path, ids: list[str]) -> Path:
    """A copy of ``source`` two levels down whose first rows take ``ids``, with their files wherever the ids point."""
    site = root / "a" / "b" / "site"
    shutil.copytree(source, site)
    lines = (site / "clinical.csv").read_text().splitlines()
    for k, new in enumerate(ids):
        old = lines[k + 1].split(",", 1)[0]
        for folder in ("images", "masks"):
            target = (site / folder / f"{new}.png").resolve()
            if target.is_relative_to(root.resolve()) and "\x00" not in new:
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(site / folder / f"{old}.png", target)
                except OSError:  # not a usable file name here: the row simply has no file
                    pass
        quoted = '"' + new.replace('"', '""') + '"'
        lines[k + 1] = quoted + "," + lines[k + 1].split(",", 1)[1]
    (site / "clinical.csv").write_text("\n".join(lines) + "\n")
    return site


IDS = st.lists(st.one_of(st.sampled_from(HOSTILE_IDS[:12]),
                         st.text(alphabet="./\\*?[]_-aZ09=", min_size=1, max_size=16)), min_size=1, max_size=3,
               unique=True)


@settings(max_examples=8, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                HealthCheck.too_slow])
@given(ids=IDS, command=st.sampled_from(["predict", "packet"]))
def test_predict_and_packet_write_nothing_outside_their_output(tiny_bundle, fuzz_root, ids, command):
    from test_bundle import model_args

    source, bundle = tiny_bundle
    root = Path(tempfile.mkdtemp(dir=fuzz_root))
    site = _crafted_site(source, root, ids)
    out = root / "a" / "b" / "out"
    before = _snapshot(root, out)
    if command == "predict":
        code = main(["predict", *model_args(bundle), "--site", str(site), "--out", str(out)])
    else:
        code = main(["reader-study", "packet", *model_args(bundle), "--site", str(site), "--out", str(out),
                     "--split", "all"])
    assert _snapshot(root, out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == (["out", "site"] if code == 0 else ["site"])
    if code == 0 and command == "predict":
        overlays = sorted(p.relative_to(out).as_posix() for p in (out / "overlays").rglob("*"))
        assert all(p.count("/") == 1 for p in overlays)  # one file per case, straight in overlays/
    shutil.rmtree(root)
