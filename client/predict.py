"""``cldlr predict``: the AI score and Grad-CAM overlay of one lesion, or of every lesion in a site folder.

The bundle is verified on load (see :mod:`cldlr.common.bundle`): its files, and its signature
against what this site trusts (``--trust`` PEM files or the policy's ``trusted_bundle_signers``);
an unsigned or foreign bundle is scored only with ``--allow-unsigned``, and every output then says
"signature: unverified". Clinical values are parsed with the bundle's own schema, so a value the
model was never trained on is refused with its valid range or levels instead of being scored.
Descriptors the bundle computes from the mask need no value, a missing ``missing: impute`` value
is imputed as in training (the output lists it), and a site folder needs only the model's input
columns (labels optional; ``--map`` renames columns).
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from cldlr.client.policy import load_policy
from cldlr.common.bundle import Bundle, Prediction, TrustAnchor, load_bundle
from cldlr.common.data.descriptors import row_spacing
from cldlr.common.data.imaging import read_image, read_mask
from cldlr.common.data.scoring import read_site_for_scoring
from cldlr.common.data.units import Spacing, format_spacing
from cldlr.common.errors import CldlrError
from cldlr.common.io import (
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_output_apart,
    contained_path,
)
from cldlr.common.text import csv_text

log = logging.getLogger(__name__)

CSV_COLUMNS = ("image_id", "ai_score", "dlr_score", "clinical_score", "predicted_class", "threshold", "fallback",
               "overlay", "imputed", "signature")


def parse_clinical_args(items: Sequence[str]) -> dict[str, str]:
    """``["age=54", "side=left"]`` → ``{"age": "54", "side": "left"}``; values are parsed later by the schema."""
    values: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise CldlrError(f"--clinical {item!r}: expected NAME=VALUE, e.g. --clinical age=54")
        if name in values:
            raise CldlrError(f"--clinical {name} is given twice ({values[name]!r} and {value!r})")
        values[name] = value
    return values


def png_bytes(rgb: np.ndarray) -> bytes:
    """An RGB/gray uint8 array as PNG bytes (no metadata: nothing identifying is embedded)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="PNG")
    return buffer.getvalue()


def site_trust(trust: Sequence[str | Path] = (), policy: str | Path | None = None) -> TrustAnchor | None:
    """What this site trusts to sign bundles: ``--trust`` files plus its policy's ``trusted_bundle_signers``.

    None when neither names anything (a bundle then loads only with ``allow_unsigned``).
    """
    files = [Path(p) for p in trust]
    if policy is not None:
        files += load_policy(policy).bundle_trust_files(Path(policy).expanduser().parent)
    return TrustAnchor.from_files(files) if files else None


def open_bundle(model: str | Path | Bundle, *, trust: TrustAnchor | None = None, allow_unsigned: bool = False) -> Bundle:
    """``model`` as a loaded bundle: a :class:`Bundle` is used as it is (its signer was checked when it was loaded)."""
    return model if isinstance(model, Bundle) else load_bundle(model, trust=trust, allow_unsigned=allow_unsigned)


def _model_info(bundle: Bundle) -> dict[str, Any]:
    return {"bundle": str(bundle.path), "bundle_id": bundle.bundle_id, "backbone": bundle.meta["model"]["backbone"],
            "selected_clinical_parameters": bundle.selected, "signature": bundle.signer.text,
            "signer": bundle.signer.to_dict()}


def imputed_text(imputed: Mapping[str, float | str]) -> str:
    """``family_history=0; side=left``: the predictions.csv cell naming what was imputed."""
    return "; ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in imputed.items())


def predict_lesion(model: str | Path | Bundle, image: str | Path, mask: str | Path, clinical: Mapping[str, Any], *,
                   out: str | Path | None = None, overlay: str | Path | None = None,
                   allow_missing_clinical: bool = False, spacing: Spacing | str | None = None,
                   accept_pixel_units: bool = False, trust: TrustAnchor | None = None,
                   allow_unsigned: bool = False) -> dict[str, Any]:
    """Score one lesion; writes the overlay PNG (and ``out`` JSON when given) and returns the result dict.

    The overlay goes to ``overlay``, else beside ``out`` (``<out stem>_overlay.png``), else to
    ``<image stem>_overlay.png`` in the working directory. ``spacing`` (mm per pixel, ``0.1`` or
    ``0.1x0.12``) is the image's pixel spacing when its file does not state one (DICOM does). The
    result's ``signature`` says who signed the bundle, or that it is unverified.
    """
    bundle = open_bundle(model, trust=trust, allow_unsigned=allow_unsigned)
    image, mask = Path(image), Path(mask)
    try:
        pixel_spacing = spacing if isinstance(spacing, tuple) else row_spacing(spacing, image)
    except ValueError as exc:
        raise CldlrError(f"--spacing: {exc}") from None
    started = time.perf_counter()
    prediction = bundle.predict(read_image(image), read_mask(mask), clinical, spacing=pixel_spacing,
                                allow_missing_clinical=allow_missing_clinical, accept_pixel_units=accept_pixel_units)
    seconds = time.perf_counter() - started
    if overlay is None:
        overlay = Path(out).with_name(Path(out).stem + "_overlay.png") if out else Path.cwd() / f"{image.stem}_overlay.png"
    for written in (overlay, out):
        if written is not None:
            check_output_apart(written, [image, mask, bundle.path])
    atomic_write_bytes(overlay, png_bytes(prediction.overlay()))
    result = {**{k: v for k, v in prediction.to_dict().items() if k != "id"}, "image": str(image), "mask": str(mask),
              "overlay": str(overlay), "spacing_mm": format_spacing(pixel_spacing) or None,
              "signature": bundle.signer.text, "model": _model_info(bundle),
              "seconds": round(seconds, 3)}
    log.info("%s: AI score %.3f (%s at threshold %.2f) in %.2f s", image.name, prediction.ai_score,
             prediction.predicted_class, prediction.threshold, seconds)
    if out is not None:
        atomic_write_json(out, result)
    return result


def _csv_row(prediction: Prediction, overlay: str, signature: str) -> dict[str, Any]:
    row = prediction.to_dict()
    return {"image_id": prediction.id, **{k: row[k] for k in CSV_COLUMNS[1:-3]}, "overlay": overlay,
            "imputed": imputed_text(prediction.imputed), "signature": signature}


def predictions_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """``predictions.csv``: one row per lesion in :data:`CSV_COLUMNS` order, every cell spreadsheet-safe."""
    return csv_text(CSV_COLUMNS, ([row.get(k) for k in CSV_COLUMNS] for row in rows))


def predict_site(model: str | Path | Bundle, site: str | Path, out_dir: str | Path, *, split: str | None = None,
                 allow_missing_clinical: bool = False, force: bool = False, batch_size: int = 16,
                 columns: dict[str, str] | None = None, accept_pixel_units: bool = False,
                 trust: TrustAnchor | None = None, allow_unsigned: bool = False) -> Path:
    """Score every lesion of a site folder: ``out_dir/predictions.csv`` and ``out_dir/overlays/<image_id>.png``.

    The site must follow the data contract for the bundle's *inputs*
    (:func:`~cldlr.common.data.scoring.read_site_for_scoring`: labels, splits and columns the model
    never uses may be absent; ``columns`` renames site columns); ``split`` keeps only the rows of
    that split. The folder appears only when every lesion was scored. Every row's ``signature``
    column says who signed the bundle, or that it is unverified.
    """
    check_output_apart(out_dir, [site, getattr(model, "path", model)])
    bundle = open_bundle(model, trust=trust, allow_unsigned=allow_unsigned)
    data = read_site_for_scoring(site, bundle.schema, bundle.selected, columns)
    if split is not None:
        data = data.split_rows(split)
        if len(data) == 0:
            raise CldlrError(f"site {site} has no rows with split {split!r}")
    frame, names = data.frame, list(bundle.selected)
    started, rows, n_fallback, n_imputed = time.perf_counter(), [], 0, 0
    with atomic_directory(out_dir, overwrite=force) as tmp:
        (tmp / "overlays").mkdir()
        starts = range(0, len(frame), batch_size)
        for start in tqdm(starts, desc=f"predict {data.name}", unit="batch", disable=None):
            chunk = frame.iloc[start:start + batch_size]
            predictions = bundle.predict_many(
                [read_image(p) for p in chunk["image_path"]], [read_mask(p) for p in chunk["mask_path"]],
                [{n: r[n] for n in names} for _, r in chunk.iterrows()], ids=[str(i) for i in chunk["image_id"]],
                allow_missing_clinical=allow_missing_clinical, batch_size=batch_size,
                spacings=list(chunk["spacing"]), accept_pixel_units=accept_pixel_units)
            for prediction in predictions:
                name = f"{prediction.id}.png"
                contained_path(tmp / "overlays", name).write_bytes(png_bytes(prediction.overlay()))
                rows.append(_csv_row(prediction, f"overlays/{name}", bundle.signer.text))
                n_fallback += prediction.fallback is not None
                n_imputed += bool(prediction.imputed)
        atomic_write_text(tmp / "predictions.csv", predictions_csv(rows))
        seconds = time.perf_counter() - started
        atomic_write_json(tmp / "summary.json", {"model": _model_info(bundle), "site": str(site), "split": split,
                                                 "n": len(rows), "n_dlr_fallback": n_fallback,
                                                 "n_imputed": n_imputed, "column_map": columns or {},
                                                 "seconds": round(seconds, 2)})
    log.info("%d lesion(s) scored in %.1f s (%.2f s each); %d DLR fallback(s): %s", len(rows), seconds,
             seconds / max(len(rows), 1), n_fallback, out_dir)
    return Path(out_dir)


def format_result(result: Mapping[str, Any]) -> str:
    """The single-lesion result as the JSON the CLI prints."""
    return json.dumps(result, indent=2)


__all__ = ["CSV_COLUMNS", "format_result", "open_bundle", "parse_clinical_args", "png_bytes", "predict_lesion",
           "predict_site", "predictions_csv", "site_trust"]
