"""The centre's strategy registry: a name in ``federation.strategy`` → how to build it and what it implies.

Like the backbone registry (:data:`cldlr.common.models.backbones.BACKBONES`), one entry per
strategy says how to build its Flower Message-API strategy from the config and what the rest of
the study must know about it (whether sites add a proximal term, whether the centre keeps an
optimizer, whether it can run with sample-level DP-SGD). :func:`make_strategy` always wraps the
built strategy in :class:`~cldlr.server.strategy.CheckedStrategy`, so a new entry gets screened
replies and a checked aggregate and keeps its own aggregation step. The config stores the name
as a plain string (``cldlr.common`` cannot import Flower): :func:`check_study_config` checks it,
and everything else the registries know, where a run starts — before anything trains.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cldlr.common.config import Config, FederationConfig, ServerOptConfig
from cldlr.common.errors import CldlrError, ConfigError
from cldlr.common.models.backbones import check_backbone

if TYPE_CHECKING:  # Flower loads when a strategy is built, not when the CLI checks a pooled run's names
    from flwr.serverapp.strategy import Strategy

    from cldlr.server.strategy import CheckedStrategy

_SYMBOLS = {"eta": "η", "beta_1": "β₁", "beta_2": "β₂", "tau": "τ"}


@dataclass(frozen=True)
class StrategyOptions:
    """What an entry may build its Flower strategy from: the sampling shared by all and each family's settings."""

    min_sites: int
    proximal_mu: float = 0.0
    server_opt: ServerOptConfig = field(default_factory=ServerOptConfig)

    def sampling(self) -> dict[str, Any]:
        """All connected sites train every round; a round needs ``min_sites`` of them (a dead site drops out)."""
        return dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=self.min_sites,
                    min_evaluate_nodes=0, min_available_nodes=self.min_sites)

    def optimizer(self) -> dict[str, Any]:
        """The ``federation.server_opt`` settings that are set, in Flower's names (unset: Flower's defaults)."""
        return {k: v for k, v in dataclasses.asdict(self.server_opt).items() if v is not None}


@dataclass(frozen=True)
class StrategyEntry:
    """One registered strategy: its report title, its builder and the properties the study depends on.

    ``proximal``: sites add FedProx's μ/2‖w − w_global‖² (the strategy sends ``proximal-mu``).
    ``server_optimizer``: the centre keeps optimizer state and ``federation.server_opt`` applies.
    ``dp_sgd``: may run with ``privacy.enabled``; ``dp_reason`` says why not when it may not.
    ``compared``: an arm of ``--compare`` when ``federation.compare_strategies`` is empty (the seed's
    comparison is FedAvg vs FedProx; server optimizers join when named, each arm costs a whole study).
    """

    name: str
    title: str
    build: Callable[[StrategyOptions], Strategy]
    proximal: bool = False
    server_optimizer: bool = False
    dp_sgd: bool = True
    dp_reason: str = ""
    compared: bool = True

    def __post_init__(self) -> None:
        """An entry refused under DP must say why (the error a user sees)."""
        if not self.dp_sgd and not self.dp_reason:
            raise CldlrError(f"strategy {self.name!r}: dp_sgd=False needs a dp_reason for the error message")

    def arm_title(self, fed: FederationConfig) -> str:
        """The title with the settings that distinguish it, e.g. ``FedProx (μ=0.01)``, ``FedAdam (η=0.05)``."""
        settings = []
        if self.proximal:
            settings.append(f"μ={fed.proximal_mu:g}")
        if self.server_optimizer:
            opt = StrategyOptions(min_sites=1, server_opt=fed.server_opt).optimizer()
            settings += [f"{_SYMBOLS.get(k, k)}={v:g}" for k, v in opt.items()]
        return f"{self.title} ({', '.join(settings)})" if settings else self.title


def _fedavg(o: StrategyOptions) -> Strategy:
    from flwr.serverapp.strategy import FedAvg

    return FedAvg(**o.sampling())


def _fedprox(o: StrategyOptions) -> Strategy:
    from flwr.serverapp.strategy import FedProx

    return FedProx(proximal_mu=o.proximal_mu, **o.sampling())


def _fedadam(o: StrategyOptions) -> Strategy:
    from flwr.serverapp.strategy import FedAdam

    return FedAdam(**o.sampling(), **o.optimizer())


def _fedyogi(o: StrategyOptions) -> Strategy:
    from flwr.serverapp.strategy import FedYogi

    return FedYogi(**o.sampling(), **o.optimizer())


STRATEGIES: dict[str, StrategyEntry] = {
    "fedavg": StrategyEntry("fedavg", "FedAvg", _fedavg),
    "fedprox": StrategyEntry("fedprox", "FedProx", _fedprox, proximal=True, dp_sgd=False,
                             dp_reason="FedProx's proximal term would be overwritten by DP-SGD's noisy gradient"),
    "fedadam": StrategyEntry("fedadam", "FedAdam", _fedadam, server_optimizer=True, compared=False),
    "fedyogi": StrategyEntry("fedyogi", "FedYogi", _fedyogi, server_optimizer=True, compared=False),
}


def register_strategy(entry: StrategyEntry, *, replace: bool = False) -> None:
    """Add a strategy (a study may bring its own) to :data:`STRATEGIES`."""
    if entry.name in STRATEGIES and not replace:
        raise CldlrError(f"strategy {entry.name!r} is already registered; pass replace=True to override it")
    STRATEGIES[entry.name] = entry


def get_strategy(name: str, *, where: str = "federation.strategy") -> StrategyEntry:
    """Registry lookup with an error that lists the available names."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ConfigError(f"unknown {where} {name!r}; available: {', '.join(sorted(STRATEGIES))}") from None


def dp_refusal(entry: StrategyEntry) -> str:
    """Why ``entry`` cannot run with ``privacy.enabled``, and what can."""
    usable = sorted(n for n, e in STRATEGIES.items() if e.dp_sgd)
    choice = " or ".join([", ".join(usable[:-1]), usable[-1]] if len(usable) > 1 else usable)
    return f"{entry.dp_reason}; use federation.strategy={choice} with privacy.enabled"


def check_study_config(config: Config) -> StrategyEntry:
    """Refuse, before anything trains, what only the registries can tell is wrong; return the strategy's entry.

    Unknown backbone or strategy names (including ``federation.compare_strategies``), DP-SGD with a
    BatchNorm backbone, DP-SGD with a strategy that cannot take it. Run at every boundary where a
    study starts: the CLI's simulation, each ``--compare`` arm, the centre's ServerApp.
    """
    check_backbone(config.model, private=config.privacy.enabled)
    for i, name in enumerate(config.federation.compare_strategies):
        get_strategy(name, where=f"federation.compare_strategies[{i}]")
    entry = get_strategy(config.federation.strategy)
    if config.privacy.enabled and not entry.dp_sgd:
        raise ConfigError(f"federation.strategy={entry.name} with privacy.enabled: {dp_refusal(entry)}")
    return entry


def make_strategy(name: str, *, min_sites: int, proximal_mu: float = 0.0,
                  server_opt: ServerOptConfig | None = None) -> CheckedStrategy:
    """The registered strategy ``name``, built from these settings and wrapped in :class:`CheckedStrategy`."""
    from cldlr.server.strategy import CheckedStrategy

    entry = get_strategy(name)
    options = StrategyOptions(min_sites=min_sites, proximal_mu=proximal_mu, server_opt=server_opt or ServerOptConfig())
    return CheckedStrategy(entry.build(options))
