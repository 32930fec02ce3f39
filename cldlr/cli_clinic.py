"""``cldlr predict`` and ``cldlr reader-study``: using a model bundle in the clinic."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cldlr.common.errors import CldlrError

from .cli_args import Add
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

    if args.site is not None:
        if args.mask is not None or args.clinical or args.overlay is not None:
            raise CldlrError("--site takes its masks and clinical values from the site folder; "
                             "drop --mask/--clinical/--overlay")
        if args.out is None:
            raise CldlrError("--site needs --out OUTDIR (predictions.csv and overlays/ are written there)")
        bundle = _bundle(args)
        out = predict_site(bundle, args.site, args.out, split=args.split,
                           allow_missing_clinical=args.allow_missing_clinical, force=args.force)
        print(f"predictions: {out / 'predictions.csv'}\noverlays:    {out / 'overlays'}\nsignature:   {bundle.signer.text}")
        return 0
    if args.mask is None:
        raise CldlrError("--image needs --mask MASK (the lesion outline the ROI is cut from)")
    bundle = _bundle(args)
    result = predict_lesion(bundle, args.image, args.mask, parse_clinical_args(args.clinical), out=args.out,
                            overlay=args.overlay, allow_missing_clinical=args.allow_missing_clinical)
    if args.out is None:
        print(format_result(result))
    else:
        print(f"prediction: {args.out}\noverlay:    {result['overlay']}\nsignature:  {bundle.signer.text}")
    return 0


def cmd_reader_packet(args: argparse.Namespace) -> int:
    """``cldlr reader-study packet``: the reading rounds for radiologists, and the key kept apart from them."""
    from cldlr.simulations.reader_packet import make_packet

    bundle = _bundle(args)
    out = make_packet(bundle, args.site, args.out, seed=args.seed, split=args.split,
                      allow_missing_clinical=args.allow_missing_clinical, force=args.force)
    print(f"reading packet: {out / 'round1.html'}, {out / 'round2.html'}, {out / 'reads_template.csv'}")
    print(f"model bundle:   signature {bundle.signer.text}")
    print(f"keep private:   {out / 'key.csv'} (case → image id and truth), {out / 'model_scores.csv'}")
    return 0


def cmd_reader_analyze(args: argparse.Namespace) -> int:
    """``cldlr reader-study analyze``: Table 3 (readers with and without the AI score) from the collected reads."""
    from cldlr.simulations.reader_study import analyze_reads

    out = analyze_reads(args.reads, args.truth, args.out, model_scores=args.model_scores, force=args.force)
    print((out / "table3.md").read_text(encoding="utf-8"))
    print(f"table: {out / 'table3.md'}  json: {out / 'table3.json'}  figure: {out / 'reader_roc.png'}")
    return 0


def cmd_reader_simulate(args: argparse.Namespace) -> int:
    """``cldlr reader-study simulate-reads``: simulated readers' reads, to try the analysis before real ones take part."""
    from cldlr.simulations.reader_study import simulate_reads

    out = simulate_reads(args.truth, args.model_scores, args.out, readers=args.readers, seed=args.seed)
    print(f"simulated reads: {out}")
    return 0


def trust_args(p: argparse.ArgumentParser) -> None:
    """``--trust``, ``--policy`` and ``--allow-unsigned``: what a command that loads a model bundle verifies it against."""
    p.add_argument("--trust", action="append", default=[], type=Path, metavar="PEM",
                   help="a CA certificate (the federation's ca.crt) or the signer's certificate/public key that model "
                        "bundles must be signed by (repeatable)")
    p.add_argument("--policy", type=Path, metavar="FILE", help="the site's policy: trust its trusted_bundle_signers")
    p.add_argument("--allow-unsigned", action="store_true",
                   help="use an unsigned or untrusted bundle anyway; outputs record 'signature: unverified'")


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
                   help="score a lesion lacking a clinical value with the DLR model (recorded as fallback: dlr)")
    trust_args(p)
    _force(p)

    p = add("reader-study", lambda a: a.reader_func(a), "radiologist reading study: packet, simulated reads, Table 3")
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
    trust_args(q)
    _force(q)
    q = rsub.add_parser("analyze", help="Table 3 (AUC, accuracy, sens., spec., PPV, NPV; DeLong) and the reader ROC figure")
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
