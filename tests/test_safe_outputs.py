"""What leaves the project is inert: CSV cells a spreadsheet will not run, literal Markdown, figures without mathtext."""

from __future__ import annotations

import ast
import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from cldlr.client.predict import CSV_COLUMNS, predictions_csv
from cldlr.common.config import Config
from cldlr.common.evaluation.figures import plot_gradcam_grid, plot_roc, plot_training_curves
from cldlr.common.evaluation.outcome import StudyOutcome, evaluate_predictions
from cldlr.common.evaluation.report import write_report
from cldlr.simulations.reader_study import analyze_reads

REPO = Path(__file__).resolve().parents[1]
MATHTEXT = "$\\notacommand{$"  # matplotlib's mathtext raises on it while drawing
FORMULA = '=HYPERLINK("x","click")'
#: Modules allowed to write CSV by themselves: site data (clinical.csv) read back by cldlr, not by a person.
SITE_DATA_WRITERS = {"client/importers/bus_bra.py", "client/importers/class_folders.py", "common/data/splits.py",
                     "simulations/federated.py", "simulations/phantom.py", "common/text.py"}


def _cells(markdown_row: str) -> int:
    """Cells of a Markdown table row: unescaped pipes minus one."""
    return len(re.findall(r"(?<!\\)\|", markdown_row)) - 1


def _csv_writers(path: Path) -> list[str]:
    """``csv.writer``/``csv.DictWriter``/``DataFrame.to_csv`` calls in one module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("writer", "DictWriter", "to_csv")):
            found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.func.attr}")
    return found


def test_every_csv_the_project_writes_goes_through_csv_text():
    modules = [p for folder in ("common", "client", "server", "simulations", "cldlr") for p in (REPO / folder).rglob("*.py")]
    stray = [w for p in modules if p.relative_to(REPO).as_posix() not in SITE_DATA_WRITERS for w in _csv_writers(p)]
    assert stray == []


def test_predictions_csv_neutralises_formulas_and_keeps_numbers():
    rows = [{"image_id": FORMULA, "ai_score": -0.5, "dlr_score": 0.25, "clinical_score": None,
             "predicted_class": "@SUM(A1)", "threshold": 0.4, "fallback": "+cmd", "overlay": "overlays/x.png",
             "signature": "=unverified"}]
    header, row = list(csv.reader(io.StringIO(predictions_csv(rows))))
    assert header == list(CSV_COLUMNS)
    assert row == ["'" + FORMULA, "-0.5", "0.25", "", "'@SUM(A1)", "0.4", "'+cmd", "overlays/x.png", "", "'=unverified"]


def _outcome(site: str) -> StudyOutcome:
    rng = np.random.default_rng(0)
    labels = {"train": rng.integers(0, 2, 40), "test": rng.integers(0, 2, 20)}
    probabilities = {m: {c: np.clip(0.5 * y + rng.normal(0.25, 0.3, len(y)), 0, 1) for c, y in labels.items()}
                     for m in ("clinical", "dlr", "cldlr")}
    metrics, delong, roc = evaluate_predictions(probabilities, labels, 0.5)
    return StudyOutcome(metrics=metrics, delong=delong, roc=roc, selection_table=[], selected=[],
                        sites=[{"name": site, "n_train": 40, "n_test": 20}],
                        history={site: [{"epoch": 1, "loss": 0.7, "accuracy": 0.5}, {"epoch": 2, "loss": 0.6}]},
                        gradcam=[(np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.uint8), MATHTEXT)])


@pytest.mark.parametrize("name", [MATHTEXT, "$x$", "a | b *c* <script>"])
def test_a_hostile_site_name_does_not_stop_the_report(tmp_path, name):
    run = tmp_path / "run"
    run.mkdir()
    write_report(run, _outcome(name), Config())
    md = (run / "report.md").read_text()
    assert sorted(p.name for p in (run / "figures").iterdir()) == ["confusion_test.png", "gradcam.png", "roc.png",
                                                                 "training.png"]
    site_row = next(line for line in md.splitlines() if line.endswith("| 40 | 20 | – | – |"))
    assert _cells(site_row) == 5 and "<script>" not in md and "*c*" not in md  # the name is one literal cell
    assert json.loads((run / "report.json").read_text())["sites"][0]["name"] == name


def test_figures_draw_names_literally(tmp_path):
    y, score = np.array([0, 1, 0, 1]), np.array([0.1, 0.8, 0.3, 0.6])
    plot_roc({MATHTEXT: (y, score)}, tmp_path / "roc.png", title=MATHTEXT)
    plot_training_curves({MATHTEXT: [{"epoch": 1, "loss": 1.0}]}, tmp_path / "train.png")
    plot_gradcam_grid([np.zeros((4, 4), np.uint8)], [np.zeros((4, 4, 3), np.uint8)], [MATHTEXT], tmp_path / "g.png")
    assert all((tmp_path / n).stat().st_size > 0 for n in ("roc.png", "train.png", "g.png"))


def _reads(tmp_path: Path, reader: str) -> tuple[Path, Path]:
    truth = tmp_path / "key.csv"
    truth.write_text("case,label\n" + "".join(f"C{i},{i % 2}\n" for i in range(8)))
    rows = [f'"{reader.replace(chr(34), chr(34) * 2)}",{r},C{i},{(i + r) % 2},{1 + (i * 3 + r) % 5}\n'
            for r in (1, 2) for i in range(8)]
    reads = tmp_path / "reads.csv"
    reads.write_text("reader,round,case,malignant,confidence\n" + "".join(rows))
    return reads, truth


@pytest.mark.parametrize("reader", [MATHTEXT, "dr | x", FORMULA])
def test_a_hostile_reader_name_reaches_table3_literally_and_the_figure_is_drawn(tmp_path, reader):
    reads, truth = _reads(tmp_path, reader)
    out = analyze_reads(reads, truth, tmp_path / "table3")
    table = (out / "table3.md").read_text()
    rows = [line for line in table.splitlines() if "1 (without AI)" in line and "mean" not in line]
    assert len(rows) == 1 and _cells(rows[0]) == 9 and reader not in table
    assert (out / "reader_roc.png").stat().st_size > 0
    assert list(json.loads((out / "table3.json").read_text())["readers"]) == [reader]

