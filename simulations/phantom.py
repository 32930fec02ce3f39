"""Deterministic synthetic multi-site breast-ultrasound data: learnable, non-IID, in the site contract.

The phantom stands in for hospital data wherever real images cannot go (CI, demos, a federation
dry run). It follows what separates BI-RADS 4 lesions in practice, so both the image model and the
clinical model have something real to learn, but never perfectly:

* images: correlated Rayleigh speckle over a layered breast (skin, fat, glandular tissue, chest
  wall), depth attenuation and log compression; benign lesions oval, circumscribed and wider than
  tall with posterior enhancement; malignant ones taller than wide with a spiculated or lobulated
  margin and posterior acoustic shadowing;
* clinical: age, palpability and family history shift with malignancy, lesion size is measured
  from the mask, side is uninformative, BI-RADS 4a/4b/4c is correlated but never a model input;
* sites: each has its own device look (gain, speckle grain, noise, blur, attenuation, field of
  view) and its own class balance; about a third of the patients have two views.

Every image draws from its own seeded generator, so output is byte-identical for a seed.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from cldlr.common.data.contract import CLINICAL_CSV, IMAGES_DIR, MASKS_DIR
from cldlr.common.data.lesion import schema_yaml
from cldlr.common.errors import CldlrError
from cldlr.common.io import atomic_directory

log = logging.getLogger(__name__)

SCHEMA_COMMENT = "Clinical parameters of the synthetic phantom (cldlr phantom writes this file beside its sites)."
PHANTOM_PARAMETERS = [
    {"name": "age", "type": "numeric", "unit": "years", "range": [18, 100], "missing": "error"},
    {"name": "lesion_size_mm", "type": "numeric", "unit": "mm", "range": [1, 100], "missing": "error",
     "description": "largest lesion diameter on the image"},
    {"name": "palpable", "type": "binary", "missing": "impute"},
    {"name": "family_history", "type": "binary", "missing": "impute",
     "description": "first-degree relative with breast cancer; a few are unknown (empty)"},
    {"name": "side", "type": "categorical", "levels": ["left", "right"], "missing": "impute"},
    {"name": "birads", "type": "categorical", "levels": ["4a", "4b", "4c"], "missing": "error",
     "model_input": False, "description": "the radiologist's category: defines the cohort, never a model input"},
]
TWO_VIEW_FRACTION = 0.35
FAMILY_HISTORY_UNKNOWN = 0.04


def phantom_schema_yaml() -> str:
    """The phantom schema as written to ``OUT/schema.yaml`` and ``configs/schema/phantom.yaml``."""
    return schema_yaml("phantom", PHANTOM_PARAMETERS, SCHEMA_COMMENT)


@dataclass(frozen=True)
class Device:
    """One site's scanner and population: how its images look and how often lesions are malignant."""

    gain: float
    speckle_grain: float  # lateral speckle correlation (px at 160 px); axial is half of it
    noise_sd: float  # additive electronic noise, grey levels
    blur: float  # extra resolution loss, px
    attenuation: float  # intensity lost over the full depth (nepers)
    depth_mm: float  # field of view: image height in mm
    malignant_fraction: float


def _devices(sites: int, seed: int) -> list[Device]:
    rng = np.random.default_rng([seed, 10_000])
    fractions = rng.permutation(np.linspace(0.3, 0.7, sites)) if sites > 1 else np.array([0.5])
    return [
        Device(
            gain=float(rng.uniform(0.8, 1.2)), speckle_grain=float(rng.uniform(1.0, 2.2)),
            noise_sd=float(rng.uniform(2.0, 9.0)), blur=float(rng.uniform(0.0, 1.4)),
            attenuation=float(rng.uniform(0.5, 1.5)), depth_mm=float(rng.uniform(35.0, 50.0)),
            malignant_fraction=float(f),
        )
        for f in fractions
    ]


def _tissue(rng: np.random.Generator, n: int) -> np.ndarray:
    """Mean echogenicity of a layered breast: bright skin, dark fat, bright gland, striated muscle."""
    x = np.arange(n) / n
    wave = lambda amp, freq: amp * np.sin(2 * np.pi * (freq * x + rng.random()))  # noqa: E731
    fat_end = (0.18 + rng.uniform(-0.04, 0.04) + wave(0.03, 1.5)) * n
    gland_end = (0.72 + rng.uniform(-0.06, 0.04) + wave(0.04, 1.0)) * n
    rows = np.arange(n)[:, None].astype(np.float64)
    tissue = np.where(rows < fat_end, 0.45, np.where(rows < gland_end, 0.8, 0.55))
    tissue[rows[:, 0] < max(2, n // 50)] = 1.3  # skin line
    muscle = rows >= gland_end
    tissue = tissue + muscle * 0.15 * np.sin(rows * 2 * np.pi / max(4.0, n / 18))  # fibre striations
    texture = ndimage.gaussian_filter(rng.normal(size=(n, n)), n / 20)
    return np.clip(tissue * (1 + 2.5 * texture), 0.1, None)


@dataclass(frozen=True)
class Lesion:
    """A patient's lesion, shared by its views: size, orientation, margin and posterior feature."""

    semi_x: float  # lateral semi-axis, fraction of the image side
    ratio: float  # height / width of the underlying oval
    tilt: float  # radians
    amps: np.ndarray  # margin harmonics 2, 3, … (lobulation, micro-lobulation)
    phases: np.ndarray
    spikes: np.ndarray  # angles of spicules
    posterior: float  # < 1 shadowing, > 1 enhancement


def _lesion(rng: np.random.Generator, malignant: bool) -> Lesion:
    """Draw a lesion; the classes overlap (circumscribed cancers, lobulated or shadowing benign)."""
    k = np.arange(2, 16)
    style = rng.random()
    if malignant:
        semi_x, ratio, tilt = rng.uniform(0.08, 0.16), rng.uniform(0.7, 1.5), rng.normal(0, 0.25)
        if style < 0.4:  # spiculated
            amps = rng.uniform(0, 0.07, k.size) * (k >= 4)
            spikes = rng.uniform(0, 2 * np.pi, int(rng.integers(3, 9)))
        elif style < 0.7:  # micro-lobulated
            amps = rng.uniform(0, 0.05, k.size) * ((k >= 4) & (k <= 10))
            spikes = np.zeros(0)
        else:  # circumscribed-looking: the hard cases
            amps = rng.uniform(0, 0.025, k.size) * (k <= 4)
            spikes = rng.uniform(0, 2 * np.pi, int(rng.integers(0, 2)))
        posterior = rng.uniform(0.3, 0.65) if rng.random() < 0.6 else rng.uniform(0.8, 1.05)
    else:
        semi_x, ratio, tilt = rng.uniform(0.09, 0.18), rng.uniform(0.45, 1.1), rng.normal(0, 0.12)
        if style < 0.5:  # smooth oval
            amps = rng.uniform(0, 0.03, k.size) * (k <= 4)
        elif style < 0.75:  # macro-lobulated
            amps = rng.uniform(0, 0.09, k.size) * (k <= 4)
        else:  # angular margin
            amps = rng.uniform(0, 0.04, k.size) * ((k >= 4) & (k <= 10))
        spikes = np.zeros(0)
        draw = rng.random()
        posterior = (rng.uniform(1.15, 1.45) if draw < 0.55 else
                     rng.uniform(0.9, 1.1) if draw < 0.9 else rng.uniform(0.55, 0.8))
    return Lesion(float(semi_x), float(ratio), float(tilt), amps, rng.uniform(0, 2 * np.pi, k.size), spikes,
                  float(posterior))


def _image(rng: np.random.Generator, n: int, device: Device, malignant: bool, lesion: Lesion) -> tuple[np.ndarray, np.ndarray]:
    """One B-mode view: ``(uint8 image, bool mask)``."""
    yy, xx = np.mgrid[:n, :n].astype(np.float64)
    semi_x = lesion.semi_x * n * rng.uniform(0.85, 1.1)  # the second view cuts the lesion in another plane
    semi_y = semi_x * lesion.ratio * rng.uniform(0.9, 1.1)
    cy = rng.uniform(0.3, 0.55) * n
    cx = rng.uniform(0.3, 0.7) * n
    angle = lesion.tilt + rng.normal(0, 0.05)
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    theta = np.arctan2(v / semi_y, u / semi_x)
    k = np.arange(2, 2 + lesion.amps.size)
    edge = 1 + np.einsum("k,kij->ij", lesion.amps, np.cos(k[:, None, None] * theta + lesion.phases[:, None, None]))
    for spike in lesion.spikes:  # narrow spicules radiating out of the margin
        gap = np.angle(np.exp(1j * (theta - spike)))
        edge += rng.uniform(0.25, 0.6) * np.exp(-0.5 * (gap / 0.06) ** 2)
    mask = np.hypot(u / semi_x, v / semi_y) <= edge
    if not mask.any():
        mask[int(cy), int(cx)] = True

    echo = _tissue(rng, n)
    inside = ndimage.gaussian_filter(mask.astype(np.float64), 0.6 if malignant else 1.2)
    level = rng.uniform(0.12, 0.25) if malignant else rng.uniform(0.22, 0.35)
    lesion_echo = level * (1 + (0.6 if malignant else 0.2) * ndimage.gaussian_filter(rng.normal(size=(n, n)), 2))
    echo = echo * (1 - inside) + np.clip(lesion_echo, 0.02, None) * inside
    # posterior features: shadow behind a malignant lesion, enhancement behind a benign one
    bottom = np.where(mask.any(axis=0), n - 1 - np.argmax(mask[::-1], axis=0), n)
    behind = (yy > bottom[None, :]).astype(np.float64)
    behind = ndimage.gaussian_filter(behind, (0, 2.0))
    echo *= 1 + (lesion.posterior - 1) * behind

    grain = device.speckle_grain * n / 160
    field = rng.normal(size=(n, n)) + 1j * rng.normal(size=(n, n))
    field = ndimage.gaussian_filter(field.real, (grain / 2, grain)) + 1j * ndimage.gaussian_filter(field.imag, (grain / 2, grain))
    speckle = np.abs(field) / np.mean(np.abs(field))  # Rayleigh-distributed, mean 1
    intensity = device.gain * echo * speckle * np.exp(-device.attenuation * yy / n)
    display = np.log1p(8 * intensity) / np.log1p(8 * 2.5)  # log compression to [0, ~1]
    if device.blur > 0:
        display = ndimage.gaussian_filter(display, device.blur * n / 160)
    grey = display * 235 + rng.normal(0, device.noise_sd, (n, n))
    return np.clip(np.round(grey), 0, 255).astype(np.uint8), mask


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _views_per_patient(rng: np.random.Generator, images: int) -> list[int]:
    counts: list[int] = []
    while sum(counts) < images:
        left = images - sum(counts)
        counts.append(2 if left >= 2 and rng.random() < TWO_VIEW_FRACTION else 1)
    return counts


def _write_site(root: Path, index: int, images: int, seed: int, n: int, device: Device) -> pd.DataFrame:
    rng = np.random.default_rng([seed, index])
    views = _views_per_patient(rng, images)
    n_malignant = int(np.clip(round(device.malignant_fraction * len(views)), 1, max(1, len(views) - 1)))
    labels = rng.permutation(np.arange(len(views)) < n_malignant)
    (root / IMAGES_DIR).mkdir(parents=True)
    (root / MASKS_DIR).mkdir()
    mm_per_px = device.depth_mm / n
    rows = []
    for p, (count, malignant) in enumerate(zip(views, labels)):
        prng = np.random.default_rng([seed, index, p])
        malignant = bool(malignant)
        age = float(np.clip(prng.normal(57 if malignant else 45, 10), 20, 90))
        palpable = int(prng.random() < (0.6 if malignant else 0.3))
        family = "" if prng.random() < FAMILY_HISTORY_UNKNOWN else str(int(prng.random() < (0.3 if malignant else 0.12)))
        side = "left" if prng.random() < 0.5 else "right"
        birads = prng.choice(["4a", "4b", "4c"], p=[0.15, 0.35, 0.5] if malignant else [0.6, 0.3, 0.1])
        lesion = _lesion(prng, malignant)
        for view in range(count):
            image_id = f"s{index}-p{p:03d}-{view + 1}"
            image, mask = _image(np.random.default_rng([seed, index, p, view]), n, device, malignant, lesion)
            (root / IMAGES_DIR / f"{image_id}.png").write_bytes(_png(image))
            (root / MASKS_DIR / f"{image_id}.png").write_bytes(_png(mask.astype(np.uint8) * 255))
            extent = max(np.ptp(np.flatnonzero(mask.any(axis=0))), np.ptp(np.flatnonzero(mask.any(axis=1)))) + 1
            size_mm = float(np.clip(extent * mm_per_px + prng.normal(0, 0.8), 1, 100))
            rows.append({
                "image_id": image_id, "patient_id": f"s{index}-p{p:03d}",
                "label": "malignant" if malignant else "benign",
                "age": f"{age:.0f}", "lesion_size_mm": f"{size_mm:.1f}", "palpable": palpable,
                "family_history": family, "side": side, "birads": str(birads),
            })
    table = pd.DataFrame(rows)
    (root / CLINICAL_CSV).write_bytes(table.to_csv(index=False, lineterminator="\n").encode())
    return table


def _summary(out: Path, tables: dict[str, pd.DataFrame], seed: int) -> str:
    lines = [f"phantom ({seed=}) → {out}",
             f"{'site':<10}{'images':>8}{'benign':>8}{'malig.':>8}{'patients':>10}{'benign':>8}{'malig.':>8}"]
    for name, t in tables.items():
        patients = t.drop_duplicates("patient_id")
        lines.append(f"{name:<10}{len(t):>8}{(t.label == 'benign').sum():>8}{(t.label == 'malignant').sum():>8}"
                     f"{len(patients):>10}{(patients.label == 'benign').sum():>8}{(patients.label == 'malignant').sum():>8}")
    lines.append(f"schema: {out / 'schema.yaml'}")
    return "\n".join(lines)


def generate_phantom(out: str | Path, *, sites: int = 3, images_per_site: int = 40, seed: int = 0,
                     image_size: int = 160, force: bool = False) -> str:
    """Write ``out/site-1 … site-N`` and ``out/schema.yaml``; return a per-site class table.

    The folder appears whole or not at all; an existing ``out`` is kept unless ``force``.
    """
    out = Path(out)
    if sites < 1:
        raise CldlrError(f"--sites must be at least 1, got {sites}")
    if images_per_site < 2:
        raise CldlrError(f"--images-per-site must be at least 2, got {images_per_site}")
    if not 32 <= image_size <= 2048:
        raise CldlrError(f"--image-size must be between 32 and 2048 px, got {image_size}")
    if out.exists() and not force:
        raise CldlrError(f"{out} already exists; choose another folder or pass --force to replace it")
    tables = {}
    with atomic_directory(out, overwrite=force) as tmp:
        for index, device in enumerate(_devices(sites, seed), start=1):
            name = f"site-{index}"
            tables[name] = _write_site(tmp / name, index, images_per_site, seed, image_size, device)
            log.info("phantom %s: %d images, malignant fraction %.2f", name, images_per_site, device.malignant_fraction)
        (tmp / "schema.yaml").write_text(phantom_schema_yaml(), encoding="utf-8")
    return _summary(out, tables, seed)


__all__ = ["PHANTOM_PARAMETERS", "Device", "generate_phantom", "phantom_schema_yaml"]
