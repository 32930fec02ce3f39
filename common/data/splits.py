"""Patient-level train/test splits and patient-disjoint virtual sites (by column, IID or Dirichlet).

Every function works on patients, never on images: a patient's images always land on the same
side of a split and in the same site, so no lesion leaks between training and evaluation.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from cldlr.common.data.contract import CLINICAL_CSV, IMAGES_DIR, LABEL_NAMES, MASKS_DIR, SPLITS, SiteData, read_clinical_csv
from cldlr.common.data.schema import Schema
from cldlr.common.data.site import read_site
from cldlr.common.errors import CldlrError
from cldlr.common.io import atomic_directory, atomic_write_text, check_output_apart, contained_path

log = logging.getLogger(__name__)

_MAX_DRAWS = 1000


def _patient_labels(frame: pd.DataFrame) -> pd.Series:
    """One label per patient (validation guarantees a patient's images agree; malignant wins otherwise)."""
    return frame.groupby("patient_id", sort=True)["label"].max().astype(int)


def patient_split(frame: pd.DataFrame, *, test_fraction: float = 0.3, seed: int = 0) -> pd.Series:
    """``'train'``/``'test'`` per row, drawn over patients and stratified by the patient's label."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    labels = _patient_labels(frame)
    counts = labels.value_counts()
    small = {LABEL_NAMES[c]: int(n) for c, n in counts.items() if n < 2}
    if small:
        raise CldlrError(f"cannot stratify the split: class(es) {small} have fewer than 2 patients; "
                         "add patients of that class or give the split column by hand")
    try:
        _, test = train_test_split(labels.index.to_numpy(), test_size=test_fraction, random_state=seed,
                                   stratify=labels.to_numpy())
    except ValueError as exc:
        raise CldlrError(f"cannot split {len(labels)} patients ({counts.to_dict()} per class) with "
                         f"test_fraction={test_fraction}: {exc}") from exc
    return pd.Series(np.where(frame["patient_id"].isin(set(test)), "test", "train"), index=frame.index, name="split")


def with_split(site: SiteData, *, test_fraction: float = 0.3, seed: int = 0, use_existing: bool = True) -> SiteData:
    """The site with a train/test split: its own ``split`` column if given (and wanted), else a drawn one."""
    given = site.frame["split"].astype(str).str.strip().str.lower()
    if use_existing and (given != "").any():
        if not given.isin(SPLITS).all():
            bad = given[~given.isin(SPLITS)]
            raise CldlrError(f"site {site.root}: split column has {len(bad)} rows that are not train/test "
                             f"(first: image_id {site.frame['image_id'].iat[bad.index[0]]!r}); fix or remove the column")
        log.info("site %s: using its own split (%d train, %d test images)", site.name,
                 int((given == "train").sum()), int((given == "test").sum()))
        return site
    split = patient_split(site.frame, test_fraction=test_fraction, seed=seed)
    return dataclasses.replace(site, frame=site.frame.assign(split=split.to_numpy()))


def site_table(frame: pd.DataFrame, site_column: str) -> str:
    """Patients and images per class for each value of ``site_column`` (plus a total row)."""
    rows = {}
    for name, group in list(frame.groupby(site_column, sort=True)) + [("total", frame)]:
        patients = _patient_labels(group)
        rows[name] = {
            "benign patients": int((patients == 0).sum()), "malignant patients": int((patients == 1).sum()),
            "benign images": int((group["label"] == 0).sum()), "malignant images": int((group["label"] == 1).sum()),
        }
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = site_column
    text: str = table.to_string()
    return text


def _site_name(value: object) -> str:
    """A value of the partition column as a safe folder name (``Toshiba Aplio`` → ``Toshiba_Aplio``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(value).strip()).strip("._") or "site"


def _by_column(frame: pd.DataFrame, column: str) -> pd.Series:
    if column not in frame.columns:
        raise CldlrError(f"partition column {column!r} is missing (columns: {', '.join(map(str, frame.columns))})")
    values = frame[column].astype(str).str.strip()
    empty = (frame[column].isna() | (values == "")).to_numpy()
    if empty.any():
        first = frame["image_id"].iat[int(np.flatnonzero(empty)[0])]
        raise CldlrError(f"partition column {column!r} is empty for {int(empty.sum())} rows (first: image_id {first!r}); "
                         "fill it in or partition by iid/dirichlet")
    per_patient = values.groupby(frame["patient_id"]).unique()
    mixed = per_patient[per_patient.map(len) > 1]
    if len(mixed):
        raise CldlrError(f"patient {mixed.index[0]!r} has several {column} values {list(mixed.iat[0])}: sites would share a "
                         f"patient ({len(mixed)} such patients); fix the column or partition by iid/dirichlet")
    names = {v: _site_name(v) for v in values.unique()}
    if len(set(names.values())) < len(names):
        raise CldlrError(f"values of {column!r} collide as folder names: {names}")
    return values.map(names)


def _check_sites(num_sites: int, n_patients: int) -> None:
    if not 1 <= num_sites <= n_patients:
        raise CldlrError(f"num_sites must be between 1 and the number of patients ({n_patients}), got {num_sites}")


def _iid(labels: pd.Series, num_sites: int, rng: np.random.Generator) -> dict[str, int]:
    """Shuffle each class, then deal the concatenated list round-robin: near-equal and stratified."""
    order = np.concatenate([rng.permutation(labels.index[labels == c].to_numpy()) for c in sorted(labels.unique())])
    return {patient: i % num_sites for i, patient in enumerate(order)}


def _dirichlet(labels: pd.Series, num_sites: int, alpha: float, rng: np.random.Generator) -> dict[str, int]:
    """Per class, patient shares per site drawn from Dir(α); redrawn until no site is empty."""
    if not alpha > 0:
        raise CldlrError(f"Dirichlet alpha must be > 0, got {alpha}")
    classes = sorted(labels.unique())
    for _ in range(_MAX_DRAWS):
        assignment: dict[str, int] = {}
        for c in classes:
            patients = rng.permutation(labels.index[labels == c].to_numpy())
            shares = rng.dirichlet(np.full(num_sites, alpha))
            cuts = np.round(np.cumsum(shares)[:-1] * len(patients)).astype(int)
            for site, chunk in enumerate(np.split(patients, cuts)):
                assignment.update(dict.fromkeys(chunk.tolist(), site))
        if len(set(assignment.values())) == num_sites:
            return assignment
    # Not one of the draws filled every site: give each empty site one patient of the largest site.
    log.warning("no Dirichlet(%.3g) draw in %d filled all %d sites; moving patients into the empty ones",
                alpha, _MAX_DRAWS, num_sites)
    for site in range(num_sites):
        if site not in assignment.values():
            sizes = pd.Series(assignment).value_counts()
            donor = next(p for p, s in assignment.items() if s == sizes.index[0])
            assignment[donor] = site
    return assignment


def partition(frame: pd.DataFrame, *, by: Literal["column", "iid", "dirichlet"] = "column", column: str = "device",
              num_sites: int = 3, alpha: float = 0.5, seed: int = 0) -> pd.Series:
    """Site name per row; patient-disjoint in every mode.

    ``column``: one site per value of ``column``; ``iid``: patients shuffled into ``num_sites``
    near-equal, label-stratified groups; ``dirichlet``: label skew, per class Dir(α) shares (small
    α → each site dominated by one class). Seeded and deterministic.
    """
    if by == "column":
        return _by_column(frame, column).rename("site")
    labels = _patient_labels(frame)
    _check_sites(num_sites, len(labels))
    rng = np.random.default_rng(seed)
    if by == "iid":
        assignment = _iid(labels, num_sites, rng)
    elif by == "dirichlet":
        assignment = _dirichlet(labels, num_sites, alpha, rng)
    else:
        raise CldlrError(f"unknown partition mode {by!r}; use column, iid or dirichlet")
    width = len(str(num_sites))
    return frame["patient_id"].map(lambda p: f"site{assignment[p] + 1:0{width}d}").rename("site")


def _write_site(dest: Path, raw: pd.DataFrame, frame: pd.DataFrame) -> None:
    """Copy the image/mask files of ``frame``'s rows into ``dest`` and write their ``clinical.csv`` rows."""
    for folder in (IMAGES_DIR, MASKS_DIR):
        (dest / folder).mkdir(parents=True, exist_ok=True)
    for image, mask in zip(frame["image_path"], frame["mask_path"]):
        shutil.copy2(image, contained_path(dest / IMAGES_DIR, Path(image).name))
        shutil.copy2(mask, contained_path(dest / MASKS_DIR, Path(mask).name))
    atomic_write_text(dest / CLINICAL_CSV, raw.to_csv(index=False))


def _read(site_root: str | Path, schema: Schema) -> tuple[SiteData, pd.DataFrame]:
    """The validated site and its raw text table (same rows, same order)."""
    site = read_site(site_root, schema)
    raw = read_clinical_csv(site_root)
    if len(raw) != len(site):
        raise CldlrError(f"{Path(site_root) / CLINICAL_CSV} changed while it was read; run again")
    return site, raw


def split_site(site_root: str | Path, out: str | Path, schema: Schema, *, test_fraction: float = 0.3,
               seed: int = 0, force: bool = False) -> str:
    """Copy a site to ``out`` with a drawn patient-level ``split`` column; return the split table.

    The source is never modified; ``out`` appears complete (and re-validated) or not at all.
    """
    source, out = Path(site_root), Path(out)
    check_output_apart(out, [source])
    site, raw = _read(source, schema)
    split = patient_split(site.frame, test_fraction=test_fraction, seed=seed)
    raw = raw.assign(split=split.to_numpy())
    with atomic_directory(out, overwrite=force) as tmp:
        _write_site(tmp, raw, site.frame)
        read_site(tmp, schema)
    log.info("wrote %s (%d images, test_fraction=%s, seed=%d)", out, len(raw), test_fraction, seed)
    return site_table(site.frame.assign(split=split.to_numpy()), "split")


def partition_site(site_root: str | Path, out: str | Path, schema: Schema, *,
                   by: Literal["column", "iid", "dirichlet"] = "column", column: str = "device", num_sites: int = 3,
                   alpha: float = 0.5, seed: int = 0, force: bool = False) -> str:
    """Write ``out/<site>/`` folders, each a valid site holding its patients' rows; return the sites table."""
    source, out = Path(site_root), Path(out)
    check_output_apart(out, [source])
    site, raw = _read(source, schema)
    if by == "column" and column not in raw.columns:
        raise CldlrError(f"partition column {column!r} is not in {source / CLINICAL_CSV} (columns: "
                         f"{', '.join(raw.columns)}); add it, pass --column, or use --by iid/dirichlet")
    frame = site.frame.copy()
    for name in raw.columns:  # columns outside the schema (e.g. device) are partition keys too
        if name not in frame.columns:
            frame[name] = raw[name].to_numpy()
    sites = partition(frame, by=by, column=column, num_sites=num_sites, alpha=alpha, seed=seed)
    with atomic_directory(out, overwrite=force) as tmp:
        for name in sorted(sites.unique()):
            rows = (sites == name).to_numpy()
            folder = contained_path(tmp, name)
            _write_site(folder, raw[rows], site.frame[rows])
            read_site(folder, schema)
    log.info("wrote %d sites to %s (by=%s)", sites.nunique(), out, by)
    return site_table(frame.assign(site=sites.to_numpy()), "site")


__all__ = ["partition", "partition_site", "patient_split", "site_table", "split_site", "with_split"]
