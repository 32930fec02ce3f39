"""Deep-feature ablation on BUS-BRA BI-RADS 4 (issue: deep features that earn their place), resumable.

Arms: backbone {scratch, augmentation, pretrained on BUS-BRA's other BI-RADS categories} × fusion
{paper (fit on train), hold-out (the concatenating SVM on the hold-out), stack (late fusion on
out-of-fold decision values of the hold-out; it reuses the hold-out arm's trained backbone)}; each
over the same patient-level splits (``data.split_seed`` and ``run.seed`` = r). Runs go round-robin
over splits so a partial run still compares every arm on the same splits. Every study is a
``cldlr simulate`` run; one that has its report is never rerun.

    python bench/ablation_deep.py --bi4 DIR --archive DIR --out DIR [--splits 5] [--arms A ...] [--table]

``--bi4``/``--archive``: ``cldlr import bus-bra SRC DIR --sites single --birads 4`` (and
``--birads 2 --birads 3 --birads 5``). ``--table`` prints the Markdown table of what has finished.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
from pathlib import Path

from cldlr.common.config import Config, load_config
from cldlr.simulations.pretrain import pretrain
from cldlr.simulations.repeats import repeat_config
from cldlr.simulations.runner import simulate

CPU = ["data.image_size=64", "model.weights=none", "train.epochs=8", "train.lr=0.0001", "train.batch_size=16",
       "svm.embedding_pca=16", "train.device=cpu"]
BACKBONES = {"scratch": [], "augmentation": ["train.augment.enabled=true"], "pretrained": ["model.weights={weights}"],
             # beyond the grid: both together, and the ROI with 20 % context around the lesion rectangle
             "pretrained+augmentation": ["model.weights={weights}", "train.augment.enabled=true"],
             "context": ["data.margin=0.2"]}
FUSIONS = {"paper": ["fusion.fit_on=train"], "hold-out": ["fusion.fit_on=holdout"],
           "stack": ["fusion.fit_on=holdout", "fusion.combine=stack"]}
ORDER = [("scratch", "paper"), ("scratch", "hold-out"), ("scratch", "stack"), ("augmentation", "hold-out"),
         ("augmentation", "stack"), ("pretrained", "hold-out"), ("pretrained", "stack"), ("augmentation", "paper"),
         ("pretrained", "paper"), ("pretrained+augmentation", "hold-out"), ("pretrained+augmentation", "stack"),
         ("context", "hold-out"), ("context", "stack"), ("pretrained+augmentation", "paper")]


#: The federated by-device arms (``--sites``): 3 device sites, 4 rounds × 2 local epochs (the pooled arms' 8
#: epochs per image), the secure RFF/LS-SVM fusion of docs/RESULTS.md's federation section.
FEDERATED = ["federation.mode=federated", "federation.num_sites=3", "federation.min_sites=3", "federation.rounds=4",
             "federation.local_epochs=2", "svm.solver=rff", "svm.rff_features=256"]


def base_config(bi4: Path, out: Path, extra: list[str], sites: Path | None = None,
                overrides: list[str] | None = None) -> Config:
    """configs/paper.yaml at the CPU setting, the arm's settings, then ``--set`` (e.g. 224 px on a GPU)."""
    root, schema = (bi4 / "bus-bra", bi4 / "schema.yaml") if sites is None else (sites, sites / "schema.yaml")
    federated = FEDERATED if sites is not None else []
    return load_config("configs/paper.yaml", [f"data.root={root}", f"data.schema={schema}",
                                              f"data.cache_dir={out / 'cache'}", *CPU, *federated, *extra,
                                              *(overrides or [])])


def arm_dir(out: Path, backbone: str, fusion: str) -> Path:
    return out / f"{backbone}-{fusion}"


def runs_root(args: argparse.Namespace) -> Path:
    """Where an arm's runs go: ``--out`` for the pooled arms, ``--out/by-device`` for the federated ones."""
    return args.out / "by-device" if args.sites else args.out


def run(args: argparse.Namespace) -> None:
    weights = args.out / "pretrained.pt"
    for r in range(args.splits):
        for backbone, fusion in ORDER:
            if args.arms and f"{backbone}-{fusion}" not in args.arms:
                continue
            if backbone.startswith("pretrained") and not weights.is_file():
                cfg = base_config(args.bi4, args.out, ["federation.mode=pooled", "train.epochs=10",
                                                       f"run.output_dir={args.out}"], overrides=args.set)
                pretrain(cfg, args.archive, weights, drop_overlap=True)  # BUS-BRA: one patient is in both
            if args.sites and fusion == "stack":
                continue  # fusion.combine=stack is pooled-only
            folder = arm_dir(runs_root(args), backbone, fusion)
            if (folder / f"repeat-{r + 1}" / "report.json").is_file():
                continue
            sets = [s.format(weights=weights) for s in BACKBONES[backbone] + FUSIONS[fusion]]
            cfg = repeat_config(base_config(args.bi4, args.out, sets, args.sites, args.set), r)
            cfg = cfg.replace(**{"run.output_dir": str(folder), "run.name": f"repeat-{r + 1}"})
            resume = folder / f"repeat-{r + 1}"
            shared = arm_dir(runs_root(args), backbone, "hold-out") / f"repeat-{r + 1}" / "checkpoint.pt"
            if fusion == "stack" and shared.is_file() and not resume.is_dir():
                # the stacked arm's backbone is the hold-out arm's (same rows, seed, settings): only the fusion differs
                resume.mkdir(parents=True)
                shutil.copy2(shared, resume / "checkpoint.pt.part")  # whole or not at all (a full disk cuts a copy)
                (resume / "checkpoint.pt.part").rename(resume / "checkpoint.pt")
            logging.getLogger("ablation").info("split %d: %s × %s", r + 1, backbone, fusion)
            simulate(cfg, resume=resume if resume.is_dir() else None)
            # a finished study needs no trainer checkpoint (1.2 GiB at 64 px: model + Adam state), except the
            # hold-out arm's, which its stacked arm reuses until it has run
            if fusion != "hold-out":
                (resume / "checkpoint.pt").unlink(missing_ok=True)
            if fusion == "stack":
                shared.unlink(missing_ok=True)


def _metrics(out: Path, backbone: str, fusion: str) -> dict[int, dict]:
    return {int(p.parent.name.split("-")[1]): json.loads(p.read_text())["metrics"]
            for p in arm_dir(out, backbone, fusion).glob("repeat-*/report.json")}


def _cell(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def table(out: Path) -> str:
    """Mean ± sd over the finished splits.

    CLDLR − Clinical is paired per split against the paper's Clinical model (every training image) of
    the same split: the paper arm of the same backbone, else the scratch × paper arm (pooled, the
    Clinical model is the same in every arm of a split), else the arm's own Clinical model.
    """
    lines = ["| Backbone | Fusion | splits | Clinical | DLR | CLDLR | CLDLR − Clinical | DLR train − test |",
             "|---|---|---|---|---|---|---|---|"]
    scratch = _metrics(out, "scratch", "paper")
    for backbone, fusion in ORDER:
        runs = _metrics(out, backbone, fusion)
        if not runs:
            continue
        paper = _metrics(out, backbone, "paper")
        clinical = {r: (paper.get(r) or scratch.get(r) or m)["clinical"]["test"]["auc"] for r, m in runs.items()}
        m = list(runs.values())
        auc = {k: [x[k]["test"]["auc"] for x in m] for k in ("dlr", "cldlr")}
        diff = [runs[r]["cldlr"]["test"]["auc"] - clinical[r] for r in runs]
        gap = [x["dlr"]["train"]["auc"] - x["dlr"]["test"]["auc"] for x in m]
        paired = f"{_cell(diff)} ({sum(d > 0 for d in diff)}/{len(diff)} > 0)"
        lines.append(f"| {backbone} | {fusion} | {len(m)} | {_cell(list(clinical.values()))} | {_cell(auc['dlr'])} | "
                     f"{_cell(auc['cldlr'])} | {paired} | {_cell(gap)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bi4", type=Path, required=True)
    parser.add_argument("--archive", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--sites", type=Path, help="device site folders (--sites device import): the federated arms")
    parser.add_argument("--arms", nargs="*", default=[], help="only these arms (e.g. scratch-paper), default all")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides after the CPU setting (bench/gpu.sh: data.image_size=224 train.device=cuda)")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if args.table:
        print(table(runs_root(args)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run(args)
    print(table(runs_root(args)))


if __name__ == "__main__":
    main()
