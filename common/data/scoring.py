"""Reading a site to *score* it with a bundle: only the model's inputs are required, columns can be renamed.

An external hospital's folder rarely matches a federation's schema column for column: it may
lack columns the model never uses (``side``, ``device``, ``birads``), call a column otherwise,
or hold new lesions without a biopsy result yet. :func:`read_site_for_scoring` is the one reader
``cldlr predict --site`` (and external testing) uses: it validates the folder against the bundle
schema restricted to the model's inputs, with labels and splits optional, after renaming columns
by the ``--map`` mapping — without copying or editing the site.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cldlr.common.data.contract import SiteData
from cldlr.common.data.schema import Schema
from cldlr.common.data.site import read_site
from cldlr.common.data.validation import Purpose


def read_site_for_scoring(folder: str | Path, schema: Schema, inputs: Sequence[str],
                          columns: dict[str, str] | None = None, *, purpose: Purpose = "predict") -> SiteData:
    """The site at ``folder`` read for a model whose inputs are ``inputs`` (parameter names of ``schema``).

    A missing input column is an error naming it and the fix (add it, or ``--map``); a derived
    input may be absent (computed from the mask); every other schema column may be absent.
    ``columns`` maps site column → schema name. ``purpose="study"`` keeps labels required (for
    external testing on a labelled site). Raises :class:`~cldlr.common.errors.ContractError`
    with the whole validation report.
    """
    unknown = sorted(set(inputs) - {p.name for p in schema.parameters})
    if unknown:
        raise KeyError(f"model input(s) {', '.join(unknown)} are not in schema {schema.name!r}")
    return read_site(folder, schema.restricted(list(inputs)), purpose=purpose, columns=columns)


__all__ = ["read_site_for_scoring"]
