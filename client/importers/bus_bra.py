"""BUS-BRA (Gómez-Flores et al., Med. Phys. 2024) → site folders in the cldlr contract.

BUS-BRA records the scanner of every patient, and each patient was scanned on exactly one device,
so one site per device gives patient-disjoint, naturally non-IID "hospitals" (``sites="device"``);
``sites="single"`` keeps the whole selection as one site. The release has no patient record beyond
side, device and BI-RADS, so the clinical parameters are the lesion descriptors a radiologist reads
off the ROI (:mod:`cldlr.common.data.lesion`), computed here from the authors' masks. Device and BI-RADS
are kept as columns but marked ``model_input: false``: the device is the site's identity, not a
patient property, and BI-RADS defines the cohort.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from PIL import Image

from cldlr.common.data.contract import CLINICAL_CSV, IMAGES_DIR, MASKS_DIR, parse_label
from cldlr.common.data.descriptors import derive_from_mask
from cldlr.common.data.ids import ID_RULE, is_safe_id
from cldlr.common.data.imaging import read_mask
from cldlr.common.data.lesion import descriptor_parameters, schema_yaml
from cldlr.common.data.schema import schema_from_dict
from cldlr.common.data.splits import site_table
from cldlr.common.errors import CldlrError
from cldlr.common.io import atomic_directory, check_output_apart, contained_path

log = logging.getLogger(__name__)

CSV_NAME = "bus_data.csv"
REQUIRED_COLUMNS = ("ID", "Case", "Pathology", "BIRADS", "Device", "Side")
DEVICES = ("ge-logiq-5", "ge-logiq-7", "toshiba-aplio-300", "u-systems")
SIDES = ("left", "right", "single")
BIRADS = ("2", "3", "4", "5")
SINGLE_SITE = "bus-bra"
SCHEMA_COMMENT = """BUS-BRA imported by `cldlr import bus-bra` (written beside the sites as schema.yaml).
The release has no age or history: the parameters are the lesion descriptors read off the ROI mask.
device is the site's identity and birads defines the cohort: both are recorded, neither is a model input."""
BUS_BRA_PARAMETERS = [
    {"name": "side", "type": "categorical", "levels": list(SIDES), "missing": "impute",
     "description": "breast side; single = one view only"},
    {"name": "device", "type": "categorical", "levels": list(DEVICES), "missing": "error", "model_input": False,
     "description": "scanner (the site's identity, not a patient property)"},
    {"name": "birads", "type": "categorical", "levels": list(BIRADS), "missing": "error", "model_input": False,
     "description": "BI-RADS category: defines the cohort, never a model input"},
    *descriptor_parameters(),
]


def bus_bra_schema_yaml() -> str:
    """The schema written to ``OUT/schema.yaml``; ``configs/schema/bus-bra.yaml`` holds the same text."""
    return schema_yaml("bus-bra", BUS_BRA_PARAMETERS, SCHEMA_COMMENT)


def device_slug(device: str) -> str:
    """``GE Logiq 7 @10-14MHz`` → ``ge-logiq-7``: the scanner without its probe frequency."""
    name = re.sub(r"@.*$", "", str(device)).strip().lower()
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def format_number(value: float) -> str:
    """Integers without a decimal point, other values to 6 decimals (stable, readable CSV)."""
    return str(int(value)) if float(value).is_integer() else f"{value:.6f}".rstrip("0")


def read_table(src: Path) -> pd.DataFrame:
    """``bus_data.csv`` checked for the columns and values the import relies on."""
    path = src / CSV_NAME
    if not src.is_dir():
        raise CldlrError(f"BUS-BRA folder {src} does not exist; pass the folder holding {CSV_NAME}, Images/ and Masks/")
    if not path.is_file():
        raise CldlrError(f"{path} is missing: {src} does not look like the BUS-BRA release (expected {CSV_NAME}, "
                         "Images/, Masks/)")
    table = pd.read_csv(path, dtype=str, keep_default_na=False).apply(lambda c: c.str.strip())
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise CldlrError(f"{path}: column(s) {', '.join(missing)} missing (found: {', '.join(table.columns)}); "
                         f"the import needs {', '.join(REQUIRED_COLUMNS)}")
    for column, ok, expected in (
        ("ID", table["ID"].str.fullmatch(r"bus_\w+-\w+") & table["ID"].map(is_safe_id), f"bus_NNNN-x ({ID_RULE})"),
        ("Case", table["Case"].map(is_safe_id), f"a patient number ({ID_RULE})"),
        ("Pathology", table["Pathology"].map(parse_label).notna(), "benign or malignant"),
        ("BIRADS", table["BIRADS"].isin(BIRADS), "one of " + "/".join(BIRADS)),
        ("Side", table["Side"].isin(SIDES + ("",)), "one of " + "/".join(SIDES)),
        ("Device", table["Device"].map(device_slug).isin(DEVICES), "a known scanner (" + ", ".join(DEVICES) + ")"),
    ):
        bad = np.flatnonzero(~ok.to_numpy())
        if len(bad):
            row = int(bad[0])
            raise CldlrError(f"{path}, line {row + 2}, column {column}: {table[column].iat[row]!r} is not {expected} "
                             f"({len(bad)} such rows)")
    for column in ("Pathology", "Device"):
        per_case = table.groupby("Case")[column].nunique()
        if (per_case > 1).any():
            raise CldlrError(f"{path}: Case {per_case.index[per_case > 1][0]} has several {column} values; "
                             "one patient must have one pathology and one device")
    duplicated = table["ID"].duplicated()
    if duplicated.any():
        raise CldlrError(f"{path}: ID {table['ID'][duplicated].iat[0]!r} appears twice")
    return table


def select(table: pd.DataFrame, birads: list[int] | None) -> pd.DataFrame:
    """Rows of the requested BI-RADS categories (all when ``birads`` is empty)."""
    if not birads:
        return table
    wanted = {str(int(b)) for b in birads}
    unknown = wanted - set(BIRADS)
    if unknown:
        raise CldlrError(f"--birads {', '.join(sorted(unknown))}: BUS-BRA has BI-RADS {', '.join(BIRADS)} only")
    chosen = table[table["BIRADS"].isin(wanted)]
    if chosen.empty:
        raise CldlrError(f"no image has BI-RADS {', '.join(sorted(wanted))}")
    return chosen


def assign_sites(frame: pd.DataFrame, sites: str, min_site_patients: int, small_sites: str) -> tuple[pd.Series, list[str]]:
    """Site name of every row, and one note per site merged or dropped for being small (site '' = dropped)."""
    if sites == "single":
        return pd.Series(SINGLE_SITE, index=frame.index), []
    if sites != "device":
        raise CldlrError(f"sites must be 'device' or 'single', got {sites!r}")
    if small_sites not in ("merge", "drop"):
        raise CldlrError(f"small_sites must be 'merge' or 'drop', got {small_sites!r}")
    site = frame["device"].copy()
    patients = frame.groupby("device")["patient_id"].nunique().sort_index()
    largest = patients.idxmax()  # ties: the first name in alphabetical order, reproducible
    notes = []
    for device, count in patients.items():
        if device == largest or count >= min_site_patients:
            continue
        fate = f"merged into {largest}" if small_sites == "merge" else "dropped"
        note = f"{device}: {count} patients < --min-site-patients {min_site_patients}, {fate}"
        log.warning("BUS-BRA site %s", note)
        notes.append(note)
        site[frame["device"] == device] = largest if small_sites == "merge" else ""
    return site, notes


def import_bus_bra(src: str | Path, out: str | Path, *, birads: list[int] | None = None,
                   sites: Literal["device", "single"] = "device", min_site_patients: int = 20,
                   small_sites: Literal["merge", "drop"] = "merge", force: bool = False) -> str:
    """Write one site folder per device (or one ``bus-bra`` site) plus ``schema.yaml`` under ``out``.

    Images and masks are copied as PNG under ``<image_id>.png``; the output appears whole or not at
    all, and an existing ``out`` is kept unless ``force``. Returns the per-site summary.
    """
    src, out = Path(src), Path(out)
    check_output_apart(out, [src])
    if out.exists() and not force:
        raise CldlrError(f"{out} already exists; choose another folder or pass --force to replace it")
    table = select(read_table(src), birads)
    frame = pd.DataFrame({
        "image_id": table["ID"], "patient_id": table["Case"],
        "label": table["Pathology"].str.lower(), "side": table["Side"],
        "device": table["Device"].map(device_slug), "birads": table["BIRADS"],
    })
    frame["site"], notes = assign_sites(frame, sites, min_site_patients, small_sites)
    frame = frame[frame["site"] != ""]

    sources = {}
    descriptors = []
    derived = schema_from_dict({"name": "bus-bra", "version": 1, "parameters": BUS_BRA_PARAMETERS}).derived_parameters
    for image_id in frame["image_id"]:
        image = src / "Images" / f"{image_id}.png"
        mask = src / "Masks" / f"{image_id.replace('bus_', 'mask_', 1)}.png"
        for path in (image, mask):
            if not path.is_file():
                raise CldlrError(f"{path} is missing ({CSV_NAME} lists image {image_id})")
        lesion = read_mask(mask)
        with Image.open(image) as img:
            if img.size != (lesion.shape[1], lesion.shape[0]):
                raise CldlrError(f"{mask}: {lesion.shape[1]}x{lesion.shape[0]} px but its image {image} is "
                                 f"{img.size[0]}x{img.size[1]} px")
        try:
            descriptors.append(derive_from_mask(derived, lesion, None))  # what validate and predict compute
        except ValueError as exc:
            raise CldlrError(f"{mask}: {exc}") from exc
        sources[image_id] = (image, mask)
    for parameter in derived:
        frame[parameter.name] = [format_number(d[parameter.name]) for d in descriptors]

    with atomic_directory(out, overwrite=force) as tmp:
        for site, rows in frame.groupby("site", sort=True):
            root = tmp / site
            (root / IMAGES_DIR).mkdir(parents=True)
            (root / MASKS_DIR).mkdir()
            for image_id in rows["image_id"]:
                image, mask = sources[image_id]
                shutil.copyfile(image, contained_path(root / IMAGES_DIR, f"{image_id}.png"))
                shutil.copyfile(mask, contained_path(root / MASKS_DIR, f"{image_id}.png"))
            csv = rows.drop(columns="site").to_csv(index=False, lineterminator="\n")
            (root / CLINICAL_CSV).write_text(csv, encoding="utf-8")
            log.info("BUS-BRA site %s: %d images", site, len(rows))
        (tmp / "schema.yaml").write_text(bus_bra_schema_yaml(), encoding="utf-8")

    counts = frame.assign(label=frame["label"].map(parse_label))
    chosen = ", ".join(map(str, sorted(set(birads)))) if birads else "all"
    lines = [f"BUS-BRA → {out}: BI-RADS {chosen}, sites by {sites}; {len(frame)} images of "
             f"{frame['patient_id'].nunique()} patients", site_table(counts, "site")]
    lines += [f"small site {note}" for note in notes]
    if sites == "device":
        lines.append("device column = the scanner (kept for merged sites); sites are patient-disjoint")
    lines.append(f"schema: {out / 'schema.yaml'}")
    return "\n".join(lines)


__all__ = ["BUS_BRA_PARAMETERS", "bus_bra_schema_yaml", "device_slug", "import_bus_bra"]
