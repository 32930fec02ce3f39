"""Reading a site folder: validate it against the contract and the schema, then parse it.

This sits above both :mod:`.contract` (layout and parsing) and :mod:`.validation` (the checks),
so neither of them needs the other at run time.
"""

from __future__ import annotations

from pathlib import Path

from cldlr.common.data.contract import SiteData, parse_frame, read_clinical_csv
from cldlr.common.data.imaging import DEFAULT_MAX_IMAGE_PIXELS
from cldlr.common.data.schema import Schema
from cldlr.common.data.validation import validate_site
from cldlr.common.errors import ContractError


def read_site(root: str | Path, schema: Schema, *, check: bool = True,
              max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> SiteData:
    """Read a site folder; with ``check`` (default) a site that fails validation raises.

    ``max_image_pixels`` (``data.max_image_pixels``, a site policy's ``max_image_pixels``) caps
    what an image header may declare.

    The raised :class:`~cldlr.common.errors.ContractError` carries the whole report, so a
    command fed an invalid site stops before doing any work and shows every problem.
    """
    root = Path(root)
    if check:
        report = validate_site(root, schema, max_image_pixels=max_image_pixels)
        if not report.ok:
            raise ContractError(f"site {root} does not follow the data contract ({report.summary()})", report)
    return SiteData(root, schema, parse_frame(root, schema, read_clinical_csv(root)))
