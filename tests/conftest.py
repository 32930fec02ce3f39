"""Shared fixtures: tiny synthetic sites written on the fly (no network, no real data needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from cldlr.common.data.schema import Schema, load_schema

REPO = Path(__file__).resolve().parents[1]
BUS_BRA = REPO.parent / "shared" / "data" / "bus-bra"

TINY_SCHEMA = {
    "name": "tiny",
    "version": 1,
    "parameters": [
        {"name": "age", "type": "numeric", "unit": "years", "range": [18, 100], "missing": "error"},
        {"name": "size_mm", "type": "numeric", "unit": "mm", "range": [0, 100], "missing": "impute"},
        {"name": "palpable", "type": "binary", "missing": "impute"},
        {"name": "side", "type": "categorical", "levels": ["left", "right"], "missing": "impute"},
        {"name": "birads", "type": "categorical", "levels": ["4a", "4b", "4c"], "model_input": False},
    ],
}


def write_schema(path: Path, data: dict | None = None) -> Path:
    path.write_text(yaml.safe_dump(data or TINY_SCHEMA, sort_keys=False))
    return path


def lesion_image(rng: np.random.Generator, size: int, malignant: bool) -> tuple[np.ndarray, np.ndarray]:
    """A speckled background with a dark lesion; malignant ones are taller than wide."""
    yy, xx = np.mgrid[:size, :size]
    image = rng.gamma(2.0, 40.0, (size, size)).clip(0, 255)
    cy, cx = size / 2 + rng.uniform(-4, 4), size / 2 + rng.uniform(-4, 4)
    ry, rx = (size * 0.25, size * 0.15) if malignant else (size * 0.12, size * 0.25)
    mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    image[mask] *= 0.3
    return image.astype(np.uint8), mask


def write_site(
    root: Path,
    *,
    n_patients: int = 12,
    images_per_patient: int = 2,
    size: int = 48,
    seed: int = 0,
    with_split: bool = False,
) -> Path:
    """Write a valid site folder in the contract (PNG images/masks, clinical.csv)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for p in range(n_patients):
        malignant = p % 2 == 1
        for k in range(images_per_patient):
            image_id = f"p{p:03d}_{k}"
            image, mask = lesion_image(rng, size, malignant)
            Image.fromarray(image).save(root / "images" / f"{image_id}.png")
            Image.fromarray((mask * 255).astype(np.uint8)).save(root / "masks" / f"{image_id}.png")
            rows.append({
                "image_id": image_id,
                "patient_id": f"P{p:03d}",
                "label": "malignant" if malignant else "benign",
                **({"split": "test" if p % 4 in (2, 3) and p >= n_patients // 2 else "train"} if with_split else {}),
                "age": int(rng.normal(58 if malignant else 45, 6)),
                "size_mm": round(float(rng.uniform(5, 30)), 1),
                "palpable": int(rng.random() < (0.7 if malignant else 0.3)),
                "side": "left" if rng.random() < 0.5 else "right",
                "birads": ["4a", "4b", "4c"][int(rng.integers(3))],
            })
    pd.DataFrame(rows).to_csv(root / "clinical.csv", index=False)
    return root


@pytest.fixture
def tiny_schema_path(tmp_path: Path) -> Path:
    return write_schema(tmp_path / "schema.yaml")


@pytest.fixture
def tiny_schema(tiny_schema_path: Path) -> Schema:
    return load_schema(tiny_schema_path)


@pytest.fixture
def tiny_site(tmp_path: Path) -> Path:
    return write_site(tmp_path / "site")


@pytest.fixture
def bus_bra() -> Path:
    if not (BUS_BRA / "bus_data.csv").is_file():
        pytest.skip("BUS-BRA is not present at ../shared/data/bus-bra")
    return BUS_BRA
