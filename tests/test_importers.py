"""The BUS-BRA and class-folder importers: synthetic layouts always, the real BUS-BRA when present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cldlr.cli import main
from cldlr.client.importers.bus_bra import device_slug, import_bus_bra
from cldlr.client.importers.class_folders import class_folders_schema_yaml, import_class_folders
from cldlr.common.data.contract import read_clinical_csv
from cldlr.common.data.imaging import read_mask
from cldlr.common.data.lesion import DESCRIPTOR_NAMES, lesion_descriptors
from cldlr.common.data.schema import load_schema
from cldlr.common.data.site import read_site
from cldlr.common.data.validation import validate_site
from cldlr.common.errors import CldlrError

REPO = Path(__file__).resolve().parents[1]
DEVICES = {"ge": "GE Logiq 7 @10-14MHz", "tosh": "Toshiba Aplio 300 @12-14 MHz", "us": "U-Systems @10-14MHz"}


def png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def blob(shape: tuple[int, int], top: int, left: int, h: int, w: int) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[top : top + h, left : left + w] = 255
    return mask


def fake_bus_bra(root: Path, patients: dict[str, int]) -> Path:
    """A BUS-BRA-shaped folder: ``patients`` per device key, two views each, alternating labels."""
    rng = np.random.default_rng(0)
    rows, case = [], 0
    for key, count in patients.items():
        for _ in range(count):
            case += 1
            for view, side in (("l", "left"), ("r", "right")):
                image_id = f"bus_{case:04d}-{view}"
                png(root / "Images" / f"{image_id}.png", rng.integers(0, 255, (40, 30), dtype=np.uint8))
                png(root / "Masks" / f"mask_{case:04d}-{view}.png", blob((40, 30), 5 + case % 7, 4, 10 + case % 5, 12))
                rows.append({"ID": image_id, "Case": case, "Histology": "x",
                             "Pathology": "malignant" if case % 2 else "benign", "BIRADS": 4 if case % 3 else 3,
                             "Device": DEVICES[key], "Width": 30, "Height": 40, "Side": side, "BBOX": "[0,0,1,1]"})
    pd.DataFrame(rows).to_csv(root / "bus_data.csv", index=False)
    return root


def assert_valid(out: Path) -> dict[str, pd.DataFrame]:
    schema = load_schema(out / "schema.yaml")
    frames = {}
    for site in sorted(p for p in out.iterdir() if p.is_dir()):
        report = validate_site(site, schema)
        assert report.ok, report.format_text()
        frames[site.name] = read_site(site, schema).frame
    return frames


# --- BUS-BRA, synthetic layout ---------------------------------------------------------------
def test_device_slug() -> None:
    assert device_slug("GE Logiq 7 @10-14MHz") == "ge-logiq-7"
    assert device_slug("Toshiba Aplio 300 @12-14 MHz") == "toshiba-aplio-300"
    assert device_slug("U-Systems @10-14MHz") == "u-systems"


def test_bus_bra_sites_by_device_with_small_site_merged(tmp_path: Path) -> None:
    src = fake_bus_bra(tmp_path / "src", {"ge": 6, "tosh": 4, "us": 2})
    summary = import_bus_bra(src, tmp_path / "out", min_site_patients=3)
    assert (tmp_path / "out" / "schema.yaml").read_text() == (REPO / "configs/schema/bus-bra.yaml").read_text()
    frames = assert_valid(tmp_path / "out")
    assert sorted(frames) == ["ge-logiq-7", "toshiba-aplio-300"]
    ge = frames["ge-logiq-7"]
    assert sorted(ge["device"].unique()) == ["ge-logiq-7", "u-systems"]  # merged rows keep their scanner
    assert len(ge) == 2 * 8 and len(frames["toshiba-aplio-300"]) == 2 * 4
    assert set(ge["patient_id"]).isdisjoint(frames["toshiba-aplio-300"]["patient_id"])
    assert "u-systems" in summary and "merged" in summary
    row = ge.iloc[0]
    expected = lesion_descriptors(read_mask(src / "Masks" / f"{row['image_id'].replace('bus_', 'mask_')}.png"))
    for name in DESCRIPTOR_NAMES:
        assert row[name] == pytest.approx(expected[name], abs=1e-5)
    assert (Path(row["image_path"]).read_bytes()
            == (src / "Images" / f"{row['image_id']}.png").read_bytes())


def test_bus_bra_drop_single_and_birads(tmp_path: Path) -> None:
    src = fake_bus_bra(tmp_path / "src", {"ge": 6, "tosh": 4, "us": 2})
    summary = import_bus_bra(src, tmp_path / "drop", min_site_patients=3, small_sites="drop")
    frames = assert_valid(tmp_path / "drop")
    assert sorted(frames) == ["ge-logiq-7", "toshiba-aplio-300"]
    assert "u-systems" not in set(pd.concat(frames.values())["device"]) and "dropped" in summary
    import_bus_bra(src, tmp_path / "single", sites="single", birads=[4])
    single = assert_valid(tmp_path / "single")["bus-bra"]
    table = pd.read_csv(src / "bus_data.csv")
    assert len(single) == int((table["BIRADS"] == 4).sum())
    assert set(single["birads"]) == {"4"}


@pytest.mark.parametrize("breakage, message", [
    ("no-csv", "bus_data.csv is missing"),
    ("no-column", "Pathology"),
    ("bad-label", "line 2, column Pathology"),
    ("no-image", "bus_0001-l.png is missing"),
    ("empty-mask", "empty"),
])
def test_bus_bra_input_errors_name_file_and_field(tmp_path: Path, breakage: str, message: str) -> None:
    src = fake_bus_bra(tmp_path / "src", {"ge": 3})
    csv = src / "bus_data.csv"
    table = pd.read_csv(csv)
    if breakage == "no-csv":
        csv.unlink()
    elif breakage == "no-column":
        table.drop(columns="Pathology").to_csv(csv, index=False)
    elif breakage == "bad-label":
        table.assign(Pathology=["unsure"] + list(table["Pathology"][1:])).to_csv(csv, index=False)
    elif breakage == "no-image":
        (src / "Images" / "bus_0001-l.png").unlink()
    else:
        png(src / "Masks" / "mask_0002-r.png", np.zeros((40, 30), np.uint8))
    with pytest.raises(CldlrError, match=message) as info:
        import_bus_bra(src, tmp_path / "out")
    assert str(src) in str(info.value)
    assert not (tmp_path / "out").exists()


def test_bus_bra_refuses_existing_output_and_bad_birads(tmp_path: Path) -> None:
    src = fake_bus_bra(tmp_path / "src", {"ge": 3})
    (tmp_path / "out").mkdir()
    with pytest.raises(CldlrError, match="already exists"):
        import_bus_bra(src, tmp_path / "out")
    with pytest.raises(CldlrError, match="BI-RADS"):
        import_bus_bra(src, tmp_path / "out", birads=[6], force=True)
    import_bus_bra(src, tmp_path / "out", force=True)
    assert (tmp_path / "out" / "ge-logiq-7" / "clinical.csv").is_file()


def test_bus_bra_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = fake_bus_bra(tmp_path / "src", {"ge": 3, "tosh": 3})
    out = tmp_path / "out"
    assert main(["import", "bus-bra", str(src), str(out), "--birads", "4", "--birads", "3",
                 "--min-site-patients", "1"]) == 0
    assert "toshiba-aplio-300" in capsys.readouterr().out
    assert main(["import", "bus-bra", str(src), str(out)]) == 2


# --- BUS-BRA, the real release ---------------------------------------------------------------
@pytest.mark.data
def test_real_bus_bra_birads4(bus_bra: Path, tmp_path: Path) -> None:
    """README facts: 693 BI-RADS 4 images of 393 patients (159 benign / 234 malignant patients)."""
    summary = import_bus_bra(bus_bra, tmp_path / "sites", birads=[4])
    schema = load_schema(tmp_path / "sites" / "schema.yaml")
    frames = {p.name: read_site(p, schema, check=False).frame
              for p in sorted((tmp_path / "sites").iterdir()) if p.is_dir()}
    assert sorted(frames) == ["ge-logiq-5", "ge-logiq-7", "toshiba-aplio-300"]  # U-Systems: 3 patients, merged
    frame = pd.concat(frames, names=["site"]).reset_index(level=0)
    assert len(frame) == 693 and frame["patient_id"].nunique() == 393
    patients = frame.groupby("patient_id")["label"].first()
    assert (patients == 0).sum() == 159 and (patients == 1).sum() == 234
    assert frame.groupby("patient_id")["site"].nunique().max() == 1
    assert set(frame["birads"]) == {"4"} and "u-systems" in set(frame["device"])
    assert "393" in summary and "693" in summary
    report = validate_site(tmp_path / "sites" / "toshiba-aplio-300", schema)
    assert report.ok, report.format_text()


# --- class folders ---------------------------------------------------------------------------
def class_tree(root: Path) -> Path:
    shape = (32, 40)
    rng = np.random.default_rng(1)
    gray = lambda: rng.integers(0, 255, shape, dtype=np.uint8)  # noqa: E731
    png(root / "benign" / "benign (1).png", np.stack([gray()] * 3, -1))  # RGB, as in BUSI
    png(root / "benign" / "benign (1)_mask.png", blob(shape, 4, 4, 8, 12))
    png(root / "benign" / "two.png", gray())
    png(root / "benign" / "two_mask.png", blob(shape, 2, 2, 5, 5))
    png(root / "benign" / "two_mask_1.png", blob(shape, 20, 25, 6, 10))
    png(root / "Malignant" / "two.png", gray())  # same name in the other class
    png(root / "Malignant" / "two_mask.png", blob(shape, 10, 10, 14, 8))
    png(root / "normal" / "normal (1).png", gray())
    png(root / "normal" / "normal (1)_mask.png", np.zeros(shape, np.uint8))
    return root


def test_class_folders(tmp_path: Path) -> None:
    src = class_tree(tmp_path / "busi")
    summary = import_class_folders(src, tmp_path / "out")
    assert (tmp_path / "out" / "schema.yaml").read_text() == (REPO / "configs/schema/class-folders.yaml").read_text()
    assert (tmp_path / "out" / "schema.yaml").read_text() == class_folders_schema_yaml()
    frame = assert_valid(tmp_path / "out")["busi"]
    assert sorted(frame["image_id"]) == ["benign_1", "benign_two", "malignant_two"]
    assert (frame["patient_id"] == frame["image_id"]).all()
    assert dict(zip(frame["image_id"], frame["label"])) == {"benign_1": 0, "benign_two": 0, "malignant_two": 1}
    double = frame.set_index("image_id").loc["benign_two"]
    union = (read_mask(src / "benign" / "two_mask.png") | read_mask(src / "benign" / "two_mask_1.png"))
    assert np.array_equal(read_mask(double["mask_path"]), union)
    assert double["area_px"] == union.sum() == 25 + 60
    assert double["height_px"] == 24 and double["depth_px"] == 2
    assert "normal" in summary and "image-level" in summary and "merged" in summary
    raw = read_clinical_csv(tmp_path / "out" / "busi")
    assert list(raw.columns) == ["image_id", "patient_id", "label", *DESCRIPTOR_NAMES]


def test_class_folders_missing_mask_is_a_clear_error(tmp_path: Path) -> None:
    src = class_tree(tmp_path / "busi")
    (src / "Malignant" / "two_mask.png").unlink()
    with pytest.raises(CldlrError, match=r"two\.png: no mask found; expected .*two_mask\.png"):
        import_class_folders(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_class_folders_other_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CldlrError, match="neither a benign"):
        import_class_folders(tmp_path / "empty", tmp_path / "out")
    src = class_tree(tmp_path / "busi")
    png(src / "benign" / "two_mask_1.png", blob((10, 10), 0, 0, 3, 3))
    with pytest.raises(CldlrError, match="two_mask_1.png: mask is 10x10 px"):
        import_class_folders(src, tmp_path / "out")
    import_class_folders(class_tree(tmp_path / "ok"), tmp_path / "out2")
    with pytest.raises(CldlrError, match="already exists"):
        import_class_folders(class_tree(tmp_path / "ok"), tmp_path / "out2")
    assert main(["import", "class-folders", str(tmp_path / "ok"), str(tmp_path / "out2"), "--force"]) == 0
