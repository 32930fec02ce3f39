"""Reader-study packets: de-identified, shuffled, self-contained HTML pages without (round 1) and with (round 2) AI.

Readers see case ids ``C001…`` only; the mapping to image ids and the truth stays in ``key.csv``,
which the study coordinator keeps. Every image is embedded as a base64 PNG data URI, so a page
is one file that opens offline and loads nothing from anywhere. Each reader gets a reading app
(``readers/<id>.html``, see :mod:`cldlr.simulations.reader_app.page`) with both rounds in that
reader's own seeded case orders; ``round1.html``/``round2.html`` stay as printable overviews.
"""

from __future__ import annotations

import base64
import hashlib
import html
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from cldlr.client.predict import imputed_text, open_bundle, png_bytes
from cldlr.common.bundle import Bundle, Prediction, TrustAnchor
from cldlr.common.data.imaging import read_image, read_mask, to_uint8
from cldlr.common.data.roi import roi_box
from cldlr.common.data.site import read_site
from cldlr.common.errors import CldlrError
from cldlr.common.io import atomic_directory, check_output_apart
from cldlr.common.text import csv_text, markdown_text
from cldlr.simulations.reader_app.page import AppOptions, build_reader_apps, case_section, check_reader_id

log = logging.getLogger(__name__)

#: The reads file: one row per reader, round and case.
READ_COLUMNS = ("reader", "round", "case", "malignant", "birads4", "likelihood", "confidence", "seconds", "comment")
#: The confidence column is a 5-point confidence-of-malignancy score (the ordinal score for the ROC).
CONFIDENCE_LEVELS = {1: "definitely benign", 2: "probably benign", 3: "indeterminate", 4: "probably malignant",
                     5: "definitely malignant"}
ROUND_TITLES = {1: "without AI", 2: "with AI (score and heat map)"}
#: Sub-categories of BI-RADS 4 a reader chooses from (the ``birads4`` column; the app leaves ``confidence`` empty).
BIRADS4 = ("4a", "4b", "4c")
MAX_SIDE = 560  # px of the embedded full image; larger images are shrunk for the page

_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1150px;color:#222;background:#fafafa}
h1{margin-bottom:.2em}.note{background:#fff;border:1px solid #ddd;padding:.6em 1em;border-radius:6px}
.case{background:#fff;border:1px solid #ccc;border-radius:6px;margin:1.2em 0;padding:.5em 1em;page-break-inside:avoid}
.row{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}figure{margin:0}
figcaption{font-size:.85em;color:#555;text-align:center}img{display:block;border:1px solid #999}
img.full{height:300px;width:auto;max-width:560px}img.roi{width:224px;height:224px}.ai{width:250px}
.score{font-size:2em;font-weight:bold}.bar{height:10px;background:#eee;border-radius:5px;width:200px}
.bar div{height:10px;border-radius:5px;background:#c0392b}"""


def _data_uri(rgb: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(rgb)).decode("ascii")


def full_image_with_box(image: np.ndarray, mask: np.ndarray, margin: float) -> np.ndarray:
    """The B-mode image (8-bit RGB) with the lesion box the model crops drawn in yellow, at most MAX_SIDE px."""
    y0, y1, x0, x1 = roi_box(mask, margin)
    picture = Image.fromarray(to_uint8(image)).convert("RGB")
    width = max(2, round(max(picture.size) / 250))
    ImageDraw.Draw(picture).rectangle([x0, y0, x1 - 1, y1 - 1], outline=(255, 215, 0), width=width)
    picture.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return np.asarray(picture)


def _figure(uri: str, caption: str, case: str, css: str = "") -> str:
    cls = f' class="{css}"' if css else ""
    return (f'<figure><img{cls} src="{uri}" alt="{html.escape(case)}: {html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _ai_box(p: Prediction) -> str:
    verdict = "above" if p.ai_score >= p.threshold else "below"
    note = "<br><small>clinical data incomplete: image-only (DLR) score</small>" if p.fallback else ""
    return (f'<div class="ai"><div>AI score</div><div class="score">{p.ai_score:.2f}</div>'
            f'<div class="bar"><div style="width:{100 * p.ai_score:.0f}%"></div></div>'
            f"<div>{verdict} the threshold {p.threshold:.2f}: the model suggests <b>{p.predicted_class}</b></div>"
            f"{note}</div>")


def render_round(round_no: int, order: list[str], panels: dict[str, dict[str, str]], bundle_id: str) -> str:
    """One self-contained page: instructions, then the cases in ``order``."""
    scale = "; ".join(f"{k} = {v}" for k, v in CONFIDENCE_LEVELS.items())
    parts = [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="referrer" content="no-referrer">'
             f"<title>Reading packet, round {round_no} ({ROUND_TITLES[round_no]})</title><style>{_STYLE}</style></head><body>",
             f"<h1>Round {round_no}: {ROUND_TITLES[round_no]}</h1>",
             f'<p class="note">{len(order)} BI-RADS 4 lesions. Printable overview: read in your own reading app '
             f"(readers/&lt;your id&gt;.html), or fill one row of reads_template.csv per case with your reader id, "
             f"round {round_no}, the case id, <b>malignant</b> (0 = benign, 1 = malignant), <b>birads4</b> (4a, 4b "
             f"or 4c), <b>likelihood</b> of malignancy (0-100) and the seconds you spent; <b>confidence</b> "
             f"({html.escape(scale)}) is optional. The yellow box marks the lesion."
             + (" The model analyses the region in that box; the heat map shows where it looked (red = most "
                "influential) and the AI score is its probability of malignancy." if round_no == 2 else "") + "</p>"]
    for case in order:
        panel = panels[case]
        figures = [_figure(panel["image"], "B-mode image", case, "full"), _figure(panel["roi"], "lesion region", case, "roi")]
        if round_no == 2:
            figures += [_figure(panel["overlay"], "heat map (Grad-CAM)", case, "roi"), panel["ai"]]
        parts.append(f'<section class="case" id="{case}"><h2>Case {case}</h2><div class="row">{"".join(figures)}</div></section>')
    parts.append(f'<p class="note">Model bundle {bundle_id[:12]}. Research use only.</p></body></html>')
    return "\n".join(parts)


def _rows_to_read(site: Path, bundle: Bundle, split: str) -> tuple:
    data = read_site(site, bundle.schema)
    has_split = (data.frame["split"].astype(str) != "").any()
    if split != "all" and has_split:
        data = data.split_rows(split)
        if len(data) == 0:
            raise CldlrError(f"site {site} has no {split!r} rows; choose --split train|test|all")
    elif split != "all":
        log.info("site %s has no split column: every lesion goes into the packet", site)
    return data


def parse_readers(spec: str | int | Sequence[str]) -> list[str]:
    """Reader ids from ``3`` (R01…R03), ``"R01,R02"`` or a list; each must be a safe id (it names a file)."""
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().isdigit()):
        count = int(spec)
        if not 1 <= count <= 999:
            raise CldlrError(f"--readers {count}: give 1-999 readers or a comma-separated list of ids")
        return [f"R{k + 1:02d}" for k in range(count)]
    names = [r.strip() for r in spec.split(",")] if isinstance(spec, str) else [str(r) for r in spec]
    return [check_reader_id(r) for r in names if r]


def study_id_for(bundle_id: str, seed: int, image_ids: list[str]) -> str:
    """A short id naming this packet (bundle, seed, lesions): it keys the readers' saved progress in their browsers."""
    text = "\n".join([bundle_id, str(seed), *sorted(image_ids)])
    return "S" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]


def _packet_readme(study: str, options: AppOptions, bundle: Bundle) -> str:
    return ("# Reading packet\n\nStudy `" + study + "`. Give each reader their own reading app, "
            "`readers/<id>.html` (one offline file, both rounds; it opens from a USB stick in any current browser). "
            f"Round 2 opens {options.washout_days:g} day(s) after the reader finishes round 1; `unlock_codes.csv` "
            "holds each reader's code to open it earlier. Readers press *Export reads* and send back "
            "`reads_<study>_<id>.csv` and its `.log.json`.\n\nA reader without the app can fill `reads_template.csv` "
            "from the printable `round1.html`, then (after the wash-out) `round2.html`: one row per reader, round and "
            "case; malignant 0/1; birads4 4a/4b/4c; likelihood 0-100; confidence 1-5 optional ("
            + ", ".join(f"{k} {v}" for k, v in CONFIDENCE_LEVELS.items()) + ").\n\nKeep private: `key.csv` "
            "(case -> image id, truth, and the clinical values imputed as in training), `model_scores.csv`, "
            "`unlock_codes.csv`; `orders.csv` records every reader's case order.\n\nImages are shown as stored "
            "(file names and DICOM tags never enter the pages); text burned "
            "into the pixels is not removed, so look through the pages before handing them out.\n\nMerge and check: "
            "`cldlr reader-study merge reads_*.csv --key key.csv --out reads.csv`; analyse: `cldlr reader-study analyze "
            "reads.csv --truth key.csv --model-scores model_scores.csv --out table3/`\n\nModel bundle "
            f"{bundle.bundle_id[:12]}, signature: {markdown_text(bundle.signer.text)}\n")


def _write_reader_apps(tmp: Path, bundle: Bundle, frame: pd.DataFrame, panels: dict[str, dict[str, str]],
                       readers: list[str], seed: int, options: AppOptions) -> str:
    """``readers/<id>.html``, ``orders.csv`` and ``unlock_codes.csv`` into ``tmp``; returns the study id."""
    study = study_id_for(bundle.bundle_id, seed, [str(v) for v in frame["image_id"]])
    sections = {case: case_section(case, _figure(panel["image"], "B-mode image", case, "full")
                                   + _figure(panel["roi"], "lesion region", case, "roi"),
                                   _figure(panel["overlay"], "heat map (Grad-CAM)", case, "roi") + panel["ai"])
                for case, panel in panels.items()}
    apps = build_reader_apps(study=study, readers=readers, sections=sections, seed=seed, bundle_id=bundle.bundle_id,
                             options=options, created=datetime.now(UTC).isoformat(timespec="seconds"))
    (tmp / "readers").mkdir()
    for reader, page in apps.pages.items():
        (tmp / "readers" / f"{reader}.html").write_text(page, "utf-8")
    (tmp / "orders.csv").write_text(csv_text(["reader", "round", "position", "case"], apps.order_rows), "utf-8")
    (tmp / "unlock_codes.csv").write_text(csv_text(["reader", "code"], apps.code_rows), "utf-8")
    return study


def make_packet(model: str | Path | Bundle, site: str | Path, out: str | Path, *, seed: int = 0, split: str = "test",
                allow_missing_clinical: bool = False, force: bool = False, batch_size: int = 16,
                readers: str | int | Sequence[str] = 3, options: AppOptions | None = None,
                trust: TrustAnchor | None = None, allow_unsigned: bool = False) -> Path:
    """Write ``readers/<id>.html`` (one reading app per reader), ``round1.html``, ``round2.html``,
    ``reads_template.csv`` (for readers) and ``key.csv``, ``model_scores.csv``, ``orders.csv``,
    ``unlock_codes.csv`` (for the coordinator) into ``out``, atomically.

    Case ids follow a seeded shuffle; each reader reads both rounds in their own seeded orders. The
    bundle must verify against ``trust`` unless ``allow_unsigned``; the coordinator's README
    records who signed it (or that it is unverified).
    """
    check_output_apart(out, [site, model.path if isinstance(model, Bundle) else model])
    options = options or AppOptions()
    names_of_readers = parse_readers(readers)
    if not names_of_readers:
        raise CldlrError("--readers: give at least one reader id")
    bundle = open_bundle(model, trust=trust, allow_unsigned=allow_unsigned)
    data = _rows_to_read(Path(site), bundle, split)
    frame, n = data.frame.reset_index(drop=True), len(data)
    rng = np.random.default_rng(seed)
    first = rng.permutation(n)
    width = max(3, len(str(n)))
    case_of = {int(row): f"C{k + 1:0{width}d}" for k, row in enumerate(first)}
    order1 = [case_of[int(r)] for r in first]
    order2 = [case_of[int(r)] for r in rng.permutation(n)]
    names = [p.name for p in bundle.schema.parameters]
    panels: dict[str, dict[str, str]] = {}
    key_rows, score_rows = [], []
    for start in range(0, n, batch_size):
        chunk = frame.iloc[start:start + batch_size]
        images, masks = [read_image(p) for p in chunk["image_path"]], [read_mask(p) for p in chunk["mask_path"]]
        cases = [case_of[start + i] for i in range(len(chunk))]
        predictions = bundle.predict_many(images, masks, [{k: r[k] for k in names} for _, r in chunk.iterrows()],
                                          ids=cases, allow_missing_clinical=allow_missing_clinical, batch_size=batch_size)
        for (_, row), case, image, mask, p in zip(chunk.iterrows(), cases, images, masks, predictions):
            panels[case] = {"image": _data_uri(full_image_with_box(image, mask, bundle.margin)),
                            "roi": _data_uri(p.roi), "overlay": _data_uri(p.overlay()), "ai": _ai_box(p)}
            key_rows.append([case, row["image_id"], int(row["label"]), imputed_text(p.imputed)])
            score_rows.append([case, p.ai_score, p.dlr_score, "" if p.clinical_score is None else p.clinical_score,
                               p.fallback or "", p.threshold])
        log.info("packet: %d/%d cases rendered", min(start + batch_size, n), n)
    template = [["", r, case] + [""] * (len(READ_COLUMNS) - 3) for r, order in ((1, order1), (2, order2)) for case in order]
    with atomic_directory(out, overwrite=force) as tmp:
        for round_no, order in ((1, order1), (2, order2)):
            (tmp / f"round{round_no}.html").write_text(render_round(round_no, order, panels, bundle.bundle_id), "utf-8")
        study = _write_reader_apps(tmp, bundle, frame, panels, names_of_readers, seed, options)
        (tmp / "reads_template.csv").write_text(csv_text(READ_COLUMNS, template), "utf-8")
        (tmp / "key.csv").write_text(csv_text(["case", "image_id", "label", "imputed"], sorted(key_rows)), "utf-8")
        (tmp / "model_scores.csv").write_text(csv_text(
            ["case", "ai_score", "dlr_score", "clinical_score", "fallback", "threshold"], sorted(score_rows)), "utf-8")
        (tmp / "README.md").write_text(_packet_readme(study, options, bundle), "utf-8")
    log.info("reading packet for %d cases and %d reader(s) written to %s", n, len(names_of_readers), out)
    return Path(out)


__all__ = ["BIRADS4", "CONFIDENCE_LEVELS", "READ_COLUMNS", "full_image_with_box", "make_packet", "parse_readers",
           "render_round", "study_id_for"]
