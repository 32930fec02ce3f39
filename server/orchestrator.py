"""The whole federated study at the centre, phase by phase, over a Flower Grid.

0. handshake — every SuperNode validates its site against the federation schema; refusals are
   logged with the site's reason and the site never joins;
1. backbone — R rounds of the configured strategy (FedAvg, FedProx, FedAdam …), checked and
   checkpointed after every round;
2. clinical selection, 3. SVM fusion, 4. evaluation — secure sums only (SecAgg+);
then the report (with the calibration and utility measures from secure sums,
:mod:`cldlr.server.federated_evaluation`), the model bundle and the privacy ledger in ``runs/<name>/``.
``federation.mode: evaluate`` runs phase 0 and the evaluation sums only: the sites score their own
copies of a bundle, nothing trains.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid
from safetensors.numpy import save_file

from cldlr import __version__
from cldlr.common.bundle import export_federated_bundle, signature_section, study_signer
from cldlr.common.config import Config, dump_config
from cldlr.common.data.roi import PIPELINE_VERSION
from cldlr.common.data.schema import Schema
from cldlr.common.errors import CldlrError
from cldlr.common.evaluation.outcome import FederationSummary, StudyOutcome
from cldlr.common.evaluation.report import write_report
from cldlr.common.io import atomic_path, atomic_write_json
from cldlr.common.models.backbones import build_model, embedding_dim
from cldlr.common.models.weights import model_to_arrays
from cldlr.common.secure.dp_plan import StudyPlan, sum_headroom
from cldlr.common.secure.payload import batch_label
from cldlr.common.secure.tasks import FINALIZE, HANDSHAKE, LOCAL_METRICS, PLAIN_SUM
from cldlr.common.secure.wire import arrays_to_record, record_to_arrays
from cldlr.server.checkpoint import Progress, load_checkpoint, save_checkpoint
from cldlr.server.federated_evaluation import (
    bundle_models,
    evaluation_only,
    evaluation_section,
    heterogeneity_section,
    load_evaluation_bundle,
    measures_phase,
)
from cldlr.server.federated_study import run_federated_phases
from cldlr.server.ledger import Ledger, LedgerGrid, error_reason
from cldlr.server.secure_sum import secure_sum, wait_for_sites
from cldlr.server.strategies import check_study_config, make_strategy

#: what a backbone-only federation (pretraining) leaves in its run folder; ``model.weights`` takes it
BACKBONE_FILE = "backbone.safetensors"

log = logging.getLogger("cldlr.centre")


class FederatedRun:
    """One study at the centre; ``run()`` goes through every phase and returns the run folder."""

    def __init__(self, grid: Grid, context: Context, config: Config, schema: Schema, run_dir: Path, *,
                 resume: bool = False, connect_timeout_s: float = 300.0) -> None:
        check_study_config(config)  # unknown strategy/backbone, DP with FedProx or BatchNorm: refused before any site joins
        self.bundle = None
        if config.federation.mode == "evaluate":  # the sites score their copies of this bundle; nothing trains
            self.bundle = load_evaluation_bundle(config.federation.evaluate_bundle, config.federation.evaluate_trust)
            schema = self.bundle.schema
            config = config.replace(**{"model.backbone": self.bundle.meta["model"]["backbone"], "model.weights": "none"})
        self.rows: dict[str, str] = {}
        self.config, self.schema, self.run_dir, self.resume = config, schema, run_dir, resume
        self.plan = StudyPlan.from_config(config) if config.privacy.enabled and config.privacy.secure_sums.enabled else None
        self.site_privacy: dict[str, dict[str, Any]] = {}
        self.context = context
        self.names: dict[int, str] = {}
        self.ledger = Ledger(run_dir / "ledger.jsonl", self.names)
        self.grid = LedgerGrid(grid, self.ledger)
        self.connect_timeout_s = connect_timeout_s
        self.counts: dict[int, dict[str, int]] = {}

    # -- phase 0 ------------------------------------------------------------------------------
    def handshake(self) -> list[int]:
        """Phase 0: offer the config and schema to every connected site; the nodes whose site accepted.

        Fewer than ``federation.min_sites`` acceptances stop the study before any training.
        """
        fed = self.config.federation
        self.ledger.phase = "handshake"
        nodes = wait_for_sites(self.grid, fed.num_sites, self.connect_timeout_s)
        offer = ConfigRecord({"version": __version__, "pipeline": PIPELINE_VERSION,
                              "config-yaml": dump_config(self.config), "schema-yaml": self.schema.to_yaml(),
                              **({"bundle-id": self.bundle.bundle_id} if self.bundle is not None else {})})
        messages = [Message(RecordDict({"handshake": offer}), dst_node_id=n, message_type=HANDSHAKE) for n in nodes]
        members = []
        for reply in self.grid.send_and_receive(messages, timeout=self.connect_timeout_s):
            node = reply.metadata.src_node_id
            if reply.has_error():
                reason = error_reason(reply).splitlines()[-1][:500]
                log.error("site on node %d refused to join: %s", node, reason)
                self.ledger.event("site-refused", node=node, reason=reason)
                continue
            self.names[node] = str(reply.content.config_records["site"]["name"])
            self.counts[node] = {k: int(_number(v, f"site {self.names[node]}: count {k!r}"))
                                 for k, v in reply.content.metric_records["counts"].items()}
            if "evaluation" in reply.content.config_records:
                self.rows[self.names[node]] = str(reply.content.config_records["evaluation"]["rows"])
            members.append(node)
        if len(members) < fed.min_sites:
            raise CldlrError(f"only {len(members)} site(s) joined ({', '.join(self.names.values()) or 'none'}); "
                             f"federation.min_sites={fed.min_sites}. See the sites' logs and {self.ledger.path}")
        self.grid.members = set(members)
        log.info("sites joined: %s", ", ".join(f"{self.names[n]} ({self.counts[n]['n-train']} train)" for n in members))
        return members

    # -- phase 1 ------------------------------------------------------------------------------
    def train_backbone(self) -> tuple[dict[str, np.ndarray], Progress]:
        """Phase 1: the backbone over the configured rounds (resumed from the last checkpoint when asked).

        Returns the final weights and the progress record the report's training curves come from.
        """
        cfg, fed = self.config, self.config.federation
        torch.manual_seed(cfg.run.seed)
        model = build_model(cfg.model)
        self.n_deep = embedding_dim(model)  # the SVMs' deep block: the backbone's penultimate width
        arrays, progress = model_to_arrays(model), Progress()
        checkpoints = self.run_dir / "checkpoints"
        if self.resume and (saved := load_checkpoint(checkpoints)) is not None:
            arrays, progress = saved
        remaining = fed.rounds - progress.completed_rounds
        if remaining <= 0:
            return arrays, progress
        strategy = make_strategy(fed.strategy, min_sites=min(fed.min_sites, len(self.grid.joined)),
                                 proximal_mu=fed.proximal_mu, server_opt=fed.server_opt)
        strategy.setup(reference=arrays, min_sites=fed.min_sites, transfer_dtype=fed.transfer_dtype, node_names=self.names,
                       announced={n: c.get("n-backbone", c["n-train"]) for n, c in self.counts.items()})
        strategy.round_offset = progress.completed_rounds
        self.ledger.phase = "backbone"

        def checkpoint(server_round: int, record: Any) -> None:
            self.ledger.round = server_round + 1 + strategy.round_offset
            if server_round == 0:
                return None
            entry = strategy.rounds[-1]
            progress.completed_rounds = entry.round
            progress.history.append({"round": entry.round, "sites": {str(n): a for n, a in entry.accepted.items()},
                                     "rejected": {self.names.get(n, str(n)): r for n, r in entry.rejected.items()}})
            for node, reason in entry.rejected.items():
                self.ledger.event("update-rejected", node=node, reason=reason[:300])
            save_checkpoint(checkpoints, record_to_arrays(record), progress)
            return None

        self.ledger.round = progress.completed_rounds + 1
        result = strategy.start(self.grid, arrays_to_record(arrays), num_rounds=remaining,
                                train_config=ConfigRecord({"local-epochs": fed.local_epochs}), evaluate_fn=checkpoint)
        return record_to_arrays(result.arrays), progress

    # -- phases 2-4 ---------------------------------------------------------------------------
    def drop_departed(self) -> None:
        """Forget members the SuperLink no longer lists (crashed or stopped SuperNodes): later phases
        go on with the others, since waiting for a dead site would stall every secure sum.
        """
        connected = set(self.grid.get_node_ids())  # the SuperLink lists only nodes with live heartbeats
        members = self.grid.joined
        for node in sorted(members - connected):
            log.warning("site %s is gone (no heartbeat); the study goes on without it", self.names.get(node, node))
            self.ledger.event("site-dropped", node=node, reason="SuperNode disconnected (missed heartbeats or stopped)")
        self.grid.members = members & connected
        if len(self.grid.members) < self.config.federation.min_sites:
            raise CldlrError(f"only {len(self.grid.members)} site(s) still connected; federation.min_sites="
                             f"{self.config.federation.min_sites}. See {self.ledger.path}")

    def finalize(self, arrays: dict[str, np.ndarray]) -> float:
        """Send the final backbone to every site; the largest bound a site reports on its embedding values.

        That bound sets the scale of the fusion sums' deep block.
        """
        self.drop_departed()
        self.ledger.phase, self.ledger.round = "finalize", 0
        record = arrays_to_record(arrays, "float32")
        messages = [Message(RecordDict({"arrays": record}), dst_node_id=n, message_type=FINALIZE) for n in self.grid.joined]
        bounds = []
        for reply in self.grid.send_and_receive(messages):
            site = self.names.get(reply.metadata.src_node_id)
            if reply.has_error():
                raise CldlrError(f"site {site} failed to load the final model: {error_reason(reply)[-300:]}")
            bound = reply.content.metric_records["bound"]["feature-bound"]
            bounds.append(float(_number(bound, f"site {site}: feature-bound")))
        return max(bounds)

    def sum_fn(self, task: str, payload: dict[str, Any], *, length: int, bound: Any, integer: bool = False) -> np.ndarray:
        """The :class:`~cldlr.server.federated_study.SumFn` of a deployment: SecAgg+ over the sites still connected.

        A federation of one site gets its sum in plaintext (:meth:`_plain_sum`); the ledger says so.
        """
        self.ledger.phase = f"secure:{batch_label(task, payload)}"
        self.ledger.round += 1
        self.drop_departed()
        members = len(self.grid.joined)
        if members == 1:
            return self._plain_sum(task, payload, length)
        headroom = 1.0
        if self.plan is not None:  # room in the range for the sites' noise shares (whole-study DP)
            cases = min(c["n-train"] for n, c in self.counts.items() if n in self.grid.joined)
            headroom = sum_headroom(self.plan, task, payload, length, cases=cases, schema=self.schema,
                                    quantization_range=self.config.secagg.quantization_range)
        result = secure_sum(self.grid, self.context, task=task, length=length, bound=bound, num_sites_expected=members,
                            payload_config=payload, secagg_cfg=self.config.secagg,
                            min_sites=max(2, min(self.config.federation.min_sites, members)), integer=integer,
                            headroom=headroom)
        self.secure_seconds += result.elapsed_s
        return result.values

    def _plain_sum(self, task: str, payload: dict[str, Any], length: int) -> np.ndarray:
        """A one-site federation: secure aggregation cannot hide a sum of one, so the site's
        aggregate vector travels in plaintext (the ledger marks it ``secure: false``).
        """
        (node,) = self.grid.joined
        content = RecordDict({"sum": ConfigRecord({"task": task, "payload": json.dumps(payload)})})
        (reply,) = self.grid.send_and_receive([Message(content, dst_node_id=node, message_type=PLAIN_SUM)])
        if reply.has_error():
            raise CldlrError(f"site {self.names.get(node)} failed task {task}: {error_reason(reply)[-300:]}")
        values = reply.content.array_records["sum"]["vector"].numpy()
        if values.shape != (length,):
            raise CldlrError(f"task {task}: the site sent {values.shape[0]} values, {length} expected")
        return values.astype(np.float64)

    def run(self) -> Path:
        """Every phase in order, then the report, the model bundle and the ledger; returns the run folder.

        A study that fails says why in its own ledger (``study-failed``, with the traceback's end), so the
        centre's run folder explains a run that ended without a report.
        """
        try:
            return self._run()
        except BaseException as exc:
            self.ledger.event("study-failed", error=f"{type(exc).__name__}: {exc}"[:2000],
                              traceback=traceback.format_exc()[-4000:])
            raise

    def _run(self) -> Path:
        start = time.monotonic()
        self.secure_seconds = 0.0
        members = self.handshake()
        if len(members) == 1:
            log.warning("one-site federation: its sums cannot be hidden by secure aggregation and travel in plaintext")
            self.ledger.event("plaintext-sums", reason="a federation of one site")
        if self.bundle is not None:
            return self._run_evaluation(start)
        arrays, progress = self.train_backbone()
        t_train = time.monotonic() - start
        if self.config.federation.phases == "backbone":
            return self._write_backbone_only(arrays, progress, t_train)
        bound = self.finalize(arrays)
        max_cases = max(c["n-train"] + c["n-test"] for n, c in self.counts.items() if n in self.grid.joined)
        fit, evaluation = run_federated_phases(self.sum_fn, self.config, self.schema, n_deep=self.n_deep,
                                               max_cases=max_cases, feature_bound=bound)
        local = self.local_metrics(fit.payload)
        sections: dict[str, str] = {"Heterogeneity across sites (test cohort)": heterogeneity_section(local)}
        measures: dict[str, Any] | None = None
        if self.plan is None:
            measures, fit.rounds["measures"] = measures_phase(self.sum_fn, self.config, fit.payload, evaluation,
                                                              tuple(evaluation.metrics), max_cases)
        else:  # their sums are not in the study's privacy plan, and a site refuses a release outside it
            sections["Calibration and clinical utility"] = (
                "Not computed: under whole-study DP every release must be in the study's privacy plan, and the "
                "calibration and decision-curve sums are not (yet).")
        signer = study_signer(self.config, self.run_dir)
        outcome = StudyOutcome(
            metrics=evaluation.metrics, delong=evaluation.delong, roc=evaluation.roc,
            selection_table=fit.selection.table, selected=fit.selection.selected,
            history=_training_curves(progress), sites=self._site_rows(),
            federation=self._summary(progress, fit.rounds, t_train, time.monotonic() - start), site_metrics=local,
            measures=measures, sections={**sections, **signature_section(signer, self.run_dir)},
        )
        write_report(self.run_dir, outcome, self.config, title=f"CLDLR study — federated ({len(members)} sites)")
        export_federated_bundle(self.run_dir / "model", arrays=arrays, fit=fit, outcome=outcome, config=self.config,
                                schema=self.schema, signer=signer)
        return self.run_dir

    def _run_evaluation(self, start: float) -> Path:
        """``federation.mode: evaluate``: the sites' scores of the bundle, summed; the report says it is external."""
        assert self.bundle is not None
        self.drop_departed()
        max_cases = max(c["n-train"] + c["n-test"] for n, c in self.counts.items() if n in self.grid.joined)
        models = bundle_models(self.bundle)
        evaluation, measures, rounds = evaluation_only(self.sum_fn, self.config, self.bundle.bundle_id, models, max_cases)
        local = self.local_metrics({"bundle_id": self.bundle.bundle_id})
        summary = FederationSummary(strategy="none (evaluation only)", rounds=0, transfer_dtype="none", secure_rounds=rounds,
                                    wall_time_s={"secure_sums": round(self.secure_seconds, 1),
                                                 "total": round(time.monotonic() - start, 1)})
        outcome = StudyOutcome(
            metrics=evaluation.metrics, delong=evaluation.delong, roc=evaluation.roc, selection_table=[],
            selected=list(self.bundle.selected), sites=self._site_rows(), federation=summary, site_metrics=local,
            measures=measures, sections={"External evaluation": evaluation_section(self.bundle, self.rows),
                                         "Heterogeneity across sites (evaluated rows)": heterogeneity_section(local)})
        write_report(self.run_dir, outcome, self.config,
                     title=f"External evaluation — federated, evaluation only ({len(self.grid.joined)} sites)")
        return self.run_dir

    def _write_backbone_only(self, arrays: dict[str, np.ndarray], progress: Progress, t_train: float) -> Path:
        """``federation.phases=backbone`` (pretraining): the global weights and a training record, nothing else."""
        with atomic_path(self.run_dir / BACKBONE_FILE) as tmp:
            save_file({k: np.ascontiguousarray(v, dtype=np.float32) if np.issubdtype(v.dtype, np.floating)
                       else np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
        atomic_write_json(self.run_dir / "pretrain.json", {
            "phases": "backbone", "rounds": progress.completed_rounds, "sites": self._site_rows(),
            "history": _training_curves(progress), "wall_time_s": round(t_train, 1), "weights": BACKBONE_FILE,
            "config": self.config.to_dict()})
        log.info("backbone-only federation: global weights in %s", self.run_dir / BACKBONE_FILE)
        return self.run_dir

    def local_metrics(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Each site scores the final models on its own cohorts; only opted-in sites share the numbers."""
        self.ledger.phase, self.ledger.round = "local-metrics", 0
        record = ConfigRecord({"payload": json.dumps(payload)})
        messages = [Message(RecordDict({"fit": record}), dst_node_id=n, message_type=LOCAL_METRICS)
                    for n in self.grid.joined]
        out: dict[str, Any] = {}
        for reply in self.grid.send_and_receive(messages):
            name = self.names.get(reply.metadata.src_node_id, str(reply.metadata.src_node_id))
            if reply.has_error():
                out[name] = f"failed: {error_reason(reply).splitlines()[-1][:200]}"
                continue
            local = reply.content.config_records["local"]
            out[name] = json.loads(str(local["metrics"])) if local["shared"] else "kept at the site"
            if "privacy" in local and (summary := json.loads(str(local["privacy"]))):
                self.site_privacy[name] = summary
        return out

    def _site_rows(self) -> list[dict[str, Any]]:
        return [{"name": self.names[n], "n_train": c["n-train"], "n_test": c["n-test"]}
                for n, c in self.counts.items() if n in self.grid.joined]

    def _summary(self, progress: Progress, rounds: dict[str, int], t_train: float, t_total: float) -> FederationSummary:
        bytes_per_round = [{"round": h["round"], **{s["site"]: s["bytes"] for s in h["sites"].values()}}
                           for h in progress.history]
        epsilon: dict[str, dict[str, Any]] = {}
        for h in progress.history:
            for s in h["sites"].values():
                if "epsilon" in s:
                    epsilon[s["site"]] = {"epsilon": s["epsilon"], "delta": s.get("delta"), "after_round": h["round"]}
        for site, summary in self.site_privacy.items():  # whole-study DP: the sites' own ε per phase and total
            if self.plan is not None and summary.get("phases"):
                phases = {k: float(v) for k, v in summary["phases"].items()}
                epsilon[site] = {**epsilon.get(site, {}), "epsilon": phases.get("total", float("nan")),
                                 "delta": summary.get("delta"), "phases": phases, "cap": summary.get("cap"),
                                 "plan": self.plan.to_dict()}
        return FederationSummary(
            strategy=self.config.federation.strategy, rounds=progress.completed_rounds,
            transfer_dtype=self.config.federation.transfer_dtype, uplink_bytes_per_site_round=bytes_per_round,
            secure_rounds=rounds, privacy=epsilon or None,
            dropped={h["round"]: h["rejected"] for h in progress.history if h["rejected"]},
            wall_time_s={"backbone": round(t_train, 1), "secure_sums": round(self.secure_seconds, 1), "total": round(t_total, 1)})


def _number(value: int | float | list[int] | list[float], what: str) -> float:
    """A metric a site sent as one number; a list there means the site speaks another protocol."""
    if isinstance(value, list):
        raise CldlrError(f"{what}: expected a number, got a list; does the site run the centre's cldlr version?")
    return value


def _training_curves(progress: Progress) -> dict[str, list[dict[str, float]]]:
    """Per site: train loss/accuracy of its last local epoch in each round, for the sites that share them.

    A site's policy may keep them (and does under DP): its rounds have no points, and a site that
    shares none has no curve.
    """
    curves: dict[str, list[dict[str, float]]] = {}
    kept: set[str] = set()
    for h in progress.history:
        for s in h["sites"].values():
            point = {key: s[name] for key, name in (("loss", "train-loss"), ("accuracy", "train-accuracy")) if name in s}
            if point:
                curves.setdefault(s["site"], []).append({"epoch": h["round"], **point})
            else:
                kept.add(s["site"])
    if kept - set(curves):
        log.info("training curves not shared by %s (their site policy)", ", ".join(sorted(kept - set(curves))))
    return curves

