"""Which policy a SuperNode's ClientApp enforces: the file its operator named, never the centre's choice.

Deployment: the SuperNode's node config names the policy file (``policy``, which
``cldlr deploy supernode --policy FILE`` sets); a SuperNode without one refuses every message,
the handshake first, and says how to give it one. Simulation (``cldlr simulate``: Flower's engine
runs the real ClientApp; the researcher holds both sides) has no node config of its own to set:
:mod:`cldlr.simulations.federated` writes a policy derived from the study into the run folder and
names it in ``$CLDLR_SITE_POLICY``, which is read only for simulated nodes (a ``partition-id``
and no ``data-path`` in the node config).

The site's log also goes to ``<folders.logs>/site.log`` once the policy is known.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

from flwr.app import Context

from cldlr.client.outbound import PublicError
from cldlr.client.policy import SitePolicy, load_policy
from cldlr.common.data.schema import Schema, load_schema

POLICY_KEY = "policy"
ENV_POLICY = "CLDLR_SITE_POLICY"
SITE_LOG = "site.log"
_LOG_HANDLERS: dict[str, logging.Handler] = {}

NO_POLICY = ("this SuperNode has no site policy: start it with --node-config 'policy=\"/path/to/policy.yaml\"' "
             "(`cldlr deploy supernode --policy FILE`; copy configs/policy/site.yaml and set schema and folders)")


def policy_path(context: Context) -> Path:
    """The policy file of this node: node config ``policy``, or ``$CLDLR_SITE_POLICY`` for a simulated node."""
    node = context.node_config
    if POLICY_KEY in node and str(node[POLICY_KEY]):
        return Path(str(node[POLICY_KEY])).expanduser()
    simulated = "partition-id" in node and "data-path" not in node
    if simulated and os.environ.get(ENV_POLICY):
        return Path(os.environ[ENV_POLICY])
    raise PublicError(NO_POLICY)


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int) -> SitePolicy:
    return load_policy(path)


def node_policy(context: Context) -> SitePolicy:
    """The node's policy (read again when the file changes); its log file is attached on first use."""
    path = policy_path(context)
    try:
        stamp = path.stat().st_mtime_ns
    except OSError as exc:
        raise PublicError(f"this SuperNode's site policy {path} cannot be read; see the site's log",
                          f"{path}: {exc}") from None
    policy = _load(str(path), stamp)
    attach_site_log(policy)
    return policy


@functools.lru_cache(maxsize=8)
def _schema(path: str, mtime_ns: int) -> Schema:
    return load_schema(path)


def site_schema(policy: SitePolicy) -> Schema:
    """The site's own copy of the federation schema (``schema`` of its policy)."""
    path = Path(policy.schema).expanduser()
    try:
        stamp = path.stat().st_mtime_ns
    except OSError as exc:
        raise PublicError("the site's own schema file cannot be read; see the site's log",
                          f"schema {path} of the site policy: {exc}") from None
    return _schema(str(path), stamp)


def attach_site_log(policy: SitePolicy) -> None:
    """Copy the ``cldlr`` log to ``<folders.logs>/site.log`` (one file per process: the latest policy's)."""
    path = str(policy.log_dir / SITE_LOG)
    if path in _LOG_HANDLERS:
        return
    detach_site_log()
    policy.log_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("cldlr").addHandler(handler)
    _LOG_HANDLERS[path] = handler


def detach_site_log() -> None:
    """Stop copying the log to the site's log file (a process that leaves the site, e.g. a test)."""
    logger = logging.getLogger("cldlr")
    for handler in _LOG_HANDLERS.values():
        logger.removeHandler(handler)
        handler.close()
    _LOG_HANDLERS.clear()


__all__ = ["ENV_POLICY", "NO_POLICY", "POLICY_KEY", "SITE_LOG", "attach_site_log", "detach_site_log", "node_policy",
           "policy_path", "site_schema"]
