"""Hospital side of a real deployment: check the site, then the ``flower-supernode`` command that joins it.

The SuperNode only dials out (HTTPS to the SuperLink); its local Runtime API listens on
127.0.0.1. Before anything starts, the site folder is validated exactly as the federation will
validate it, so a broken site is fixed here, with the full report, instead of failing the study.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cldlr.client.fab_gate import approved_fabs
from cldlr.client.policy import load_policy
from cldlr.common.data.imaging import DEFAULT_MAX_IMAGE_PIXELS
from cldlr.common.data.schema import Schema, load_schema
from cldlr.common.data.validation import ValidationReport, validate_site
from cldlr.common.deploy.launch import Command, check_address, existing_file, flower_command, key_values, python_command
from cldlr.common.deploy.pki import load_node_private_key
from cldlr.common.errors import CldlrError, ContractError

log = logging.getLogger(__name__)

DEFAULT_PORT = 9094
GATE_MODULE = "cldlr.client.fab_gate"
NO_POLICY_NOTE = ("no --policy: this SuperNode runs whatever ClientApp the centre's FAB carries; pin the FABs this "
                  "site approves with --policy FILE (approved_fabs) and `cldlr deploy clientapp` (docs/DEPLOY.md)")
CONTRACT_ONLY = Schema(name="data contract only", version=1, parameters=())


def find_schema(data_path: Path, schema: str | os.PathLike[str] | None) -> Path | None:
    """``--schema`` if given, else a ``schema.yaml`` in or beside the site (importers put it there)."""
    if schema is not None:
        return existing_file(schema, "schema", "use the federation schema file the centre sent")
    for candidate in (data_path / "schema.yaml", data_path.parent / "schema.yaml"):
        if candidate.is_file():
            return candidate.resolve()
    return None


def check_site(data_path: str | os.PathLike[str], schema: str | os.PathLike[str] | None = None, *,
               max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ValidationReport:
    """Validate the site; raise :class:`ContractError` carrying the full report when it fails.

    ``max_image_pixels`` is the site policy's cap on what an image header may declare.

    Without a schema only the data contract (ids, labels, images, masks) is checked here; the
    clinical columns are then checked against the centre's schema during the handshake.
    """
    folder = Path(data_path).expanduser().resolve()
    if not folder.is_dir():
        raise CldlrError(f"--data-path {data_path}: no such folder (the site folder with clinical.csv, images/, masks/)")
    schema_path = find_schema(folder, schema)
    if schema_path is None:
        log.warning("no schema given or found beside %s: checking the data contract only; the clinical columns "
                    "are checked against the centre's schema when the study starts (pass --schema to check now)", folder)
    report = validate_site(folder, load_schema(schema_path) if schema_path else CONTRACT_ONLY,
                           max_image_pixels=max_image_pixels)
    if not report.ok:
        raise ContractError(f"site {folder} fails validation ({report.summary()}); fix it before joining — "
                            "no SuperNode was started", report)
    return report


def _check_key(key: str | os.PathLike[str]) -> Path:
    path = existing_file(key, "SuperNode key", "create it with `cldlr certs node OUT --name SITE`")
    load_node_private_key(path)
    if path.stat().st_mode & 0o077:
        log.warning("%s is readable by other users: chmod 600 it (it is this hospital's identity)", path)
    return path


def supernode_command(superlink: str, ca: str | os.PathLike[str], key: str | os.PathLike[str],
                      data_path: str | os.PathLike[str], *, port: int = DEFAULT_PORT, site_name: str | None = None,
                      schema: str | os.PathLike[str] | None = None, state_dir: str | os.PathLike[str] | None = None,
                      validate: bool = True, policy: str | os.PathLike[str] | None = None) -> Command:
    """``flower-supernode`` over TLS with the hospital's key; the site is validated first.

    The node config hands the ClientApp its site folder (``data-path``), optionally its display
    name, the local copy of the schema (the handshake refuses a centre with another schema) and
    where run state goes. ``port`` is the local Runtime API (127.0.0.1 only; one per SuperNode).
    With ``policy`` (the site's policy file, checked here, handed on as node config ``policy``)
    the SuperNode runs ``--isolation process``: it starts no ClientApp itself, and
    :func:`clientapp_command` (the FAB gate) starts one only for a FAB the policy approves.
    """
    check_address(superlink, "--superlink")
    ca_path = existing_file(ca, "CA certificate", "copy the federation's ca.crt from the centre")
    key_path = _check_key(key)
    folder = Path(data_path).expanduser().resolve()
    schema_path = find_schema(folder, schema) if folder.is_dir() else None
    policy_path = _check_policy(policy) if policy is not None else None
    if validate:
        cap = load_policy(policy_path).max_image_pixels if policy_path is not None else DEFAULT_MAX_IMAGE_PIXELS
        report = check_site(folder, schema_path, max_image_pixels=cap)
        log.info("site check: %s", report.summary())
    node_config: dict[str, str] = {"data-path": str(folder)}
    if site_name:
        node_config["site-name"] = site_name
    if schema_path is not None:
        node_config["schema-path"] = str(schema_path)
    if state_dir is not None:
        node_config["state-dir"] = str(Path(state_dir).expanduser().resolve())
    if policy_path is not None:
        node_config["policy"] = str(policy_path)
    args = ["--superlink", superlink, "--root-certificates", str(ca_path), "--auth-supernode-private-key", str(key_path),
            "--port", str(port), "--node-config", key_values(node_config)]
    if policy is not None:
        args += ["--isolation", "process"]
    return flower_command("flower-supernode", args)


def _check_policy(policy: str | os.PathLike[str]) -> Path:
    """The policy file's absolute path, after it loaded cleanly (a broken policy stops the start here)."""
    path = existing_file(policy, "site policy", "copy configs/policy/site.yaml, set schema, folders and approved_fabs")
    approved_fabs(path)
    return path


def clientapp_command(policy: str | os.PathLike[str], *, port: int = DEFAULT_PORT) -> Command:
    """The FAB gate beside a ``--isolation process`` SuperNode whose local Runtime API is on 127.0.0.1:``port``.

    It claims the SuperNode's tasks and starts Flower's ``flwr-clientapp`` only for a FAB whose
    sha256 the site's policy lists in ``approved_fabs``; any other run is refused before any of
    its code is unpacked (see :mod:`cldlr.client.fab_gate`).
    """
    path = _check_policy(policy)
    return python_command(GATE_MODULE, ["--policy", str(path), "--runtime-api-address", f"127.0.0.1:{port}"])


__all__ = ["DEFAULT_PORT", "NO_POLICY_NOTE", "check_site", "clientapp_command", "find_schema", "supernode_command"]
