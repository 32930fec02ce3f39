"""ROI crop geometry, resize, and the content-addressed safetensors cache (miss → hit, keys, atomicity)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_site
from PIL import Image

from cldlr.common.config import DataConfig
from cldlr.common.data import imaging
from cldlr.common.data.roi import build_site_cache, cache_for, extract_roi, load_roi_cache, roi_box
from cldlr.common.data.schema import Schema
from cldlr.common.data.site import read_site


def test_box_is_exact_half_open() -> None:
    mask = np.zeros((20, 30), dtype=bool)
    mask[4:9, 10:22] = True
    mask[6, 25] = True  # a stray pixel widens the box
    assert roi_box(mask) == (4, 9, 10, 26)


def test_margin_is_fraction_of_box_and_clipped() -> None:
    mask = np.zeros((40, 40), dtype=np.uint8)
    mask[10:20, 10:30] = 255  # 10 tall, 20 wide
    assert roi_box(mask, margin=0.2) == (8, 22, 6, 34)
    assert roi_box(mask, margin=1.0) == (0, 30, 0, 40)  # clipped at the image border


def test_empty_mask_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        roi_box(np.zeros((5, 5), dtype=bool))


def test_extract_roi_shape_dtype_and_content() -> None:
    image = np.zeros((50, 60), dtype=np.uint8)
    image[10:20, 5:45] = 200
    mask = np.zeros_like(image, dtype=bool)
    mask[10:20, 5:45] = True
    roi = extract_roi(image, mask, 32)
    assert roi.shape == (32, 32) and roi.dtype == np.uint8
    assert roi.min() == 200  # only the lesion rectangle, stretched to a square


def test_extract_roi_accepts_16_bit() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 65535, (40, 40), dtype=np.uint16)
    mask = np.zeros((40, 40), dtype=bool)
    mask[5:35, 5:35] = True
    roi = extract_roi(image, mask, 16)
    assert roi.dtype == np.uint8 and roi.shape == (16, 16) and roi.max() > 100


def test_extract_roi_rejects_mismatched_mask() -> None:
    with pytest.raises(ValueError, match="same size"):
        extract_roi(np.zeros((10, 10), np.uint8), np.ones((10, 12), bool), 8)


def _cfg(tmp_path: Path, **kw: object) -> DataConfig:
    return dataclasses.replace(DataConfig(), cache_dir=str(tmp_path / "cache"), image_size=24, **kw)


def test_cache_miss_then_hit_without_decoding(tiny_site: Path, tiny_schema: Schema, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    cfg = _cfg(tmp_path)
    caplog.set_level(logging.INFO, logger="cldlr.common.data.roi")
    first = build_site_cache(tiny_site, tiny_schema, cfg)
    assert "cache miss" in caplog.text
    site = read_site(tiny_site, tiny_schema)
    assert first.images.dtype == torch.uint8 and tuple(first.images.shape) == (len(site), 1, 24, 24)
    assert first.image_ids == list(site.frame["image_id"])
    assert first.path.name.startswith("site-") and first.path.name == f"site-{first.key[:16]}.safetensors"

    def boom(*_: object, **__: object) -> np.ndarray:
        raise AssertionError("a cache hit must not decode images")

    monkeypatch.setattr(imaging, "read_image", boom)
    monkeypatch.setattr(imaging, "read_mask", boom)
    caplog.clear()
    second = build_site_cache(site, tiny_schema, cfg)
    assert "cache hit" in caplog.text
    assert second.path == first.path and torch.equal(second.images, first.images)

    # a reordered subset reuses no foreign rows and follows the frame order
    sub = site.subset(site.frame["patient_id"].isin(["P000", "P003"]))
    sub = dataclasses.replace(sub, frame=sub.frame.iloc[::-1].reset_index(drop=True))
    monkeypatch.undo()
    part = cache_for(sub, cfg)
    assert part.path != first.path and part.image_ids == list(sub.frame["image_id"])
    for i, image_id in enumerate(part.image_ids):
        assert torch.equal(part.images[i], first.images[first.image_ids.index(image_id)])


def test_key_changes_with_bytes_and_size(tmp_path: Path, tiny_schema: Schema) -> None:
    root = write_site(tmp_path / "s", n_patients=4, images_per_patient=1)
    cfg = _cfg(tmp_path)
    base = build_site_cache(root, tiny_schema, cfg)
    assert build_site_cache(root, tiny_schema, dataclasses.replace(cfg, image_size=16)).key != base.key
    assert build_site_cache(root, tiny_schema, dataclasses.replace(cfg, margin=0.1)).key != base.key

    path = root / "images" / "p000_0.png"
    pixels = np.array(Image.open(path))
    pixels[0, 0] = (int(pixels[0, 0]) + 1) % 256
    Image.fromarray(pixels).save(path)
    changed = build_site_cache(root, tiny_schema, cfg)
    assert changed.key != base.key and changed.path != base.path


def test_file_is_safetensors_and_write_is_atomic(tmp_path: Path, tiny_schema: Schema) -> None:
    root = write_site(tmp_path / "s", n_patients=4, images_per_patient=1)
    cache = build_site_cache(root, tiny_schema, _cfg(tmp_path))
    data = cache.path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")  # safetensors: u64 length + JSON header + raw bytes
    header = json.loads(data[8:8 + header_len])
    assert header["images"]["dtype"] == "U8" and header["images"]["shape"] == [4, 1, 24, 24]
    assert json.loads(header["__metadata__"]["image_ids"]) == cache.image_ids
    assert len(data) == 8 + header_len + 4 * 24 * 24  # nothing but the header and the pixels: no pickle
    assert sorted(p.name for p in cache.path.parent.iterdir()) == [cache.path.name]
    again = load_roi_cache(cache.path)
    assert again.image_ids == cache.image_ids and torch.equal(again.images, cache.images)


def test_failed_decode_leaves_no_file(tmp_path: Path, tiny_schema: Schema, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_site(tmp_path / "s", n_patients=4, images_per_patient=1)
    site = read_site(root, tiny_schema)
    cfg = _cfg(tmp_path)
    real = imaging.read_image
    calls = []

    def flaky(path: object, *, max_pixels: int) -> np.ndarray:
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk went away")
        return real(path, max_pixels=max_pixels)

    monkeypatch.setattr(imaging, "read_image", flaky)
    with pytest.raises(OSError):
        cache_for(site, cfg)
    cache_dir = Path(cfg.cache_dir)
    assert not cache_dir.exists() or not any(cache_dir.iterdir())
