"""Distributed DP noise for SecAgg+ sums: the Skellam mechanism in the integer domain, and its RDP.

**Mechanism (why Skellam, in the integer domain).** Flower's SecAgg+ maps each site's float
vector onto integers (clip to ``[-C, C]``, scale to ``[0, Q]``, stochastic rounding) and adds
them modulo ``M``. Gaussian noise added *before* that rounding is not exactly post-processed by
it (each site's rounding depends on its own noisy value), and Flower's rounding draws from
NumPy's global generator. So a site puts its vector on Flower's grid *itself* — its own stochastic
rounding from the OS entropy source — and adds integer noise there: ``Poisson(μ/t) − Poisson(μ/t)``
per element. On that grid Flower's own quantisation is exact (``C`` and ``Q`` powers of two;
:func:`grid_is_exact`), and the sum over ``t`` honest sites carries ``Skellam(μ)`` noise exactly,
because Skellam is closed under summation (Agarwal, Kairouz & Liu, NeurIPS 2021). A distributed
discrete Gaussian (Kairouz et al., ICML 2021) is not closed under summation (its sum is only close to
one), which costs a further approximation term; Skellam needs none.

**Sensitivity.** Every per-site bound ``b_j`` the protocol states is (a count of cases) × (one
patient's largest contribution ``c_j`` to element ``j``). Where the protocol fixes ``c_j``
(:func:`~cldlr.common.secure.dp_plan.patient_bounds`) one patient moves an element by at most
``u = Q c_j / (2 h b_j)`` quanta (``h``: the range's headroom, below) — the same at every site, so
a small site adds no more noise than the largest; elsewhere the site takes ``c_j ≤ b_j / d`` with
``d`` its own cases (``client.federated``'s ``release_cases``), ``u = Q / (2 h d)``. The grid rounding adds
at most one quantum (neighbouring inputs coupled monotonely), hence ``⌈u⌉``. A patient touches at
most ``K`` elements of a release (:func:`~cldlr.common.secure.dp_plan.touched_elements`):
``Δ₂ = √K⌈u⌉`` and ``Δ₁ = K⌈u⌉``. Where the protocol also bounds the L2 norm of a patient's part
(the LS-SVM sums of RFF features: :func:`~cldlr.common.secure.dp_plan.patient_norm`), ``Δ₂`` is at
most that norm in quanta plus ``√K`` for the rounding (:func:`sensitivities`). The per-patient bounds
are the protocol's, not the centre's: a site refuses stated per-site bounds below its cases times
them (:func:`~cldlr.common.secure.dp_plan.patient_bounds`).

**Range and wrap-around.** The centre widens every bound by a headroom factor ``h`` (a power of
two, :func:`headroom_for`); the site checks its values against ``b_j`` and its noise against the
rest of the range: with ``Q/(2h) + x ≤ Q/2`` for the Bernstein tail ``x`` of its share
(:func:`noise_tail`) no element is clipped by Flower except with probability below
:data:`CLIP_PROBABILITY` per release, and ``n·Q < M`` (checked already) rules out wrap-around.

**Accounting.** RDP at the fixed :data:`ORDERS` (Opacus' RDP orders plus large ones, as for
DP-SGD): :func:`gaussian_rdp`, :func:`skellam_rdp` (Agarwal et al. 2021, Theorem 3.5) and the
conversion to (ε, δ) of Balle et al. 2020 (:func:`epsilon_from_rdp`, as Opacus converts).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence

import numpy as np

from cldlr.common.errors import CldlrError

#: The RDP orders every release is accounted at: Opacus' defaults plus 64…256 (as client.privacy's ALPHAS).
ORDERS: tuple[float, ...] = (*(1 + x / 10.0 for x in range(1, 100)), *map(float, range(12, 64)),
                             *map(float, range(64, 257, 8)))
#: A site's noise share is clipped by Flower with at most this probability per release (see the module).
CLIP_PROBABILITY = 1e-12


class NoiseError(CldlrError):
    """Noise cannot be added as planned (range too narrow, settings off the exact grid, bad numbers)."""


def os_rng() -> np.random.Generator:
    """A NumPy generator seeded with 128 bits from the OS: noise neither the centre nor a config can replay."""
    return np.random.default_rng(secrets.randbits(128))


def gaussian_rdp(sigma: float, l2: float, orders: Sequence[float] = ORDERS) -> np.ndarray:
    """RDP ``α·Δ₂²/(2σ²)`` of the Gaussian mechanism at each order."""
    return np.asarray(orders, dtype=np.float64) * l2**2 / (2.0 * sigma**2)


def skellam_rdp(mu: float, l1: float, l2: float, orders: Sequence[float] = ORDERS) -> np.ndarray:
    """RDP of adding ``Skellam(μ)`` = Poisson(μ) − Poisson(μ) (variance 2μ) per element to an integer vector.

    Agarwal, Kairouz & Liu (2021), Theorem 3.5, for sensitivities ``Δ₁``, ``Δ₂``:
    ``ε(α) = αΔ₂²/(4μ) + min(((2α−1)Δ₂² + 6Δ₁)/(16μ²), 3Δ₁/(4μ))`` — the Gaussian of the same
    variance plus a term that vanishes as μ grows.
    """
    if not (mu > 0 and l1 >= 0 and l2 >= 0):
        raise NoiseError(f"Skellam RDP needs mu > 0 and sensitivities >= 0, got mu={mu}, l1={l1}, l2={l2}")
    a = np.asarray(orders, dtype=np.float64)
    extra = np.minimum(((2 * a - 1) * l2**2 + 6 * l1) / (16 * mu**2), 3 * l1 / (4 * mu))
    out: np.ndarray = a * l2**2 / (4 * mu) + extra
    return out


def epsilon_from_rdp(rdp: np.ndarray, delta: float, orders: Sequence[float] = ORDERS) -> float:
    """ε at ``delta`` of an RDP curve: ``min_α rdp(α) + log((α−1)/α) − (log δ + log α)/(α−1)`` (Balle et al. 2020)."""
    if not 0 < delta < 1:
        raise NoiseError(f"delta must be in (0, 1), got {delta}")
    a = np.asarray(orders, dtype=np.float64)
    eps = np.asarray(rdp, dtype=np.float64) - (math.log(delta) + np.log(a)) / (a - 1) + np.log((a - 1) / a)
    return float(max(np.nanmin(eps), 0.0))


def gaussian_multiplier(epsilon: float, delta: float, releases: int) -> float:
    """The noise multiplier z = σ/Δ₂ at which ``releases`` Gaussian releases compose to ``epsilon`` at ``delta``."""
    if not (epsilon > 0 and math.isfinite(epsilon) and releases >= 1):
        raise NoiseError(f"a phase budget needs epsilon > 0 and >= 1 release, got epsilon={epsilon}, releases={releases}")
    low, high = 1e-3, 1e4
    if epsilon_from_rdp(releases * gaussian_rdp(high, 1.0), delta) > epsilon:
        raise NoiseError(f"no noise reaches epsilon={epsilon} over {releases} releases at delta={delta}")
    for _ in range(200):  # bisection on log z: ε decreases in z
        mid = math.sqrt(low * high)
        if epsilon_from_rdp(releases * gaussian_rdp(mid, 1.0), delta) > epsilon:
            low = mid
        else:
            high = mid
    return high


def skellam_mu(multiplier: float, l1: float, l2: float) -> float:
    """The smallest μ (up to 0.1 %) whose Skellam RDP stays at or below the Gaussian's of ``σ = z·Δ₂`` at every order.

    So a release never costs more than the plan's Gaussian calibration promised.
    """
    target = gaussian_rdp(multiplier * l2, l2)
    mu = (multiplier * l2) ** 2 / 2.0
    for _ in range(10_000):
        if np.all(skellam_rdp(mu, l1, l2) <= target):
            return mu
        mu *= 1.001
    raise NoiseError(f"no Skellam parameter matches the multiplier {multiplier} at sensitivities {l1}, {l2}")


def noise_tail(site_mu: float, length: int, probability: float = CLIP_PROBABILITY) -> float:
    """``x`` with ``P(any |share element| > x) ≤ probability`` for ``length`` elements of Poisson(μ)−Poisson(μ).

    Bernstein's inequality (the difference is a sum of independent centred terms bounded by 1):
    ``P(|X| ≥ x) ≤ 2·exp(−x² / (2(2μ + x/3)))``, solved for x with a union bound over elements.
    """
    log_term = math.log(2.0 * max(length, 1) / probability)
    # x² = 2 log_term (2μ + x/3)  →  x² − (2/3) log_term x − 4 μ log_term = 0
    b = 2.0 * log_term / 3.0
    return 0.5 * (b + math.sqrt(b * b + 16.0 * site_mu * log_term))


def grid_is_exact(clipping_range: float, quantization_range: int) -> bool:
    """Whether Flower's quantisation maps grid points to themselves exactly (both ranges powers of two)."""
    mantissa_c, _ = math.frexp(clipping_range)
    return clipping_range > 0 and mantissa_c == 0.5 and quantization_range > 0 and \
        quantization_range & (quantization_range - 1) == 0


def sensitivities(touched: int, quanta_per_patient: float, norm: float | None = None) -> tuple[float, float]:
    """``(Δ₁, Δ₂)`` in quanta of a release where one patient moves ≤ ``touched`` elements by ≤ ``u`` each (+1 for rounding).

    ``norm``: one patient's part also has L2 norm ≤ ``norm·u`` (before rounding); then the rounding adds
    at most one quantum per touched element, so ``Δ₂ ≤ norm·u + √K`` and ``Δ₁ ≤ √K·norm·u + K``
    (Cauchy–Schwarz), whichever of the two bounds is smaller.
    """
    step = float(math.ceil(quanta_per_patient))
    l1, l2 = touched * step, math.sqrt(touched) * step
    if norm is not None:
        root = math.sqrt(touched)
        l1, l2 = min(l1, root * norm * quanta_per_patient + touched), min(l2, norm * quanta_per_patient + root)
    return l1, l2


def headroom_for(multiplier: float, touched: int, length: int, cases: float, *, sites: int = 2,
                 quantization_range: int = 2**26, norm: float | None = None) -> float:
    """The power-of-two headroom ``h`` the centre widens each bound by, so a site's noise share fits the range.

    Solved for the worst case of ``sites`` honest sites and ``cases`` cases per site: the share's
    tail in quanta must fit ``Q/2 − Q/(2h)``. A site checks its own share again (and refuses if not).
    """
    h = 2.0
    for _ in range(60):
        u = quantization_range / (2.0 * h * max(cases, 1.0))
        l1, l2 = sensitivities(touched, u, norm)
        tail = noise_tail(skellam_mu(multiplier, l1, l2) / sites, length)
        if quantization_range / (2.0 * h) + 2.0 * tail <= quantization_range / 2.0:
            return h  # with a factor-2 margin on the tail
        h *= 2.0
    raise NoiseError(f"no headroom fits noise multiplier {multiplier} over {touched} elements of {cases:g} cases")


def to_grid(scaled: np.ndarray, clipping_range: float, quantization_range: int, rng: np.random.Generator) -> np.ndarray:
    """Integers in ``[0, Q]``: the site's own stochastic rounding of ``scaled`` ∈ [−C, C] onto Flower's grid."""
    position = (np.clip(np.asarray(scaled, dtype=np.float64), -clipping_range, clipping_range) + clipping_range) \
        * (quantization_range / (2.0 * clipping_range))
    low = np.floor(position)
    grid: np.ndarray = (low + (rng.random(position.shape) < position - low)).astype(np.int64)
    return grid


def from_grid(grid: np.ndarray, clipping_range: float, quantization_range: int) -> np.ndarray:
    """The float Flower's quantisation maps back onto exactly ``grid`` (for powers of two)."""
    out: np.ndarray = np.asarray(grid, dtype=np.float64) * (2.0 * clipping_range / quantization_range) - clipping_range
    return out


def skellam_share(length: int, site_mu: float, rng: np.random.Generator) -> np.ndarray:
    """One site's noise share: ``Poisson(μ/t) − Poisson(μ/t)`` per element (the sum over t sites is Skellam(μ))."""
    share: np.ndarray = rng.poisson(site_mu, length).astype(np.int64) - rng.poisson(site_mu, length).astype(np.int64)
    return share
