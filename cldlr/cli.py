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

log = logging.getLogger("cldlr")


def _config_args(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument("config", type=Path, nargs=None if required else "?", help="YAML config (see configs/)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=2 (repeatable)",
    )


def cmd_validate(args: argparse.Namespace) -> int:
    from cldlr.common.validation import validate_site
    from cldlr.common.schema import load_schema

    report = validate_site(args.site, load_schema(args.schema))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format_text())
    return 0 if report.ok else 1


def cmd_import_bus_bra(args: argparse.Namespace) -> int:
    from cldlr.client.importers.bus_bra import import_bus_bra

    summary = import_bus_bra(
        args.src, args.out, birads=args.birads, sites=args.sites,
        min_site_patients=args.min_site_patients, small_sites=args.small_sites, force=args.force,
    )
    print(summary)
    return 0


def cmd_import_class_folders(args: argparse.Namespace) -> int:
    from cldlr.client.importers.class_folders import import_class_folders

    print(import_class_folders(args.src, args.out, force=args.force))
    return 0


def cmd_phantom(args: argparse.Namespace) -> int:
    from cldlr.simulations.phantom import generate_phantom

    print(generate_phantom(
        args.out, sites=args.sites, images_per_site=args.images_per_site, seed=args.seed,
        image_size=args.image_size, force=args.force,
    ))
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from cldlr.common.schema import load_schema
    from cldlr.common.splits import split_site

    print(split_site(args.site, args.out, load_schema(args.schema), test_fraction=args.test_fraction,
                     seed=args.seed, force=args.force))
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    from cldlr.common.schema import load_schema
    from cldlr.common.splits import partition_site

    print(partition_site(
        args.site, args.out, load_schema(args.schema), by=args.by, column=args.column,
        num_sites=args.num_sites, alpha=args.alpha, seed=args.seed, force=args.force,
    ))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from cldlr.common.config import load_config
    from cldlr.common.roi import build_site_cache
    from cldlr.common.schema import load_schema

    config = load_config(args.config, args.overrides)
    cache = build_site_cache(args.site, load_schema(config.data.schema), config.data, weights=config.model.weights)
    print(f"ROI cache: {cache.path} ({len(cache.image_ids)} ROIs at {cache.images.shape[-1]} px)")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from cldlr.common.config import load_config
    from cldlr.simulations.runner import simulate

    config = load_config(args.config, args.overrides)
    run_dir = simulate(config, compare=args.compare, resume=args.resume)
    print(f"report: {run_dir / 'report.md'}")
    return 0


def cmd_compare_backbones(args: argparse.Namespace) -> int:
    from cldlr.common.config import load_config
    from cldlr.simulations.backbones import compare_backbones

    config = load_config(args.config, args.overrides)
    out = compare_backbones(config, backbones=args.backbones)
    print(f"table: {out}")
    return 0


def cmd_certs_ca(args: argparse.Namespace) -> int:
    from cldlr.common.pki import create_ca

    paths = create_ca(args.out, name=args.name, days=args.days, force=args.force)
    print(f"CA certificate: {paths.cert}  (give a copy to the SuperLink host and every hospital)")
    print(f"CA key:         {paths.key}  (SECRET: keep offline; needed only to issue server certificates)")
    return 0


def cmd_certs_server(args: argparse.Namespace) -> int:
    from cldlr.common.pki import create_server_cert

    paths = create_server_cert(args.out, ca_dir=args.ca_dir, hosts=args.hosts, days=args.days, force=args.force)
    print(f"server certificate: {paths.cert}\nserver key:         {paths.key}  (SECRET)")
    print(f"CA copy:            {paths.ca_cert}")
    print(f"flower-superlink --ssl-ca-certfile {paths.ca_cert} --ssl-certfile {paths.cert} "
          f"--ssl-keyfile {paths.key} --enable-supernode-auth")
    return 0


def cmd_certs_node(args: argparse.Namespace) -> int:
    from cldlr.common.pki import create_node_keys

    private, public = create_node_keys(args.out, name=args.name, force=args.force)
    print(f"SuperNode private key: {private}  (SECRET: stays at the hospital)")
    print(f"SuperNode public key:  {public}  (send to the centre: flwr supernode register {public.name} <connection>)")
    print(f"flower-supernode --root-certificates ca.crt --auth-supernode-private-key {private} ...")
    return 0


def cmd_certs_show(args: argparse.Namespace) -> int:
    from cldlr.common.pki import describe

    print(describe(args.dir))
    return 0


def cmd_deploy_superlink(args: argparse.Namespace) -> int:
    from cldlr.common.launch import emit
    from cldlr.server.deploy import CONTROL_API_NOTE, superlink_command

    command = superlink_command(args.certs, host=args.host, port=args.port, database=args.database,
                                log_file=args.log_file)
    print(emit(command, run=args.run, notes=[CONTROL_API_NOTE]))
    return 0


def cmd_deploy_register(args: argparse.Namespace) -> int:
    from cldlr.common.launch import emit
    from cldlr.server.deploy import register_command, write_connection

    if args.certs is not None:
        write_connection(args.connection, args.address, args.certs / "ca.crt")
    print(emit(register_command(args.pub, args.connection, name=args.name), run=args.run))
    return 0


def cmd_deploy_supernode(args: argparse.Namespace) -> int:
    from cldlr.client.deploy import supernode_command
    from cldlr.common.launch import emit

    command = supernode_command(args.superlink, args.ca, args.key, args.data_path, port=args.port,
                                site_name=args.site_name, schema=args.schema, state_dir=args.state_dir)
    print(emit(command, run=args.run))
    return 0


def cmd_deploy_connection(args: argparse.Namespace) -> int:
    from cldlr.server.deploy import write_connection

    path = write_connection(args.name, args.address, args.ca, make_default=args.default, force=args.force)
    print(f"connection {args.name!r} → {args.address} in {path}\n"
          f"check it with: flwr supernode list {args.name}")
    return 0


def cmd_deploy_run(args: argparse.Namespace) -> int:
    from cldlr.common.launch import emit
    from cldlr.server.deploy import run_command

    command = run_command(args.connection, args.config, overrides=args.overrides, run_dir=args.run_dir,
                          resume=args.resume, stream=not args.detach, app=args.app)
    print(emit(command, run=args.run))
    return 0


def _deploy_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``cldlr deploy ...``: print (``--run``: execute) the Flower commands of a real deployment."""
    text = "print (or --run) the Flower commands of a real deployment: SuperLink, SuperNodes, runs"
    p = sub.add_parser("deploy", help=text, description=text + ". See docs/DEPLOY.md.")
    dsub = p.add_subparsers(dest="deploy_command", required=True, metavar="ACTION")

    def action(name: str, func: Callable[[argparse.Namespace], int], help_text: str, *, runs: bool = True) -> argparse.ArgumentParser:
        q = dsub.add_parser(name, help=help_text, description=help_text)
        q.set_defaults(func=func)
        if runs:
            q.add_argument("--run", action="store_true", help="execute the printed command (this process becomes it)")
        return q

    q = action("superlink", cmd_deploy_superlink, "centre: flower-superlink with TLS, SuperNode auth, no runtime installs")
    q.add_argument("--certs", type=Path, required=True, metavar="DIR", help="ca.crt, server.crt, server.key (cldlr certs server)")
    q.add_argument("--host", default="0.0.0.0", help="bind address (default 0.0.0.0; firewall the port, see docs/DEPLOY.md)")
    q.add_argument("--port", type=int, default=9092, help="the single HTTPS port (Fleet + Control API; default 9092)")
    q.add_argument("--database", type=Path, help="SQLite file: registered nodes and runs survive a restart")
    q.add_argument("--log-file", type=Path, help="rotating SuperLink log file")
    q = action("register", cmd_deploy_register, "centre: register a hospital's SuperNode public key (flwr supernode register)")
    q.add_argument("--pub", type=Path, required=True, metavar="NODE.pub", help="the hospital's supernode-<site>.pub")
    q.add_argument("--connection", default="cldlr", help="flwr connection name (default cldlr)")
    q.add_argument("--certs", type=Path, metavar="DIR", help="also write the connection, with DIR/ca.crt, to $FLWR_HOME")
    q.add_argument("--address", default="127.0.0.1:9092", help="with --certs: the SuperLink address (default 127.0.0.1:9092)")
    q.add_argument("--name", help="display name (default: the site in supernode-<site>.pub)")
    q = action("supernode", cmd_deploy_supernode, "hospital: validate the site, then flower-supernode over TLS with its key")
    q.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the centre's SuperLink (no https://)")
    q.add_argument("--ca", type=Path, required=True, metavar="ca.crt", help="the federation CA certificate")
    q.add_argument("--key", type=Path, required=True, metavar="NODE.key", help="this hospital's supernode-<site>.key")
    q.add_argument("--data-path", type=Path, required=True, metavar="SITE", help="the site folder")
    q.add_argument("--schema", type=Path, help="federation schema (default: schema.yaml in/beside the site)")
    q.add_argument("--port", type=int, default=9094, help="local Runtime API port on 127.0.0.1 (default 9094)")
    q.add_argument("--site-name", help="name shown in reports (default: the site folder's name)")
    q.add_argument("--state-dir", type=Path, help="where per-run state and caches go")
    q = action("connection", cmd_deploy_connection, "write a SuperLink connection into $FLWR_HOME/config.toml", runs=False)
    q.add_argument("--name", required=True)
    q.add_argument("--address", required=True, metavar="HOST:PORT")
    q.add_argument("--ca", type=Path, required=True, metavar="ca.crt")
    q.add_argument("--default", action="store_true", help="make it flwr's default connection")
    q.add_argument("--force", action="store_true", help="replace a different connection of that name")
    q = action("run", cmd_deploy_run, "centre: submit the study to the SuperLink (flwr run)")
    q.add_argument("--connection", required=True)
    _config_args(q)
    q.add_argument("--run-dir", type=Path, help="run folder on the SuperLink host (needed to --resume)")
    q.add_argument("--resume", action="store_true", help="continue --run-dir from its last checkpoint")
    q.add_argument("--detach", action="store_true", help="submit and return (default: stream the logs)")
    q.add_argument("--app", type=Path, help="cldlr checkout holding [tool.flwr.app] (default: the installed one)")


def cmd_predict(args: argparse.Namespace) -> int:
    from cldlr.client.predict import format_result, parse_clinical_args, predict_lesion, predict_site

    if args.site is not None:
        if args.mask is not None or args.clinical or args.overlay is not None:
            raise CldlrError("--site takes its masks and clinical values from the site folder; "
                             "drop --mask/--clinical/--overlay")
        if args.out is None:
            raise CldlrError("--site needs --out OUTDIR (predictions.csv and overlays/ are written there)")
        out = predict_site(args.model, args.site, args.out, split=args.split,
                           allow_missing_clinical=args.allow_missing_clinical, force=args.force)
        print(f"predictions: {out / 'predictions.csv'}\noverlays:    {out / 'overlays'}")
        return 0
    if args.mask is None:
        raise CldlrError("--image needs --mask MASK (the lesion outline the ROI is cut from)")
    result = predict_lesion(args.model, args.image, args.mask, parse_clinical_args(args.clinical), out=args.out,
                            overlay=args.overlay, allow_missing_clinical=args.allow_missing_clinical)
    if args.out is None:
        print(format_result(result))
    else:
        print(f"prediction: {args.out}\noverlay:    {result['overlay']}")
    return 0


def cmd_reader_packet(args: argparse.Namespace) -> int:
    from cldlr.simulations.reader_packet import make_packet

    out = make_packet(args.model, args.site, args.out, seed=args.seed, split=args.split,
                      allow_missing_clinical=args.allow_missing_clinical, force=args.force)
    print(f"reading packet: {out / 'round1.html'}, {out / 'round2.html'}, {out / 'reads_template.csv'}")
    print(f"keep private:   {out / 'key.csv'} (case → image id and truth), {out / 'model_scores.csv'}")
    return 0


def cmd_reader_analyze(args: argparse.Namespace) -> int:
    from cldlr.simulations.reader_study import analyze_reads

    out = analyze_reads(args.reads, args.truth, args.out, model_scores=args.model_scores, force=args.force)
    print((out / "table3.md").read_text(encoding="utf-8"))
    print(f"table: {out / 'table3.md'}  json: {out / 'table3.json'}  figure: {out / 'reader_roc.png'}")
    return 0


def cmd_reader_simulate(args: argparse.Namespace) -> int:
    from cldlr.simulations.reader_study import simulate_reads

    out = simulate_reads(args.truth, args.model_scores, args.out, readers=args.readers, seed=args.seed)
    print(f"simulated reads: {out}")
    return 0


def _force(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cldlr", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"cldlr {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    p = add("validate", cmd_validate, "check a site folder against the data contract and schema (reads only)")
    p.add_argument("site", type=Path)
    p.add_argument("--schema", type=Path, required=True)
    p.add_argument("--json", action="store_true", help="machine-readable report")

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

    p = add("certs", lambda a: a.certs_func(a), "TLS certificates and SuperNode keys for a real deployment")
    csub = p.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    overwrite = "replace existing keys/certificates (anything issued with the old ones stops working)"
    q = csub.add_parser("ca", help="create the federation CA (ca.crt, ca.key)")
    q.set_defaults(certs_func=cmd_certs_ca)
    q.add_argument("out", type=Path, metavar="OUT_DIR")
    q.add_argument("--name", default="cldlr federation CA", help="CA common name")
    q.add_argument("--days", type=int, default=3650)
    q.add_argument("--force", action="store_true", help=overwrite)
    q = csub.add_parser("server", help="issue the SuperLink TLS certificate (server.crt, server.key, ca.crt copy)")
    q.set_defaults(certs_func=cmd_certs_server)
    q.add_argument("out", type=Path, metavar="OUT_DIR")
    q.add_argument("--ca-dir", type=Path, required=True, help="folder with ca.crt and ca.key")
    q.add_argument("--host", dest="hosts", action="append", default=[], metavar="NAME_OR_IP",
                   help="name or IP that SuperNodes and the flwr CLI dial (repeatable; "
                        "127.0.0.1 and localhost are always added)")
    q.add_argument("--days", type=int, default=825)
    q.add_argument("--force", action="store_true", help=overwrite)
    q = csub.add_parser("node", help="create a hospital's SuperNode authentication key pair (ECDSA P-384, OpenSSH)")
    q.set_defaults(certs_func=cmd_certs_node)
    q.add_argument("out", type=Path, metavar="OUT_DIR")
    q.add_argument("--name", required=True, metavar="SITE", help="site name, used in the file names")
    q.add_argument("--force", action="store_true", help=overwrite)
    q = csub.add_parser("show", help="who holds which file, and checks on every certificate/key in a folder")
    q.set_defaults(certs_func=cmd_certs_show)
    q.add_argument("dir", type=Path, metavar="DIR")

    _deploy_parser(sub)

    p = add("cache", cmd_cache, "preprocess a site's ROIs into the cache once")
    p.add_argument("site", type=Path)
    _config_args(p)

    p = add("simulate", cmd_simulate, "run a study (pooled, local or federated) on one machine and write a report")
    _config_args(p)
    p.add_argument("--compare", action="store_true", help="Pooled vs Local-i vs FedAvg vs FedProx table")
    p.add_argument("--resume", type=Path, default=None, help="continue the run in this folder")

    p = add("compare-backbones", cmd_compare_backbones, "train every registry backbone on the same split (Table S2)")
    _config_args(p)
    p.add_argument("--backbones", nargs="+", default=None)

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
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
