"""The hospital's Flower ClientApp: a thin adapter from messages to :class:`FederatedSite`, under the site's policy.

The site's data folder comes from the SuperNode's node config (``data-path``; in simulation the
``partition-id`` picks one of the configured site folders), its policy from node config
``policy`` (see :mod:`cldlr.client.node_policy`). The centre's handshake carries the resolved
study config; the site checks it against its policy, refuses a centre whose schema, ROI pipeline
or cldlr version differs from its own, and validates its data against its own schema before it
joins. Its cache, state and logs go to the policy's folders, never to ones the centre's config names.

Two mods wrap every handler: outermost :func:`~cldlr.client.outbound.make_outbound_mod` (every
reply is audited before it is sent; every error reaches the centre only as a short fixed reason),
then the secure-sum mod with the site's :class:`~cldlr.client.guard.SecureRoundGuard`.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from cldlr import __version__
from cldlr.client.guard import SecureRoundGuard
from cldlr.client.node_policy import POLICY_KEY, node_policy, site_schema
from cldlr.client.outbound import PublicError, make_outbound_mod
from cldlr.client.policy import PolicyRefusal, SitePolicy, check_study
from cldlr.client.secure_sum import make_secure_sum_mod
from cldlr.common.config import Config, config_from_dict
from cldlr.common.data.contract import site_folders
from cldlr.common.data.schema import Schema, load_schema, schema_from_dict
from cldlr.common.data.site import read_site
from cldlr.common.errors import ContractError
from cldlr.common.logs import configure_logging
from cldlr.common.secure.tasks import SECURE_SUM_TASKS
from cldlr.common.secure.wire import arrays_to_record, record_to_arrays

if TYPE_CHECKING:  # torch-heavy: imported only by the messages that need a site (every message is a new process)
    from cldlr.client.federated import FederatedSite
    from cldlr.client.site import SiteSession

log = logging.getLogger("cldlr.site")

#: One FederatedSite per (run, node) in this process: the ROI cache and model stay warm across
#: messages (Flower's context.state holds only records, not tensors).
_SITES: dict[tuple[int, int], FederatedSite] = {}
STATE_KEY = "cldlr-site"


@functools.lru_cache(maxsize=1)
def configure_site_logging(level: str) -> None:
    """Log at the study's ``run.log_level`` in this process: set up once, again only if the level changes.

    Flower starts the ClientApp in processes of its own (a Ray actor, a ``flwr-clientapp``), where
    nothing else configures logging: without this a site's INFO lines would never show.
    """
    configure_logging(level)


def site_folder(context: Context, config: Config) -> Path:
    """``data-path`` from the node config, or the ``partition-id``-th configured site in simulation."""
    node = context.node_config
    if "data-path" in node:
        return Path(str(node["data-path"]))
    if "partition-id" in node:
        folders = site_folders(config)
        index = int(node["partition-id"])
        if index >= len(folders):
            raise PublicError(f"simulation node {index} has no site folder: only {len(folders)} configured")
        return folders[index]
    raise PublicError("this SuperNode has no data-path: start it with --node-config 'data-path=\"/path/to/site\"'")


def _counts(session: SiteSession) -> dict[str, int]:
    """Cohort sizes for the centre; ``n-backbone`` (what a round's num-examples must be) only with a fusion hold-out."""
    counts = {"n-train": len(session.train), "n-test": len(session.test)}
    if session.n_backbone != len(session.train):
        counts["n-backbone"] = session.n_backbone
    return counts


def _handshake(msg: Message, context: Context) -> Message:
    offer = msg.content.config_records["handshake"]
    problems = []
    if offer["version"] != __version__:
        problems.append(f"cldlr version: centre {offer['version']}, site {__version__} — install the same release")
    from cldlr.common.data.roi import PIPELINE_VERSION

    if str(offer["pipeline"]) != str(PIPELINE_VERSION):
        problems.append(f"ROI pipeline version: centre {offer['pipeline']}, site {PIPELINE_VERSION}")
    config = config_from_dict(yaml.safe_load(str(offer["config-yaml"])))
    configure_site_logging(config.run.log_level)
    if problems:
        for p in problems:
            log.error("handshake refused: %s", p)
        raise PublicError("site refuses the federation: " + "; ".join(problems))  # versions only: the centre may read it
    policy = node_policy(context)
    centre_schema = schema_from_dict(yaml.safe_load(str(offer["schema-yaml"])), source="federation schema")
    schema = site_schema(policy)
    _check_schema_path(context, policy, schema)
    check_study(policy, config, centre_schema, schema)
    folder = site_folder(context, config)
    bundle_id = str(offer.get("bundle-id", "")) if config.federation.mode == "evaluate" else ""
    try:
        federated = _build_site(context, config, schema, folder, policy, bundle_id)
    except ContractError as exc:  # the SuperNode operator must see every problem, not just the count
        report = getattr(exc, "report", None)
        log.error("this site cannot join: %s\n%s", exc, report.format_text() if report is not None else "")
        raise
    context.state.config_records[STATE_KEY] = ConfigRecord({
        "config-yaml": str(offer["config-yaml"]), "schema-yaml": schema.to_yaml(), "folder": str(folder),
        "bundle-id": bundle_id})
    log.info("site %s joined run %s: %d train / %d test images", federated.name, context.run_id,
             len(federated.session.train), len(federated.session.test))
    return Message(RecordDict({
        "site": ConfigRecord({"name": federated.name, "version": __version__}),
        "counts": MetricRecord(_counts(federated.session)),
        **({"evaluation": ConfigRecord({"rows": federated.external.rows})} if federated.external is not None else {}),
    }), reply_to=msg)


def _check_schema_path(context: Context, policy: SitePolicy, schema: Schema) -> None:
    """A ``schema-path`` node config (older deployments) must name the same schema as the policy."""
    local = context.node_config.get("schema-path")
    if local and load_schema(str(local)).fingerprint() != schema.fingerprint():
        raise PublicError(f"this site's node config schema-path={local} and its policy's schema={policy.schema} differ; "
                          "keep one schema file (the policy's)")


def _build_site(context: Context, config: Config, schema: Schema, folder: Path, policy: SitePolicy,
                bundle_id: str = "") -> FederatedSite:
    from cldlr.client.federated import FederatedSite
    from cldlr.client.site import SiteSession

    # validates (under the site's own image cap, not the centre's); an invalid site raises with the full report
    site = read_site(folder, schema, max_image_pixels=policy.max_image_pixels)
    name = str(context.node_config.get("site-name", site.name))
    node_state = context.node_config.get("state-dir")
    if node_state and Path(str(node_state)).expanduser().resolve() != policy.state_dir.resolve():
        log.warning("node config state-dir=%s is ignored: the site's folders come from its policy (folders.state=%s)",
                    node_state, policy.state_dir)
    federated = FederatedSite(SiteSession(site.renamed(name), config, cache_dir=policy.cache_dir), config,
                              policy.state_dir / f"run-{context.run_id}" / f"node-{context.node_id}", policy=policy,
                              run_id=context.run_id)
    if config.federation.mode == "evaluate":  # scores only the bundle the site holds, with the offered id
        from cldlr.client.federated_evaluation import external_scores

        federated.external = external_scores(federated.session, policy, config, bundle_id, federated.state_dir)
    _SITES[(context.run_id, context.node_id)] = federated
    return federated


def _site(context: Context) -> FederatedSite:
    """The node's site; rebuilt from the handshake kept in ``context.state`` in a fresh process."""
    site = _SITES.get((context.run_id, context.node_id))
    if site is not None:
        return site
    saved = context.state.config_records.get(STATE_KEY)
    if saved is None:
        raise PublicError("this site has not completed the handshake of this run")
    config = config_from_dict(yaml.safe_load(str(saved["config-yaml"])))
    configure_site_logging(config.run.log_level)  # a fresh process: the handshake ran in another one
    schema = schema_from_dict(yaml.safe_load(str(saved["schema-yaml"])), source="federation schema")
    return _build_site(context, config, schema, Path(str(saved["folder"])), node_policy(context),
                       str(saved.get("bundle-id", "")))


class _SiteTasks(Mapping[str, Any]):
    """Secure-sum tasks of whichever site the message's context belongs to."""

    _NAMES = SECURE_SUM_TASKS

    def __getitem__(self, task: str) -> Any:
        if task not in self._NAMES:
            raise KeyError(task)
        return lambda payload, context: _site(context).tasks()[task](payload)

    def __iter__(self) -> Iterator[str]:
        return iter(self._NAMES)

    def __len__(self) -> int:
        return len(self._NAMES)


app = ClientApp(mods=[make_outbound_mod(node_policy), make_secure_sum_mod(
    _SiteTasks(), SecureRoundGuard(node_policy, noiser_for=lambda context: _site(context).sum_noiser()))])


@app.query("handshake")
def handshake(msg: Message, context: Context) -> Message:
    """Join the run if the centre's study suits this site's policy and its data validates."""
    return _handshake(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One FedAvg/FedProx round of local epochs from the global weights.

    Train loss and accuracy leave the site only where its policy shares them, and never under DP.
    """
    site = _site(context)
    _no_training(site, "train")
    config = msg.content.config_records["config"]
    arrays, n, metrics = site.train_round(
        record_to_arrays(msg.content.array_records["arrays"]),
        server_round=int(config.get("global-round", config.get("server-round", 0))),
        proximal_mu=float(config.get("proximal-mu", 0.0)),
    )
    if not shares_training_metrics(site.policy, site.config):
        metrics = {k: v for k, v in metrics.items() if k not in TRAINING_METRICS}
    return Message(RecordDict({
        "arrays": arrays_to_record(arrays),
        "metrics": MetricRecord({"num-examples": n, **metrics}),
    }), reply_to=msg)


TRAINING_METRICS = ("train-loss", "train-accuracy")


def _no_training(site: FederatedSite, kind: str) -> None:
    """An evaluation-only study's site takes no weights: it scores only the bundle it holds."""
    if site.external is not None:
        from cldlr.client.federated_evaluation import check_evaluation_request

        check_evaluation_request(kind)


def shares_training_metrics(policy: SitePolicy | None, config: Config) -> bool:
    """Per-round train loss/accuracy describe the site's data un-noised: only if the policy says so, never under DP."""
    return policy is not None and policy.share_training_metrics and not config.privacy.enabled


@app.query("sum")
def plain_sum(msg: Message, context: Context) -> Message:
    """A task's vector in plaintext — only in a one-site study, and only where the site's policy allows one."""
    site = _site(context)
    policy = node_policy(context)
    if not (policy.allow_single_site and site.config.federation.num_sites == 1):
        raise PolicyRefusal("a plaintext sum of this site alone",
                            f"federation.num_sites={site.config.federation.num_sites}, "
                            f"allow_single_site={policy.allow_single_site}: every sum must go through SecAgg+")
    request = msg.content.config_records["sum"]
    task = str(request["task"])
    if task not in SECURE_SUM_TASKS:
        raise PolicyRefusal("a task outside the protocol", f"task {task!r}; the protocol has {', '.join(SECURE_SUM_TASKS)}")
    vector = site.tasks()[task](json.loads(str(request["payload"])))
    return Message(RecordDict({"sum": ArrayRecord({"vector": Array(np.asarray(vector, dtype=np.float64))})}), reply_to=msg)


@app.query("local_metrics")
def local_metrics(msg: Message, context: Context) -> Message:
    """Score the final models on this site's cohorts; share them only if the site's policy says so."""
    site = _site(context)
    metrics = site.local_metrics(json.loads(str(msg.content.config_records["fit"]["payload"])))
    share = node_policy(context).share_local_metrics
    if "share-local-metrics" in context.node_config:
        log.warning("node config share-local-metrics is ignored: the site's policy decides (share_local_metrics)")
    body = json.dumps(metrics) if share else ""
    # ε per phase and in total (no data: what the site's noise and DP-SGD cost, at its δ)
    privacy = json.dumps(site.privacy_summary())
    return Message(RecordDict({"local": ConfigRecord({"shared": share, "metrics": body, "privacy": privacy})}),
                   reply_to=msg)


@app.query("finalize")
def finalize(msg: Message, context: Context) -> Message:
    """Load the final global backbone; report the power of two bounding its embedding values."""
    site = _site(context)
    _no_training(site, "finalize")
    site.set_global_model(record_to_arrays(msg.content.array_records["arrays"]))
    return Message(RecordDict({"bound": MetricRecord({"feature-bound": site.feature_bound()})}), reply_to=msg)


__all__ = ["POLICY_KEY", "STATE_KEY", "TRAINING_METRICS", "app", "configure_site_logging", "shares_training_metrics",
           "site_folder"]
