"""Whole-study DP trade-off: test AUC (Clinical, DLR, CLDLR) and the selected parameters against ε.

One federated simulation per (ε, seed) on site folders (e.g. BUS-BRA BI-RADS 4 split by device:
``cldlr import bus-bra ../shared/data/bus-bra OUT --birads 4 --sites device``). ``inf`` runs
without any DP; a finite ε is the whole study's budget, split over the phases by :data:`SPLIT`
(backbone DP-SGD, then the five phases of noisy secure sums). Each finished run appends one line to
``OUT/results.jsonl``, so an interrupted sweep resumes where it stopped; ``--table`` writes the
Markdown table and the PNG plot from what is there. Under DP the published AUC is that of the
noisy score histograms (the evaluation phase's own noise); ``--exact`` scores each finished run's
bundle on the pooled test split offline (outside the study's DP guarantee: a benchmark of what the
model itself achieves) into ``OUT/exact.jsonl``, and the table then shows both.

    python bench/dp_budget.py --sites DIR --out OUT [--eps inf 8 4 2 1] [--seeds 0 1] [--set key=value ...]
                              [--split svm=0.35 --split platt=0]
    python bench/dp_budget.py --sites DIR --out OUT --exact [--set key=value ...]
    python bench/dp_budget.py --out OUT --table [--png docs/img/dp_budget.png]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

#: Share of the whole-study ε each phase gets (backbone DP-SGD, then the noisy secure sums).
SPLIT = {"backbone": 0.4, "clinical": 0.1, "encoder": 0.05, "svm": 0.25, "platt": 0.1, "evaluation": 0.1}
#: The CPU setting of docs/RESULTS.md, made small: tiny backbone, 64 px, 2 rounds of 1 local epoch.
SMALL = ["model.backbone=tiny", "model.weights=none", "data.image_size=64", "train.batch_size=16", "train.lr=0.0001",
         "svm.solver=rff", "svm.embedding_pca=16", "svm.rff_features=256", "federation.mode=federated",
         "federation.rounds=2", "federation.local_epochs=1", "federation.min_sites=2", "federation.num_sites=3",
         "federation.transfer_dtype=float32", "evaluation.histogram_bins=20", "evaluation.min_count=1"]
MODELS = ("clinical", "dlr", "cldlr")


def overrides(epsilon: float, seed: int, sites: Path, out: Path, split: dict[str, float] | None = None) -> list[str]:
    """The study's settings for one point of the sweep (``split``: the phases' shares, default :data:`SPLIT`)."""
    split = SPLIT if split is None else split
    name = f"eps-{epsilon:g}-seed-{seed}"
    base = [f"data.root={sites}", f"data.cache_dir={out / 'cache'}", f"run.output_dir={out / 'runs'}",
            f"run.name={name}", f"run.seed={seed}", *SMALL]
    if math.isinf(epsilon):
        return base
    dp = ["privacy.enabled=true", "privacy.delta=1e-3", "privacy.max_grad_norm=1.0",
          f"privacy.target_epsilon={epsilon * split['backbone']:g}", "privacy.secure_sums.enabled=true"]
    return base + dp + [f"privacy.secure_sums.{phase}={epsilon * share:g}" for phase, share in split.items()
                        if phase != "backbone"]


def run_point(epsilon: float, seed: int, sites: Path, out: Path, extra: list[str],
              split: dict[str, float] | None = None) -> dict[str, Any]:
    """One federated simulation; its test AUCs, selection and ε per site."""
    from cldlr.common.config import load_config
    from cldlr.simulations.runner import simulate

    run = simulate(load_config(None, overrides(epsilon, seed, sites, out, split) + extra))
    report = json.loads((run / "report.json").read_text())
    privacy = (report.get("federation") or {}).get("privacy") or {}
    return {"epsilon": epsilon, "seed": seed,
            "auc": {m: report["metrics"][m]["test"]["auc"] for m in MODELS if m in report["metrics"]},
            "selected": report.get("selected_clinical_parameters", []),
            "spent": {site: v.get("phases", {}).get("total", v.get("epsilon")) for site, v in privacy.items()}}


def exact_auc(epsilon: float, seed: int, sites: Path, out: Path, extra: list[str]) -> dict[str, float]:
    """Test AUC of a finished run's bundle scored offline on the pooled test split (no evaluation noise)."""
    from sklearn.metrics import roc_auc_score

    from cldlr.client.evaluate import score_site
    from cldlr.common.bundle import load_bundle
    from cldlr.common.config import load_config
    from cldlr.simulations.sites import load_sites

    config = load_config(None, overrides(epsilon, seed, sites, out) + extra)
    bundle = load_bundle(out / "runs" / f"eps-{epsilon:g}-seed-{seed}" / "model", allow_unsigned=True)
    labels, scores = [], {"clinical": [], "dlr": [], "cldlr": []}
    for site in load_sites(config):
        table = score_site(bundle, site.root, label=site.name)
        test = set(site.frame.loc[site.frame["split"] == "test", "image_id"].astype(str))
        rows = table[table["image_id"].isin(test)]
        labels += rows["label"].tolist()
        for model, column in (("clinical", "clinical_score"), ("dlr", "dlr_score"), ("cldlr", "ai_score")):
            scores[model] += rows[column].tolist()
    return {m: float(roc_auc_score(labels, v)) for m, v in scores.items() if not any(x != x for x in v)}


def done(out: Path, name: str = "results.jsonl") -> list[dict[str, Any]]:
    """The finished points (one JSON line each)."""
    path = out / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def table(rows: list[dict[str, Any]]) -> str:
    """Mean test AUC (± SD over seeds) per ε and model, the selected parameters and the largest ε spent."""
    import numpy as np

    from cldlr.common.text import markdown_text

    exact = {(r["epsilon"], r["seed"]): r["auc"] for r in rows if r.get("exact")}
    rows = [r for r in rows if not r.get("exact")]
    head = "| whole-study ε | seeds | Clinical | DLR | CLDLR |"
    if exact:
        head += " exact Clinical | exact DLR | exact CLDLR |"
    lines = [head + " selected (by seed) | largest ε spent |", "|---" * (head.count("|") + 1) + "|"]
    for eps in sorted({r["epsilon"] for r in rows}, key=lambda e: -e):
        group = [r for r in rows if r["epsilon"] == eps]
        cells = []
        for m in MODELS:
            values = [r["auc"][m] for r in group if m in r["auc"]]
            cells.append(f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "–")
        for m in MODELS if exact else ():
            values = [exact[(r["epsilon"], r["seed"])][m] for r in group if m in exact.get((r["epsilon"], r["seed"]), {})]
            cells.append(f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "–")
        selected = "; ".join(", ".join(markdown_text(s) for s in r["selected"]) or "none"
                             for r in group if "error" not in r) or "–"
        spent = max((v for r in group for v in r["spent"].values() if v is not None), default=None)
        failed = sum("error" in r for r in group)
        lines.append(f"| {'∞' if math.isinf(eps) else f'{eps:g}'} | {len(group) - failed}"
                     + (f" (+{failed} stopped)" if failed else "") + " | " + " | ".join(cells)
                     + f" | {selected} | {'–' if spent is None else f'{spent:.2f}'} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, exact: list[dict[str, Any]] | None = None) -> Path:
    """Test AUC against ε (log axis; ∞ drawn at the right), one line per model; ``exact`` rows dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    finite = sorted({r["epsilon"] for r in rows if not math.isinf(r["epsilon"])})
    right = (max(finite) * 2) if finite else 16.0
    xs = sorted({r["epsilon"] for r in rows}, key=lambda e: right if math.isinf(e) else e)
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    names = {"clinical": "Clinical", "dlr": "DLR", "cldlr": "CLDLR"}
    for kind, group, style in (("published", rows, "-"), ("exact", exact or [], "--")):
        for i, m in enumerate(MODELS):
            x, y, s = [], [], []
            for eps in xs:
                values = [r["auc"][m] for r in group if r["epsilon"] == eps and m in r["auc"]]
                if values:
                    x.append(right if math.isinf(eps) else eps)
                    y.append(float(np.mean(values)))
                    s.append(float(np.std(values)))
            if x:
                ax.errorbar(x, y, yerr=s, marker="o" if style == "-" else "s", capsize=3, ls=style, color=f"C{i}",
                            label=names[m] + (f" ({kind})" if exact else ""))
    ax.set_xscale("log")
    ax.set_xticks([right if math.isinf(e) else e for e in xs])
    ax.set_xticklabels(["∞" if math.isinf(e) else f"{e:g}" for e in xs])
    ax.tick_params(axis="x", which="minor", labelbottom=False)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("whole-study ε (δ = 1e-3) per site")
    ax.set_ylabel("test AUC")
    ax.legend(frameon=False, fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=Path, help="folder of site folders (one per hospital)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--eps", type=float, nargs="+", default=[math.inf, 8.0, 4.0, 2.0, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--split", action="append", default=[], metavar="PHASE=SHARE",
                        help="change a phase's share of ε (e.g. svm=0.35 platt=0 with svm.dp_fusion); shares must sum to 1")
    parser.add_argument("--exact", action="store_true", help="score the finished runs' bundles offline (exact AUC)")
    parser.add_argument("--table", action="store_true", help="only write the table and the plot")
    parser.add_argument("--png", type=Path, default=None)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    split = dict(SPLIT)
    for item in args.split:
        phase, _, share = item.partition("=")
        if phase not in SPLIT:
            parser.error(f"--split {item}: unknown phase {phase!r} (one of {', '.join(SPLIT)})")
        split[phase] = float(share)
    if abs(sum(split.values()) - 1.0) > 1e-9:
        parser.error(f"--split: the shares must sum to 1, got {sum(split.values()):g} ({split})")
    if args.exact:
        if args.sites is None:
            parser.error("--sites is needed to score the runs")
        scored = {(r["epsilon"], r["seed"]) for r in done(args.out, "exact.jsonl")}
        for r in done(args.out):
            if "error" in r or (r["epsilon"], r["seed"]) in scored:
                continue
            auc = exact_auc(r["epsilon"], r["seed"], args.sites.resolve(), args.out.resolve(), args.extra)
            with open(args.out / "exact.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"epsilon": r["epsilon"], "seed": r["seed"], "auc": auc, "exact": True}) + "\n")
            print(r["epsilon"], r["seed"], auc, flush=True)
    elif not args.table:
        if args.sites is None:
            parser.error("--sites is needed to run the sweep")
        finished = {(r["epsilon"], r["seed"]) for r in done(args.out)}
        for seed in args.seeds:
            for eps in args.eps:
                if (eps, seed) in finished:
                    continue
                try:
                    row = run_point(eps, seed, args.sites.resolve(), args.out.resolve(), args.extra, split)
                except Exception as exc:  # a study that stopped (a refusal, a failed round) is a result too
                    row = {"epsilon": eps, "seed": seed, "auc": {}, "selected": [], "spent": {},
                           "error": str(exc).splitlines()[-1][:300]}
                with open(args.out / "results.jsonl", "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    rows = done(args.out)
    text = table(rows + done(args.out, "exact.jsonl"))
    (args.out / "table.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    if rows:
        print(plot(rows, args.png or args.out / "dp_budget.png", done(args.out, "exact.jsonl")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
