"""Sample-level DP-SGD for a site's local training (the only module of cldlr that imports Opacus).

One :class:`SitePrivacy` lives for a site's whole federation. Its noise multiplier is
calibrated once, from all the local epochs the run will train; its RDP accountant keeps
counting across rounds (and across restarts, through ``state_dict``), so the ε it reports is
the site's cumulative spend, and it refuses a round that would overspend. Batches are Poisson
samples (each training image joins with probability q = batch_size / n), as DP-SGD's analysis
assumes. A Poisson batch larger than ``max_physical_batch`` is run as chunks whose clipped
per-sample gradients are summed before the single noisy step (Opacus's virtual steps), so the
memory of a step never exceeds that of a batch of ``max_physical_batch`` images.

DP's guarantee needs randomness nobody else knows: the Poisson draws and the Gaussian noise come
from generators seeded by the operating system's CSPRNG (:func:`os_generator`), never from
``run.seed``, which the centre sets (with it the centre could regenerate the noise and subtract
it). Opacus's ``secure_mode`` noise is used too (robust to floating-point attacks); its
``torchcsprng`` generator is not available for current PyTorch, hence the OS-seeded ones. Runs
without DP keep their seeded reproducibility: only this module's hooks draw from the OS.

Accounting uses Opacus's RDP accountant: deterministic, a few numbers of state, and slightly
conservative (a larger ε) compared with the PRV accountant.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import secrets
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn

from cldlr.common.config import PrivacyConfig
from cldlr.common.errors import CldlrError

log = logging.getLogger(__name__)

ACCOUNTANT = "rdp"
# Opacus's RDP orders plus larger ones: a large ε over few steps is tightest at high orders.
ALPHAS = [*RDPAccountant.DEFAULT_ALPHAS, *range(64, 257, 8)]
EPSILON_SLACK = 1e-6  # absolute: a round may end at most this far above target_epsilon
STATE_FORMAT = 1


class PrivacyBudgetError(CldlrError):
    """Training more would take the site's cumulative ε beyond ``privacy.target_epsilon``."""


def _problems(model: nn.Module) -> list[str]:
    """Every layer DP-SGD cannot train privately, named, with Opacus's reason."""
    found = []
    for name, module in model.named_modules():
        label = f"{name or '<model>'} ({type(module).__name__})"
        validator = ModuleValidator.VALIDATORS.get(type(module))
        if validator is not None:
            found += [f"{label}: {str(error).split('. ')[0].strip()}" for error in validator(module)]
        elif any(p.requires_grad for p in module.parameters(recurse=False)) and any(module.buffers(recurse=False)):
            found.append(f"{label}: trainable layer with buffers (statistics shared across examples)")
    return found


def check_private_compatible(model: nn.Module) -> None:
    """Raise, listing every offending layer, if ``model`` cannot be trained with per-sample DP.

    BatchNorm mixes the examples of a batch, so a per-sample gradient (and its clipping) would
    not bound one image's influence; such layers must be replaced before training starts.
    """
    problems = _problems(model)
    if problems:
        raise CldlrError(
            f"{type(model).__name__} cannot be trained with differential privacy: " + "; ".join(problems)
            + ". Build the model with make_private_compatible(model) (BatchNorm → GroupNorm) on every site "
            "and on the centre before the federation starts, so that all use the same architecture"
        )


def make_private_compatible(model: nn.Module) -> nn.Module:
    """``model`` itself when DP-ready (e.g. VGG11), else a copy with BatchNorm → GroupNorm.

    The new GroupNorm layers start fresh (BatchNorm's running statistics cannot carry over), so
    every participant must apply this to the same freshly built or loaded model.
    """
    problems = _problems(model)
    if not problems:
        return model
    fixed = ModuleValidator.fix(model)
    fixed.train(model.training)
    check_private_compatible(fixed)
    log.info("made the model DP-compatible by replacing %d layer(s): %s", len(problems),
             ", ".join(p.split(":")[0] for p in problems[:5]) + (" …" if len(problems) > 5 else ""))
    return fixed


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under Opacus's ``GradSampleModule``, whose state-dict names lack ``_module.``."""
    while isinstance(model, GradSampleModule):
        model = model._module
    return model


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
    """The calibrated DP-SGD settings of one site for one run (fixed before the first round)."""

    n_train: int
    batch_size: int
    total_epochs: int
    steps_per_epoch: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    target_epsilon: float
    delta: float
    accountant: str = ACCOUNTANT


@functools.lru_cache(maxsize=64)
def _noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Opacus's binary search (seconds of RDP sums), cached: a Flower client is rebuilt every round."""
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant=ACCOUNTANT, alphas=ALPHAS))


def calibrate(cfg: PrivacyConfig, *, n_train: int, batch_size: int, total_epochs: int) -> PrivacyPlan:
    """Choose σ so that ``total_epochs`` of Poisson-sampled steps end at ε ≤ target (at δ).

    The sampler draws ``n_train // batch_size`` batches per epoch (as Opacus's Poisson loader
    does), so σ is calibrated on exactly the steps that will be taken; this equals Opacus's
    ``epochs=`` form when the batch size divides ``n_train``.
    """
    if not cfg.enabled:
        raise CldlrError("privacy.enabled is false; build SitePrivacy only for a DP run")
    if not (cfg.target_epsilon > 0 and 0 < cfg.delta < 1 and cfg.max_grad_norm > 0):
        raise CldlrError(f"privacy needs target_epsilon > 0, 0 < delta < 1 and max_grad_norm > 0, got {cfg}")
    if not 1 <= batch_size <= n_train:
        raise CldlrError(f"DP-SGD needs 1 <= train.batch_size <= the {n_train} training images, got {batch_size}")
    if total_epochs < 1:
        raise CldlrError("DP-SGD needs at least one local epoch in the run (rounds × local epochs), "
                         f"got {total_epochs}")
    if cfg.delta >= 1.0 / n_train:
        warnings.warn(f"privacy.delta={cfg.delta} is not below 1/{n_train} (one over the site's training images); "
                      "such a δ allows leaking a whole record", stacklevel=2)
    sample_rate = batch_size / n_train
    steps_per_epoch = n_train // batch_size
    try:
        sigma = _noise_multiplier(cfg.target_epsilon, cfg.delta, sample_rate, total_epochs * steps_per_epoch)
    except ValueError as exc:
        raise CldlrError(f"no noise level reaches ε={cfg.target_epsilon} at δ={cfg.delta} over {total_epochs} "
                         f"epochs of {n_train} images ({exc}); raise the budget or train fewer epochs") from exc
    return PrivacyPlan(n_train=n_train, batch_size=batch_size, total_epochs=total_epochs,
                       steps_per_epoch=steps_per_epoch, sample_rate=sample_rate, noise_multiplier=sigma,
                       max_grad_norm=cfg.max_grad_norm, target_epsilon=cfg.target_epsilon, delta=cfg.delta)


def epsilon_of(history: list[tuple[float, float, int]], delta: float) -> float:
    """ε at ``delta`` of a DP-SGD history of ``(noise multiplier, sample rate, steps)`` entries (RDP)."""
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta, alphas=ALPHAS))


def dpsgd_rdp(history: list[tuple[float, float, int]]) -> Any:
    """The RDP curve at :data:`ALPHAS` of a DP-SGD history (Opacus' ``compute_rdp``), to compose with other releases."""
    import numpy as np
    from opacus.accountants.analysis.rdp import compute_rdp

    total = np.zeros(len(ALPHAS))
    for sigma, q, steps in history:
        total = total + np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=ALPHAS))
    return total


def epsilon_of_rdp(rdp: Any, delta: float) -> float:
    """ε at ``delta`` of an RDP curve at :data:`ALPHAS` (Opacus' ``get_privacy_spent``, as its accountant converts)."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    return float(get_privacy_spent(orders=ALPHAS, rdp=rdp, delta=delta)[0])


def os_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded with 64 bits from the OS (``secrets``): DP randomness no config can set or replay."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(64))


class SitePrivacy:
    """A site's DP-SGD hooks for :func:`~cldlr.client.training.train_classifier` and its ε ledger.

    Every Poisson draw is charged to the accountant when it is drawn (also an empty one, which
    the trainer skips), so each step is counted exactly once whatever the trainer does with it.
    Draws and noise come from generators seeded by the OS at every :meth:`prepare`.
    """

    def __init__(self, plan: PrivacyPlan, *, seed: int = 0, max_physical_batch: int | None = None) -> None:
        if max_physical_batch is not None and max_physical_batch < 1:
            raise CldlrError(f"max_physical_batch must be >= 1 (or None for the batch size), got {max_physical_batch}")
        self.plan = plan
        self.seed = seed  # the run's seed, recorded in the state only: draws and noise never come from it
        self.max_physical_batch = max_physical_batch if max_physical_batch is not None else plan.batch_size
        self._accountant = RDPAccountant()
        self._module: GradSampleModule | None = None
        self._optimizer: DPOptimizer | None = None
        self._sampling: torch.Generator | None = None
        self._draws = self._noisy_steps = 0
        self._inplace: list[nn.Module] = []

    @classmethod
    def from_config(cls, cfg: PrivacyConfig, *, n_train: int, batch_size: int, total_epochs: int, seed: int,
                    max_physical_batch: int | None = None) -> SitePrivacy:
        """Calibrate once for ``total_epochs`` (= federation rounds × local epochs) of ``n_train`` images."""
        plan = calibrate(cfg, n_train=n_train, batch_size=batch_size, total_epochs=total_epochs)
        log.info("DP-SGD: sigma=%.4f, q=%.4f, %d steps/epoch, clip %.3g; calibrated for %d epochs to "
                 "epsilon<=%g at delta=%g (%s accountant)", plan.noise_multiplier, plan.sample_rate,
                 plan.steps_per_epoch, plan.max_grad_norm, total_epochs, plan.target_epsilon, plan.delta, ACCOUNTANT)
        return cls(plan, seed=seed, max_physical_batch=max_physical_batch)

    # -- accounting --------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Noisy steps (Poisson draws) charged so far."""
        return sum(int(entry[2]) for entry in self._accountant.history)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """The accountant's ``(noise multiplier, sample rate, steps)`` entries: what the lifetime ledger composes."""
        return [(float(s), float(q), int(n)) for s, q, n in self._accountant.history]

    def planned(self, epochs: int) -> tuple[float, float, int]:
        """The history entry ``epochs`` more local epochs would add (for ledger checks before training)."""
        return (self.plan.noise_multiplier, self.plan.sample_rate, epochs * self.plan.steps_per_epoch)

    def continue_history(self, history: list[tuple[float, float, int]]) -> None:
        """Take over a longer history of this run kept elsewhere (the lifetime ledger), e.g. after a crash.

        A history drawn at another noise multiplier or sample rate belongs to another calibration
        and is refused rather than mixed in.
        """
        ours = (self.plan.noise_multiplier, self.plan.sample_rate)
        if any((float(s), float(q)) != ours for s, q, _ in history):
            raise CldlrError(f"the recorded DP-SGD history of this run ({history}) was drawn at other settings than "
                             f"sigma={ours[0]}, q={ours[1]}; resume with the same privacy/train/federation settings")
        if sum(int(n) for _, _, n in history) > self.steps:
            self._accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]

    def epsilon(self) -> float:
        """Cumulative ε at the configured δ after every step so far."""
        return float(self._accountant.get_epsilon(delta=self.plan.delta, alphas=ALPHAS))

    def epsilon_after(self, epochs: int) -> float:
        """The cumulative ε if ``epochs`` more local epochs were trained (composed on a copy)."""
        trial = RDPAccountant()
        trial.history = [*self._accountant.history,
                         (self.plan.noise_multiplier, self.plan.sample_rate, epochs * self.plan.steps_per_epoch)]
        return float(trial.get_epsilon(delta=self.plan.delta, alphas=ALPHAS))

    def would_exceed(self, epochs: int) -> bool:
        """Whether training ``epochs`` more would take ε above target (+ :data:`EPSILON_SLACK`)."""
        return self.epsilon_after(epochs) > self.plan.target_epsilon + EPSILON_SLACK

    def summary(self) -> dict[str, Any]:
        """The numbers a round reports: cumulative ε, δ, σ, q, steps, clipping norm and target."""
        return {"epsilon": self.epsilon(), "delta": self.plan.delta, "noise_multiplier": self.plan.noise_multiplier,
                "sample_rate": self.plan.sample_rate, "steps": self.steps, "max_grad_norm": self.plan.max_grad_norm,
                "target_epsilon": self.plan.target_epsilon, "accountant": ACCOUNTANT}

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready ledger (plan + accountant history) to keep between rounds and across restarts."""
        state = self._accountant.state_dict()
        return {"format": STATE_FORMAT, "seed": self.seed, "plan": dataclasses.asdict(self.plan),
                "accountant": {"mechanism": state["mechanism"], "history": [list(h) for h in state["history"]]}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a saved ledger; refuses one calibrated for other settings rather than mix them."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise CldlrError(f"privacy state: expected a dict with format={STATE_FORMAT}, got "
                             f"{state.get('format') if isinstance(state, dict) else type(state).__name__}")
        saved = state.get("plan", {})
        ours = dataclasses.asdict(self.plan)
        differ = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in ours.items() if saved.get(k) != v]
        if differ:
            raise CldlrError("privacy state was calibrated for other settings (" + "; ".join(differ)
                             + "); resume with the same privacy/train/federation settings and data")
        try:
            history = [(float(s), float(q), int(n)) for s, q, n in state["accountant"]["history"]]
            self._accountant.load_state_dict({"mechanism": state["accountant"]["mechanism"], "history": history})
        except (KeyError, TypeError, ValueError) as exc:
            raise CldlrError(f"privacy state: unreadable accountant entry ({exc})") from exc

    # -- training hooks ----------------------------------------------------------------------
    def train_kwargs(self) -> dict[str, Any]:
        """``batch_sampler`` and ``prepare`` for ``train_classifier`` (call :meth:`release` afterwards)."""
        return {"batch_sampler": self.poisson_batches, "prepare": self.prepare}

    @contextmanager
    def training(self) -> Iterator[dict[str, Any]]:
        """``with privacy.training() as kw: train_classifier(..., **kw)`` — unhooks the model afterwards."""
        try:
            yield self.train_kwargs()
        finally:
            self.release()

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Wrap for per-sample clipping and noise; the wrapper shares ``model``'s parameters, so the
        trained weights land in the caller's model under their plain names.
        """
        self.release()
        check_private_compatible(model)
        # Opacus's backward hooks forbid in-place edits of a hooked layer's output (VGG's
        # ReLU(inplace=True)); out-of-place gives the same numbers and is restored by release().
        self._inplace = [m for m in model.modules() if getattr(m, "inplace", False) is True]
        for module in self._inplace:
            module.inplace = False
        self._module = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
        device = next(model.parameters()).device  # the noise is drawn where the gradients are
        self._optimizer = DPOptimizer(optimizer, noise_multiplier=self.plan.noise_multiplier,
                                      max_grad_norm=self.plan.max_grad_norm,
                                      expected_batch_size=self.plan.batch_size, loss_reduction="mean",
                                      generator=os_generator(device), secure_mode=True)
        self._sampling = os_generator()
        self._optimizer.attach_step_hook(self._after_noise)
        self._draws = self._noisy_steps = 0
        return self._module, self._optimizer

    def poisson_batches(self, n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
        """One epoch of Poisson draws (charged now), each split into chunks of ≤ ``max_physical_batch``.

        ``generator`` is the trainer's seeded one and deliberately unused: the draws come from the
        OS-seeded generator of :meth:`prepare`, so whoever knows ``run.seed`` cannot know the batches.
        """
        plan = self.plan
        if self._optimizer is None or self._sampling is None:
            raise CldlrError("the Poisson sampler ran without the DP prepare hook; pass both entries of "
                             "SitePrivacy.train_kwargs() to train_classifier")
        if (n, batch_size) != (plan.n_train, plan.batch_size):
            raise CldlrError(f"privacy was calibrated for {plan.n_train} training images in batches of "
                             f"{plan.batch_size}, but the trainer samples {n} in batches of {batch_size}; build "
                             "SitePrivacy with the trainer's numbers (with train.keep=best_val, the inner-train size)")
        if self.would_exceed(1):
            raise PrivacyBudgetError(f"another epoch would take ε from {self.epsilon():.3f} to "
                                     f"{self.epsilon_after(1):.3f} > target {plan.target_epsilon}; training stops")
        batches: list[torch.Tensor] = []
        for _ in range(plan.steps_per_epoch):
            drawn = torch.nonzero(torch.rand(n, generator=self._sampling) < plan.sample_rate).flatten()
            self._accountant.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
            if drawn.numel() == 0:  # the trainer skips it; the draw is charged all the same
                batches.append(drawn)
                continue
            chunks = list(drawn.split(self.max_physical_batch))
            for i in range(len(chunks)):  # clip and sum every chunk, add noise and step after the last
                self._optimizer.signal_skip_step(do_skip=i < len(chunks) - 1)
            batches += chunks
            self._draws += 1
        return batches

    def _after_noise(self, optimizer: DPOptimizer) -> None:
        """Refuse a noisy step on a batch the Poisson sampler did not draw (its ε would be wrong)."""
        self._noisy_steps += 1
        if self._noisy_steps > self._draws:
            raise CldlrError("the DP optimizer stepped on batches that the Poisson sampler did not draw; "
                             "pass both entries of SitePrivacy.train_kwargs() to train_classifier")

    def release(self) -> None:
        """Remove Opacus's hooks and attributes from the model trained last (idempotent)."""
        if self._module is None:
            return
        model = self._module.to_standard_module()
        for p in model.parameters():
            if hasattr(p, "summed_grad"):
                del p.summed_grad
        for module in self._inplace:
            module.inplace = True
        self._module = self._optimizer = self._sampling = None
        self._inplace = []
