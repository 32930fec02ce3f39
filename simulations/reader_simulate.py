"""Simulated readers, to try the whole reader study (packet → reads → Table 3) before radiologists take part.

Each reader has a binormal latent score (juniors d′≈1, seniors d′≈1.9); in round 2 the latent moves
towards the AI score's probit (juniors lean more on it). The reads are written in the reading app's
format: the malignant decision is the latent above the reader's own bias (BI-RADS 4 readers lean
towards calling a lesion malignant), the 0-100 likelihood is Φ of the latent relative to that bias
(so a likelihood above 50 goes with a malignant call), the BI-RADS 4 sub-category follows the ACR's
likelihood bands (4a ≤ 10 %, 4b ≤ 50 %, 4c above), and the reading time is log-normal (seniors
faster, round 2 a little slower: there is the AI panel to look at). Seeded, so deterministic.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import norm

from cldlr.common.errors import CldlrError
from cldlr.common.io import atomic_write_text, check_output_apart
from cldlr.common.text import csv_text
from cldlr.simulations.reader_packet import READ_COLUMNS
from cldlr.simulations.reader_reads import read_model_scores, read_truth

log = logging.getLogger(__name__)

#: Simulated reader profiles: discriminability d′ of the latent score, weight given to the AI in round 2,
#: median reading time (s) in round 1.
PROFILES = {"junior": (1.0, 0.5, 35.0), "senior": (1.9, 0.25, 22.0)}
#: Upper likelihood (%) of BI-RADS 4a and 4b (ACR BI-RADS atlas, 5th ed.: 4a 2-10 %, 4b 10-50 %, 4c 50-95 %).
BIRADS_BANDS = ((10, "4a"), (50, "4b"), (100, "4c"))


def birads4_of(likelihood: int) -> str:
    """The BI-RADS 4 sub-category of a 0-100 likelihood of malignancy, by the ACR's bands."""
    return next(category for top, category in BIRADS_BANDS if likelihood <= top)


def simulate_reads(truth: str | Path, model_scores: str | Path, out: str | Path, *, readers: int = 3,
                   seed: int = 0) -> Path:
    """Write realistic reads (``READ_COLUMNS``, both rounds, each in its own shuffled order) for ``readers`` readers."""
    if readers < 1:
        raise CldlrError(f"--readers must be at least 1, got {readers}")
    check_output_apart(out, [truth, model_scores])
    labels = read_truth(truth)
    scores, _ = read_model_scores(model_scores, labels)
    cases = sorted(labels)
    y = np.array([labels[c] for c in cases], float)
    rng = np.random.default_rng(seed)

    def standard(v: np.ndarray) -> np.ndarray:
        return np.asarray((v - v.mean()) / (v.std() or 1.0))

    ai = standard(norm.ppf(np.clip([scores[c] for c in cases], 1e-4, 1 - 1e-4)))
    rows: list[list[Any]] = []
    for r in range(readers):
        level = "junior" if r % 2 == 0 else "senior"
        d_prime, reliance, median_s = PROFILES[level]
        name = f"{level}-{r // 2 + 1}"
        first = standard(d_prime * rng.uniform(0.85, 1.15) * y + rng.normal(size=y.size))
        second = standard((1 - reliance) * (first + rng.normal(0, 0.3, y.size)) + reliance * ai)
        bias = rng.normal(-0.25, 0.15)
        for round_no, latent in ((1, first), (2, second)):
            seconds = median_s * (1.0 if round_no == 1 else 1.2) * np.exp(rng.normal(0, 0.45, y.size))
            likelihood = np.clip(np.rint(100 * norm.cdf(1.5 * (latent - bias))), 0, 100).astype(int)
            for k in rng.permutation(y.size):
                rows.append([name, round_no, cases[k], int(latent[k] > bias), birads4_of(int(likelihood[k])),
                             int(likelihood[k]), "", round(float(seconds[k]), 1), ""])
    atomic_write_text(out, csv_text(READ_COLUMNS, rows))
    log.info("simulated %d reads by %d reader(s) on %d cases: %s", len(rows), readers, len(cases), out)
    return Path(out)


__all__ = ["BIRADS_BANDS", "PROFILES", "birads4_of", "simulate_reads"]
