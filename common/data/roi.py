"""Lesion ROIs (mask bounding rectangle → 8-bit → size×size) and their content-addressed cache.

Every image is decoded once per site and pipeline setting: the uint8 ROIs are stored as one
safetensors tensor (no pickle) whose file name carries a hash of the image and mask bytes, so a
changed file, image size or margin can never be served a stale cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from cldlr.common.config import DataConfig
from cldlr.common.data import imaging
from cldlr.common.data.contract import SiteData
from cldlr.common.data.schema import Schema
from cldlr.common.data.site import read_site
from cldlr.common.errors import CldlrError
from cldlr.common.io import atomic_path, contained_path

log = logging.getLogger(__name__)

#: Bump when the crop/resize code changes, so older caches stop matching.
PIPELINE_VERSION = "roi-v1"
_TENSOR = "images"
_FORMAT = "cldlr-roi-cache"


def roi_box(mask: np.ndarray, margin: float = 0.0) -> tuple[int, int, int, int]:
    """Half-open ``(y0, y1, x0, x1)`` rectangle around the nonzero pixels of ``mask``.

    ``margin`` widens the box by that fraction of its own height/width on each side (the paper
    crops the bare rectangle: 0); the result is clipped to the image.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    if margin < 0 or not np.isfinite(margin):
        raise ValueError(f"margin must be a finite fraction >= 0, got {margin}")
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("mask is empty (no nonzero pixel): there is no lesion to crop around")
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    dy, dx = int(round(margin * (y1 - y0))), int(round(margin * (x1 - x0)))
    height, width = mask.shape
    return max(0, y0 - dy), min(height, y1 + dy), max(0, x0 - dx), min(width, x1 + dx)


def extract_roi(image: np.ndarray, mask: np.ndarray, size: int, margin: float = 0.0) -> np.ndarray:
    """Crop the lesion rectangle of an 8/16-bit image and resize it to ``size``×``size`` uint8.

    The aspect ratio is not kept: the paper stretches the rectangle to 224×224. Pillow's bilinear
    resize widens its kernel when shrinking, so downscaling is antialiased.
    """
    image, mask = np.asarray(image), np.asarray(mask)
    if image.shape != mask.shape:
        raise ValueError(f"image is {image.shape} but its mask is {mask.shape}; they must be the same size")
    if size < 1:
        raise ValueError(f"ROI size must be a positive number of pixels, got {size}")
    y0, y1, x0, x1 = roi_box(mask, margin)
    crop = np.ascontiguousarray(imaging.to_uint8(image)[y0:y1, x0:x1])
    resized = Image.fromarray(crop).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


@dataclass
class RoiCache:
    """The ROIs of one site (or subset): ``images`` is ``[N,1,S,S]`` uint8 in ``image_ids`` order."""

    path: Path
    images: torch.Tensor
    image_ids: list[str]
    key: str

    def __len__(self) -> int:
        return len(self.image_ids)


def _file_sha256(path: str | Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def image_digests(site: SiteData) -> list[tuple[str, str, str]]:
    """The sorted (image_id, image sha256, mask sha256) rows: the content of a site's pixels, in any row order.

    The ROI cache key and the site's lifetime privacy ledger (which keys its ε budget by the
    data's content, not by a folder name the centre could change) both hash these.
    """
    return sorted(
        (str(r.image_id), _file_sha256(r.image_path), _file_sha256(r.mask_path))
        for r in site.frame[["image_id", "image_path", "mask_path"]].itertuples(index=False)
    )


def cache_key(site: SiteData, image_size: int, margin: float) -> str:
    """sha256 over the sorted (image_id, image sha256, mask sha256) rows and the ROI settings.

    Row order does not matter (a reordered table reuses the file); any byte of any image or mask,
    the ROI size, the margin or :data:`PIPELINE_VERSION` changing gives a new key.
    """
    rows = image_digests(site)
    payload = {"rows": rows, "image_size": int(image_size), "margin": float(margin), "version": PIPELINE_VERSION}
    return hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode()).hexdigest()


def load_roi_cache(path: str | Path) -> RoiCache:
    """Open a cache file once (tensor and id metadata from the same safetensors header)."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = handle.keys()  # a safe_open handle has keys() but no `in`
        if metadata.get("format") != _FORMAT or _TENSOR not in tensors:
            raise CldlrError(f"{path} is not a cldlr ROI cache; delete it and run `cldlr cache` again")
        images = handle.get_tensor(_TENSOR)
    image_ids = json.loads(metadata["image_ids"])
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[0] != len(image_ids):
        raise CldlrError(f"{path}: ROI tensor {tuple(images.shape)} {images.dtype} does not match its "
                         f"{len(image_ids)} image ids; delete the file so it is rebuilt")
    return RoiCache(path, images, image_ids, metadata.get("key", ""))


def _decode(site: SiteData, data_cfg: DataConfig) -> torch.Tensor:
    size = data_cfg.image_size
    out = np.empty((len(site), 1, size, size), dtype=np.uint8)
    rows = site.frame[["image_id", "image_path", "mask_path"]].itertuples(index=False)
    for i, row in enumerate(tqdm(rows, total=len(site), desc=f"ROIs {site.name}", unit="img", disable=None)):
        try:
            cap = data_cfg.max_image_pixels
            image, mask = imaging.read_image(row.image_path, max_pixels=cap), imaging.read_mask(row.mask_path, max_pixels=cap)
            out[i, 0] = extract_roi(image, mask, size, data_cfg.margin)
        except ValueError as exc:
            raise CldlrError(f"{site.root}: image_id {row.image_id!r} ({row.image_path}): {exc}; "
                             f"fix the mask (run `cldlr validate`)") from exc
    return torch.from_numpy(out)


def _reorder(cache: RoiCache, image_ids: list[str]) -> RoiCache | None:
    """The cached ROIs in ``image_ids`` order, or ``None`` when the file lacks one of them."""
    position = {image_id: i for i, image_id in enumerate(cache.image_ids)}
    if any(i not in position for i in image_ids):
        return None
    if cache.image_ids == image_ids:
        return cache
    index = torch.tensor([position[i] for i in image_ids], dtype=torch.long)
    return RoiCache(cache.path, cache.images[index], list(image_ids), cache.key)


def cache_for(site: SiteData, data_cfg: DataConfig, weights: str = "none") -> RoiCache:
    """The ROI cache of exactly the rows of ``site`` (a whole site or a partition's subset).

    ``weights`` does not enter the key: the cache holds raw uint8 ROIs and the weight-dependent
    normalization is applied per batch on the device (:mod:`cldlr.common.data.transforms`).
    """
    if len(site) == 0:
        raise CldlrError(f"site {site.root} has no rows to cache")
    key = cache_key(site, data_cfg.image_size, data_cfg.margin)
    path = Path(data_cfg.cache_dir).expanduser() / f"{site.name}-{key[:16]}.safetensors"
    contained_path(path.parent, path.name)  # a site name is a plain file name, never a way out of the cache
    image_ids = [str(i) for i in site.frame["image_id"]]
    if path.is_file():
        try:
            cached = load_roi_cache(path)
        except Exception as exc:  # a damaged file is rebuilt, not fatal
            log.warning("ROI cache %s unreadable (%s); rebuilding it", path, exc)
        else:
            hit = _reorder(cached, image_ids) if cached.key == key else None
            if hit is not None:
                log.info("cache hit: %s (%d ROIs, weights=%s)", path, len(hit), weights)
                return hit
            log.warning("ROI cache %s does not match its key; rebuilding it", path)
    log.info("cache miss: decoding %d images of %s into %s", len(site), site.name, path)
    images = _decode(site, data_cfg)
    metadata = {
        "format": _FORMAT, "key": key, "version": PIPELINE_VERSION, "image_ids": json.dumps(image_ids),
        "image_size": str(data_cfg.image_size), "margin": repr(float(data_cfg.margin)),
    }
    with atomic_path(path) as tmp:
        save_file({_TENSOR: images}, str(tmp), metadata=metadata)
    return RoiCache(path, images, image_ids, key)


def build_site_cache(site: str | Path | SiteData, schema: Schema, data_cfg: DataConfig, *,
                     weights: str = "none") -> RoiCache:
    """Decode a site's ROIs once into the cache (or load them); a path is read and validated first."""
    if not isinstance(site, SiteData):
        site = read_site(site, schema, max_image_pixels=data_cfg.max_image_pixels)
    return cache_for(site, data_cfg, weights)


__all__ = ["PIPELINE_VERSION", "RoiCache", "build_site_cache", "cache_for", "cache_key", "extract_roi", "image_digests",
           "load_roi_cache", "roi_box"]
