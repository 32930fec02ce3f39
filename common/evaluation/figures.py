"""Report figures (ROC curves, confusion matrices, training curves, Grad-CAM grids) as PNG files.

Figures are built on bare :class:`matplotlib.figure.Figure` objects with an Agg canvas, so no
pyplot global state or display backend is involved (safe in servers, threads and tests), and
each PNG is written atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import rc_context
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import roc_auc_score, roc_curve

from cldlr.common.data.contract import LABEL_NAMES
from cldlr.common.io import atomic_path

log = logging.getLogger(__name__)

DPI = 100
_LOSS_KEYS = (("loss", "train_loss"), ("val_loss",))
_ACC_KEYS = (("accuracy", "acc", "train_accuracy", "train_acc"), ("val_accuracy", "val_acc"))


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: str | Path, *, dpi: float | None = DPI) -> Path:
    r"""Write ``figure`` as a PNG atomically, with every text drawn literally (no mathtext, no LaTeX).

    Titles, legends and labels carry site, reader and case names from the data; with mathtext a
    name such as ``$\notacommand{$`` raises while drawing and the whole report is lost, and with
    ``usetex`` a name would be run through LaTeX. Texts made before saving are switched to plain
    text here, those matplotlib makes while drawing (tick labels) by the same settings.
    """
    path = Path(path)
    with rc_context({"text.usetex": False, "text.parse_math": False}):
        for text in figure.findobj(Text):
            text.set_usetex(False)
            text.set_parse_math(False)
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", dpi=dpi)
    log.info("figure written: %s", path)
    return path



def _roc_inputs(name: str, y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Check one model's labels/scores so a bad curve fails with the model's name, not deep in sklearn."""
    y, score = np.asarray(y, dtype=float).ravel(), np.asarray(score, dtype=float).ravel()
    if y.shape != score.shape:
        raise ValueError(f"ROC {name!r}: {y.size} labels but {score.size} scores")
    if not (np.isfinite(y).all() and np.isfinite(score).all()):
        raise ValueError(f"ROC {name!r}: labels or scores contain NaN/inf; drop or fix those predictions first")
    classes = set(np.unique(y).tolist())
    if not classes <= {0.0, 1.0}:
        raise ValueError(f"ROC {name!r}: labels must be 0 (benign) / 1 (malignant), got {sorted(classes)}")
    if len(classes) < 2:
        raise ValueError(f"ROC {name!r}: only one class present in the labels; an ROC curve needs benign and malignant cases")
    return y.astype(int), score


def _draw_roc(ax: Axes, curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str) -> None:
    if not curves:
        raise ValueError(f"ROC panel {title!r}: no curves given")
    for name, (y, score) in curves.items():
        y, score = _roc_inputs(name, y, score)
        fpr, tpr, _ = roc_curve(y, score)
        ax.plot(fpr, tpr, linewidth=1.8, label=f"{name} (AUC {roc_auc_score(y, score):.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 − specificity", ylabel="Sensitivity", title=title)
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(alpha=0.3)


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = "ROC") -> Path:
    """One ROC curve per model, labelled ``Name (AUC 0.812)``, with the chance diagonal (Fig. 4)."""
    figure = _new_figure(5.5, 5.5)
    _draw_roc(figure.add_subplot(), curves, title)
    return save_figure(figure, path)


def plot_roc_panels(panels: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]], path: str | Path) -> Path:
    """Side-by-side ROC panels, e.g. ``{"Training": curves, "Test": curves}``."""
    if not panels:
        raise ValueError("plot_roc_panels: no panels given")
    figure = _new_figure(5.0 * len(panels), 5.2)
    for ax, (title, curves) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels.items()):
        _draw_roc(ax, curves, title)
    return save_figure(figure, path)


def plot_confusion_matrices(matrices: Mapping[str, np.ndarray], path: str | Path) -> Path:
    """2×2 confusion matrices (rows true, columns predicted; benign/malignant) with counts (Fig. 5)."""
    if not matrices:
        raise ValueError("plot_confusion_matrices: no matrices given")
    figure = _new_figure(3.6 * len(matrices), 3.6)
    for ax, (name, matrix) in zip(figure.subplots(1, len(matrices), squeeze=False)[0], matrices.items()):
        matrix = np.asarray(matrix, dtype=float)
        if matrix.shape != (2, 2) or not np.isfinite(matrix).all() or (matrix < 0).any():
            raise ValueError(f"confusion matrix {name!r} must be 2x2 non-negative counts, got {matrix.tolist()}")
        ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(matrix.max(), 1))
        for (i, j), count in np.ndenumerate(matrix):
            dark = count > matrix.max() / 2
            ax.text(j, i, f"{count:g}", ha="center", va="center", fontsize=14, color="white" if dark else "black")
        ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=LABEL_NAMES, yticklabels=LABEL_NAMES,
               xlabel="Predicted", ylabel="True", title=name)
    return save_figure(figure, path)


def _series(history: Sequence[Mapping[str, float]], keys: tuple[str, ...]) -> tuple[list[float], list[float]] | None:
    key = next((k for k in keys if any(k in row for row in history)), None)
    if key is None:
        return None
    points = [(float(row.get("epoch", i + 1)), float(row[key])) for i, row in enumerate(history) if key in row]
    return [p[0] for p in points], [p[1] for p in points]


def plot_training_curves(history: Sequence[Mapping[str, float]] | Mapping[str, Sequence[Mapping[str, float]]],
                         path: str | Path) -> Path:
    """Loss and accuracy per epoch (validation dashed when recorded).

    ``history`` is one list of per-epoch dicts (``epoch``, ``loss``/``train_loss``,
    ``accuracy``/``acc``, ``val_loss``, ``val_accuracy``) or a dict of such lists, e.g. one per
    federated round or per site, drawn in one colour each.
    """
    histories = dict(history) if isinstance(history, Mapping) else {"": list(history)}
    if not histories or not any(histories.values()):
        raise ValueError("plot_training_curves: the history is empty (no epoch recorded)")
    panels = [(name, keys) for name, keys in (("Loss", _LOSS_KEYS), ("Accuracy", _ACC_KEYS))
              if any(_series(h, k) for h in histories.values() for k in keys)]
    if not panels:
        raise ValueError("plot_training_curves: no loss or accuracy key in the history "
                         f"(expected one of {[k for keys in _LOSS_KEYS + _ACC_KEYS for k in keys]})")
    figure = _new_figure(5.0 * len(panels), 4.0)
    colors = [f"C{i % 10}" for i in range(len(histories))]
    for ax, (metric, (train_keys, val_keys)) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        for color, (label, rows) in zip(colors, histories.items()):
            for keys, style, part in ((train_keys, "-", "train"), (val_keys, "--", "val")):
                series = _series(rows, keys)
                if series:
                    ax.plot(*series, style, color=color, label=f"{label} {part}".strip())
        ax.set(xlabel="Epoch", ylabel=metric, title=metric)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    return save_figure(figure, path)


def plot_gradcam_grid(rois: Sequence[np.ndarray], overlays: Sequence[np.ndarray], titles: Sequence[str],
                      path: str | Path) -> Path:
    """One row per case: the gray ROI beside its Grad-CAM overlay (RGB), titled (Fig. 3)."""
    if not (len(rois) == len(overlays) == len(titles)) or not rois:
        raise ValueError(f"plot_gradcam_grid: need equal, non-zero numbers of ROIs ({len(rois)}), "
                         f"overlays ({len(overlays)}) and titles ({len(titles)})")
    figure = _new_figure(5.0, 2.6 * len(rois))
    axes = figure.subplots(len(rois), 2, squeeze=False)
    for (ax_roi, ax_cam), roi, overlay, title in zip(axes, rois, overlays, titles):
        roi, overlay = np.squeeze(np.asarray(roi)), np.asarray(overlay)
        if roi.ndim != 2:
            raise ValueError(f"Grad-CAM grid {title!r}: ROI must be a 2-D gray image, got shape {roi.shape}")
        if overlay.ndim != 3 or overlay.shape[-1] != 3:
            raise ValueError(f"Grad-CAM grid {title!r}: overlay must be H×W×3 RGB, got shape {overlay.shape}")
        ax_roi.imshow(roi, cmap="gray", vmin=0, vmax=255 if roi.dtype == np.uint8 else None)
        ax_cam.imshow(overlay if overlay.dtype == np.uint8 else np.clip(overlay, 0, 1))
        ax_roi.set_title(title, fontsize="small")
        ax_cam.set_title("Grad-CAM", fontsize="small")
        for ax in (ax_roi, ax_cam):
            ax.set_axis_off()
    return save_figure(figure, path)


__all__ = ["plot_confusion_matrices", "plot_gradcam_grid", "plot_roc", "plot_roc_panels", "plot_training_curves",
           "save_figure"]
