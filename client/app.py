"""The hospital's Flower ClientApp: a thin adapter from messages to :class:`FederatedSite`.

The site's data folder comes from the SuperNode's node config (``data-path``; in simulation the
``partition-id`` picks one of the configured site folders). The centre's handshake carries the
resolved study config; the site validates its data against the federation schema before it
joins, and refuses a centre whose schema, ROI pipeline or cldlr version differs from its own.
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
from cldlr.client.secure_sum import make_secure_sum_mod
from cldlr.common.config import Config, config_from_dict
from cldlr.common.data.contract import site_folders
from cldlr.common.data.schema import Schema, load_schema, schema_from_dict
from cldlr.common.data.site import read_site
from cldlr.common.errors import CldlrError, ContractError
from cldlr.common.logs import configure_logging
from cldlr.common.secure.tasks import SECURE_SUM_TASKS
from cldlr.common.secure.wire import arrays_to_record, record_to_arrays

if TYPE_CHECKING:  # torch-heavy: imported only by the messages that need a site (every message is a new process)
    from cldlr.client.federated import FederatedSite

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
            raise CldlrError(f"simulation node {index} has no site folder: only {len(folders)} configured")
        return folders[index]
    raise CldlrError("this SuperNode has no data-path: start it with --node-config 'data-path=\"/path/to/site\"'")


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
    schema = schema_from_dict(yaml.safe_load(str(offer["schema-yaml"])), source="federation schema")
    local = context.node_config.get("schema-path")
    if local and load_schema(str(local)).fingerprint() != schema.fingerprint():
        problems.append(f"schema: the centre's {schema.name!r} differs from this site's {local} — agree on one schema file")
    if problems:
        for p in problems:
            log.error("handshake refused: %s", p)
        raise CldlrError("site refuses the federation: " + "; ".join(problems))
    folder = site_folder(context, config)
    try:
        federated = _build_site(context, config, schema, folder)
    except ContractError as exc:  # the SuperNode operator must see every problem, not just the count
        report = getattr(exc, "report", None)
        log.error("this site cannot join: %s\n%s", exc, report.format_text() if report is not None else "")
        raise
    context.state.config_records[STATE_KEY] = ConfigRecord({
        "config-yaml": str(offer["config-yaml"]), "schema-yaml": str(offer["schema-yaml"]), "folder": str(folder)})
    log.info("site %s joined run %s: %d train / %d test images", federated.name, context.run_id,
             len(federated.session.train), len(federated.session.test))
    return Message(RecordDict({
        "site": ConfigRecord({"name": federated.name, "version": __version__}),
        "counts": MetricRecord({"n-train": len(federated.session.train), "n-test": len(federated.session.test)}),
    }), reply_to=msg)


def _build_site(context: Context, config: Config, schema: Schema, folder: Path) -> FederatedSite:
    from cldlr.client.federated import FederatedSite
    from cldlr.client.site import SiteSession

    site = read_site(folder, schema)  # validates; an invalid site raises with the full report
    name = str(context.node_config.get("site-name", site.name))
    state_dir = Path(str(context.node_config.get("state-dir", Path(config.data.cache_dir) / "state")))
    federated = FederatedSite(SiteSession(site.renamed(name), config), config,
                              state_dir / f"run-{context.run_id}" / f"node-{context.node_id}")
    _SITES[(context.run_id, context.node_id)] = federated
    return federated


def _site(context: Context) -> FederatedSite:
    """This node's site; rebuilt from the handshake kept in ``context.state`` in a fresh process."""
    site = _SITES.get((context.run_id, context.node_id))
    if site is not None:
        return site
    saved = context.state.config_records.get(STATE_KEY)
    if saved is None:
        raise CldlrError("this site has not completed the handshake of this run")
    config = config_from_dict(yaml.safe_load(str(saved["config-yaml"])))
    configure_site_logging(config.run.log_level)  # a fresh process: the handshake ran in another one
    schema = schema_from_dict(yaml.safe_load(str(saved["schema-yaml"])), source="federation schema")
    return _build_site(context, config, schema, Path(str(saved["folder"])))


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


app = ClientApp(mods=[make_secure_sum_mod(_SiteTasks())])


@app.query("handshake")
def handshake(msg: Message, context: Context) -> Message:
    return _handshake(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One FedAvg/FedProx round of local epochs from the global weights."""
    site = _site(context)
    config = msg.content.config_records["config"]
    arrays, n, metrics = site.train_round(
        record_to_arrays(msg.content.array_records["arrays"]),
        server_round=int(config.get("global-round", config.get("server-round", 0))),
        proximal_mu=float(config.get("proximal-mu", 0.0)),
    )
    return Message(RecordDict({
        "arrays": arrays_to_record(arrays),
        "metrics": MetricRecord({"num-examples": n, **metrics}),
    }), reply_to=msg)


@app.query("sum")
def plain_sum(msg: Message, context: Context) -> Message:
    """A task's vector in plaintext — answered only in a study configured for a single site."""
    site = _site(context)
    if site.config.federation.num_sites != 1:
        raise CldlrError("refusing a plaintext sum: this study has several sites, so every sum must go through SecAgg+")
    request = msg.content.config_records["sum"]
    vector = site.tasks()[str(request["task"])](json.loads(str(request["payload"])))
    return Message(RecordDict({"sum": ArrayRecord({"vector": Array(np.asarray(vector, dtype=np.float64))})}), reply_to=msg)


@app.query("local_metrics")
def local_metrics(msg: Message, context: Context) -> Message:
    """Score the final models on this site's cohorts; share them only if the site opted in."""
    site = _site(context)
    metrics = site.local_metrics(json.loads(str(msg.content.config_records["fit"]["payload"])))
    share = str(context.node_config.get("share-local-metrics", "false")).lower() in ("true", "1", "yes")
    body = json.dumps(metrics) if share else ""
    return Message(RecordDict({"local": ConfigRecord({"shared": share, "metrics": body})}), reply_to=msg)


@app.query("finalize")
def finalize(msg: Message, context: Context) -> Message:
    """Load the final global backbone; report the power of two bounding its embedding values."""
    site = _site(context)
    site.set_global_model(record_to_arrays(msg.content.array_records["arrays"]))
    return Message(RecordDict({"bound": MetricRecord({"feature-bound": site.feature_bound()})}), reply_to=msg)

