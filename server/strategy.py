"""FedAvg / FedProx over named weights that checks every reply before it touches the average.

Flower's Message-API strategies aggregate in the transfer dtype and abort the whole ServerApp on
an inconsistent reply. Here a reply with NaN/Inf, unknown names or wrong shapes is rejected and
logged, the round goes on with the rest when at least ``min_sites`` answered, averaging is done
in float64, and bytes and metrics are recorded per site and round.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx

from cldlr.common.errors import CldlrError
from cldlr.common.models.weights import InvalidUpdate, check_arrays, weighted_average
from cldlr.common.secure.wire import arrays_to_record, record_to_arrays

log = logging.getLogger(__name__)


@dataclass
class Reply:
    """One site's answer in a round: weights and metrics, or why there are none."""

    node: int
    arrays: dict[str, np.ndarray] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    nbytes: int = 0
    error: str | None = None


@dataclass
class RoundLog:
    """What one training round did, per site (node id → details)."""

    round: int
    accepted: dict[int, dict[str, Any]] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)


class CheckedAggregation:
    """Mixin for Flower's FedAvg/FedProx: validated, float64, fp16-capable, logged."""

    def setup(self, *, reference: dict[str, np.ndarray], min_sites: int, transfer_dtype: str,
              node_names: dict[int, str]) -> None:
        self.reference = reference
        self.min_sites = min_sites
        self.transfer_dtype = transfer_dtype
        self.node_names = node_names
        self.rounds: list[RoundLog] = []
        self.round_offset = 0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        config["global-round"] = server_round + self.round_offset
        downlink = arrays_to_record(record_to_arrays(arrays), self.transfer_dtype)
        return super().configure_train(server_round, downlink, config, grid)  # type: ignore[misc]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        items: list[Reply] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                items.append(Reply(node, error=f"error reply: {msg.error.reason}"))
                continue
            try:
                record = next(iter(msg.content.array_records.values()))
                metrics = dict(next(iter(msg.content.metric_records.values())))
            except StopIteration:
                items.append(Reply(node, error="reply lacks its weights or metrics"))
                continue
            items.append(Reply(node, arrays=record_to_arrays(record), metrics=metrics, nbytes=int(record.count_bytes())))
        average, metrics = self.aggregate_replies(server_round + self.round_offset, items)
        return arrays_to_record(average), MetricRecord(metrics)

    def aggregate_replies(self, round_number: int, items: list[Reply]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Screen every reply, then average the valid ones in float64 (the testable core of a round)."""
        entry = RoundLog(round=round_number)
        updates = []
        for item in items:
            name = self.node_names.get(item.node, str(item.node))
            reason = item.error
            if reason is None:
                try:
                    check_arrays(item.arrays, reference=self.reference)
                    weight = float(item.metrics["num-examples"])
                except (InvalidUpdate, KeyError, TypeError, ValueError) as exc:
                    reason = f"invalid update: {exc}"
            if reason is not None:
                reason = " ".join(reason.split())[:300]  # a one-line summary; the site's log has the rest
                entry.rejected[item.node] = reason
                log.warning("round %d: update of site %s rejected: %s", entry.round, name, reason[:300])
                continue
            updates.append((item.arrays, weight))
            entry.accepted[item.node] = {"site": name, "bytes": item.nbytes, **item.metrics}
        self.rounds.append(entry)
        if len(updates) < self.min_sites:
            raise CldlrError(
                f"round {entry.round}: only {len(updates)} valid update(s), federation.min_sites={self.min_sites}; "
                f"rejected: {entry.rejected or 'none'}"
            )
        self.reference = weighted_average(updates)
        total = sum(w for _, w in updates)
        loss = sum(a.get("train-loss", 0.0) * a["num-examples"] for a in entry.accepted.values()) / total
        log.info("round %d: averaged %d site(s), train loss %.4f, %s bytes/site", entry.round, len(updates), loss,
                 sorted(a["bytes"] for a in entry.accepted.values()))
        return self.reference, {"train-loss": float(loss), "num-sites": len(updates)}


class CheckedFedAvg(CheckedAggregation, FedAvg):
    """FedAvg with validated float64 aggregation."""


class CheckedFedProx(CheckedAggregation, FedProx):
    """FedProx (the proximal term μ/2‖w − w_global‖² is added by each site) with validated aggregation."""


def make_strategy(name: str, *, min_sites: int, proximal_mu: float) -> CheckedAggregation:
    """All connected sites train every round; a round needs ``min_sites`` of them (a dead site drops out)."""
    common = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=min_sites,
                  min_evaluate_nodes=0, min_available_nodes=min_sites)
    if name == "fedprox":
        return CheckedFedProx(proximal_mu=proximal_mu, **common)
    return CheckedFedAvg(**common)
