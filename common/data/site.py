"""Reading a site folder: validate it against the contract and the schema, then parse it.

This sits above both :mod:`.contract` (layout and parsing) and :mod:`.validation` (the checks),
so neither of them needs the other at run time. Parameters computed from the mask
(``derived: mask``) that a site leaves empty are computed here, by the function the importers use.
"""

from __future__ import annotations

from pathlib import Path

from cldlr.common.data.columns import apply_column_map
from cldlr.common.data.contract import CLINICAL_CSV, SiteData, parse_frame, read_clinical_csv
from cldlr.common.data.descriptors import fill_derived
from cldlr.common.data.imaging import DEFAULT_MAX_IMAGE_PIXELS
from cldlr.common.data.schema import Schema
from cldlr.common.data.validation import Purpose, validate_site
from cldlr.common.errors import ContractError


def read_site(root: str | Path, schema: Schema, *, check: bool = True, purpose: Purpose = "study",
              columns: dict[str, str] | None = None, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> SiteData:
    """Read a site folder; with ``check`` (default) a site that fails validation raises.

    ``max_image_pixels`` (``data.max_image_pixels``, a site policy's ``max_image_pixels``) caps
    what an image header may declare.

    The raised :class:`~cldlr.common.errors.ContractError` carries the whole report, so a
    command fed an invalid site stops before doing any work and shows every problem. ``purpose``
    ``predict`` accepts rows without label or split; ``columns`` renames site columns to schema
    names on read (:func:`cldlr.common.data.columns.apply_column_map`).
    """
    root = Path(root)
    if check:
        report = validate_site(root, schema, purpose=purpose, columns=columns, max_image_pixels=max_image_pixels)
        if not report.ok:
            raise ContractError(f"site {root} does not follow the data contract ({report.summary()})", report)
    raw = apply_column_map(read_clinical_csv(root), columns, CLINICAL_CSV)
    return SiteData(root, schema, fill_derived(parse_frame(root, schema, raw), schema))
