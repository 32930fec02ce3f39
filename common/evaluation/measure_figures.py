"""Calibration (reliability diagram with Wilson CIs) and decision-curve figures, drawn from the measures' JSON.

Like :mod:`.figures` these use bare Agg figures and atomic PNG writes; they read only the
aggregate output of :func:`cldlr.common.evaluation.measures.model_measures` (bins, net benefit
per threshold), so a federated report can draw them from secure sums alike.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cldlr.common.io import atomic_path

log = logging.getLogger(__name__)

DPI = 100
#: ``panels[title][model] = model_measures(...)`` — one panel per site (and the pooled one).
Panels = Mapping[str, Mapping[str, Mapping[str, Any]]]


def _figure(n_panels: int) -> tuple[Figure, Any]:
    if n_panels < 1:
        raise ValueError("no panels to draw: evaluate at least one model on one set of cases")
    figure = Figure(figsize=(5.0 * n_panels, 5.0), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(1, n_panels, squeeze=False)[0]


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)
    log.info("figure written: %s", path)
    return path


def plot_calibration(panels: Panels, path: str | Path) -> Path:
    """Reliability diagrams: observed fraction malignant (Wilson 95 % CI bars) against mean predicted risk."""
    figure, axes = _figure(len(panels))
    for ax, (title, models) in zip(axes, panels.items()):
        for i, (name, measures) in enumerate(models.items()):
            cal = measures["calibration"]
            bins = cal["bins"]
            x = np.array([b["mean_predicted"] for b in bins])
            y = np.array([b["observed"] for b in bins])
            err = np.array([[b["observed"] - b["ci_low"] for b in bins],
                            [b["ci_high"] - b["observed"] for b in bins]]).clip(min=0.0)
            ax.errorbar(x, y, yerr=err, fmt="o-", color=f"C{i}", capsize=3, linewidth=1.4,
                        label=f"{name} (slope {cal['slope']:.2f}, int. {cal['intercept']:.2f})")
        ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1)
        ax.set(xlim=(0, 1), ylim=(-0.02, 1.02), xlabel="Predicted probability", ylabel="Observed fraction malignant",
               title=title)
        ax.legend(loc="upper left", fontsize="small")
        ax.grid(alpha=0.3)
    return _save(figure, path)


def plot_decision_curves(panels: Panels, path: str | Path, max_threshold: float = 0.6) -> Path:
    """Net benefit of each model against treat-all (biopsy every lesion) and treat-none, per threshold."""
    figure, axes = _figure(len(panels))
    for ax, (title, models) in zip(axes, panels.items()):
        reference: Mapping[str, Any] | None = None
        for i, (name, measures) in enumerate(models.items()):
            curve = measures["decision_curve"]
            t = np.asarray(curve["thresholds"])
            keep = t <= max_threshold
            ax.plot(t[keep], np.asarray(curve["model"])[keep], color=f"C{i}", linewidth=1.8, label=name)
            reference = curve
        if reference is not None:
            t = np.asarray(reference["thresholds"])
            keep = t <= max_threshold
            all_ = np.asarray(reference["treat_all"])[keep]
            ax.plot(t[keep], all_, color="0.4", linestyle="--", linewidth=1.2, label="Biopsy all")
            ax.axhline(0.0, color="0.2", linewidth=1.0, label="Biopsy none")
            top = max(float(np.nanmax(all_)), max(float(np.nanmax(m["decision_curve"]["model"])) for m in models.values()))
            ax.set_ylim(-0.05, max(top, 0.05) * 1.1)
        ax.set(xlim=(0, max_threshold), xlabel="Threshold probability", ylabel="Net benefit", title=title)
        ax.legend(loc="upper right", fontsize="small")
        ax.grid(alpha=0.3)
    return _save(figure, path)


__all__ = ["plot_calibration", "plot_decision_curves"]
