"""``cldlr predict`` and ``cldlr reader-study``: using a model bundle in the clinic."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cldlr.common.errors import CldlrError

from .cli_args import Add, bundle_trust
from .cli_args import force as _force


def _bundle(args: argparse.Namespace) -> Any:
    """The ``--model`` bundle, verified against ``--trust``/``--policy``; an unverified one is announced on stderr."""
    from cldlr.client.predict import open_bundle, site_trust

    bundle = open_bundle(args.model, trust=site_trust(args.trust, args.policy), allow_unsigned=args.allow_unsigned)
    if not bundle.signer.verified:
        print(f"WARNING: model bundle {args.model}: signature {bundle.signer.text}", file=sys.stderr)
    return bundle


def cmd_predict(args: argparse.Namespace) -> int:
    """``cldlr predict``: score one lesion (image + mask + clinical values) or every case of a site folder."""
    from cldlr.client.predict import format_result, parse_clinical_args, predict_lesion, predict_site
    from cldlr.common.data.columns import parse_column_map

    if args.site is not None:
        if args.mask is not None or args.clinical or args.overlay is not None or args.spacing is not None:
            raise CldlrError("--site takes its masks, clinical values and spacings from the site folder; "
                             "drop --mask/--clinical/--overlay/--spacing (spacings: its spacing_mm column)")
        if args.out is None:
            raise CldlrError("--site needs --out OUTDIR (predictions.csv and overlays/ are written there)")
        bundle = _bundle(args)
        out = predict_site(bundle, args.site, args.out, split=args.split,
                           allow_missing_clinical=args.allow_missing_clinical, force=args.force,
                           columns=parse_column_map(args.map), accept_pixel_units=args.accept_pixel_units)
        print(f"predictions: {out / 'predictions.csv'}\noverlays:    {out / 'overlays'}\nsignature:   {bundle.signer.text}")
        return 0
    if args.mask is None:
        raise CldlrError("--image needs --mask MASK (the lesion outline the ROI is cut from)")
    if args.map:
        raise CldlrError("--map renames a site folder's columns: use it with --site (for --image, name the "
                         "values with --clinical NAME=VALUE)")
    bundle = _bundle(args)
    result = predict_lesion(bundle, args.image, args.mask, parse_clinical_args(args.clinical), out=args.out,
                            overlay=args.overlay, allow_missing_clinical=args.allow_missing_clinical,
                            spacing=args.spacing, accept_pixel_units=args.accept_pixel_units)
    if args.out is None:
        print(format_result(result))
    else:
        print(f"prediction: {args.out}\noverlay:    {result['overlay']}\nsignature:  {bundle.signer.text}")
    return 0


def cmd_reader_packet(args: argparse.Namespace) -> int:
    """``cldlr reader-study packet``: the reading rounds for radiologists, and the key kept apart from them."""
    from cldlr.simulations.reader_app.page import AppOptions
    from cldlr.simulations.reader_packet import make_packet

    options = AppOptions(washout_days=args.washout_days, show_round1=args.show_round1)
    bundle = _bundle(args)
    out = make_packet(bundle, args.site, args.out, seed=args.seed, split=args.split,
                      allow_missing_clinical=args.allow_missing_clinical, force=args.force, readers=args.readers,
                      options=options)
    print(f"reading apps:   {out / 'readers'}/<reader>.html (one offline file per reader; both rounds)")
    print(f"printable:      {out / 'round1.html'}, {out / 'round2.html'}, {out / 'reads_template.csv'}")
    print(f"model bundle:   signature {bundle.signer.text}")
    print(f"keep private:   {out / 'key.csv'} (case → image id and truth), {out / 'model_scores.csv'}, "
          f"{out / 'unlock_codes.csv'}, {out / 'orders.csv'}")
    return 0


def cmd_reader_merge(args: argparse.Namespace) -> int:
    """``cldlr reader-study merge``: the readers' exports checked against the key and merged into one reads file."""
    from cldlr.simulations.reader_app.merge import merge_reads

    result = merge_reads(args.reads, args.key, args.out, washout_days=args.washout_days, washout=args.washout,
                         force=args.force)
    for line in result.washout.values():
        print(line)
    for line in result.warnings:
        print(f"warning: {line}")
    print(f"merged reads: {result.path} ({len(result.readers)} reader(s) × 2 rounds × {result.cases} cases)")
    return 0


def cmd_reader_analyze(args: argparse.Namespace) -> int:
    """``cldlr reader-study analyze``: Table 3 (readers with and without the AI score) from the collected reads."""
    from cldlr.simulations.reader_study import analyze_reads

    out = analyze_reads(args.reads, args.truth, args.out, model_scores=args.model_scores, force=args.force)
    print((out / "table3.md").read_text(encoding="utf-8"))
    print(f"table: {out / 'table3.md'}  json: {out / 'table3.json'}  figure: {out / 'reader_roc.png'}")
    print(f"for MRMCaov / iMRMC: {out / 'mrmcaov.csv'}, {out / 'reads.imrmc'}")
    return 0


def cmd_reader_simulate(args: argparse.Namespace) -> int:
    """``cldlr reader-study simulate-reads``: simulated readers' reads, to try the analysis before real ones take part."""
    from cldlr.simulations.reader_study import simulate_reads

    out = simulate_reads(args.truth, args.model_scores, args.out, readers=args.readers, seed=args.seed)
    print(f"simulated reads: {out}")
    return 0


def add_clinic_commands(sub: Any, add: Add) -> None:
    """Register ``predict`` and ``reader-study``."""
    p = add("predict", cmd_predict, "AI score (CLDLR probability) and Grad-CAM overlay from a model bundle")
    p.add_argument("--model", type=Path, required=True, metavar="BUNDLE", help="bundle folder (a run's model/)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", type=Path, help="one B-mode image (with --mask and --clinical)")
    what.add_argument("--site", type=Path, help="a site folder: score every lesion (with --out OUTDIR)")
    p.add_argument("--mask", type=Path, help="lesion mask of --image")
    p.add_argument("--clinical", action="append", default=[], metavar="NAME=VALUE",
                   help="a clinical value, e.g. --clinical age=54 (repeatable; the bundle's selected parameters)")
    p.add_argument("--out", type=Path, help="JSON file (--image; default: print) or output folder (--site)")
    p.add_argument("--overlay", type=Path, help="Grad-CAM overlay PNG (default: beside --out, else in the cwd)")
    p.add_argument("--split", choices=["train", "test"], help="--site: score only this split")
    p.add_argument("--allow-missing-clinical", action="store_true",
                   help="score a lesion lacking a (missing: error) clinical value with the DLR model (fallback: dlr); "
                        "missing: impute values are always imputed as in training")
    p.add_argument("--spacing", metavar="MM", help="--image: pixel spacing in mm (0.1, or ROWxCOLUMN) when the file "
                                                   "does not state it (DICOM PixelSpacing is read)")
    p.add_argument("--accept-pixel-units", action="store_true",
                   help="score pixel-unit inputs (width_px, …) although this image's spacing differs from training")
    p.add_argument("--map", action="append", default=[], metavar="SITE_COLUMN=SCHEMA_NAME",
                   help="--site: read the site's column SITE_COLUMN as the schema's SCHEMA_NAME (repeatable; the "
                        "folder is not changed)")
    bundle_trust(p)
    _force(p)

    p = add("reader-study", lambda a: a.reader_func(a), "radiologist reading study: packet, merge, simulated reads, Table 3")
    rsub = p.add_subparsers(dest="reader_command", required=True, metavar="ACTION")
    q = rsub.add_parser("packet", help="de-identified, shuffled HTML reading packets (without/with AI) and a key")
    q.set_defaults(reader_func=cmd_reader_packet)
    q.add_argument("--model", type=Path, required=True, metavar="BUNDLE")
    q.add_argument("--site", type=Path, required=True, metavar="TEST_SITE_FOLDER")
    q.add_argument("--out", type=Path, required=True, metavar="DIR")
    q.add_argument("--seed", type=int, default=0, help="case order and ids")
    q.add_argument("--split", choices=["test", "train", "all"], default="test",
                   help="rows to read (default test; a site without splits is read whole)")
    q.add_argument("--allow-missing-clinical", action="store_true", help="DLR score for lesions lacking a value")
    q.add_argument("--readers", default="3", metavar="N|ID,ID…", help="reader count (R01…) or ids (default 3)")
    q.add_argument("--washout-days", type=float, default=28.0,
                   help="days between a reader finishing round 1 and round 2 opening (default 28, FDA CADe guidance; "
                        "0 = none; unlock_codes.csv opens it earlier)")
    q.add_argument("--show-round1", action="store_true", help="round 2 shows the reader's own round-1 answer")
    bundle_trust(q)
    _force(q)
    q = rsub.add_parser("merge", help="check the readers' exported reads against the key and merge them")
    q.set_defaults(reader_func=cmd_reader_merge)
    q.add_argument("reads", type=Path, nargs="+", metavar="READS.csv", help="the readers' reads_*.csv (logs beside)")
    q.add_argument("--key", type=Path, required=True, metavar="KEY.csv", help="the packet's key.csv")
    q.add_argument("--out", type=Path, required=True, metavar="MERGED.csv")
    q.add_argument("--washout-days", type=float, default=28.0, help="the wash-out to check (default 28)")
    q.add_argument("--washout", choices=["error", "warn", "off"], default="error",
                   help="a wash-out shorter than --washout-days (without the unlock code) is an error (default), "
                        "a warning, or not checked")
    _force(q)
    q = rsub.add_parser("analyze", help="Table 3 (AUC, accuracy, sens., spec., PPV, NPV; DeLong; MRMC OR-Hillis) and Fig. 6")
    q.set_defaults(reader_func=cmd_reader_analyze)
    q.add_argument("reads", type=Path, metavar="READS.csv")
    q.add_argument("--truth", type=Path, required=True, metavar="KEY_OR_TRUTH.csv", help="columns case, label")
    q.add_argument("--model-scores", type=Path, help="columns case, ai_score[, threshold] (the packet's model_scores.csv)")
    q.add_argument("--out", type=Path, required=True, metavar="DIR")
    _force(q)
    q = rsub.add_parser("simulate-reads", help="generate realistic reads (junior/senior readers who lean on the AI)")
    q.set_defaults(reader_func=cmd_reader_simulate)
    q.add_argument("--truth", type=Path, required=True, metavar="KEY_OR_TRUTH.csv")
    q.add_argument("--model-scores", type=Path, required=True)
    q.add_argument("--out", type=Path, required=True, metavar="READS.csv")
    q.add_argument("--readers", type=int, default=3)
    q.add_argument("--seed", type=int, default=0)
