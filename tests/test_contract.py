"""Data contract: every allowed image/mask format reads back as expected; read_site parses a mixed site."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from conftest import write_site
from PIL import Image

from cldlr.common.data.imaging import read_image, read_mask
from cldlr.common.data.schema import Schema
from cldlr.common.data.site import read_site
from cldlr.common.errors import ContractError, ImageReadError

H, W = 20, 30  # not square, so a swapped (x, y) axis order shows


@pytest.fixture
def gray8() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (H, W), dtype=np.uint8)


@pytest.fixture
def gray16() -> np.ndarray:
    return np.random.default_rng(2).integers(0, 65536, (H, W), dtype=np.uint16)


@pytest.fixture
def lesion() -> np.ndarray:
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[3:9, 12:27] = 1  # off-centre rectangle, wider than tall
    return mask


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tif", ".tiff"])
def test_lossless_8bit_raster(tmp_path: Path, gray8: np.ndarray, ext: str) -> None:
    path = tmp_path / f"img{ext}"
    Image.fromarray(gray8).save(path)
    image = read_image(path)
    assert image.dtype == np.uint8 and image.shape == (H, W)
    np.testing.assert_array_equal(image, gray8)


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_16bit_raster_keeps_depth(tmp_path: Path, gray16: np.ndarray, ext: str) -> None:
    path = tmp_path / f"img{ext}"
    Image.fromarray(gray16).save(path)
    image = read_image(path)
    assert image.dtype == np.uint16 and image.shape == (H, W)
    np.testing.assert_array_equal(image, gray16)


def test_jpeg_is_close(tmp_path: Path) -> None:
    smooth = np.tile(np.linspace(20, 230, W), (H, 1)).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "img.jpg", quality=95)
    image = read_image(tmp_path / "img.jpg")
    assert image.dtype == np.uint8 and image.shape == (H, W)
    assert np.abs(image.astype(int) - smooth).mean() < 3


def test_rgb_becomes_luminance(tmp_path: Path, gray8: np.ndarray) -> None:
    rgb = np.random.default_rng(3).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.stack([gray8] * 3, axis=-1)).save(tmp_path / "gray_as_rgb.png")
    image = read_image(tmp_path / "rgb.png")
    assert image.shape == (H, W) and image.dtype == np.uint8
    luma = rgb.astype(float) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(image - luma).max() <= 1.0
    np.testing.assert_array_equal(read_image(tmp_path / "gray_as_rgb.png"), gray8)


@pytest.mark.parametrize("bits", [8, 16])
def test_dicom(tmp_path: Path, gray8: np.ndarray, gray16: np.ndarray, bits: int) -> None:
    pixels = gray8 if bits == 8 else gray16
    path = tmp_path / "img.dcm"
    sitk.WriteImage(sitk.GetImageFromArray(pixels), str(path))
    image = read_image(path)
    assert image.dtype == pixels.dtype and image.shape == (H, W)
    np.testing.assert_array_equal(image, pixels)


@pytest.mark.parametrize("ext", [".nii", ".nii.gz", ".nrrd"])
def test_itk_masks(tmp_path: Path, lesion: np.ndarray, ext: str) -> None:
    path = tmp_path / f"mask{ext}"
    sitk.WriteImage(sitk.GetImageFromArray(lesion), str(path))  # array (y, x) → image size (x, y)
    mask = read_mask(path)
    assert mask.dtype == bool and mask.shape == (H, W)
    np.testing.assert_array_equal(mask, lesion > 0)


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tif"])
def test_raster_masks_0_255(tmp_path: Path, lesion: np.ndarray, ext: str) -> None:
    Image.fromarray(lesion * 255).save(tmp_path / f"mask{ext}")
    mask = read_mask(tmp_path / f"mask{ext}")
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, lesion > 0)


def test_unreadable_files_raise(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    (tmp_path / "x.gif").write_bytes(b"GIF89a")
    volume = sitk.GetImageFromArray(np.ones((3, H, W), dtype=np.uint8))
    sitk.WriteImage(volume, str(tmp_path / "volume.nii.gz"))
    for name in ("bad.png", "x.gif", "volume.nii.gz"):
        with pytest.raises(ImageReadError, match=name.split(".")[0]):
            read_mask(tmp_path / name)


def _convert(root: Path, folder: str, image_id: str, ext: str) -> None:
    """Re-save ``<folder>/<image_id>.png`` in another format and remove the PNG."""
    source = root / folder / f"{image_id}.png"
    pixels = np.asarray(Image.open(source))
    target = root / folder / f"{image_id}{ext}"
    if ext in (".dcm", ".nii", ".nii.gz", ".nrrd"):
        sitk.WriteImage(sitk.GetImageFromArray(pixels.astype(np.uint16) * 200 if ext == ".dcm" else pixels), str(target))
    else:
        Image.fromarray(pixels).save(target)
    source.unlink()


def test_read_site_on_mixed_formats(tmp_path: Path, tiny_schema: Schema) -> None:
    root = write_site(tmp_path / "site", n_patients=4, images_per_patient=2, size=32, with_split=True)
    for image_id, image_ext, mask_ext in [("p000_0", ".jpg", ".nii"), ("p000_1", ".bmp", ".nii.gz"),
                                          ("p001_0", ".tif", ".nrrd"), ("p001_1", ".dcm", ".tiff")]:
        _convert(root, "images", image_id, image_ext)
        _convert(root, "masks", image_id, mask_ext)
    raw = pd.read_csv(root / "clinical.csv", dtype=str, keep_default_na=False)
    raw["label"] = raw["label"].map({"benign": "0", "malignant": "Malignant"})
    raw.loc[0, "size_mm"] = ""  # impute policy: allowed, parsed as missing
    raw.to_csv(root / "clinical.csv", index=False)

    site = read_site(root, tiny_schema)
    frame = site.frame
    assert len(site) == 8 and site.name == "site"
    assert frame["label"].tolist() == [0 if v == "0" else 1 for v in raw["label"]]
    assert frame["split"].tolist() == raw["split"].tolist()
    assert frame["age"].tolist() == [float(v) for v in raw["age"]]
    assert frame["size_mm"].iloc[0] is None or math.isnan(frame["size_mm"].iloc[0])
    assert frame["size_mm"].iloc[1:].tolist() == [float(v) for v in raw["size_mm"].iloc[1:]]
    assert frame["birads"].tolist() == raw["birads"].tolist()
    paths = dict(zip(frame["image_id"], frame["image_path"]))
    assert Path(paths["p001_1"]).name == "p001_1.dcm" and Path(paths["p000_0"]).name == "p000_0.jpg"
    assert Path(frame.set_index("image_id").at["p000_1", "mask_path"]).name == "p000_1.nii.gz"
    for image_path, mask_path in zip(frame["image_path"], frame["mask_path"]):
        assert read_image(image_path).shape == read_mask(mask_path).shape == (32, 32)
    test_patients = set(raw.loc[raw["split"] == "test", "patient_id"])
    assert test_patients and set(site.split_rows("test").frame["patient_id"]) == test_patients


def test_read_site_refuses_an_invalid_site(tmp_path: Path, tiny_schema: Schema) -> None:
    root = write_site(tmp_path / "site", n_patients=2, images_per_patient=1, size=24)
    (root / "images" / "p001_0.png").write_bytes(b"garbage")
    with pytest.raises(ContractError, match="does not follow the data contract") as caught:
        read_site(root, tiny_schema)
    report = caught.value.report
    assert report is not None and not report.ok
    assert [(p.code, p.file) for p in report.errors] == [("image-unreadable", "images/p001_0.png")]
