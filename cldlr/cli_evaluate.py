"""``cldlr evaluate``: external testing of a model bundle on labelled site folders (runs where the data is)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cldlr.common.errors import CldlrError

from .cli_args import Add, bundle_trust
from .cli_args import force as _force


def _sensitivity(text: str) -> float:
    value = float(text.rstrip("%")) / (100.0 if text.endswith("%") or float(text.rstrip("%")) > 1 else 1.0)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: a sensitivity is in (0, 1] (or a percentage, e.g. 95%)")
    return value


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``cldlr evaluate``: Table 2, calibration, decision curve, biopsies avoided and subgroups per site and pooled."""
    from cldlr.client.evaluate import evaluate
    from cldlr.client.evaluate_measures import EvaluationSettings
    from cldlr.client.predict import site_trust
    from cldlr.common.data.columns import parse_column_map

    if args.n_boot < 1:
        raise CldlrError(f"--n-boot {args.n_boot}: need at least one bootstrap resample")
    settings = EvaluationSettings(unit=args.unit, by=tuple(args.by), n_bins=args.bins,
                                  sensitivities=tuple(args.sensitivity or (0.95, 0.98)), n_boot=args.n_boot,
                                  seed=args.seed, allow_missing_clinical=args.allow_missing_clinical,
                                  columns=tuple(parse_column_map(args.map).items()))
    out = evaluate(args.model, args.sites, args.out, against=args.against, settings=settings,
                   recalibrate=args.recalibrate, recalibrated_out=args.recalibrated_out,
                   trust=site_trust(args.trust, args.policy), allow_unsigned=args.allow_unsigned, signer=args.signer,
                   force=args.force)
    print(f"report: {out / 'report.md'}\njson:   {out / 'report.json'}\npredictions: {out / 'predictions.csv'}")
    if args.recalibrated_out is not None:
        print(f"recalibrated bundle: {args.recalibrated_out}")
    return 0


def add_evaluate_commands(sub: Any, add: Add) -> None:
    """Register ``evaluate``."""
    p = add("evaluate", cmd_evaluate, "test a model bundle on labelled sites: Table 2, calibration, decision curve, "
                                      "biopsies avoided, subgroups")
    p.add_argument("--model", type=Path, required=True, metavar="BUNDLE", help="bundle folder (a run's model/)")
    p.add_argument("sites", type=Path, nargs="+", metavar="SITE", help="labelled site folder(s) in the data contract")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="new report folder")
    p.add_argument("--against", type=Path, metavar="BUNDLE2", help="a second bundle: paired DeLong test on the same cases")
    p.add_argument("--by", action="append", default=[], metavar="COLUMN",
                   help="subgroups by a categorical column of clinical.csv, e.g. --by birads (repeatable)")
    p.add_argument("--unit", choices=["lesion", "patient", "image"], default="lesion",
                   help="unit of analysis (default lesion: the mean score of its images; image: clustered CIs)")
    p.add_argument("--sensitivity", type=_sensitivity, action="append", metavar="S",
                   help="target sensitivity of the biopsy operating point (repeatable; default 0.95 and 0.98)")
    p.add_argument("--map", action="append", default=[], metavar="SITE_COLUMN=SCHEMA_NAME",
                   help="read the sites' column SITE_COLUMN as SCHEMA_NAME (repeatable; the sites are not copied)")
    p.add_argument("--bins", type=int, default=10, help="reliability-diagram bins (default 10)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the operating-point CIs")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--recalibrate", type=Path, metavar="SITE",
                   help="labelled local sample: fit an intercept/slope update of the probabilities on it")
    p.add_argument("--recalibrated-out", type=Path, metavar="NEWBUNDLE", help="where the recalibrated bundle goes")
    p.add_argument("--signer", type=Path, metavar="DIR",
                   help="folder with bundle-signer.key/.pem (cldlr certs bundle-signer) that signs the recalibrated "
                        "bundle; default: a recalibration-local key (certificate: <out>/recalibration-signer.pem)")
    p.add_argument("--allow-missing-clinical", action="store_true",
                   help="score a lesion lacking a clinical value with the DLR model (the Clinical model is then left out)")
    bundle_trust(p)
    _force(p)
