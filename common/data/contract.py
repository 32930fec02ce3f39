"""The site data contract: one folder per site, the same layout in every hospital.

::

    SITE/
      clinical.csv            one row per image: image_id, patient_id, label[, split], parameters…
      images/<image_id>.<ext> PNG, JPEG, BMP, TIFF or DICOM; 8/16-bit; gray or RGB (→ gray)
      masks/<image_id>.<ext>  binary lesion mask: PNG/JPEG/BMP/TIFF, NIfTI or NRRD

``label`` is ``benign``/``malignant`` (or 0/1), ``split`` is ``train``/``test`` when given.
A folder for ``cldlr predict`` only (a clinic's new, unbiopsied lesions) may leave ``label`` and
``split`` out, or empty. The optional ``spacing_mm`` column gives each image's pixel spacing in
mm (``0.1``, or ``ROWxCOLUMN`` such as ``0.1x0.12``); empty means unknown, and a DICOM image's own
PixelSpacing is used then (:mod:`cldlr.common.data.units`). The clinical parameters are those the
federation schema declares; a ``derived: mask`` parameter's column may be left out (computed from
the mask, :mod:`cldlr.common.data.descriptors`). :func:`parse_frame` turns a
validated table into typed columns; :func:`cldlr.common.data.site.read_site` validates a folder
(:mod:`cldlr.common.data.validation`) and then reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cldlr.common.data.descriptors import spacing_column
from cldlr.common.data.ids import check_id
from cldlr.common.data.imaging import IMAGE_EXTS, MASK_EXTS, file_ext
from cldlr.common.data.schema import Parameter, Schema
from cldlr.common.errors import ConfigError, ContractError
from cldlr.common.io import contained_path

if TYPE_CHECKING:
    from cldlr.common.config import Config

CLINICAL_CSV = "clinical.csv"
IMAGES_DIR = "images"
MASKS_DIR = "masks"
REQUIRED_COLUMNS = ("image_id", "patient_id", "label")
LABELS = {"benign": 0, "malignant": 1, "0": 0, "1": 1, "0.0": 0, "1.0": 1}
LABEL_NAMES = ("benign", "malignant")
SPLITS = ("train", "test")
COHORTS = SPLITS  # a cohort is the cases of one split: every report and secure layout uses these names


def parse_label(raw: object) -> int | None:
    """``benign``/``malignant``/0/1 (any case) → 0/1; ``None`` when unknown."""
    return LABELS.get(str(raw).strip().lower())


def read_clinical_csv(root: str | Path) -> pd.DataFrame:
    """Read ``clinical.csv`` with every cell as text (nothing guessed, nothing coerced)."""
    return pd.read_csv(Path(root) / CLINICAL_CSV, dtype=str, keep_default_na=False, na_filter=False)


def find_files(folder: Path, image_id: str, extensions: tuple[str, ...]) -> list[Path]:
    """All files in ``folder`` named ``<image_id><ext>`` for an allowed extension.

    ``image_id`` must be a safe id (:mod:`cldlr.common.data.ids`; validation reports one that is
    not), and every candidate is checked to stay inside ``folder``, so no id reads elsewhere.
    """
    check_id(image_id, "image_id")
    if not folder.is_dir():
        return []
    found = []
    for ext in extensions:
        for name in dict.fromkeys((f"{image_id}{ext}", f"{image_id}{ext.upper()}")):
            contained_path(folder, name)
            if (folder / name).is_file():
                found.append(folder / name)
    return found


def image_path(root: str | Path, image_id: str) -> Path | None:
    """The image file of ``image_id``; ``None`` when there is none or more than one (validation names which)."""
    files = find_files(Path(root) / IMAGES_DIR, image_id, IMAGE_EXTS)
    return files[0] if len(files) == 1 else None


def mask_path(root: str | Path, image_id: str) -> Path | None:
    """The lesion mask of ``image_id``; ``None`` when there is none or more than one (validation names which)."""
    files = find_files(Path(root) / MASKS_DIR, image_id, MASK_EXTS)
    return files[0] if len(files) == 1 else None


@dataclass(frozen=True)
class SiteData:
    """A validated site: one row per image with parsed label, split, paths and clinical values.

    ``frame`` columns: ``image_id``, ``patient_id``, ``label`` (0/1; None in an unlabelled
    row), ``split`` ('' when the site has none), ``image_path``, ``mask_path``, ``spacing``
    (``(row_mm, column_mm)`` or None), then one column per schema parameter holding the parsed
    value (float for numeric/binary, str for categorical, NaN/None when missing).
    """

    root: Path
    schema: Schema
    frame: pd.DataFrame
    site_name: str = ""

    @property
    def name(self) -> str:
        """The site's name: given explicitly for virtual (partitioned) sites, else the folder name."""
        return self.site_name or self.root.name

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def labels(self) -> np.ndarray:
        """0 (benign) / 1 (malignant) per row, as int64 for metrics and stratified splits."""
        unlabelled = self.frame["label"].isna()
        if unlabelled.any():
            raise ContractError(f"site {self.name}: {int(unlabelled.sum())} row(s) have no label (first: "
                                f"{self.frame['image_id'][unlabelled].iloc[0]}); an unlabelled folder serves predict "
                                "only — add the biopsy result to every row to use it here")
        labels: np.ndarray = self.frame["label"].to_numpy(dtype=np.int64)
        return labels

    def subset(self, mask: np.ndarray | pd.Series) -> SiteData:
        """The same site restricted to the rows where ``mask`` is true, renumbered from 0."""
        return SiteData(self.root, self.schema, self.frame[np.asarray(mask)].reset_index(drop=True), self.site_name)

    def renamed(self, name: str) -> SiteData:
        """The same rows under another site name (a virtual site carved out of a pooled folder)."""
        return SiteData(self.root, self.schema, self.frame, name)

    def split_rows(self, split: str) -> SiteData:
        """The rows of one split (``train`` / ``test``; ``''`` when the site has no split column)."""
        return self.subset(self.frame["split"] == split)


def parse_frame(root: Path, schema: Schema, raw: pd.DataFrame) -> pd.DataFrame:
    """Turn the raw text table into typed columns (call only on a table that validated)."""
    frame = pd.DataFrame({
        "image_id": raw["image_id"].str.strip(),
        "patient_id": raw["patient_id"].str.strip(),
        "label": [parse_label(v) for v in raw["label"]] if "label" in raw.columns else [None] * len(raw),
        "split": raw["split"].str.strip().str.lower() if "split" in raw.columns else "",
    })
    frame["image_path"] = [str(image_path(root, i)) for i in frame["image_id"]]
    frame["mask_path"] = [str(mask_path(root, i)) for i in frame["image_id"]]
    frame["spacing"] = spacing_column(raw, frame["image_path"])
    for parameter in schema.parameters:  # a derived column a site left out is filled by the site reader
        cells = raw[parameter.name] if parameter.name in raw.columns else [None] * len(raw)
        frame[parameter.name] = [parameter.parse(v) for v in cells]
    return frame


def encode_clinical(frame: pd.DataFrame, parameters: tuple[Parameter, ...] | list[Parameter]) -> tuple[np.ndarray, list[str]]:
    """Numeric design matrix of the given parameters: numeric/binary as is, categories one-hot.

    Missing values stay NaN (for numeric/binary) or an all-NaN one-hot row, so the caller decides
    how to impute (with training-cohort statistics only).
    """
    columns: list[np.ndarray] = []
    names: list[str] = []
    for parameter in parameters:
        values = frame[parameter.name]
        if parameter.type == "categorical":
            for level, name in zip(parameter.levels, parameter.feature_names):
                col = np.array([np.nan if v is None or (isinstance(v, float) and np.isnan(v)) else float(v == level)
                                for v in values])
                columns.append(col)
                names.append(name)
        else:
            columns.append(pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64))
            names.append(parameter.name)
    if not columns:
        return np.zeros((len(frame), 0)), []
    return np.column_stack(columns), names


def site_folders(config: Config) -> list[Path]:
    """The site folders named by the config: ``federation.sites``, or ``data.root`` itself if it
    is a site, or every sub-folder of ``data.root`` that holds a ``clinical.csv``.
    """
    if config.federation.sites:
        return [Path(s) for s in config.federation.sites]
    if not config.data.root:
        raise ConfigError("data.root is not set: pass --set data.root=PATH (a site folder or a folder of sites)")
    root = Path(config.data.root)
    if (root / CLINICAL_CSV).is_file():
        return [root]
    found = sorted(p for p in root.iterdir() if (p / CLINICAL_CSV).is_file()) if root.is_dir() else []
    if not found:
        raise ConfigError(f"data.root {root} is neither a site folder (no {CLINICAL_CSV}) nor a folder of sites")
    return found


__all__ = [
    "CLINICAL_CSV", "IMAGES_DIR", "MASKS_DIR", "REQUIRED_COLUMNS", "LABEL_NAMES", "SPLITS",
    "SiteData", "encode_clinical", "file_ext", "find_files", "image_path", "mask_path",
    "parse_label", "read_clinical_csv", "site_folders",
]
