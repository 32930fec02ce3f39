"""One reader's reading app: a single offline HTML file with both rounds, built from the packaged template.

The file is handed to a radiologist on a USB stick and opened from ``file://``: images are inlined as
``data:`` URIs, the script and the styles are inline, and a Content-Security-Policy forbids every network
load (only the script whose SHA-256 the policy names may run). Names and ids are HTML-escaped; the study
data travel as JSON in a ``<script type="application/json">`` with ``<``, ``>`` and ``&`` escaped, so no
id can close the script element.

What the app enforces (round 2 only after round 1 is finished and the wash-out has passed, round-1
answers locked once finished) runs in the reader's own browser and can be got round by a determined
reader; it is a protocol aid. The exported log records when each round started and finished (by that
browser's clock, and whether the clock was set back), so the coordinator's merge can check the wash-out.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import secrets
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np

from cldlr.common.errors import CldlrError

#: Reader ids become file names and localStorage keys: letters, digits, ``.``, ``_``, ``-`` (max 40).
READER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$")
_CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I
_PLACEHOLDER = re.compile(r"@@([A-Z0-9_]+)@@")
_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


@dataclass(frozen=True)
class AppOptions:
    """The study design the app follows: wash-out before round 2 and whether round 2 shows the round-1 answer."""

    washout_days: float = 28.0
    show_round1: bool = False


def check_reader_id(reader: str) -> str:
    """``reader`` unchanged, or a CldlrError: ids name files and storage keys, so only a safe alphabet is allowed."""
    if not READER_ID.match(reader):
        raise CldlrError(f"reader id {reader!r}: use 1-40 letters, digits, '.', '_' or '-' (starting with a letter "
                         "or digit), e.g. --readers R01,R02 or --readers 3")
    return reader


def script_json(data: Any) -> str:
    """JSON that is safe inside a ``<script>`` element: no ``</script>``, ``<!--`` or line separators survive."""
    text = json.dumps(data, ensure_ascii=False, sort_keys=True)
    return re.sub("[<>&\u2028\u2029]", lambda m: _JSON_ESCAPES[m.group(0)], text)


def new_unlock_code() -> str:
    """A random coordinator code (``XXXXX-XXXXX``, ~50 bits) that opens round 2 before the wash-out ends."""
    raw = "".join(secrets.choice(_CODE_ALPHABET) for _ in range(10))
    return f"{raw[:5]}-{raw[5:]}"


def unlock_hash(study: str, reader: str, code: str) -> str:
    """What the page stores of a code: SHA-256 of ``study:reader:CODE`` (the code itself stays with the coordinator)."""
    normal = re.sub(r"[^A-Z0-9]", "", code.upper())
    return hashlib.sha256(f"{study}:{reader}:{normal}".encode()).hexdigest()


def _asset(name: str) -> str:
    return resources.files("cldlr.simulations.reader_app").joinpath(name).read_text(encoding="utf-8")


def _sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def case_section(case: str, figures: str, ai_figures: str) -> str:
    """One case's images, hidden until the app shows it; the AI panel is shown only in round 2."""
    c = html.escape(case)
    return (f'<section class="case" data-case="{c}" hidden><div class="row">{figures}'
            f'<div class="row ai-panel" hidden>{ai_figures}</div></div></section>')


def render_reader_app(*, study: str, reader: str, created: str, bundle_id: str, sections: list[str],
                      orders: dict[int, list[str]], options: AppOptions, unlock_code_hash: str = "") -> str:
    """The whole page for one reader: both rounds in the reader's own orders, the cases' sections, and the app."""
    check_reader_id(reader)
    script, style = _asset("app.js"), _asset("app.css")
    csp = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src " + _sha256_source(script)
           + "; connect-src 'none'; form-action 'none'; base-uri 'none'; frame-src 'none'; object-src 'none'")
    days = options.washout_days
    washout = "immediately" if days <= 0 else f"{days:g} day{'s' if days != 1 else ''}"
    data = {"format": 1, "study": study, "reader": reader, "created": created, "washout_days": days,
            "show_round1": options.show_round1, "unlock_hash": unlock_code_hash,
            "orders": {str(r): list(o) for r, o in orders.items()}}
    values = {"CSP": html.escape(csp), "TITLE": html.escape(f"Reading study {study} · reader {reader}"),
              "STYLE": style, "READER": html.escape(reader), "STUDY": html.escape(study),
              "N_CASES": str(len(orders[1])), "WASHOUT_TEXT": html.escape(washout), "CASES": "\n".join(sections),
              "BUNDLE": html.escape(bundle_id[:12]), "DATA": script_json(data), "SCRIPT": script}
    # one pass: text put in for a placeholder is never searched for placeholders again
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], _asset("app.html"))


def reader_orders(cases: list[str], reader: str, seed: int) -> dict[int, list[str]]:
    """The reader's own case order per round, seeded by (seed, reader id): adding a reader changes no one else's."""
    digest = int.from_bytes(hashlib.sha256(reader.encode("utf-8")).digest()[:8], "big")
    rng = np.random.default_rng([seed, digest])
    ordered = sorted(cases)
    return {r: [ordered[int(k)] for k in rng.permutation(len(ordered))] for r in (1, 2)}


@dataclass(frozen=True)
class ReaderApps:
    """Everything the packet writes for the readers' apps: one page per reader, the orders and the unlock codes."""

    pages: dict[str, str]
    order_rows: list[list[object]]
    code_rows: list[list[object]]


def build_reader_apps(*, study: str, readers: list[str], sections: dict[str, str], seed: int, bundle_id: str,
                      options: AppOptions, created: str) -> ReaderApps:
    """One app per reader (own orders, own unlock code), plus the coordinator's ``orders`` and ``unlock_codes`` rows."""
    if len(set(readers)) != len(readers):
        raise CldlrError(f"--readers: a reader id appears twice in {readers}")
    pages: dict[str, str] = {}
    order_rows: list[list[object]] = []
    code_rows: list[list[object]] = []
    for reader in readers:
        check_reader_id(reader)
        orders = reader_orders(list(sections), reader, seed)
        code = new_unlock_code()
        order_rows += [[reader, r, k + 1, case] for r in (1, 2) for k, case in enumerate(orders[r])]
        code_rows.append([reader, code])
        pages[reader] = render_reader_app(study=study, reader=reader, created=created, bundle_id=bundle_id,
                                          sections=[sections[c] for c in sorted(sections)], orders=orders,
                                          options=options, unlock_code_hash=unlock_hash(study, reader, code))
    return ReaderApps(pages, order_rows, code_rows)


__all__ = ["READER_ID", "AppOptions", "ReaderApps", "build_reader_apps", "case_section", "check_reader_id",
           "new_unlock_code", "reader_orders", "render_reader_app", "script_json", "unlock_hash"]
