"""``cldlr certs`` and ``cldlr deploy``: the certificates and Flower commands of a real deployment."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .cli_args import Add
from .cli_args import config_args as _config_args


def cmd_certs_ca(args: argparse.Namespace) -> int:
    """`cldlr certs ca`: the federation's certificate authority (kept offline by the centre)."""
    from cldlr.common.deploy.pki import create_ca

    paths = create_ca(args.out, name=args.name, days=args.days, force=args.force)
    print(f"CA certificate: {paths.cert}  (give a copy to the SuperLink host and every hospital)")
    print(f"CA key:         {paths.key}  (SECRET: keep offline; needed only to issue server certificates)")
    return 0


def cmd_certs_server(args: argparse.Namespace) -> int:
    """`cldlr certs server`: the SuperLink's TLS certificate, signed by the federation CA."""
    from cldlr.common.deploy.pki import create_server_cert

    paths = create_server_cert(args.out, ca_dir=args.ca_dir, hosts=args.hosts, days=args.days, force=args.force)
    print(f"server certificate: {paths.cert}\nserver key:         {paths.key}  (SECRET)")
    print(f"CA copy:            {paths.ca_cert}")
    print(f"flower-superlink --ssl-ca-certfile {paths.ca_cert} --ssl-certfile {paths.cert} "
          f"--ssl-keyfile {paths.key} --enable-supernode-auth")
    return 0


def cmd_certs_node(args: argparse.Namespace) -> int:
    """`cldlr certs node`: a hospital's SuperNode key pair (the public half is registered at the centre)."""
    from cldlr.common.deploy.pki import create_node_keys

    private, public = create_node_keys(args.out, name=args.name, force=args.force)
    print(f"SuperNode private key: {private}  (SECRET: stays at the hospital)")
    print(f"SuperNode public key:  {public}  (send to the centre: flwr supernode register {public.name} <connection>)")
    print(f"flower-supernode --root-certificates ca.crt --auth-supernode-private-key {private} ...")
    return 0


def cmd_certs_bundle_signer(args: argparse.Namespace) -> int:
    """`cldlr certs bundle-signer`: the centre's model-bundle signing key, issued by the federation CA."""
    from cldlr.common.deploy.signer import create_bundle_signer

    paths = create_bundle_signer(args.out, ca_dir=args.ca_dir, name=args.name, days=args.days, force=args.force)
    print(f"bundle signer certificate: {paths.cert}  (hospitals may pin it: cldlr predict --trust {paths.cert.name})")
    print(f"bundle signer key:         {paths.key}  (SECRET: where the centre signs bundles; keep it off the SuperLink)")
    print(f"sign a run's bundle: cldlr certs sign-bundle RUN/model --signer {args.out}  (or run.bundle_signer={args.out})")
    return 0


def cmd_certs_sign_bundle(args: argparse.Namespace) -> int:
    """`cldlr certs sign-bundle`: (re-)sign an exported model bundle with the centre's bundle signer."""
    from cldlr.common.bundle import BundleSigner, sign_bundle

    signer = BundleSigner.load(args.signer)
    sign_bundle(args.bundle, signer)
    print(f"{args.bundle}: {signer.describe()}")
    return 0


def cmd_certs_show(args: argparse.Namespace) -> int:
    """`cldlr certs show`: what each file of a PKI folder is and who must hold it."""
    from cldlr.common.deploy.pki_show import describe

    print(describe(args.dir))
    return 0


def cmd_deploy_superlink(args: argparse.Namespace) -> int:
    """`cldlr deploy superlink`: the centre's SuperLink command (TLS, node auth, loopback by default)."""
    from cldlr.common.deploy.launch import emit
    from cldlr.server.deploy import control_api_notes, superlink_command

    command = superlink_command(args.certs, host=args.host, port=args.port, database=args.database,
                                log_file=args.log_file)
    print(emit(command, run=args.run, notes=control_api_notes(args.host)))
    return 0


def cmd_deploy_proxy(args: argparse.Namespace) -> int:
    """Write the Fleet-only nginx config and print (``--run``: become) the nginx command."""
    from cldlr.common.deploy.launch import emit
    from cldlr.server.proxy import CONFIG_NAME, FLEET_PREFIX, proxy_command

    command = proxy_command(args.certs, args.out, listen=args.listen, superlink=args.superlink, max_body=args.max_body,
                            timeout_s=args.timeout, user=args.user)
    notes = [f"{args.out / CONFIG_NAME}: TLS on {args.listen}, only POST {FLEET_PREFIX}* forwarded to {args.superlink}; "
             "the SuperNodes dial this address, the flwr CLI stays on the SuperLink host (127.0.0.1)"]
    print(emit(command, run=args.run, notes=notes))
    return 0


def cmd_deploy_register(args: argparse.Namespace) -> int:
    """`cldlr deploy register`: register the hospitals' SuperNode public keys at the SuperLink."""
    from cldlr.common.deploy.launch import emit
    from cldlr.server.deploy import register_command, write_connection

    if args.certs is not None:
        write_connection(args.connection, args.address, args.certs / "ca.crt")
    print(emit(register_command(args.pub, args.connection, name=args.name), run=args.run))
    return 0


def cmd_deploy_supernode(args: argparse.Namespace) -> int:
    """`cldlr deploy supernode`: a hospital's SuperNode command, after its site folder validates."""
    from cldlr.client.deploy import NO_POLICY_NOTE, supernode_command
    from cldlr.common.deploy.launch import emit

    command = supernode_command(args.superlink, args.ca, args.key, args.data_path, port=args.port,
                                site_name=args.site_name, schema=args.schema, state_dir=args.state_dir, policy=args.policy)
    notes = [NO_POLICY_NOTE] if args.policy is None else [
        "--isolation process: this SuperNode starts no ClientApp itself; run the FAB gate beside it: "
        f"cldlr deploy clientapp --policy {args.policy} --port {args.port} --run"]
    print(emit(command, run=args.run, notes=notes))
    return 0


def cmd_deploy_clientapp(args: argparse.Namespace) -> int:
    """Print (``--run``: become) the FAB gate that starts a ClientApp only for an approved FAB."""
    from cldlr.client.deploy import clientapp_command
    from cldlr.common.deploy.launch import emit

    print(emit(clientapp_command(args.policy, port=args.port), run=args.run))
    return 0


def cmd_deploy_fab_hash(args: argparse.Namespace) -> int:
    """Print the sha256 a site lists in ``approved_fabs`` for a FAB (folder packed as ``flwr run`` packs it, or a file)."""
    from cldlr.client.fab_gate import fab_sha256
    from cldlr.server.deploy import app_dir

    target = args.app if args.app is not None and args.app.is_file() else app_dir(args.app)
    print(fab_sha256(target))
    return 0


def cmd_deploy_connection(args: argparse.Namespace) -> int:
    """`cldlr deploy connection`: the ``flwr`` CLI's connection to the centre's SuperLink."""
    from cldlr.server.deploy import write_connection

    path = write_connection(args.name, args.address, args.ca, make_default=args.default, force=args.force)
    print(f"connection {args.name!r} → {args.address} in {path}\n"
          f"check it with: flwr supernode list {args.name}")
    return 0


def cmd_deploy_run(args: argparse.Namespace) -> int:
    """`cldlr deploy run`: submit the study with ``flwr run``."""
    from cldlr.common.deploy.launch import emit
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

    def action(name: str, func: Callable[[argparse.Namespace], int], help_text: str, *,
               runs: bool = True) -> argparse.ArgumentParser:
        q = dsub.add_parser(name, help=help_text, description=help_text)
        q.set_defaults(func=func)
        if runs:
            q.add_argument("--run", action="store_true", help="execute the printed command (this process becomes it)")
        return q

    q = action("superlink", cmd_deploy_superlink, "centre: flower-superlink with TLS, SuperNode auth, no runtime installs")
    q.add_argument("--certs", type=Path, required=True, metavar="DIR", help="ca.crt, server.crt, server.key (cldlr certs server)")
    q.add_argument("--host", default="127.0.0.1",
                   help="bind address (default 127.0.0.1: the Control API has no authentication; hospitals come in "
                        "through `cldlr deploy proxy`; any other address is warned about)")
    q.add_argument("--port", type=int, default=9092, help="the single HTTPS port (Fleet + Control API; default 9092)")
    q.add_argument("--database", type=Path, help="SQLite file: registered nodes and runs survive a restart")
    q.add_argument("--log-file", type=Path, help="rotating SuperLink log file")
    q = action("proxy", cmd_deploy_proxy, "centre: nginx in front of the SuperLink, TLS, forwarding only the Fleet API")
    q.add_argument("out", type=Path, metavar="OUT_DIR", help="where nginx.conf, logs/, tmp/ and the pid file go")
    q.add_argument("--certs", type=Path, required=True, metavar="DIR", help="ca.crt, server.crt, server.key (cldlr certs server)")
    q.add_argument("--listen", required=True, metavar="HOST:PORT", help="the address the hospitals dial, e.g. 0.0.0.0:9092")
    q.add_argument("--superlink", required=True, metavar="127.0.0.1:PORT", help="the SuperLink (cldlr deploy superlink)")
    q.add_argument("--max-body", default="512m", help="largest request body (a weight chunk is 5 MB; default 512m)")
    q.add_argument("--timeout", type=int, default=300, help="seconds a transfer may stall before nginx drops it (300)")
    q.add_argument("--user", help="system user of nginx's worker processes when started as root (default: nginx's)")
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
    q.add_argument("--policy", type=Path, help="the site's policy file: run only the FABs it approves "
                                                "(--isolation process; start `cldlr deploy clientapp` beside it)")
    q = action("clientapp", cmd_deploy_clientapp,
               "hospital: the FAB gate beside a --policy SuperNode; starts a ClientApp only for an approved FAB")
    q.add_argument("--policy", type=Path, required=True, help="the site's policy file (approved_fabs)")
    q.add_argument("--port", type=int, default=9094, help="the SuperNode's local Runtime API port (its --port; default 9094)")
    q = action("fab-hash", cmd_deploy_fab_hash, "print the sha256 of the FAB `flwr run` packs (for approved_fabs)", runs=False)
    q.add_argument("app", nargs="?", type=Path, metavar="APP_DIR|FILE.fab",
                   help="a Flower app folder or a .fab file (default: the installed cldlr checkout)")
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


def add_deploy_commands(sub: Any, add: Add) -> None:
    """Register ``certs`` and ``deploy``."""
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
    q = csub.add_parser("bundle-signer", help="issue the centre's model-bundle signing key (bundle-signer.key, .pem)")
    q.set_defaults(certs_func=cmd_certs_bundle_signer)
    q.add_argument("out", type=Path, metavar="OUT_DIR")
    q.add_argument("--ca-dir", type=Path, required=True, help="folder with ca.crt and ca.key")
    q.add_argument("--name", default="cldlr bundle signer", help="signer common name")
    q.add_argument("--days", type=int, default=1095)
    q.add_argument("--force", action="store_true", help=overwrite)
    q = csub.add_parser("sign-bundle", help="sign an exported model bundle with the centre's bundle signer")
    q.set_defaults(certs_func=cmd_certs_sign_bundle)
    q.add_argument("bundle", type=Path, metavar="BUNDLE")
    q.add_argument("--signer", type=Path, required=True, metavar="DIR", help="folder with bundle-signer.key and .pem")
    q = csub.add_parser("show", help="who holds which file, and checks on every certificate/key in a folder")
    q.set_defaults(certs_func=cmd_certs_show)
    q.add_argument("dir", type=Path, metavar="DIR")

    _deploy_parser(sub)
