"""Report figures: each writes a real PNG of the expected size atomically; bad ROC input fails clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cldlr.common.evaluation.figures import (
    DPI,
    plot_confusion_matrices,
    plot_gradcam_grid,
    plot_roc,
    plot_roc_panels,
    plot_training_curves,
)


def _curves(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 80)
    return {"DLR": (y, y + rng.normal(0, 0.8, 80)), "CLDLR": (y, y + rng.normal(0, 0.4, 80))}


def _png_size(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_plot_roc_writes_square_png(tmp_path: Path) -> None:
    out = plot_roc(_curves(), tmp_path / "roc.png", "Test")
    assert out == tmp_path / "roc.png"
    width, height = _png_size(out)
    assert width == height == int(5.5 * DPI)
    assert _no_temp_files(tmp_path)


def test_plot_roc_panels_is_wide(tmp_path: Path) -> None:
    width, height = _png_size(plot_roc_panels({"Training": _curves(0), "Test": _curves(1)}, tmp_path / "p.png"))
    assert width == int(10 * DPI) and height == int(5.2 * DPI)


@pytest.mark.parametrize(("y", "score", "message"), [
    ([0, 1, 0, 1], [0.1, np.nan, 0.3, 0.9], "NaN"),
    ([1, 1, 1, 1], [0.1, 0.2, 0.3, 0.9], "one class"),
    ([0, 1, 2, 1], [0.1, 0.2, 0.3, 0.9], "0 \\(benign\\)"),
    ([0, 1, 0], [0.1, 0.2, 0.3, 0.9], "3 labels but 4 scores"),
])
def test_plot_roc_rejects_bad_input(tmp_path: Path, y: list, score: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plot_roc({"bad": (np.array(y), np.array(score))}, tmp_path / "roc.png", "x")
    assert not (tmp_path / "roc.png").exists() and _no_temp_files(tmp_path)


def test_confusion_matrices(tmp_path: Path) -> None:
    matrices = {"Training": np.array([[50, 5], [7, 38]]), "Test": np.array([[20, 3], [4, 13]])}
    width, height = _png_size(plot_confusion_matrices(matrices, tmp_path / "cm.png"))
    assert width == int(7.2 * DPI) and height == int(3.6 * DPI)
    with pytest.raises(ValueError, match="2x2"):
        plot_confusion_matrices({"bad": np.ones((3, 3))}, tmp_path / "bad.png")


def test_training_curves_single_and_several(tmp_path: Path) -> None:
    history = [{"epoch": e, "loss": 1 / e, "accuracy": 1 - 1 / (e + 1), "val_loss": 1.2 / e, "val_accuracy": 0.5}
               for e in range(1, 6)]
    width, height = _png_size(plot_training_curves(history, tmp_path / "one.png"))
    assert width == int(10 * DPI) and height == int(4 * DPI)
    rounds = {f"round {r}": [{"train_loss": 1 / (e + r)} for e in range(1, 4)] for r in range(3)}
    width, _ = _png_size(plot_training_curves(rounds, tmp_path / "rounds.png"))
    assert width == int(5 * DPI)  # loss only: one panel
    with pytest.raises(ValueError, match="empty"):
        plot_training_curves([], tmp_path / "empty.png")
    with pytest.raises(ValueError, match="no loss or accuracy"):
        plot_training_curves([{"lr": 0.1}], tmp_path / "none.png")


def test_gradcam_grid(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rois = [rng.integers(0, 256, (32, 32), dtype=np.uint8) for _ in range(3)]
    overlays = [rng.random((32, 32, 3)) for _ in range(2)] + [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)]
    width, height = _png_size(plot_gradcam_grid(rois, overlays, ["a", "b", "c"], tmp_path / "cam.png"))
    assert width == int(5 * DPI) and height == int(7.8 * DPI)
    with pytest.raises(ValueError, match="equal"):
        plot_gradcam_grid(rois, overlays[:2], ["a", "b", "c"], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="RGB"):
        plot_gradcam_grid(rois[:1], [rois[0]], ["a"], tmp_path / "bad.png")
