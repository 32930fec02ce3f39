"""Check a site folder against the data contract and the federation schema, reporting every problem.

A hospital runs ``cldlr validate SITE --schema S`` before joining a federation: the folder is read
once, never written, and *all* problems are listed with their file, CSV line, column and fix, so
one pass is enough to repair a site.

A folder serves different commands depending on what it holds: a study (and ``cldlr evaluate``,
the reader study) needs a label in every row, ``cldlr predict`` does not — a clinic scores new,
unbiopsied lesions. ``purpose`` says which the caller needs: ``study`` (labels required, the
default), ``predict`` (labels and splits optional) or ``any`` (``cldlr validate``: a missing
label is a warning, and :attr:`ValidationReport.serves` says which commands the folder serves).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from tqdm import tqdm

from cldlr.common.data.columns import ColumnMapError, apply_column_map
from cldlr.common.data.contract import (
    CLINICAL_CSV,
    IMAGES_DIR,
    MASKS_DIR,
    REQUIRED_COLUMNS,
    SPLITS,
    find_files,
    parse_label,
    read_clinical_csv,
)
from cldlr.common.data.descriptors import derived_problems
from cldlr.common.data.ids import id_error, is_safe_id
from cldlr.common.data.imaging import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_EXTS,
    MASK_EXTS,
    ImageTooLargeError,
    NonFiniteImageError,
    file_ext,
    read_image,
    read_raw,
)
from cldlr.common.data.schema import RESERVED_COLUMNS, Parameter, Schema
from cldlr.common.data.units import SPACING_COLUMN, parse_spacing
from cldlr.common.data.validation_report import LABELLED_COMMANDS, Problem, Severity, ValidationReport
from cldlr.common.errors import ImageReadError

log = logging.getLogger(__name__)

Purpose = Literal["study", "predict", "any"]
LOSSY_EXTS = (".jpg", ".jpeg")
ID_FIX = "rename it in clinical.csv (and the files of an image_id in images/ and masks/) to follow the rule"


class _Checker:
    """Walks one site and collects problems (state, so that every check can add to the same list)."""

    def __init__(self, root: Path, schema: Schema, purpose: Purpose = "study",
                 columns: dict[str, str] | None = None, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.root, self.schema, self.purpose, self.columns = root, schema, purpose, columns
        self.max_pixels = max_image_pixels
        self.report = ValidationReport(site=str(root))
        self.records: dict[str, dict[str, str]] = {}  # first row of each image id (derived checks need it)
        # each image file once: by resolved path (an error) and by content (a warning) -> (image_id, line)
        self.image_files: dict[Path, tuple[str, int]] = {}
        self.image_digests: dict[str, tuple[str, int]] = {}

    def add(self, code: str, severity: Severity, message: str, fix: str, file: str | None = None,
            row: int | None = None, column: str | None = None) -> None:
        message = " ".join(message.split())  # decoders' messages span lines; a problem is one line
        self.report.problems.append(Problem(code, severity, message, fix, file, row, column))

    def cell(self, code: str, message: str, fix: str, row: int, column: str, severity: Severity = "error") -> None:
        """A problem located in clinical.csv (row 1 is the header)."""
        self.add(code, severity, message, fix, CLINICAL_CSV, row, column)

    def labelled_only(self, code: str, reason: str, message: str, fix: str, row: int, column: str) -> None:
        """A problem that keeps the folder out of studies but not out of ``predict``.

        ``study``: an error (as every study needs it); ``any``: one warning per ``code`` and the
        folder serves predict only; ``predict``: nothing to report.
        """
        if self.purpose == "study":
            self.cell(code, message, fix, row, column)
            return
        if reason not in self.report.predict_only:
            self.report.predict_only.append(reason)
            if self.purpose == "any":
                self.cell(code, f"{message}: the folder serves predict only", fix, row, column, "warning")

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    # --- clinical.csv -------------------------------------------------------------------------
    def read_table(self) -> pd.DataFrame | None:
        if not self.root.is_dir():
            self.add("site-missing", "error", f"site folder {self.root} does not exist or is not a folder",
                     "pass the path of a site folder that holds clinical.csv, images/ and masks/")
            return None
        if not (self.root / CLINICAL_CSV).is_file():
            self.add("clinical-missing", "error", f"{CLINICAL_CSV} is missing from {self.root}",
                     "write clinical.csv: image_id, patient_id, label and the schema's parameters", CLINICAL_CSV)
            return None
        try:
            table = read_clinical_csv(self.root).fillna("")  # short rows come back as NaN
            return apply_column_map(table, self.columns, CLINICAL_CSV)
        except ColumnMapError as exc:
            self.add("column-map", "error", str(exc), "fix the --map SITE_COLUMN=SCHEMA_NAME arguments", CLINICAL_CSV)
            return None
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
            line = re.search(r"\bline (\d+)", str(exc))
            self.add("csv-unreadable", "error", f"cannot be read as CSV ({type(exc).__name__}: {exc})",
                     "save it as UTF-8, comma-separated, one header line, the same number of fields in every row",
                     CLINICAL_CSV, int(line.group(1)) if line else None)
            return None

    def check_header(self, table: pd.DataFrame) -> set[str]:
        """A name twice in the header is an error (pandas would rename the second ``age.1``); returns those names."""
        try:
            with open(self.root / CLINICAL_CSV, encoding="utf-8-sig", newline="") as handle:
                header = next(csv.reader(handle), [])
        except (OSError, UnicodeDecodeError, csv.Error):
            return set()  # pandas read it: nothing more to say about its header here
        positions: dict[str, list[int]] = defaultdict(list)
        for index, name in enumerate(header, start=1):
            positions[name].append(index)
        for name, where in positions.items():
            if len(where) > 1:
                self.cell("duplicate-column", f"column {name!r} appears {len(where)} times in the header (fields "
                          f"{', '.join(map(str, where))}); only the first would be read",
                          "keep one column of that name (merge or rename the others)", 1, name)
        return {str(c) for c in table.columns} - set(header)  # the renamed copies

    def check_columns(self, table: pd.DataFrame) -> None:
        renamed = self.check_header(table)
        for name in REQUIRED_COLUMNS:
            if name == "label" and name not in table.columns:
                self.labelled_only("missing-column", "unlabelled", f"required column {name!r} is missing from the "
                                   "header", "add a column named 'label' (benign/malignant) to use it in a study",
                                   1, name)
            elif name not in table.columns:
                self.cell("missing-column", f"required column {name!r} is missing from the header",
                          f"add a column named {name!r} (exact spelling, lower case)", 1, name)
        mapped = " or --map SITE_COLUMN={} if the site calls it otherwise" if self.purpose == "predict" else ""
        for parameter in self.schema.parameters:
            if parameter.name not in table.columns and parameter.derived:
                continue  # computed from the mask (check_derived)
            if parameter.name not in table.columns and mapped:
                self.cell("missing-parameter-column", f"column {parameter.name!r}, an input of the model, is missing "
                          "from the header", f"add a column {parameter.name!r}{mapped.format(parameter.name)}", 1,
                          parameter.name)
            elif parameter.name not in table.columns:
                self.cell("missing-parameter-column", f"column {parameter.name!r} of schema {self.schema.name!r} "
                          "is missing from the header", f"add a column {parameter.name!r} (cells may be empty only "
                          "when its policy is missing: impute)", 1, parameter.name)
        declared = {p.name for p in self.schema.parameters} | RESERVED_COLUMNS
        for name in table.columns:
            if name in renamed:
                continue
            if name not in declared and mapped:
                self.cell("unused-column", f"column {name!r} is not an input of the model: ignored",
                          "nothing to do (or drop it from the folder)", 1, name, "warning")
            elif name not in declared:
                self.cell("unused-column", f"column {name!r} is not in schema {self.schema.name!r}: ignored by models",
                          "remove it, or ask the federation to add it to the schema", 1, name, "warning")
        if table.empty:
            self.add("no-rows", "error", "header but no data rows", "add one row per image", CLINICAL_CSV)

    def check_rows(self, table: pd.DataFrame) -> list[tuple[str, int]]:
        """Per-cell checks; returns (image_id, line) of each distinct non-empty image id, in order."""
        first_line: dict[str, int] = {}
        for line, record in enumerate(table.to_dict("records"), start=2):
            image_id = record.get("image_id", "-").strip()
            if not image_id:
                self.cell("empty-image-id", "image_id is empty",
                          "give every row the file name (without extension) of its image in images/", line, "image_id")
            elif "image_id" in record and not is_safe_id(image_id):  # never looked up as a file
                self.cell("unsafe-id", id_error("image_id", image_id), ID_FIX, line, "image_id")
            elif image_id in first_line:
                self.cell("duplicate-image-id", f"image_id {image_id!r} already on line {first_line[image_id]}",
                          "keep one row per image (remove or rename the duplicate)", line, "image_id")
            elif "image_id" in record:
                first_line[image_id] = line
            patient_id = record.get("patient_id", "-").strip()
            if not patient_id:
                self.cell("empty-patient-id", "patient_id is empty",
                          "give every row its (pseudonymised) patient id, shared by the patient's images", line,
                          "patient_id")
            elif "patient_id" in record and not is_safe_id(patient_id):
                self.cell("unsafe-id", id_error("patient_id", patient_id), ID_FIX, line, "patient_id")
            if "image_id" in record and image_id and is_safe_id(image_id):
                self.records.setdefault(image_id, record)
            label = record.get("label", "")
            if not label.strip():
                self.report.n_unlabelled += 1
                if "label" in record:
                    self.labelled_only("unknown-label", "rows without label", f"label {label!r} is not benign, "
                                       "malignant, 0 or 1", "write the biopsy result as benign or malignant", line,
                                       "label")
            elif parse_label(label) is None:
                self.cell("unknown-label", f"label {record['label']!r} is not benign, malignant, 0 or 1",
                          "write the biopsy result as benign or malignant", line, "label")
            if SPACING_COLUMN in record:
                try:
                    parse_spacing(record[SPACING_COLUMN])
                except ValueError as exc:
                    self.cell("invalid-spacing", f"{SPACING_COLUMN}: {exc}", "write the pixel spacing in mm (0.1), "
                              "or ROWxCOLUMN (0.1x0.12), or leave it empty when unknown", line, SPACING_COLUMN)
            split = record.get("split", "train").strip().lower()
            if not split:
                self.labelled_only("missing-split", "rows without split", "split is empty although the site has a "
                                   "split column", "write train or test in every row, or remove the split column",
                                   line, "split")
            elif split not in SPLITS:
                self.cell("unknown-split", f"split {record['split']!r} is not train or test", "write train or test",
                          line, "split")
            for parameter in self.schema.parameters:
                if parameter.name in record:
                    self.check_value(parameter, record[parameter.name], line)
        return list(first_line.items())

    def check_value(self, parameter: Parameter, raw: str, line: int) -> None:
        try:
            value = parameter.parse(raw)
        except ValueError as exc:  # parse's message is the reason
            if parameter.type == "numeric" and parameter.range is not None and _is_finite_number(raw):
                low, high = parameter.range
                self.cell("out-of-range", f"{parameter.name}: {exc}", f"correct the value (valid: {low:g} to {high:g}"
                          f"{' ' + parameter.unit if parameter.unit else ''})", line, parameter.name)
            else:
                self.cell("invalid-value", f"{parameter.name}: {exc}", _expected(parameter), line, parameter.name)
            return
        if value is None and parameter.missing == "error" and not parameter.derived:
            self.cell("missing-value", f"{parameter.name} is empty and schema {self.schema.name!r} says missing: error",
                      f"fill in {parameter.name}, or agree on missing: impute for it in the schema", line,
                      parameter.name)

    def check_patients(self, table: pd.DataFrame) -> None:
        """One patient, one label and one split (a patient in both splits leaks into the test set)."""
        if "patient_id" not in table.columns:
            return
        groups: dict[str, list[int]] = defaultdict(list)
        for index, patient in enumerate(table["patient_id"].str.strip()):
            if patient:
                groups[patient].append(index)
        self.report.n_patients = len(groups)
        for patient, rows in groups.items():
            for column, parse, code, what, fix in (
                ("label", parse_label, "patient-label-conflict", "images with different labels",
                 "check the biopsy results (distinct lesions of one patient need distinct patient ids)"),
                ("split", _parse_split, "patient-split-leak", "images in both train and test",
                 "put all images of a patient in one split (cldlr split does this)"),
            ):
                if column not in table.columns:
                    continue
                values = {i + 2: (table[column].iat[i].strip(), parse(table[column].iat[i])) for i in rows}
                if len({v for _, v in values.values() if v is not None}) > 1:
                    listing = ", ".join(f"line {line}: {text}" for line, (text, v) in values.items() if v is not None)
                    self.cell(code, f"patient {patient!r} has {what} ({listing})", fix, rows[0] + 2, column)

    # --- images and masks ---------------------------------------------------------------------
    def present_folders(self) -> set[str]:
        """images/ and masks/ that exist; a missing folder is one problem, not one per row."""
        present = set()
        for folder in (IMAGES_DIR, MASKS_DIR):
            if (self.root / folder).is_dir():
                present.add(folder)
            else:
                self.add(f"{folder}-folder-missing", "error", f"folder {folder}/ is missing from {self.root}",
                         f"put one file per image_id in {folder}/, named <image_id>.<ext>", f"{folder}/")
        return present

    def one_file(self, folder: str, image_id: str, line: int, exts: tuple[str, ...]) -> Path | None:
        """The single file of ``image_id`` in ``folder``; none or several is a problem."""
        kind = "image" if folder == IMAGES_DIR else "mask"
        files = find_files(self.root / folder, image_id, exts)
        if len(files) == 1:
            return files[0]
        if not files:
            others = sorted(p.name for p in (self.root / folder).glob(f"{image_id}.*"))
            hint = f" (found {', '.join(others)}: unsupported type)" if others else ""
            self.add(f"{kind}-missing", "error", f"no {kind} file for image_id {image_id!r}{hint}",
                     f"add {folder}/{image_id}<ext> (ext: {' '.join(exts)}), or remove the row",
                     f"{folder}/{image_id}.*", line, "image_id")
        else:
            self.add(f"{kind}-ambiguous", "error", f"several {kind} files for image_id {image_id!r}: "
                     + ", ".join(self.rel(p) for p in files), "keep exactly one file per image_id",
                     self.rel(files[0]), line, "image_id")
        return None

    def check_same_file(self, image_id: str, line: int, path: Path) -> None:
        """One image file under two ids (``x`` and ``./x``, a symlink, a copy) could sit in train and test."""
        where = (self.rel(path), line, "image_id")
        resolved = path.resolve()
        if (first := self.image_files.setdefault(resolved, (image_id, line))) != (image_id, line):
            self.add("image-same-file", "error", f"image_id {image_id!r} (line {line}) and image_id {first[0]!r} "
                     f"(line {first[1]}) are the same file {resolved}", "give each row its own image file (one "
                     "image under two ids can land in both train and test)", *where)
            return
        try:
            with path.open("rb") as handle:
                digest = hashlib.file_digest(handle, "sha256").hexdigest()
        except OSError:
            return  # reading it fails again below, with its own problem
        if (first := self.image_digests.setdefault(digest, (image_id, line))) != (image_id, line):
            self.add("image-same-content", "warning", f"image_id {image_id!r} (line {line}) has the same bytes as "
                     f"image_id {first[0]!r} (line {first[1]})", "remove the duplicate, or check the export did "
                     "not write one image twice (a copy in train and test inflates the test results)", *where)

    def read_problem(self, kind: str, exc: ImageReadError, where: tuple[str, int, str]) -> None:
        """An image or mask that cannot be used: too large by its header, non-finite pixels, or undecodable."""
        if isinstance(exc, ImageTooLargeError):
            self.add(f"{kind}-too-large", "error", f"{kind} is too large: {exc}", "crop or downscale it, or raise "
                     "data.max_image_pixels (cldlr validate --max-image-pixels; a site policy's max_image_pixels)",
                     *where)
        elif isinstance(exc, NonFiniteImageError):
            self.add(f"{kind}-not-finite", "error", f"{kind} has non-finite pixels: {exc}",
                     "re-export it with finite values (or as an integer PNG)", *where)
        elif kind == "image":
            self.add("image-unreadable", "error", f"image cannot be read: {exc}",
                     "re-export the image as PNG (8- or 16-bit) or DICOM", *where)
        else:
            self.add("mask-unreadable", "error", f"mask cannot be read: {exc}",
                     "re-export the mask as a 2-D PNG, NIfTI or NRRD", *where)

    def check_image(self, image_id: str, line: int, folders: set[str]) -> None:
        shape = None
        path = self.one_file(IMAGES_DIR, image_id, line, IMAGE_EXTS) if IMAGES_DIR in folders else None
        if path is not None:
            self.check_same_file(image_id, line, path)
            try:
                shape = read_image(path, max_pixels=self.max_pixels).shape
            except ImageReadError as exc:
                self.read_problem("image", exc, (self.rel(path), line, "image_id"))
        path = self.one_file(MASKS_DIR, image_id, line, MASK_EXTS) if MASKS_DIR in folders else None
        if path is None:
            return
        where = (self.rel(path), line, "image_id")
        try:
            raw = read_raw(path, max_pixels=self.max_pixels)  # raw values: read_mask's bool would hide a non-binary mask
        except ImageReadError as exc:
            self.read_problem("mask", exc, where)
            return
        values = np.unique(raw)
        if not np.any(values != 0):
            self.add("mask-empty", "error", "mask has no lesion pixel (all zero)",
                     "delineate the lesion (nonzero = lesion), or remove the row", *where)
        elif raw.ndim == 2:
            self.check_derived(image_id, line, raw != 0)
        if shape is not None and raw.shape != shape:
            self.add("mask-size-mismatch", "error", f"mask is {raw.shape[1]}x{raw.shape[0]} px, its image "
                     f"{shape[1]}x{shape[0]} px", "export the mask from this image, at the same size", *where)
        if len(values) > 2:
            lossy = file_ext(path) in LOSSY_EXTS
            note = " (JPEG compression; every nonzero pixel counts as lesion)" if lossy else ""
            self.add("mask-not-binary", "warning" if lossy else "error", f"mask has {len(values)} distinct values, "
                     f"not 2{note}", "save the mask losslessly (PNG/NIfTI/NRRD), 0 = background, one lesion value",
                     *where)

    def check_derived(self, image_id: str, line: int, mask: np.ndarray) -> None:
        """Descriptors computed from the mask: missing ones must be computable, recorded ones should agree."""
        if not self.schema.derived_parameters:
            return
        files = find_files(self.root / IMAGES_DIR, image_id, IMAGE_EXTS)
        record = self.records.get(image_id, {})
        for code, severity, message, fix, column in derived_problems(self.schema, record, mask,
                                                                     files[0] if len(files) == 1 else None):
            self.cell(code, message, fix, line, column, severity)

    def check_orphans(self, ids: set[str]) -> None:
        """Files no row references: harmless to models, but often a typo in an image_id."""
        for folder, exts in ((IMAGES_DIR, IMAGE_EXTS), (MASKS_DIR, MASK_EXTS)):
            directory = self.root / folder
            for path in sorted(directory.iterdir()) if directory.is_dir() else ():
                ext = file_ext(path)
                if path.name.startswith(".") or not path.is_file():
                    continue
                if path.name[: len(path.name) - len(ext)] not in ids or ext not in exts:
                    self.add("orphan-file", "warning", f"{self.rel(path)} is not referenced by any row of "
                             f"{CLINICAL_CSV}", "add a row for it, or move it out of the site folder", self.rel(path))


def _parse_split(raw: str) -> str | None:
    split = str(raw).strip().lower()
    return split if split in SPLITS else None


def _is_finite_number(raw: str) -> bool:
    try:
        return bool(np.isfinite(float(str(raw).strip())))
    except ValueError:
        return False


def _expected(parameter: Parameter) -> str:
    """What a valid cell of ``parameter`` looks like (the fix of an invalid value)."""
    empty = ", or leave it empty" if parameter.missing == "impute" else ""
    if parameter.type == "numeric":
        return f"write a plain number{' in ' + parameter.unit if parameter.unit else ''} (no unit){empty}"
    if parameter.type == "binary":
        return f"write 0/1, yes/no or true/false{empty}"
    return f"write one of {', '.join(parameter.levels)} (exact spelling){empty}"


def validate_site(root: str | Path, schema: Schema, *, purpose: Purpose = "study",
                  columns: dict[str, str] | None = None,
                  max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ValidationReport:
    """Check ``root`` against the contract and ``schema``; read-only, reports every problem.

    ``purpose``: what the folder is checked for (module docstring); ``columns``: site column →
    schema name, applied to the header before any check (:mod:`cldlr.common.data.columns`);
    ``max_image_pixels`` caps what an image or mask header may declare (checked before decoding).
    """
    checker = _Checker(Path(root), schema, purpose, columns, max_image_pixels)
    table = checker.read_table()
    if table is None:
        return checker.report
    checker.report.n_rows = len(table)
    checker.check_columns(table)
    ids = checker.check_rows(table)
    checker.check_patients(table)
    folders = checker.present_folders()
    for image_id, line in tqdm(ids, desc=f"validate {checker.root.name}", unit="image", disable=None):
        checker.check_image(image_id, line, folders)
    if "image_id" in table.columns:  # without ids every file would look unreferenced
        checker.check_orphans({image_id for image_id, _ in ids})
    log.debug("validated %s: %s", root, checker.report.summary())
    return checker.report


__all__ = ["LABELLED_COMMANDS", "Problem", "Purpose", "ValidationReport", "validate_site"]
