"""The site's lifetime privacy ledger: ε per dataset composed across every run, restart and centre.

A run's accountant (:class:`~cldlr.client.privacy.SitePrivacy`) counts one study. A hospital's
budget is per *dataset*, whatever the centre calls the run: this ledger lives in the site's own
state folder (never in a folder the centre's config names), is keyed by the content hash of the
data, and keeps the DP-SGD history — ``(noise multiplier, sample rate, steps)`` entries, Opacus's
own accountant state — of every run that trained on it. ε is recomputed from the whole history, so
runs compose exactly as the RDP accountant composes steps. Training that would take the lifetime ε
past the policy's cap is refused *before* it starts.

The file is rewritten atomically under an exclusive lock, so two runs on the same SuperNode
cannot lose each other's entries.
"""

from __future__ import annotations

import fcntl
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cldlr.client.privacy import epsilon_of
from cldlr.common.errors import CldlrError
from cldlr.common.io import atomic_write_json

log = logging.getLogger(__name__)

LEDGER_FILE = "privacy-ledger.json"
FORMAT = 1
Entry = tuple[float, float, int]


class LifetimeBudgetError(CldlrError):
    """Training would take a dataset's lifetime ε past the site's cap."""


class LifetimeLedger:
    """ε spent on one dataset at this site, over all runs (``STATE/privacy-ledger.json``)."""

    def __init__(self, state_dir: str | Path, dataset: str, *, delta: float, cap: float) -> None:
        self.path = Path(state_dir) / LEDGER_FILE
        self.dataset = dataset
        self.delta = delta
        self.cap = cap

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield read_ledger(self.path)

    def runs(self) -> list[dict[str, Any]]:
        """Every run recorded for this dataset, oldest first."""
        return list(read_ledger(self.path)["datasets"].get(self.dataset, {}).get("runs", []))

    def history(self) -> list[Entry]:
        """The composed DP-SGD history of every run on this dataset."""
        return [(float(s), float(q), int(n)) for run in self.runs() for s, q, n in run["history"]]

    def epsilon(self, extra: list[Entry] | None = None) -> float:
        """Lifetime ε at the policy's δ, with ``extra`` planned steps added."""
        history = self.history() + list(extra or [])
        return epsilon_of(history, self.delta) if history else 0.0

    def check(self, planned: list[Entry], *, what: str) -> float:
        """Refuse ``planned`` steps that would pass the cap; return the ε it would end at."""
        after = self.epsilon(planned)
        if after > self.cap:
            raise LifetimeBudgetError(
                f"{what} would take this dataset's lifetime ε from {self.epsilon():.3f} to {after:.3f} > the site's "
                f"cap {self.cap:g} (δ={self.delta:g}; {len(self.runs())} earlier run(s)); training refused")
        return after

    def record(self, run: str, history: list[Entry], **details: Any) -> None:
        """Store (or replace) a run's history: called after every round, so a crash loses no step."""
        with self._locked() as ledger:
            dataset = ledger["datasets"].setdefault(self.dataset, {"runs": []})
            entry = {"run": run, "history": [list(h) for h in history], **details}
            runs = [r for r in dataset["runs"] if r["run"] != run]
            dataset["runs"] = [*runs, entry]
            atomic_write_json(self.path, ledger)
        log.info("lifetime privacy ledger: dataset %s at ε=%.3f (cap %g, δ=%g)", self.dataset[:12], self.epsilon(),
                 self.cap, self.delta)


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


def describe_ledger(state_dir: str | Path, delta: float) -> str:
    """``cldlr privacy STATE_DIR``: ε per dataset and run, composed at ``delta``."""
    path = Path(state_dir) / LEDGER_FILE
    ledger = read_ledger(path)
    if not ledger["datasets"]:
        return f"{path}: no DP training recorded"
    lines = [f"{path} (ε at δ={delta:g}, RDP accountant)"]
    for dataset, entry in ledger["datasets"].items():
        history: list[Entry] = []
        lines.append(f"dataset {dataset}")
        for run in entry["runs"]:
            history += [(float(s), float(q), int(n)) for s, q, n in run["history"]]
            steps = sum(int(n) for _, _, n in run["history"])
            lines.append(f"  run {run['run']}: {steps} steps, lifetime ε after it {epsilon_of(history, delta):.3f}")
        lines.append(f"  total: ε = {epsilon_of(history, delta) if history else 0.0:.3f}")
    return "\n".join(lines)
