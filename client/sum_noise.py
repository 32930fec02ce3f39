"""A site's share of the distributed DP noise on every vector it releases through SecAgg+.

:class:`SumNoiser` turns the site's scaled vector (``[-C, C]``, as :class:`ScalePlan` maps it)
into integers on Flower's quantisation grid plus its ``Poisson(μ/t) − Poisson(μ/t)`` share of
Skellam noise per element (the mechanism and its analysis: :mod:`cldlr.common.secure.noise`),
each part of a batch with its own phase and sensitivity. What it decides, it decides itself:

- **the noise level** comes from the study plan the site accepted at the handshake against its
  own cap (``privacy.secure_sums``, checked by :class:`~cldlr.client.privacy_ledger.LifetimeLedger`),
  never from a number in the centre's request; the phase of a release is read from its task;
- **t**, the honest sites its share assumes: with ``dp.noise_split: listed`` every site the
  centre listed at the share-keys stage (the unmask is refused if one of them drops out after the
  noise was added, and the next round over fewer sites adds a larger share); with ``min_parties``
  the policy's minimum (a larger share, so drop-outs down to that minimum keep the target);
- **the sensitivity**: from the protocol's per-patient bounds (clinical values clipped to ±4 SD,
  RFF rows of bounded norm, one count per patient-image), never below them: stated per-site
  bounds under (its cases) × (per-patient bound) are refused; where the protocol fixes a patient's
  part, a small site's share is no larger than the largest site's;
- **the release count**: a phase gets no more releases than the plan states, and none that would
  take the dataset past the site's lifetime cap (both refused with a public reason).

The generator is the OS entropy source (:func:`~cldlr.common.secure.noise.os_rng`); tests may
pass another one. This module knows nothing of Flower.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from cldlr.client.policy import PolicyRefusal, SitePolicy
from cldlr.common.data.schema import Schema
from cldlr.common.secure import noise
from cldlr.common.secure.dp_plan import StudyPlan, patient_bounds, patient_norm, phase_of, touched_elements
from cldlr.common.secure.sums import SecureSumSpec
from cldlr.common.secure.tasks import BATCH_TASK

if TYPE_CHECKING:  # Opacus-heavy (the ledger composes DP-SGD too)
    from cldlr.client.privacy_ledger import LifetimeLedger

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Release:
    """One noisy sum as the accountant composes it: its phase, Skellam μ of the sum, and Δ₁, Δ₂ in quanta."""

    phase: str
    task: str
    mu: float
    l1: float
    l2: float
    length: int
    sites: int

    def rdp(self) -> np.ndarray:
        """Its RDP curve at :data:`~cldlr.common.secure.noise.ORDERS`."""
        return noise.skellam_rdp(self.mu, self.l1, self.l2)

    def to_dict(self) -> dict[str, Any]:
        """JSON form for the lifetime ledger."""
        return {"phase": self.phase, "task": self.task, "mu": self.mu, "l1": self.l1, "l2": self.l2,
                "length": self.length, "sites": self.sites}


class ReleaseBook(Protocol):
    """Where the noiser checks and records releases (the lifetime ledger's run entry, in the real site)."""

    def count(self, phase: str) -> int:
        """Releases of ``phase`` recorded for this run so far."""

    def check(self, releases: list[Release]) -> None:
        """Refuse releases that would take the dataset past the site's cap."""

    def record(self, releases: list[Release]) -> None:
        """Keep releases (before the vector is sent)."""


def _parts(spec: SecureSumSpec) -> list[tuple[str, Mapping[str, Any], int, int]]:
    """(task, payload, start, stop) of every independent sum in the request's full vector."""
    if spec.task != BATCH_TASK:
        return [(spec.task, spec.payload, 0, spec.length)]
    parts, start = [], 0
    for part in spec.payload.get("parts", []):
        length = int(part.get("length", 0))
        parts.append((str(part.get("task")), dict(part.get("payload") or {}), start, start + length))
        start += length
    return parts


class SumNoiser:
    """Adds this site's noise share to each secure-sum vector (see the module)."""

    def __init__(self, plan: StudyPlan, policy: SitePolicy, book: ReleaseBook, *,
                 cases: Callable[[str, Mapping[str, Any]], int], schema: Schema | None = None,
                 rng: np.random.Generator | None = None) -> None:
        self.plan = plan
        self.policy = policy
        self.book = book
        self.cases = cases
        self.schema = schema
        self.rng = rng  # None: a fresh OS-seeded generator per vector

    def honest_sites(self, neighbours: int) -> int:
        """t: how many sites' shares the sum is assumed to hold (see the module)."""
        return self.policy.min_parties if self.policy.dp.noise_split == "min_parties" else neighbours

    def noisy(self, spec: SecureSumSpec, scaled: np.ndarray, *, neighbours: int, clipping_range: float,
              quantization_range: int) -> tuple[np.ndarray, list[Release]]:
        """``scaled`` on Flower's grid with this site's noise share; the releases it makes, recorded."""
        C, Q = float(clipping_range), int(quantization_range)
        if spec.plan.clipping_range != C or not noise.grid_is_exact(C, Q):
            raise PolicyRefusal("secure-sum settings the site's noise cannot use exactly",
                                f"clipping range {C} (plan {spec.plan.clipping_range}) and quantization range {Q} "
                                "must agree and be powers of two")
        rng = self.rng if self.rng is not None else noise.os_rng()
        t = self.honest_sites(neighbours)
        headroom = spec.plan.headroom
        grid = noise.to_grid(scaled, C, Q, rng)
        releases: list[Release] = []
        counts: dict[str, int] = {}
        for task, payload, start, stop in _parts(spec):
            phase = phase_of(task, payload)
            counts[phase] = counts.get(phase, 0) + 1
            if self.book.count(phase) + counts[phase] > self.plan.releases[phase]:
                raise PolicyRefusal("more releases than the study's privacy plan states",
                                    f"phase {phase}: release {self.book.count(phase) + counts[phase]} > the plan's "
                                    f"{self.plan.releases[phase]}")
            length = stop - start
            cases = max(self.cases(task, payload), 1)
            u = Q / (2.0 * headroom) * self._patient_share(spec, task, phase, payload, start, stop, cases)
            l1, l2 = noise.sensitivities(touched_elements(task, payload, length, self.schema), u,
                                         patient_norm(task, payload))
            mu = noise.skellam_mu(self.plan.multiplier(phase), l1, l2)
            tail = noise.noise_tail(mu / t, length)
            if Q / (2.0 * headroom) + tail > Q / 2.0:
                raise PolicyRefusal("the secure-sum range is too narrow for the site's noise",
                                    f"{task} ({phase}): share tail {tail:.3g} quanta + signal {Q / (2 * headroom):.3g} "
                                    f"> {Q / 2:.3g} (headroom {headroom:g}, t={t})")
            grid[start:stop] += noise.skellam_share(length, mu / t, rng)
            releases.append(Release(phase=phase, task=task, mu=mu, l1=l1, l2=l2, length=length, sites=t))
        self.book.check(releases)
        self.book.record(releases)
        log.info("secure sum %s: Skellam noise share added (%s; t=%d)", spec.task,
                 ", ".join(f"{r.phase} μ={r.mu:.3g}" for r in releases), t)
        return noise.from_grid(np.clip(grid, 0, Q), C, Q), releases


    def _patient_share(self, spec: SecureSumSpec, task: str, phase: str, payload: Mapping[str, Any], start: int,
                       stop: int, cases: int) -> float:
        """The largest fraction of its stated bound one patient can move an element of this part by.

        Where the protocol fixes a patient's part (:func:`~cldlr.common.secure.dp_plan.patient_bounds`)
        that is ``c_j / b_j`` — the same at every site, so a small site adds no more noise than the
        largest — and stated per-site bounds below (the site's cases) × ``c_j`` are refused: a centre
        stating tight bounds would otherwise shrink every site's noise. Elsewhere it is ``1 / cases``:
        the stated bound is (a count no smaller than the site's) × (a patient's largest part).
        """
        fallback = 1.0 / cases
        per_patient = patient_bounds(task, payload, stop - start, self.schema)
        if per_patient is None:
            return fallback
        stated = spec.plan.bounds()[start:stop]
        known = np.isfinite(per_patient)
        low = np.flatnonzero(known & (stated < cases * per_patient * (1.0 - 1e-9)))
        if low.size:
            j = int(low[0])
            raise PolicyRefusal("secure-sum bounds tighter than the protocol's per-patient bounds",
                                f"{task} ({phase}): element {j} bound {stated[j]:.6g} < {cases} cases × "
                                f"{per_patient[j]:g} per patient ({low.size} such elements)")
        with np.errstate(divide="ignore", invalid="ignore"):
            share = np.where(known, per_patient / np.where(stated > 0, stated, np.inf), fallback)
        return float(min(share.max(initial=0.0), fallback))


class MemoryBook:
    """Releases kept in memory only (a site without a policy, e.g. in unit tests): no cap to check."""

    def __init__(self) -> None:
        self.releases: list[Release] = []

    def count(self, phase: str) -> int:
        """Releases of ``phase`` so far."""
        return sum(r.phase == phase for r in self.releases)

    def check(self, releases: list[Release]) -> None:
        """No cap without a policy."""

    def record(self, releases: list[Release]) -> None:
        """Keep them."""
        self.releases += releases


class LedgerBook:
    """The run's entry in the site's lifetime ledger: counts, the cap check and the record survive restarts."""

    def __init__(self, ledger: LifetimeLedger, run: str) -> None:
        self.ledger = ledger
        self.run = run

    def count(self, phase: str) -> int:
        """Releases of ``phase`` this run recorded."""
        return sum(r.get("phase") == phase for r in self.ledger.run_releases(self.run))

    def check(self, releases: list[Release]) -> None:
        """Refuse (a :class:`~cldlr.client.privacy_ledger.LifetimeBudgetError`) releases past the cap."""
        rdp = sum((r.rdp() for r in releases), np.zeros(len(noise.ORDERS)))
        self.ledger.check([], what=f"run {self.run}: secure sum(s) {', '.join(r.task for r in releases)}",
                          planned_rdp=rdp)

    def record(self, releases: list[Release]) -> None:
        """Append them to the run's entry."""
        self.ledger.record_releases(self.run, [r.to_dict() for r in releases])
