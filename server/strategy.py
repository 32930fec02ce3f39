"""A validating wrapper around any Flower Message-API strategy: replies are screened before it aggregates.

Flower's strategies abort the whole ServerApp on an inconsistent reply and aggregate in the
transfer dtype. :class:`CheckedStrategy` wraps one, as Flower's DP wrappers
(``DifferentialPrivacyServerSideFixedClipping`` …) wrap theirs, instead of being mixed into it
(a mixin whose ``aggregate_train`` never calls ``super()`` would silently drop FedAdam's step):
an error reply, missing weights or metrics, NaN/Inf, unknown names, wrong shapes or a bad
``num-examples`` is rejected, logged and kept in the round's :class:`RoundLog`, and the round goes
on with the rest when at least ``min_sites`` remain. The valid replies, as float32, then go to the
inner strategy's own ``aggregate_train`` — only a strategy whose ``aggregate_train`` *is*
``FedAvg.aggregate_train`` (FedAvg, FedProx) gets the same weighted mean from the fused float32
:func:`weighted_average` instead (≈5× faster for VGG11: 0.7 s against 4 s for three sites). The
aggregate must be finite and shaped like the global model before it becomes it. The downlink
travels in ``transfer_dtype``; bytes and metrics are recorded per site and round.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import DEFAULT_TTL, ArrayRecord, ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.app.message import make_message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from cldlr.common.errors import CldlrError
from cldlr.common.models.weights import InvalidUpdate, check_arrays, weighted_average
from cldlr.common.secure.wire import arrays_to_record, record_to_arrays

log = logging.getLogger(__name__)

#: The metric every train reply carries: its number of training examples, the weight of its update.
WEIGHT_KEY = "num-examples"


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


def reply_of(msg: Message) -> Reply:
    """A train reply as a :class:`Reply`: its first ArrayRecord and MetricRecord, or why it has none."""
    node = msg.metadata.src_node_id
    if msg.has_error():
        return Reply(node, error=f"error reply: {msg.error.reason}")
    try:
        record = next(iter(msg.content.array_records.values()))
        metrics = dict(next(iter(msg.content.metric_records.values())))
    except StopIteration:
        return Reply(node, error="reply lacks its weights or metrics")
    return Reply(node, arrays=record_to_arrays(record), metrics=metrics, nbytes=int(record.count_bytes()))


class CheckedStrategy(Strategy):
    """Any Flower Message-API strategy with screened replies, a checked aggregate and per-round logs.

    Call :meth:`setup` before ``start``. ``round_offset`` (completed rounds of a resumed run) is
    added to the round numbers sites and logs see (``global-round``); the inner strategy counts
    its own rounds from 1, as its optimizer state (FedAdam's moments) starts afresh on resume.
    """

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy
        self.reference: dict[str, np.ndarray] | None = None
        self.min_sites = 1
        self.transfer_dtype = "float32"
        self.node_names: dict[int, str] = {}
        self.announced: dict[int, int] = {}
        self.rounds: list[RoundLog] = []
        self.round_offset = 0

    def __repr__(self) -> str:
        """Name the wrapper with what it wraps (Flower logs strategies by repr)."""
        return f"CheckedStrategy({self.strategy!r})"

    def setup(self, *, reference: dict[str, np.ndarray], min_sites: int, transfer_dtype: str,
              node_names: dict[int, str], announced: dict[int, int] | None = None) -> None:
        """The global model replies are checked against, the valid replies a round needs, the downlink dtype, site names.

        ``announced`` maps a node to the training images it declared at the handshake: a reply's
        ``num-examples`` must equal it, so no site can weight its update above its data (a weight of
        1e9 would make one site's update the global model).
        """
        self.reference = reference
        self.min_sites = min_sites
        self.transfer_dtype = transfer_dtype
        self.node_names = node_names
        self.announced = dict(announced or {})

    @property
    def fast_average(self) -> bool:
        """Whether the inner aggregation is exactly FedAvg's weighted mean by ``num-examples``.

        Decided by the identity of the method that would run, never by a flag: any strategy that
        overrides ``aggregate_train`` (FedAdam, FedYogi, a DP wrapper, a subclass) goes through its own.
        """
        method = getattr(self.strategy.aggregate_train, "__func__", None)
        return method is FedAvg.aggregate_train and getattr(self.strategy, "weighted_by_key", None) == WEIGHT_KEY

    # -- Flower's Strategy interface ---------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """The inner strategy's messages (it keeps the full-precision model), the model in them in ``transfer_dtype``."""
        config["global-round"] = server_round + self.round_offset
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        names = set(arrays.keys())
        downlink = arrays_to_record(record_to_arrays(arrays), self.transfer_dtype)
        for msg in messages:
            for key, record in list(msg.content.array_records.items()):
                if set(record.keys()) == names:
                    msg.content[key] = downlink
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen the replies, aggregate the valid ones with the inner strategy, return the checked aggregate."""
        items = [reply_of(msg) for msg in replies]
        average, metrics = self.aggregate_replies(server_round + self.round_offset, items, server_round=server_round)
        return arrays_to_record(average), MetricRecord({k: v for k, v in metrics.items()})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Federated evaluation is the inner strategy's (the study evaluates through secure sums instead)."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The inner strategy's evaluation aggregate."""
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        """Log the wrapper's settings, then the inner strategy's."""
        log.info("checked aggregation: ≥ %d valid update(s) per round, downlink %s", self.min_sites, self.transfer_dtype)
        self.strategy.summary()

    # -- the testable core of a round ----------------------------------------------------------
    def aggregate_replies(self, round_number: int, items: list[Reply], *,
                          server_round: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Screen every reply, aggregate the valid ones, check the aggregate; it becomes the new reference.

        ``round_number`` is the study's round (logs, :class:`RoundLog`); ``server_round`` the inner
        strategy's own count (default: ``round_number - round_offset``).
        """
        if self.reference is None:
            raise CldlrError("CheckedStrategy.setup() must be called before a round is aggregated")
        entry = RoundLog(round=round_number)
        updates: list[tuple[Reply, float]] = []
        for item in items:
            name = self.node_names.get(item.node, str(item.node))
            reason = item.error
            if reason is None:
                try:
                    weight = self._checked_weight(item)
                except (InvalidUpdate, KeyError, TypeError, ValueError) as exc:
                    reason = f"invalid update: {exc}"
            if reason is not None:
                reason = " ".join(reason.split())[:300]  # a one-line summary; the site's log has the rest
                entry.rejected[item.node] = reason
                log.warning("round %d: update of site %s rejected: %s", entry.round, name, reason)
                continue
            updates.append((item, weight))
            entry.accepted[item.node] = {"site": name, "bytes": item.nbytes, **item.metrics}
        self.rounds.append(entry)
        if len(updates) < self.min_sites:
            raise CldlrError(
                f"round {entry.round}: only {len(updates)} valid update(s), federation.min_sites={self.min_sites}; "
                f"rejected: {entry.rejected or 'none'}"
            )
        inner_round = round_number - self.round_offset if server_round is None else server_round
        self.reference = self._checked_aggregate(entry.round, inner_round, updates)
        shared = [a for a in entry.accepted.values() if "train-loss" in a]  # a site's policy may keep its loss
        loss = sum(a["train-loss"] * a[WEIGHT_KEY] for a in shared) / sum(a[WEIGHT_KEY] for a in shared) if shared else None
        shown = "not shared" if loss is None else f"{loss:.4f}" + (
            "" if len(shared) == len(updates) else f" (of the {len(shared)} site(s) that share it)")
        log.info("round %d: %s over %d site(s), train loss %s, %s bytes/site", entry.round,
                 "averaged" if self.fast_average else f"{type(self.strategy).__name__} step", len(updates), shown,
                 sorted(a["bytes"] for a in entry.accepted.values()))
        return self.reference, {"num-sites": len(updates), **({} if loss is None else {"train-loss": float(loss)})}

    def _checked_weight(self, item: Reply) -> float:
        """The reply's weight, after its arrays passed :func:`check_arrays` against the global model."""
        if item.arrays is None:
            raise InvalidUpdate("the reply carries no weights")
        check_arrays(item.arrays, reference=self.reference or {})
        weight = float(item.metrics[WEIGHT_KEY])
        if not (math.isfinite(weight) and weight > 0):
            raise InvalidUpdate(f"{WEIGHT_KEY} is {weight}, a positive number expected")
        if item.node in self.announced and weight != self.announced[item.node]:
            raise InvalidUpdate(f"{WEIGHT_KEY} is {weight:g}, but the site announced {self.announced[item.node]} "
                                "training images at the handshake")
        return weight

    def _checked_aggregate(self, round_number: int, server_round: int,
                           updates: list[tuple[Reply, float]]) -> dict[str, np.ndarray]:
        """The inner strategy's aggregate, refused unless finite and named and shaped like the global model."""
        assert self.reference is not None
        if self.fast_average:
            aggregate = weighted_average([(item.arrays, weight) for item, weight in updates if item.arrays is not None])
        else:
            record, _ = self.strategy.aggregate_train(server_round, self._inner_replies(server_round, updates))
            if record is None:
                raise CldlrError(f"round {round_number}: {type(self.strategy).__name__} returned no aggregate "
                                 f"from {len(updates)} valid update(s)")
            aggregate = record_to_arrays(record)
        try:
            check_arrays(aggregate, reference=self.reference)  # names, shapes, NaN/Inf as computed
            aggregate = {name: _like(value, self.reference[name]) for name, value in aggregate.items()}
            check_arrays(aggregate, reference=self.reference)  # and no overflow in the model's own dtype
        except InvalidUpdate as exc:
            raise CldlrError(f"round {round_number}: the aggregate of {len(updates)} valid update(s) by "
                             f"{type(self.strategy).__name__} is refused ({exc}); the global model stays that of "
                             "the previous round — check the strategy's settings (e.g. federation.server_opt)") from exc
        return aggregate

    def _inner_replies(self, server_round: int, updates: list[tuple[Reply, float]]) -> list[Message]:
        """The valid replies as the inner strategy expects them: one float32 ArrayRecord, one MetricRecord
        with the metrics every reply has (Flower refuses replies whose metric keys differ).
        """
        shared = set.intersection(*(set(item.metrics) for item, _ in updates))
        replies = []
        for item, weight in updates:
            assert item.arrays is not None
            metrics = {k: v for k, v in item.metrics.items() if k in shared and _metric_value(v)}
            content = RecordDict({"arrays": arrays_to_record(item.arrays, "float32"),
                                  "metrics": MetricRecord({**metrics, WEIGHT_KEY: weight})})
            metadata = Metadata(run_id=0, message_id="", src_node_id=item.node, dst_node_id=0, reply_to_message_id="",
                                group_id=str(server_round), created_at=0.0, ttl=DEFAULT_TTL, message_type=MessageType.TRAIN)
            replies.append(make_message(metadata, content))  # Flower's own way to rebuild a received message
        return replies


def _metric_value(value: Any) -> bool:
    """What a MetricRecord may hold: an int or float (not a bool), or a list of them."""
    items = value if isinstance(value, list) else [value]
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items)


def _like(value: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """An aggregate entry in the global model's dtype (FedOpt computes in float64; counters stay integers)."""
    target = np.asarray(reference).dtype
    if np.issubdtype(target, np.floating):
        with np.errstate(over="ignore"):  # an overflow becomes Inf, which the caller's check refuses
            return np.asarray(value, dtype=target)
    return np.round(np.asarray(value, dtype=np.float64)).astype(target)
