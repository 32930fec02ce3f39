"""Centre side of a real deployment: the SuperLink command, node registration, the CLI connection, runs.

Thin on purpose: each function returns the Flower command it stands for (see
:mod:`cldlr.common.deploy.launch`), so the operator sees and may reuse exactly what runs. The SuperLink
always gets TLS, SuperNode authentication and no runtime dependency installation (that would
need the internet at run time and let a submitted app change the installed packages).
"""

from __future__ import annotations

import logging
import os
import shlex
import tomllib
from pathlib import Path
from typing import Any

import tomli_w
from cryptography import x509

import cldlr
from cldlr.common.deploy.launch import Command, check_address, existing_file, flower_command, is_loopback, key_values
from cldlr.common.deploy.pki import CA_CERT, SERVER_CERT, SERVER_KEY, load_node_public_key
from cldlr.common.errors import CldlrError
from cldlr.common.io import atomic_write_text

log = logging.getLogger(__name__)

DEFAULT_PORT = 9092
CONFIG_FILE = "config.toml"
DEFAULT_HOST = "127.0.0.1"
CONTROL_API_NOTE = ("the SuperLink's single port also serves its Control API, which has NO authentication in "
                    "Flower 1.41: allow only the hospitals' and the centre's addresses to reach it (see docs/DEPLOY.md)")
LOOPBACK_NOTE = ("the SuperLink's single port also serves its Control API, which has NO authentication in Flower 1.41; "
                 "it listens on this host only: let the hospitals in through `cldlr deploy proxy` (Fleet API only)")


def control_api_notes(host: str) -> list[str]:
    """What the operator must know about the unauthenticated Control API on ``host``.

    On a loopback address only this host reaches it (the hospitals come through the proxy); on
    any other address whoever reaches the port can submit a run, whose code every SuperNode runs.
    """
    if is_loopback(host):
        return [LOOPBACK_NOTE]
    return [f"--host {host} EXPOSES the Control API: anyone who reaches this port can submit a run, and a run's code "
            "executes on every hospital's SuperNode that has not pinned its FABs; keep 127.0.0.1 and use "
            "`cldlr deploy proxy`, or firewall the port to an allow-list", CONTROL_API_NOTE]


def superlink_command(certs: str | os.PathLike[str], *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                      database: str | os.PathLike[str] | None = None, log_file: str | os.PathLike[str] | None = None) -> Command:
    """``flower-superlink`` with TLS from ``certs`` (``cldlr certs server`` output), node auth, no uv sync.

    ``database`` keeps registered nodes and runs across restarts (else they live in memory and
    every SuperNode must be registered again after a restart). ``host`` is 127.0.0.1 by default:
    the port also serves the unauthenticated Control API, so the hospitals reach the Fleet API
    through ``cldlr deploy proxy``; any other address logs a warning.
    """
    if not is_loopback(host):
        log.warning(control_api_notes(host)[0])
    folder = Path(certs).expanduser().resolve()
    hint = f"issue them with `cldlr certs server {folder} --ca-dir CA_DIR --host <name hospitals dial>`"
    files = [existing_file(folder / name, name, hint) for name in (CA_CERT, SERVER_CERT, SERVER_KEY)]
    args = ["--ssl-ca-certfile", str(files[0]), "--ssl-certfile", str(files[1]), "--ssl-keyfile", str(files[2]),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--host", host, "--port", str(port)]
    if database is not None:
        args += ["--database", str(Path(database).expanduser().resolve())]
    if log_file is not None:
        args += ["--log-file", str(Path(log_file).expanduser().resolve())]
    return flower_command("flower-superlink", args)


def flwr_home() -> Path:
    """Where the ``flwr`` CLI keeps its connections: ``$FLWR_HOME``, else ``~/.flwr``."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")


def _default_config() -> dict[str, Any]:
    """What ``flwr`` itself would create, so its local simulation connection keeps working."""
    from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML

    return tomllib.loads(DEFAULT_FLOWER_CONFIG_TOML)


def write_connection(name: str, address: str, ca: str | os.PathLike[str], *, make_default: bool = False,
                     force: bool = False, home: str | os.PathLike[str] | None = None) -> Path:
    """Add ``[superlink.<name>]`` (address, CA) to ``$FLWR_HOME/config.toml``; returns the file.

    Other connections are kept; an existing different entry of that name is replaced only with
    ``force``; the previous file is kept as ``config.toml.bak``; the write is atomic.
    """
    if not name.replace("-", "").replace("_", "").isalnum():
        raise CldlrError(f"connection name {name!r}: use letters, digits, '-' or '_'")
    check_address(address, "--address")
    ca_path = existing_file(ca, "CA certificate", "copy ca.crt from the centre (`cldlr certs ca` made it)")
    try:
        x509.load_pem_x509_certificate(ca_path.read_bytes())
    except ValueError as exc:
        raise CldlrError(f"{ca_path} is not a PEM certificate ({exc}); pass the federation's ca.crt") from exc
    path = Path(home).expanduser() if home is not None else flwr_home()
    path = path / CONFIG_FILE
    if path.is_file():
        try:
            config = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise CldlrError(f"{path} is not valid TOML ({exc}); fix or move it, then run this again") from exc
    else:
        config = _default_config()
    links = config.setdefault("superlink", {})
    entry = {"address": address, "root-certificates": str(ca_path)}
    old = links.get(name)
    if old == entry and (not make_default or links.get("default") == name):
        log.info("connection %r in %s is already up to date", name, path)
        return path
    if old is not None and old != entry and not force:
        raise CldlrError(f"{path} already has a different connection {name!r} ({old}); "
                         "pick another --name or pass --force to replace it")
    links[name] = entry
    if make_default:
        links["default"] = name
    if path.is_file():
        atomic_write_text(path.with_name(CONFIG_FILE + ".bak"), path.read_text(encoding="utf-8"))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, tomli_w.dumps(config))
    log.info("connection %r → %s written to %s", name, address, path)
    return path


def register_command(public_key: str | os.PathLike[str], connection: str, *, name: str | None = None) -> Command:
    """``flwr supernode register`` for a hospital's ``supernode-<site>.pub`` (checked to be ECDSA first)."""
    pub = existing_file(public_key, "public key", "ask the hospital for its supernode-<site>.pub")
    load_node_public_key(pub)
    if name is None and pub.stem.startswith("supernode-"):
        name = pub.stem.removeprefix("supernode-")
    args = ["supernode", "register", str(pub), connection] + (["--name", name] if name else [])
    return flower_command("flwr", args)


def app_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The folder ``flwr run`` packs: the cldlr checkout whose pyproject.toml has ``[tool.flwr.app]``."""
    candidates = [Path(explicit)] if explicit is not None else [Path(cldlr.__file__).resolve().parents[1], Path.cwd()]
    for folder in candidates:
        project = folder.expanduser().resolve() / "pyproject.toml"
        if project.is_file() and "flwr" in tomllib.loads(project.read_text(encoding="utf-8")).get("tool", {}):
            return project.parent
    raise CldlrError(f"no Flower app definition ([tool.flwr.app] in pyproject.toml) in {', '.join(map(str, candidates))}; "
                     "pass --app with the path of a cldlr checkout")


def run_command(connection: str, config: str | os.PathLike[str], *, overrides: list[str] | None = None,
                run_dir: str | os.PathLike[str] | None = None, resume: bool = False, stream: bool = True,
                app: str | os.PathLike[str] | None = None) -> Command:
    """``flwr run <app> <connection> --run-config 'config=... overrides=... run-dir=... resume=...'``.

    Paths become absolute because the ServerApp reads them on the SuperLink host from its own
    working directory; the study config is loaded here first so a typo fails before submission.
    """
    from cldlr.common.config import load_config

    study = existing_file(config, "study config", "pass the YAML of the study (see configs/)")
    load_config(study, list(overrides or []))
    settings: dict[str, str | bool] = {"config": str(study)}
    if overrides:
        settings["overrides"] = shlex.join(overrides)
    if run_dir is not None:
        settings["run-dir"] = str(Path(run_dir).expanduser().resolve())
    if resume:
        if run_dir is None:
            raise CldlrError("--resume needs --run-dir: the folder of the run to continue")
        settings["resume"] = True
    args = ["run", str(app_dir(app)), connection, "--run-config", key_values(settings)]
    if stream:
        args.append("--stream")
    return flower_command("flwr", args)


__all__ = ["CONTROL_API_NOTE", "DEFAULT_HOST", "DEFAULT_PORT", "LOOPBACK_NOTE", "app_dir", "control_api_notes", "flwr_home",
           "register_command", "run_command", "superlink_command", "write_connection"]
