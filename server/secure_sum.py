"""Centre side of a secure sum over sites: Flower's legacy SecAgg+ workflow run inside a Message-API ServerApp.

Flower 1.41 offers SecAgg+ only through the legacy ``DefaultWorkflow(fit_workflow=
SecAggPlusWorkflow(...))``. It unmasks the weighted MEAN of the sites' vectors and hands it to a
legacy strategy. With ``num_examples = 1`` per site and ``max_weight = 1.0`` every weight is 1, so
the mean times the number of surviving sites is the SUM; the centre never sees a single site's
vector. One call may span several rounds (slices) for very long vectors. Every failure mode the
workflow keeps quiet about (halted protocol, dropped sites, stale replies) becomes a
:class:`~cldlr.common.secure.sums.SecureSumError` here.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.common import FitRes, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from cldlr.common.config import SecAggConfig
from cldlr.common.secure.sums import (
    SPEC_KEY,
    BoundSpec,
    ScalePlan,
    SecureSumError,
    SecureSumSpec,
    check_capacity,
    round_to_integers,
    split_rounds,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecureSumResult:
    """The secure sum of one task and who contributed to it."""

    task: str
    values: np.ndarray
    num_sites: int
    node_ids: tuple[int, ...]
    error_bound: np.ndarray  # per element: |values - plain sum| stays below this
    rounds: int
    elapsed_s: float


class _SumStrategy(FedAvg):
    """Legacy FedAvg that sends the spec and records what SecAgg+ hands to ``aggregate_fit``."""

    def __init__(self, *, num_sites: int, spec: SecureSumSpec) -> None:
        spec_json = spec.to_json()
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=num_sites,
            min_evaluate_clients=0,
            min_available_clients=num_sites,
            on_fit_config_fn=lambda _round: {SPEC_KEY: spec_json},
            # A placeholder: DefaultWorkflow would otherwise ask a site for parameters with a
            # legacy message a decorator ClientApp cannot route; the sites ignore its content.
            initial_parameters=ndarrays_to_parameters([np.zeros(1, dtype=np.float64)]),
            accept_failures=True,
        )
        self.called = False
        self.mean: np.ndarray | None = None
        self.node_ids: tuple[int, ...] = ()
        self.replies: list[FitRes] = []

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Any, dict[str, Scalar]]:
        """Keep the unmasked mean (identical in every result) and the contributors; store nothing."""
        self.called = True
        self.node_ids = tuple(proxy.node_id for proxy, _ in results)
        self.replies = [res for _, res in results]
        if results:
            arrays = parameters_to_ndarrays(results[0][1].parameters)
            self.mean = np.concatenate([np.ravel(a) for a in arrays]) if arrays else np.zeros(0)
        return None, {}


def _short_reason(reason: str | None, limit: int = 300) -> str:
    """Last meaningful line of a site's error (simulation wraps it in whole Ray tracebacks)."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", reason or "").splitlines() if line.strip()]
    text = lines[-1].removesuffix("'>") if lines else "no reason given"
    text = text.split("Message: ", 1)[-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _ErrorRecordingGrid:
    """Delegating grid that remembers why sites failed, since the workflow discards the reasons."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.errors: dict[int, str] = {}

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Forward to the real grid and note each error reply's reason by node."""
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.has_error():
                logger.debug("site %s failed: %s", reply.metadata.src_node_id, reply.error.reason)
                self.errors[reply.metadata.src_node_id] = _short_reason(reply.error.reason)
        return replies

    def __getattr__(self, name: str) -> Any:
        """Everything else (node ids, run, push/pull) is the real grid's."""
        return getattr(self._grid, name)


def wait_for_sites(grid: Grid, num_sites: int, timeout_s: float, poll_s: float = 1.0) -> list[int]:
    """Block until ``num_sites`` nodes are connected (Flower itself would wait a whole day)."""
    deadline = time.monotonic() + timeout_s
    while True:
        node_ids = list(grid.get_node_ids())
        if len(node_ids) >= num_sites:
            return node_ids
        if time.monotonic() >= deadline:
            raise SecureSumError(
                f"only {len(node_ids)} of {num_sites} expected sites connected within {timeout_s:.0f} s; "
                "start the missing SuperNodes or lower the expected number of sites"
            )
        time.sleep(poll_s)


def _workflow(cfg: SecAggConfig, timeout: float | None) -> SecAggPlusWorkflow:
    """SecAgg+ with unit weights; ``num_shares``/threshold follow Flower's int-or-fraction rule."""
    shares: int | float = cfg.num_shares
    if isinstance(shares, float) and shares > 1 and shares.is_integer():
        shares = int(shares)  # a whole number above 1 means a count, not a fraction
    return SecAggPlusWorkflow(
        num_shares=shares,
        reconstruction_threshold=cfg.reconstruction_threshold,
        max_weight=1.0,
        clipping_range=cfg.clipping_range,
        quantization_range=cfg.quantization_range,
        modulus_range=cfg.modulus_range,
        timeout=timeout,
    )


def _round_context(context: Context) -> LegacyContext:
    """Fresh state per round so the workflow's bookkeeping never touches the ServerApp's own state."""
    scratch = Context(
        run_id=context.run_id,
        node_id=context.node_id,
        node_config=context.node_config,
        state=RecordDict(),
        run_config=context.run_config,
        series_id=getattr(context, "series_id", 0),
    )
    return LegacyContext(scratch, config=ServerConfig(num_rounds=1))


def _run_round(
    grid: Grid, context: Context, spec: SecureSumSpec, *, num_sites: int, min_sites: int, cfg: SecAggConfig, timeout: float | None
) -> tuple[np.ndarray, tuple[int, ...]]:
    """One SecAgg+ round over one slice; returns the unmasked scaled mean and the contributors."""
    strategy = _SumStrategy(num_sites=num_sites, spec=spec)
    legacy = _round_context(context)
    legacy.strategy = strategy
    recording = _ErrorRecordingGrid(grid)
    DefaultWorkflow(fit_workflow=_workflow(cfg, timeout))(cast(Grid, recording), legacy)
    failed = "; ".join(f"node {nid}: {reason}" for nid, reason in sorted(recording.errors.items())) or "none reported"
    where = f"secure sum '{spec.task}' slice [{spec.offset}, {spec.offset + spec.count})"
    if not strategy.called or strategy.mean is None:
        raise SecureSumError(
            f"{where}: Flower's SecAgg+ halted (too few sites kept up with the protocol); site errors: {failed}"
        )
    for reply in strategy.replies:
        if reply.num_examples != 1:
            raise SecureSumError(f"{where}: a site replied with weight {reply.num_examples} instead of 1")
        if not spec.is_reply_to(reply.metrics):
            raise SecureSumError(f"{where}: a reply belongs to another request ({reply.metrics!r})")
    if strategy.mean.size != spec.count:
        raise SecureSumError(f"{where}: got {strategy.mean.size} values, expected {spec.count}")
    if len(strategy.node_ids) < min_sites:
        raise SecureSumError(
            f"{where}: only {len(strategy.node_ids)} sites contributed, at least {min_sites} required; site errors: {failed}"
        )
    if recording.errors:
        logger.warning("%s: sites failed and were left out: %s", where, failed)
    return strategy.mean, strategy.node_ids


def secure_sum(
    grid: Grid,
    context: Context,
    *,
    task: str,
    length: int,
    bound: BoundSpec,
    num_sites_expected: int,
    payload_config: Mapping[str, Any] | None = None,
    secagg_cfg: SecAggConfig | None = None,
    timeout: float | None = None,
    min_sites: int | None = None,
    max_elements_per_round: int | None = None,
    wait_for_sites_s: float = 120.0,
    integer: bool = False,
    headroom: float = 1.0,
) -> SecureSumResult:
    """Sum a float vector of ``length`` over all sites with SecAgg+; sites compute it for ``task``.

    ``bound`` is the largest magnitude one site may contribute per element (scalar, per element,
    or ``[(count, bound), ...]`` blocks): it sets the scale and hence the resolution ``2*bound/Q``.
    ``payload_config`` (JSON-serialisable, numpy allowed) reaches the site's task callback.
    ``timeout`` bounds each of the four protocol stages; ``min_sites`` (default: all expected) is
    the fewest contributors accepted, since SecAgg+ silently continues without dropped sites.
    ``integer=True`` returns exact integer sums (counts) and refuses bounds too coarse for that.
    ``headroom`` widens the range beyond ``bound`` for the sites' DP noise shares (whole-study DP).
    """
    cfg = secagg_cfg or SecAggConfig()
    min_sites = num_sites_expected if min_sites is None else min_sites
    if num_sites_expected < 2 or not 2 <= min_sites <= num_sites_expected:
        raise SecureSumError(f"secure sum needs 2 <= min_sites ({min_sites}) <= num_sites_expected ({num_sites_expected})")
    check_capacity(num_sites_expected, cfg.quantization_range, cfg.modulus_range)
    plan = ScalePlan.from_bounds(bound, length, cfg.clipping_range, headroom)
    if integer:  # fail before any site works, with the worst case of all expected sites
        round_to_integers(np.zeros(1), plan.error_bound(num_sites_expected, cfg.quantization_range))
    start = time.monotonic()
    wait_for_sites(grid, num_sites_expected, wait_for_sites_s)
    call_id = uuid.uuid4().hex
    scaled = np.empty(length, dtype=np.float64)
    contributors: tuple[int, ...] | None = None
    slices = split_rounds(length, max_elements_per_round)
    for offset, count in slices:
        spec = SecureSumSpec(task, call_id, plan, offset, count, dict(payload_config or {}))
        mean, node_ids = _run_round(
            grid, context, spec, num_sites=num_sites_expected, min_sites=min_sites, cfg=cfg, timeout=timeout
        )
        if contributors is not None and set(node_ids) != set(contributors):
            raise SecureSumError(
                f"secure sum '{task}': sites changed between slices ({sorted(contributors)} -> {sorted(node_ids)})"
            )
        contributors = node_ids
        scaled[offset : offset + count] = mean * len(node_ids)
    assert contributors is not None  # split_rounds yields at least one slice
    if len(contributors) == 2:
        logger.warning("secure sum '%s' over 2 sites: each site can subtract its own vector and learn the other's", task)
    elapsed = time.monotonic() - start
    logger.info(
        "secure sum '%s': %d values over %d sites in %d round(s), %.1f s", task, length, len(contributors), len(slices), elapsed
    )
    error_bound = plan.error_bound(len(contributors), cfg.quantization_range)
    values = plan.unscale(scaled)
    if integer:
        values, error_bound = round_to_integers(values, error_bound), np.zeros_like(error_bound)
    return SecureSumResult(
        task=task,
        values=values,
        num_sites=len(contributors),
        node_ids=tuple(sorted(contributors)),
        error_bound=error_bound,
        rounds=len(slices),
        elapsed_s=elapsed,
    )
