"""Image hardening: non-finite pixels, one file under two ids, a duplicated header, header dimensions capped before decoding."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from conftest import write_site
from PIL import Image

from cldlr.cli import main
from cldlr.common.config import DataConfig, load_config
from cldlr.common.data.imaging import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageTooLargeError,
    NonFiniteImageError,
    check_header,
    header_size,
    read_image,
    read_mask,
)
from cldlr.common.data.roi import build_site_cache
from cldlr.common.data.schema import Schema
from cldlr.common.data.validation import Problem, ValidationReport, validate_site
from cldlr.common.errors import ConfigError, ContractError

CSV = "clinical.csv"


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return write_site(tmp_path / "site", n_patients=4, images_per_patient=2, size=32, with_split=True)


def _problems(report: ValidationReport, code: str) -> list[Problem]:
    return [p for p in report.problems if p.code == code]


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR claims ``width`` x ``height`` px, followed by a few bytes of pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


def _nrrd_header_only(path: Path, width: int, height: int) -> Path:
    """A detached NRRD header claiming ``width`` x ``height`` px over a 4-byte data file."""
    path.with_suffix(".raw").write_bytes(b"\0" * 4)
    path.write_text(f"NRRD0004\ntype: unsigned char\ndimension: 2\nsizes: {width} {height}\nencoding: raw\n"
                    f"data file: {path.with_suffix('.raw').name}\n\n")
    return path


def _add_row(root: Path, image_id: str, patient_id: str, split: str = "test", like: int = 0) -> int:
    """Append a copy of row ``like`` under new ids; returns its CSV line."""
    table = pd.read_csv(root / CSV, dtype=str, keep_default_na=False)
    row = table.iloc[[like]].copy()
    row["image_id"], row["patient_id"], row["split"] = image_id, patient_id, split
    pd.concat([table, row], ignore_index=True).to_csv(root / CSV, index=False)
    return len(table) + 2


# --- non-finite pixels -------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_float_tiff_with_one_non_finite_pixel_is_an_error_naming_the_file(site: Path, tiny_schema: Schema,
                                                                          bad: float) -> None:
    image = np.asarray(Image.open(site / "images" / "p000_0.png"), dtype=np.float32)
    image[3, 4] = bad
    (site / "images" / "p000_0.png").unlink()
    Image.fromarray(image).save(site / "images" / "p000_0.tif")  # mode F: a 32-bit float TIFF

    with pytest.raises(NonFiniteImageError, match=r"p000_0\.tif: 1 of 1,024 pixels are NaN or infinite"):
        read_image(site / "images" / "p000_0.tif")
    report = validate_site(site, tiny_schema)
    assert not report.ok
    [problem] = _problems(report, "image-not-finite")
    assert (problem.file, problem.row, problem.column) == ("images/p000_0.tif", 2, "image_id")


@pytest.mark.parametrize("ext", [".nrrd", ".tif"])  # (ITK's NIfTI reader already turns NaN into 0)
def test_a_float_mask_with_nan_is_an_error(site: Path, tiny_schema: Schema, ext: str) -> None:
    mask = (np.asarray(Image.open(site / "masks" / "p001_1.png")) > 0).astype(np.float32)
    mask[0, 0] = np.nan
    (site / "masks" / "p001_1.png").unlink()
    sitk.WriteImage(sitk.GetImageFromArray(mask), str(site / "masks" / f"p001_1{ext}"))
    with pytest.raises(NonFiniteImageError):
        read_mask(site / "masks" / f"p001_1{ext}")
    [problem] = _problems(validate_site(site, tiny_schema), "mask-not-finite")
    assert (problem.file, problem.row) == (f"masks/p001_1{ext}", 5)


def test_finite_float_images_still_validate(site: Path, tiny_schema: Schema) -> None:
    image = np.asarray(Image.open(site / "images" / "p000_0.png"), dtype=np.float32) / 7.0
    (site / "images" / "p000_0.png").unlink()
    Image.fromarray(image).save(site / "images" / "p000_0.tif")
    assert validate_site(site, tiny_schema).problems == []


# --- one image file under two ids ---------------------------------------------------------------


def test_the_same_file_under_a_dotted_id_is_an_error_naming_both_rows(site: Path, tiny_schema: Schema) -> None:
    line = _add_row(site, "./p000_0", "P900")  # would resolve to images/p000_0.png: train and test at once
    report = validate_site(site, tiny_schema)
    assert not report.ok  # the id rule refuses it before any file is looked up (a symlink is caught below)
    [problem] = _problems(report, "unsafe-id")
    assert problem.row == line and problem.severity == "error" and problem.column == "image_id"


def test_a_symlinked_image_under_another_id_is_an_error(site: Path, tiny_schema: Schema) -> None:
    line = _add_row(site, "p900_0", "P900")
    os.symlink("p000_0.png", site / "images" / "p900_0.png")
    shutil.copy(site / "masks" / "p000_0.png", site / "masks" / "p900_0.png")
    [problem] = _problems(validate_site(site, tiny_schema), "image-same-file")
    assert (problem.file, problem.row, problem.column) == ("images/p900_0.png", line, "image_id")
    assert str((site / "images" / "p000_0.png").resolve()) in problem.message


def test_the_same_content_under_two_ids_is_a_warning(site: Path, tiny_schema: Schema) -> None:
    line = _add_row(site, "p900_0", "P900")
    for folder in ("images", "masks"):
        shutil.copy(site / folder / "p000_0.png", site / folder / "p900_0.png")
    report = validate_site(site, tiny_schema)
    assert [p.code for p in report.problems] == ["image-same-content"]
    problem = report.problems[0]
    assert (problem.severity, problem.row) == ("warning", line)
    assert "'p000_0' (line 2)" in problem.message


# --- a duplicated header -----------------------------------------------------------------------


def test_a_duplicated_header_is_an_error_naming_the_column(site: Path, tiny_schema: Schema) -> None:
    lines = (site / CSV).read_text().splitlines()
    (site / CSV).write_text("\n".join([lines[0] + ",age"] + [row + ",61" for row in lines[1:]]) + "\n")
    report = validate_site(site, tiny_schema)
    assert not report.ok
    assert [(p.code, p.severity, p.file, p.row, p.column) for p in report.problems] == [
        ("duplicate-column", "error", CSV, 1, "age")]  # and no 'unused column age.1' warning
    assert "appears 2 times" in report.problems[0].message


# --- dimensions from the header, before decoding ----------------------------------------------------


def _write_each_format(folder: Path, size: int = 32) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    array = np.zeros((size, size), np.uint8)
    paths = []
    for name in ("x.png", "x.tif", "x.bmp", "x.jpg"):
        Image.fromarray(array).save(folder / name)
        paths.append(folder / name)
    for name in ("x.dcm", "x.nii.gz", "x.nrrd"):
        sitk.WriteImage(sitk.GetImageFromArray(array), str(folder / name))
        paths.append(folder / name)
    return paths


def test_every_format_is_sized_from_its_header_and_capped(tmp_path: Path) -> None:
    for path in _write_each_format(tmp_path / "formats"):
        assert header_size(path)[:2] == (32, 32), path
        assert check_header(path, 32 * 32)[:2] == (32, 32)
        with pytest.raises(ImageTooLargeError, match=rf"{path.name}: header declares 32 x 32.*more than the cap of 1,000"):
            check_header(path, 1000)
        with pytest.raises(ImageTooLargeError):
            read_image(path, max_pixels=1000)


def test_a_nrrd_header_claiming_100000_squared_is_refused_before_allocating(tmp_path: Path) -> None:
    """In a child process limited to 1 GiB of address space: the 10 GB buffer is never asked for."""
    path = _nrrd_header_only(tmp_path / "huge.nrrd", 100_000, 100_000)
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        from cldlr.common.data.imaging import ImageTooLargeError, read_raw
        try:
            read_raw({str(path)!r})
        except ImageTooLargeError as exc:
            print("refused:", exc)
            sys.exit(0)
        except Exception as exc:
            print("other:", type(exc).__name__, exc)
        sys.exit(1)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "header declares 100000 x 100000 px (10,000,000,000 pixels)" in done.stdout


@pytest.mark.parametrize(("kind", "width"), [("png", 9000), ("png", 100_000), ("nrrd", 9000)])
def test_a_site_with_a_huge_header_is_refused_by_the_dimension_check(site: Path, tiny_schema: Schema, kind: str,
                                                                     width: int) -> None:
    if kind == "png":
        _png_header_only(site / "images" / "p001_0.png", width, width)
        folder, code, file = "images", "image-too-large", "images/p001_0.png"
    else:
        (site / "masks" / "p001_0.png").unlink()
        _nrrd_header_only(site / "masks" / "p001_0.nrrd", width, width)
        folder, code, file = "masks", "mask-too-large", "masks/p001_0.nrrd"
    report = validate_site(site, tiny_schema)
    assert [p.code for p in report.problems if p.severity == "error"] == [code], report.format_text()
    problem = _problems(report, code)[0]
    assert (problem.file, problem.row, problem.column) == (file, 4, "image_id")
    assert folder and "max_image_pixels" in problem.fix


def test_the_cap_is_configurable_in_config_policy_and_cli(site: Path, tiny_schema: Schema, tiny_schema_path: Path,
                                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert DataConfig().max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS == 8192 * 8192
    assert load_config(None, ["data.max_image_pixels=1000"]).data.max_image_pixels == 1000
    with pytest.raises(ConfigError, match="data.max_image_pixels"):
        load_config(None, ["data.max_image_pixels=0"])
    report = validate_site(site, tiny_schema, max_image_pixels=31 * 31)  # every 32 x 32 file is too large
    assert {p.code for p in report.problems} == {"image-too-large", "mask-too-large"}
    with pytest.raises(ContractError) as raised:
        build_site_cache(site, tiny_schema, DataConfig(max_image_pixels=31 * 31, cache_dir=str(tmp_path / "c")))
    assert "image-too-large" in raised.value.report.format_text()  # type: ignore[union-attr]
    assert main(["validate", str(site), "--schema", str(tiny_schema_path), "--max-image-pixels", "1000"]) == 1
    assert "image-too-large" in capsys.readouterr().out
    assert main(["validate", str(site), "--schema", str(tiny_schema_path)]) == 0


def test_a_site_policy_sets_its_own_cap(tmp_path: Path) -> None:
    from cldlr.client.policy import policy_from_dict

    base = {"schema": "s.yaml", "folders": {"state": str(tmp_path)}}
    assert policy_from_dict(base).max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS
    assert policy_from_dict({**base, "max_image_pixels": 4096 * 4096}).max_image_pixels == 4096 * 4096
    with pytest.raises(ConfigError, match="max_image_pixels must be >= 1"):
        policy_from_dict({**base, "max_image_pixels": 0})
