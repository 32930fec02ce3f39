"""The site's lifetime privacy ledger: ε per dataset composed across every run, restart and centre.

A run's accountant (:class:`~cldlr.client.privacy.SitePrivacy`) counts one study. A hospital's
budget is per *dataset*, whatever the centre calls the run: this ledger lives in the site's own
state folder (never in a folder the centre's config names), is keyed by the content hash of the
data, and keeps the DP-SGD history — ``(noise multiplier, sample rate, steps)`` entries, Opacus's
own accountant state — of every run that trained on it. ε is recomputed from the whole history, so
runs compose exactly as the RDP accountant composes steps. Training that would take the lifetime ε
past the policy's cap is refused *before* it starts.

Whole-study DP (``privacy.secure_sums``) adds each noisy secure sum a run released (``releases``:
phase, Skellam μ, Δ₁, Δ₂; :mod:`cldlr.client.sum_noise`). The one accountant composes everything —
Opacus' RDP of the DP-SGD steps plus each release's RDP, at the same fixed orders — and converts
to (ε, δ) once; :meth:`LifetimeLedger.phase_epsilons` states ε per phase and in total.

The file is rewritten atomically under an exclusive lock, so two runs on the same SuperNode
cannot lose each other's entries. :func:`dataset_key` names the data by its bytes (every image and
mask, and ``clinical.csv``), so a copied or renamed folder still draws on the same budget.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from cldlr.client.policy import PolicyRefusal
from cldlr.client.privacy import dpsgd_rdp, epsilon_of, epsilon_of_rdp
from cldlr.common.data.contract import CLINICAL_CSV, SiteData
from cldlr.common.data.roi import image_digests
from cldlr.common.errors import CldlrError
from cldlr.common.io import atomic_write_json, exclusive_lock
from cldlr.common.secure.dp_plan import PHASES
from cldlr.common.secure.noise import skellam_rdp

log = logging.getLogger(__name__)

LEDGER_FILE = "privacy-ledger.json"
FORMAT = 1
DATASET_KEY_VERSION = "cldlr-dataset-v1"
Entry = tuple[float, float, int]


def dataset_key(site: SiteData) -> str:
    """sha256 of a site's data: every image's and mask's sha256 (by image id) and the bytes of ``clinical.csv``.

    The budget follows the patients' data, not the folder or the centre's name for the site: the
    same files anywhere give the same key, and any changed byte gives a new one.
    """
    clinical = site.root / CLINICAL_CSV
    try:
        with open(clinical, "rb") as handle:
            clinical_sha = hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError as exc:
        raise CldlrError(f"{clinical}: cannot read the site's clinical table to key its privacy budget ({exc})") from exc
    payload = {"version": DATASET_KEY_VERSION, "images": image_digests(site), "clinical": clinical_sha}
    return hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode()).hexdigest()


class LifetimeBudgetError(PolicyRefusal):
    """Training would take a dataset's lifetime ε past the site's cap.

    A policy refusal: the centre is told only that (``public``); how much was spent, and over how
    many earlier runs, stays in ``detail`` for the site's log and audit file.
    """

    def __init__(self, detail: str) -> None:
        super().__init__("training would take this dataset past the site's lifetime ε cap", detail)


class LifetimeLedger:
    """ε spent on one dataset at this site, over all runs (``STATE/privacy-ledger.json``)."""

    def __init__(self, state_dir: str | Path, dataset: str, *, delta: float, cap: float) -> None:
        self.path = Path(state_dir) / LEDGER_FILE
        self.dataset = dataset
        self.delta = delta
        self.cap = cap

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        with exclusive_lock(self.path):
            yield read_ledger(self.path)

    def runs(self) -> list[dict[str, Any]]:
        """Every run recorded for this dataset, oldest first."""
        return list(read_ledger(self.path)["datasets"].get(self.dataset, {}).get("runs", []))

    def history(self, *, without: str | None = None) -> list[Entry]:
        """The composed DP-SGD history of every run on this dataset (but run ``without``)."""
        return [(float(s), float(q), int(n)) for run in self.runs() if run["run"] != without
                for s, q, n in run["history"]]

    def run_history(self, run: str) -> list[Entry]:
        """What the ledger holds of one run (empty if it has not trained yet): a restart continues from it."""
        return [(float(s), float(q), int(n)) for r in self.runs() if r["run"] == run for s, q, n in r["history"]]

    def releases(self, *, without: str | None = None) -> list[dict[str, Any]]:
        """Every noisy secure sum of every run on this dataset (but run ``without``)."""
        return [r for run in self.runs() if run["run"] != without for r in run.get("releases", [])]

    def run_releases(self, run: str) -> list[dict[str, Any]]:
        """The noisy secure sums one run released so far."""
        return [r for entry in self.runs() if entry["run"] == run for r in entry.get("releases", [])]

    def epsilon(self, extra: list[Entry] | None = None, *, without: str | None = None,
                extra_rdp: np.ndarray | None = None) -> float:
        """Lifetime ε at the policy's δ, with ``extra`` planned steps and ``extra_rdp`` planned sums added
        (and run ``without`` left out): DP-SGD and every noisy sum composed in RDP, converted once.
        """
        history = self.history(without=without) + list(extra or [])
        releases = self.releases(without=without)
        if not releases and extra_rdp is None:
            return epsilon_of(history, self.delta) if history else 0.0
        return epsilon_of_rdp(composed_rdp(history, releases) + (0.0 if extra_rdp is None else extra_rdp), self.delta)

    def check(self, planned: list[Entry], *, what: str, without: str | None = None,
              planned_rdp: np.ndarray | None = None) -> float:
        """Refuse ``planned`` steps (and ``planned_rdp`` of sums) that would pass the cap; return the ε it would end at.

        ``without`` leaves one run's own entry out, for a ``planned`` that already holds that
        run's whole history (a run re-checked after a restart is not counted twice).
        """
        after = self.epsilon(planned, without=without, extra_rdp=planned_rdp)
        if after > self.cap:
            earlier = sum(r["run"] != without for r in self.runs())
            detail = (f"{what} would take this dataset's lifetime ε from {self.epsilon(without=without):.3f} to "
                      f"{after:.3f} > the site's cap {self.cap:g} (δ={self.delta:g}; {earlier} earlier run(s)); "
                      "training refused")
            log.warning("policy refusal: %s", detail)
            raise LifetimeBudgetError(detail)
        return after

    def record(self, run: str, history: list[Entry], **details: Any) -> None:
        """Store (or replace) a run's history: called after every round, so a crash loses no step."""
        with self._locked() as ledger:
            dataset = ledger["datasets"].setdefault(self.dataset, {"runs": []})
            entry = {"run": run, "history": [list(h) for h in history], **details}
            earlier = [r for r in dataset["runs"] if r["run"] == run]
            if earlier and earlier[0].get("releases"):
                entry["releases"] = earlier[0]["releases"]  # a round's DP-SGD record keeps the run's sums
            runs = [r for r in dataset["runs"] if r["run"] != run]
            dataset["runs"] = [*runs, entry]
            atomic_write_json(self.path, ledger)
        log.info("lifetime privacy ledger: dataset %s at ε=%.3f (cap %g, δ=%g)", self.dataset[:12], self.epsilon(),
                 self.cap, self.delta)


    def record_releases(self, run: str, releases: list[dict[str, Any]]) -> None:
        """Append noisy secure sums to a run's entry (before the vector leaves the site)."""
        with self._locked() as ledger:
            dataset = ledger["datasets"].setdefault(self.dataset, {"runs": []})
            entry = next((r for r in dataset["runs"] if r["run"] == run), None)
            if entry is None:
                entry = {"run": run, "history": []}
                dataset["runs"].append(entry)
            entry["releases"] = [*entry.get("releases", []), *releases]
            atomic_write_json(self.path, ledger)

    def phase_epsilons(self, run: str) -> dict[str, float]:
        """ε at the policy's δ of one run, per phase (each phase alone) and ``total`` (all composed), and ``lifetime``."""
        history, releases = self.run_history(run), self.run_releases(run)
        out: dict[str, float] = {}
        for phase in PHASES:
            rdp = composed_rdp(history if phase == "backbone" else [],
                               [r for r in releases if r["phase"] == phase])
            if np.any(rdp > 0):
                out[phase] = epsilon_of_rdp(rdp, self.delta)
        out["total"] = epsilon_of_rdp(composed_rdp(history, releases), self.delta) if history or releases else 0.0
        out["lifetime"] = self.epsilon()
        return out


def composed_rdp(history: list[Entry], releases: list[dict[str, Any]]) -> np.ndarray:
    """The RDP curve of DP-SGD steps and noisy secure sums together (the one accountant's state)."""
    total = np.asarray(dpsgd_rdp(history), dtype=np.float64)
    for release in releases:
        total = total + skellam_rdp(float(release["mu"]), float(release["l1"]), float(release["l2"]))
    return total


def read_ledger(path: str | Path) -> dict[str, Any]:
    """The whole ledger file (an empty one if it does not exist yet)."""
    path = Path(path)
    if not path.is_file():
        return {"format": FORMAT, "datasets": {}}
    try:
        ledger = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CldlrError(f"{path}: unreadable privacy ledger ({exc}); restore it from the site's backup — "
                         "never delete it, or the spent budget is forgotten") from exc
    if not isinstance(ledger, dict) or ledger.get("format") != FORMAT or not isinstance(ledger.get("datasets"), dict):
        raise CldlrError(f"{path}: not a cldlr privacy ledger (format {FORMAT})")
    return ledger


def recorded_delta(ledger: dict[str, Any]) -> float | None:
    """The smallest δ the ledger's runs were stated at (the most conservative ε), or None if none says."""
    deltas = [float(r["delta"]) for entry in ledger["datasets"].values() for r in entry["runs"] if "delta" in r]
    return min(deltas) if deltas else None


def _epsilon(history: list[Entry], releases: list[dict[str, Any]], delta: float) -> float:
    if not releases:
        return epsilon_of(history, delta) if history else 0.0
    return epsilon_of_rdp(composed_rdp(history, releases), delta)


def describe_ledger(state_dir: str | Path, delta: float | None = None) -> str:
    """``cldlr privacy STATE_DIR``: ε per dataset and run, composed at ``delta`` (default: the δ its runs recorded)."""
    path = Path(state_dir) / LEDGER_FILE
    ledger = read_ledger(path)
    if not ledger["datasets"]:
        return f"{path}: no DP training recorded"
    if delta is None and (delta := recorded_delta(ledger)) is None:
        raise CldlrError(f"{path}: its runs do not say at which δ ε is stated; pass --delta D or --policy FILE")
    if not 0 < delta < 1:
        raise CldlrError(f"δ must be in (0, 1), got {delta:g}")
    lines = [f"{path} (ε at δ={delta:g}, RDP accountant)"]
    for dataset, entry in ledger["datasets"].items():
        history: list[Entry] = []
        lines.append(f"dataset {dataset}")
        releases: list[dict[str, Any]] = []
        for run in entry["runs"]:
            history += [(float(s), float(q), int(n)) for s, q, n in run["history"]]
            releases += run.get("releases", [])
            steps = sum(int(n) for _, _, n in run["history"])
            site = f" (site {run['site']})" if "site" in run else ""
            sums = f", {len(run['releases'])} noisy secure sums" if run.get("releases") else ""
            lines.append(f"  run {run['run']}{site}: {steps} steps{sums}, lifetime ε after it "
                         f"{_epsilon(history, releases, delta):.3f}")
        cap = next((f", cap {r['cap']:g} at run {r['run']}" for r in reversed(entry["runs"]) if "cap" in r), "")
        lines.append(f"  total: ε = {_epsilon(history, releases, delta):.3f}{cap}")
    return "\n".join(lines)
