"""The ``cldlr`` command line: a thin argparse layer over functions in the subpackages.

Each subcommand parses its arguments, calls one library function and prints its result;
heavy modules are imported lazily so ``cldlr --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cldlr import __version__
from cldlr.common.errors import CldlrError
from cldlr.common.logs import LEVELS, configure_logging

from .cli_args import config_args as _config_args
from .cli_args import force as _force
from .cli_args import study_config
from .cli_clinic import add_clinic_commands
from .cli_deploy import add_deploy_commands
from .cli_evaluate import add_evaluate_commands
from .cli_site import add_site_commands

log = logging.getLogger("cldlr")


def cmd_validate(args: argparse.Namespace) -> int:
    """`cldlr validate`: report every problem of a site folder and which commands it serves; exit 1 when invalid."""
    from cldlr.common.data.columns import parse_column_map
    from cldlr.common.data.imaging import DEFAULT_MAX_IMAGE_PIXELS
    from cldlr.common.data.schema import load_schema
    from cldlr.common.data.validation import validate_site

    cap = DEFAULT_MAX_IMAGE_PIXELS if args.max_image_pixels is None else args.max_image_pixels
    if cap < 1:
        raise CldlrError(f"--max-image-pixels must be >= 1, got {cap}")
    report = validate_site(args.site, load_schema(args.schema), purpose=args.purpose, columns=parse_column_map(args.map),
                           max_image_pixels=cap)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format_text())
    return 0 if report.ok else 1


def cmd_import_bus_bra(args: argparse.Namespace) -> int:
    """`cldlr import bus-bra`: the BUS-BRA release as site folders with lesion descriptors and a schema."""
    from cldlr.client.importers.bus_bra import import_bus_bra

    summary = import_bus_bra(
        args.src, args.out, birads=args.birads, sites=args.sites,
        min_site_patients=args.min_site_patients, small_sites=args.small_sites, force=args.force,
    )
    print(summary)
    return 0


def cmd_import_class_folders(args: argparse.Namespace) -> int:
    """`cldlr import class-folders`: benign/ and malignant/ folders as one site folder."""
    from cldlr.client.importers.class_folders import import_class_folders

    print(import_class_folders(args.src, args.out, force=args.force))
    return 0


def cmd_phantom(args: argparse.Namespace) -> int:
    """`cldlr phantom`: deterministic synthetic multi-site data for demos and tests."""
    from cldlr.simulations.phantom import generate_phantom

    print(generate_phantom(
        args.out, sites=args.sites, images_per_site=args.images_per_site, seed=args.seed,
        image_size=args.image_size, force=args.force,
    ))
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    """`cldlr split`: a copy of a site with a patient-level stratified train/test split."""
    from cldlr.common.data.schema import load_schema
    from cldlr.common.data.splits import split_site

    print(split_site(args.site, args.out, load_schema(args.schema), test_fraction=args.test_fraction,
                     seed=args.seed, force=args.force))
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    """`cldlr partition`: one dataset cut into patient-disjoint virtual sites."""
    from cldlr.common.data.schema import load_schema
    from cldlr.common.data.splits import partition_site

    print(partition_site(
        args.site, args.out, load_schema(args.schema), by=args.by, column=args.column,
        num_sites=args.num_sites, alpha=args.alpha, seed=args.seed, force=args.force,
    ))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """`cldlr cache`: decode a site's ROIs once into its content-addressed cache."""
    from cldlr.common.data.roi import build_site_cache
    from cldlr.common.data.schema import load_schema

    config = study_config(args)
    cache = build_site_cache(args.site, load_schema(config.data.schema), config.data, weights=config.model.weights)
    print(f"ROI cache: {cache.path} ({len(cache.image_ids)} ROIs at {cache.images.shape[-1]} px)")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    """`cldlr simulate`: a pooled, local or federated study (or a comparison) on this machine."""
    from cldlr.simulations.runner import simulate

    config = study_config(args)
    run_dir = simulate(config, compare=args.compare, resume=args.resume, repeats=args.repeats)
    print(f"report: {run_dir / 'report.md'}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    """`cldlr pretrain`: the backbone on the sites' archives outside the study cohort → a model.weights file."""
    from cldlr.simulations.pretrain import pretrain

    out = pretrain(study_config(args), args.archive, args.out, force=args.force, drop_overlap=args.drop_overlap)
    print(f"weights: {out} (use --set model.weights={out})")
    return 0


def cmd_compare_backbones(args: argparse.Namespace) -> int:
    """`cldlr compare-backbones`: every registry backbone on the same split (Table S2)."""
    from cldlr.simulations.backbones import compare_backbones

    config = study_config(args)
    out = compare_backbones(config, backbones=args.backbones)
    print(f"table: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; sub-command groups live in ``cli_clinic``, ``cli_deploy`` and ``cli_site``."""
    parser = argparse.ArgumentParser(prog="cldlr", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"cldlr {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (= --log-level DEBUG)")
    parser.add_argument("--log-level", type=str.upper, choices=LEVELS, default=None,
                        help="log level; overrides the config's run.log_level (default: that, else INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    p = add("validate", cmd_validate, "check a site folder against the data contract and schema (reads only)")
    p.add_argument("site", type=Path)
    p.add_argument("--schema", type=Path, required=True)
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument("--for", dest="purpose", choices=["any", "study", "predict"], default="any",
                   help="what the folder must serve (default any: say which commands it serves; an unlabelled "
                        "folder serves predict only)")
    p.add_argument("--map", action="append", default=[], metavar="SITE_COLUMN=SCHEMA_NAME",
                   help="read the site's column SITE_COLUMN as SCHEMA_NAME (repeatable)")
    p.add_argument("--max-image-pixels", type=int, metavar="N",
                   help="most pixels an image or mask header may declare, checked before decoding "
                        "(default 67108864 = 8192 x 8192)")

    p = add("import", lambda a: a.import_func(a), "turn a public/in-house layout into site folders")
    isub = p.add_subparsers(dest="layout", required=True, metavar="LAYOUT")
    q = isub.add_parser("bus-bra", help="the BUS-BRA release → one site per device (or one site)")
    q.set_defaults(import_func=cmd_import_bus_bra)
    q.add_argument("src", type=Path)
    q.add_argument("out", type=Path)
    q.add_argument("--birads", type=int, action="append", help="keep only these BI-RADS categories (repeatable)")
    q.add_argument("--sites", choices=["device", "single"], default="device")
    q.add_argument("--min-site-patients", type=int, default=20,
                   help="a device site with fewer patients is merged or dropped (default 20)")
    q.add_argument("--small-sites", choices=["merge", "drop"], default="merge",
                   help="merge a too-small site into the largest one, or drop it")
    _force(q)
    q = isub.add_parser("class-folders", help="benign/ malignant/ folders with <name>_mask*.png masks → one site")
    q.set_defaults(import_func=cmd_import_class_folders)
    q.add_argument("src", type=Path)
    q.add_argument("out", type=Path)
    _force(q)

    p = add("phantom", cmd_phantom, "generate a deterministic synthetic multi-site dataset")
    p.add_argument("out", type=Path)
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--images-per-site", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=160, help="side of the generated B-mode images (px)")
    _force(p)

    p = add("split", cmd_split, "patient-level stratified train/test split written to a copy of a site")
    p.add_argument("site", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--schema", type=Path, required=True)
    p.add_argument("--test-fraction", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    _force(p)

    p = add("partition", cmd_partition, "split one dataset into patient-disjoint virtual sites")
    p.add_argument("site", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--schema", type=Path, required=True)
    p.add_argument("--by", choices=["column", "iid", "dirichlet"], default="column")
    p.add_argument("--column", default="device")
    p.add_argument("--num-sites", type=int, default=3)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration over labels")
    p.add_argument("--seed", type=int, default=0)
    _force(p)

    add_deploy_commands(sub, add)

    p = add("cache", cmd_cache, "preprocess a site's ROIs into the cache once")
    p.add_argument("site", type=Path)
    _config_args(p)

    p = add("simulate", cmd_simulate, "run a study (pooled, local or federated) on one machine and write a report")
    _config_args(p)
    p.add_argument("--compare", action="store_true", help="Pooled vs Local-i vs the strategies of federation.compare_strategies")
    p.add_argument("--resume", type=Path, default=None, help="continue the run in this folder")
    p.add_argument("--repeats", type=int, default=1, metavar="N",
                   help="run over N patient-level splits (split and seed + r) and report mean ± sd; resumable")

    p = add("pretrain", cmd_pretrain, "pretrain the backbone on images outside the study cohort (federated or pooled)")
    _config_args(p)
    p.add_argument("--archive", type=Path, required=True,
                   help="a site folder or folder of sites with the images outside the study cohort (other BI-RADS)")
    p.add_argument("--out", type=Path, required=True, help="the weights file to write (.pt, or .safetensors)")
    p.add_argument("--force", action="store_true", help="replace an existing weights file")
    p.add_argument("--drop-overlap", action="store_true",
                   help="leave out the archive's images of patients who are in the study cohort (else refused)")

    p = add("compare-backbones", cmd_compare_backbones, "train every registry backbone on the same split (Table S2)")
    _config_args(p)
    p.add_argument("--backbones", nargs="+", default=None)

    add_clinic_commands(sub, add)
    add_evaluate_commands(sub, add)
    add_site_commands(sub, add)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a :class:`CldlrError` becomes its message on stderr and exit code 2, not a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose and args.log_level is None:
        args.log_level = "DEBUG"
    configure_logging(args.log_level or logging.INFO)
    try:
        return int(args.func(args))
    except (CldlrError, FileExistsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        report = getattr(exc, "report", None)
        if report is not None and hasattr(report, "format_text"):
            print(report.format_text(), file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
