"""Class-folder datasets (``benign/``, ``malignant/`` with ``<name>_mask*.png``, as in BUSI) → one site.

This is the most common layout of public breast-ultrasound sets. It carries no patient ids and
no clinical record, so every image is its own "patient" (splits become image-level, which the
summary says: two views of one lesion may land on both sides of a split) and the clinical
parameters are the lesion descriptors read off the mask. Several masks of one image
(``x_mask.png``, ``x_mask_1.png``, …: several lesions) are merged by OR; ``normal/`` holds no
lesion and is skipped.
"""

from __future__ import annotations

import io
import logging
import re
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cldlr.common.data.contract import CLINICAL_CSV, IMAGES_DIR, MASKS_DIR
from cldlr.common.data.descriptors import derive_from_mask
from cldlr.common.data.ids import MAX_ID_LENGTH, check_id
from cldlr.common.data.imaging import RASTER_EXTS, file_ext, read_mask
from cldlr.common.data.lesion import descriptor_parameters, schema_yaml
from cldlr.common.data.schema import schema_from_dict
from cldlr.common.data.splits import site_table
from cldlr.common.errors import CldlrError, ImageReadError
from cldlr.common.io import atomic_directory, check_output_apart, contained_path

log = logging.getLogger(__name__)

CLASSES = ("benign", "malignant")
SKIPPED = ("normal",)
MASK_NAME = re.compile(r"^(?P<base>.+)_mask(?:_\d+)?$", re.IGNORECASE)
SCHEMA_COMMENT = """Class-folder dataset imported by `cldlr import class-folders` (written beside the site as schema.yaml).
No clinical record comes with this layout: the parameters are the lesion descriptors read off the ROI mask."""


def class_folders_schema_yaml() -> str:
    """The schema written to ``OUT/schema.yaml``; ``configs/schema/class-folders.yaml`` holds the same text."""
    return schema_yaml("class-folders", descriptor_parameters(), SCHEMA_COMMENT)


def safe_id(name: str) -> str:
    """A file stem as an image id: ``benign (12)`` → ``benign_12`` (the id rule of :mod:`cldlr.common.data.ids`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")[:MAX_ID_LENGTH].rstrip("._-")


def _class_dirs(src: Path) -> tuple[dict[str, Path], list[str]]:
    """The benign/malignant folders (any letter case) and notes about the folders left out."""
    if not src.is_dir():
        raise CldlrError(f"{src} is not a folder; pass the folder that holds benign/ and malignant/")
    found: dict[str, Path] = {}
    notes = []
    for folder in sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")):
        key = folder.name.lower()
        if key in CLASSES:
            if key in found:
                raise CldlrError(f"{src} holds both {found[key].name}/ and {folder.name}/; keep one {key} folder")
            found[key] = folder
        else:
            why = "no lesion to describe" if key in SKIPPED else "not a class of this layout"
            notes.append(f"skipped {folder.name}/ ({why})")
            log.info("class folders: skipping %s (%s)", folder, why)
    if not found:
        raise CldlrError(f"{src} has neither a benign/ nor a malignant/ folder (found: "
                         f"{', '.join(p.name for p in src.iterdir() if p.is_dir()) or 'no folders'})")
    for label in CLASSES:
        if label not in found:
            notes.append(f"no {label}/ folder: the site has {label} cases only in other sites")
    return found, notes


def _scan(label: str, folder: Path) -> tuple[list[tuple[str, Path, list[Path]]], list[str]]:
    """(name, image, masks) for each image in ``folder``; masks matched by ``<name>_mask[_k]``."""
    images: dict[str, Path] = {}
    masks: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith(".") or file_ext(path) not in RASTER_EXTS:
            continue
        stem = path.name[: -len(file_ext(path))]
        match = MASK_NAME.match(stem)
        if match:
            masks[match.group("base")].append(path)
        elif stem in images:
            raise CldlrError(f"{folder}: {images[stem].name} and {path.name} are two images with the same name")
        else:
            images[stem] = path
    entries = []
    for stem, image in images.items():
        if not masks.get(stem):
            raise CldlrError(f"{image}: no mask found; expected {folder / (stem + '_mask.png')} "
                             f"(several lesions: {stem}_mask_1.png, …)")
        entries.append((stem, image, masks[stem]))
    orphans = sorted(str(m) for base, paths in masks.items() if base not in images for m in paths)
    notes = [f"{label}/: {len(orphans)} mask(s) without an image, ignored (first: {orphans[0]})"] if orphans else []
    return entries, notes


def _merged_mask(image: Path, masks: list[Path]) -> np.ndarray:
    """OR of an image's masks, checked against the image size."""
    try:
        with Image.open(image) as img:
            width, height = img.size
    except Exception as exc:  # Pillow raises several types for a bad file
        raise CldlrError(f"{image}: cannot be read as an image ({exc})") from exc
    merged = np.zeros((height, width), bool)
    for path in masks:
        try:
            mask = read_mask(path)
        except ImageReadError as exc:
            raise CldlrError(str(exc)) from exc
        if mask.shape != merged.shape:
            raise CldlrError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} px, its image {image.name} {width}x{height} px")
        merged |= mask
    if not merged.any():
        raise CldlrError(f"{', '.join(map(str, masks))}: empty mask for {image} (no lesion pixel); remove the image or "
                         "delineate the lesion")
    return merged


def _assign_ids(entries: list[tuple[str, str, Path, list[Path]]]) -> list[str]:
    """Safe, unique ids; a name used in both classes gets its class as prefix."""
    ids = [safe_id(stem) or "image" for _, stem, _, _ in entries]
    counts = pd.Series(ids).value_counts()
    ids = [f"{label}_{i}" if counts[i] > 1 else i for (label, _, _, _), i in zip(entries, ids)]
    seen: dict[str, Path] = {}
    for image_id, (_, _, image, _) in zip(ids, entries):
        if image_id in seen:
            raise CldlrError(f"{seen[image_id]} and {image} both become image id {image_id!r}; rename one of them")
        seen[image_id] = image
    return ids


def import_class_folders(src: str | Path, out: str | Path, *, force: bool = False) -> str:
    """Write ``out/<name of src>/`` (a site in the contract) and ``out/schema.yaml``; return a summary.

    The output appears whole or not at all; an existing ``out`` is kept unless ``force``.
    """
    src, out = Path(src), Path(out)
    check_output_apart(out, [src])
    if out.exists() and not force:
        raise CldlrError(f"{out} already exists; choose another folder or pass --force to replace it")
    folders, notes = _class_dirs(src)
    entries = []
    for label, folder in sorted(folders.items()):
        found, scan_notes = _scan(label, folder)
        notes += scan_notes
        entries += [(label, stem, image, masks) for stem, image, masks in found]
    if not entries:
        raise CldlrError(f"{src}: no images in {', '.join(f'{f.name}/' for f in folders.values())}")
    ids = _assign_ids(entries)
    site = safe_id(src.resolve().name) or "site"

    rows = []
    derived = schema_from_dict({"name": "class-folders", "version": 1,
                                "parameters": descriptor_parameters()}).derived_parameters
    with atomic_directory(out, overwrite=force) as tmp:
        root = contained_path(tmp, site)
        (root / IMAGES_DIR).mkdir(parents=True)
        (root / MASKS_DIR).mkdir()
        for image_id, (label, _, image, masks) in zip(ids, entries):
            mask = _merged_mask(image, masks)
            shutil.copyfile(image, contained_path(root / IMAGES_DIR, f"{check_id(image_id)}{file_ext(image)}"))
            buffer = io.BytesIO()
            Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG")
            contained_path(root / MASKS_DIR, f"{image_id}.png").write_bytes(buffer.getvalue())
            descriptors = derive_from_mask(derived, mask, None)  # what validate and predict compute
            rows.append({"image_id": image_id, "patient_id": image_id, "label": label,
                         **{k: round(v, 6) for k, v in descriptors.items()}})
            if len(masks) > 1:
                log.debug("%s: %d masks merged", image, len(masks))
        table = pd.DataFrame(rows)
        (root / CLINICAL_CSV).write_text(table.to_csv(index=False, lineterminator="\n"), encoding="utf-8")
        (tmp / "schema.yaml").write_text(class_folders_schema_yaml(), encoding="utf-8")

    merged = sum(len(masks) > 1 for *_, masks in entries)
    counts = table.assign(label=(table["label"] == "malignant").astype(int), site=site)
    lines = [f"class folders {src} → {out / site}: {len(table)} images", site_table(counts, "site")]
    lines.append("this layout has no patient ids: each image is its own patient, so splits are image-level "
                 "(views of one lesion can fall on both sides)")
    if merged:
        lines.append(f"{merged} image(s) with several masks: merged by OR")
    lines += notes
    lines.append(f"schema: {out / 'schema.yaml'}")
    return "\n".join(lines)


__all__ = ["class_folders_schema_yaml", "import_class_folders", "safe_id"]
