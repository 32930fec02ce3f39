"""``cldlr simulate --repeats N``: the same study over N patient-level splits, summarised as mean ± sd.

One 7:3 split of a few hundred patients gives a test AUC with a 95 % CI half-width of about 0.07,
so a single split cannot tell whether deep features add to clinical parameters. Repeat *r* uses
``data.split_seed + r`` and ``run.seed + r`` (a new split *and* a new initialisation), runs in its
own ``repeat-<r>`` folder, and is skipped on ``--resume`` once its report exists, so a long CPU
run continues where it stopped. The summary gives each model's test AUC (mean ± sd, range), the
train − test gap, and the paired difference CLDLR − Clinical per repeat: the one number the
study's claim rests on, with its spread.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cldlr.common.config import Config
from cldlr.common.errors import ConfigError
from cldlr.common.evaluation.outcome import MODEL_TITLES, MODELS
from cldlr.common.io import atomic_write_json, atomic_write_text
from cldlr.common.text import markdown_text

log = logging.getLogger(__name__)

#: Runs one study into a folder: (config, run folder, resume) → the folder.
StudyRunner = Callable[[Config, Path, bool], Path]


def repeat_config(config: Config, r: int) -> Config:
    """The config of repeat ``r`` (0-based): split and seed shifted by ``r``, the site's own split ignored."""
    return config.replace(**{"data.split_seed": config.data.split_seed + r, "run.seed": config.run.seed + r,
                             "data.use_existing_split": False})


def _test_aucs(report_dir: Path, compare: bool) -> dict[str, dict[str, dict[str, float]]]:
    """Arm → model → {"test": AUC, "train": AUC (when known)} from one repeat's outputs."""
    if compare:
        rows = json.loads((report_dir / "comparison.json").read_text(encoding="utf-8"))
        return {arm: {m: {"test": float(v["auc"])} for m, v in models.items()} for arm, models in rows.items()}
    report = json.loads((report_dir / "report.json").read_text(encoding="utf-8"))
    return {"Study": {m: {k: float(report["metrics"][m][k]["auc"]) for k in ("train", "test") if k in report["metrics"][m]}
                      for m in report["metrics"]}}


def _spread(values: list[float]) -> dict[str, float]:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "sd": sd, "min": min(values), "max": max(values), "n": len(values)}


def summarise(per_repeat: list[dict[str, dict[str, dict[str, float]]]]) -> dict[str, Any]:
    """Mean ± sd per arm and model, the train − test gap, and the paired CLDLR − Clinical difference."""
    summary: dict[str, Any] = {}
    for arm in per_repeat[0]:
        entry: dict[str, Any] = {}
        for model in MODELS:
            runs = [rep[arm][model] for rep in per_repeat if model in rep.get(arm, {})]
            if not runs:
                continue
            entry[model] = {"test": _spread([r["test"] for r in runs])}
            if all("train" in r for r in runs):
                entry[model]["train_minus_test"] = _spread([r["train"] - r["test"] for r in runs])
        pairs = [rep[arm]["cldlr"]["test"] - rep[arm]["clinical"]["test"] for rep in per_repeat
                 if {"cldlr", "clinical"} <= set(rep.get(arm, {}))]
        if pairs:
            entry["cldlr_minus_clinical"] = {**_spread(pairs), "values": pairs, "positive": sum(p > 0 for p in pairs)}
        summary[arm] = entry
    return summary


def _fmt(s: dict[str, float]) -> str:
    return f"{s['mean']:.3f} ± {s['sd']:.3f} ({s['min']:.3f}–{s['max']:.3f})"


def summary_markdown(summary: dict[str, Any], n: int) -> str:
    """The repeats table: one row per arm, test AUC mean ± sd (range) per model and CLDLR − Clinical."""
    head = "| Arm | " + " | ".join(MODEL_TITLES[m] for m in MODELS) + " | CLDLR − Clinical | CLDLR > Clinical |"
    lines = [f"Test AUC over {n} patient-level splits: mean ± sd (min–max).", "", head, "|---|" + "---|" * (len(MODELS) + 2)]
    for arm, entry in summary.items():
        cells = [_fmt(entry[m]["test"]) if m in entry else "–" for m in MODELS]
        diff = entry.get("cldlr_minus_clinical")
        cells += [f"{diff['mean']:+.3f} ± {diff['sd']:.3f}", f"{diff['positive']}/{diff['n']}"] if diff else ["–", "–"]
        lines.append(f"| {markdown_text(arm)} | " + " | ".join(cells) + " |")
    gaps = [(arm, entry["dlr"]["train_minus_test"]) for arm, entry in summary.items()
            if "train_minus_test" in entry.get("dlr", {})]
    if gaps:
        lines += ["", "DLR train − test AUC: " + "; ".join(f"{markdown_text(a)} {_fmt(g)}" for a, g in gaps) + "."]
    return "\n".join(lines)


def run_repeats(config: Config, run_dir: Path, repeats: int, run_one: StudyRunner, *, compare: bool,
                resume: bool) -> Path:
    """Run ``repeats`` studies into ``run_dir/repeat-<r>`` and write ``repeats.json`` and ``report.md``."""
    if repeats < 2:
        raise ConfigError(f"--repeats {repeats}: give 2 or more (a single split needs no summary)")
    per_repeat = []
    for r in range(repeats):
        sub = run_dir / f"repeat-{r + 1}"
        done = (sub / ("comparison.json" if compare else "report.json")).is_file()
        if resume and done:
            log.info("repeat %d/%d already finished; skipped", r + 1, repeats)
        else:
            log.info("repeat %d/%d: data.split_seed=%d run.seed=%d", r + 1, repeats,
                     config.data.split_seed + r, config.run.seed + r)
            existed = sub.is_dir()
            sub.mkdir(exist_ok=True)
            run_one(repeat_config(config, r), sub, resume and existed)
        per_repeat.append(_test_aucs(sub, compare))
    summary = summarise(per_repeat)
    atomic_write_json(run_dir / "repeats.json", {"repeats": repeats, "per_repeat": per_repeat, "summary": summary})
    text = summary_markdown(summary, repeats)
    atomic_write_text(run_dir / "report.md", f"# CLDLR — {repeats} repeated splits\n\n{text}\n\n"
                      "Each repeat's own report is in its `repeat-<r>` folder.\n")
    log.info("repeats:\n%s", text)
    return run_dir
