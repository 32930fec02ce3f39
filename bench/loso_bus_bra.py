"""Leave-one-site-out on BUS-BRA by device (docs/RESULTS.md's LOSO table), resumable.

For each device site S: the study trains federated (FedAvg, the real ServerApp/ClientApps on
Flower's simulation engine) on the other devices, and the bundle is tested on every site's test
split — S's is the external test (:mod:`cldlr.simulations.loso`). Only the LOSO arms run (not the
pooled, local and strategy arms of ``simulate --compare``); an arm with a report is not rerun.

    cldlr import bus-bra /work/shared/data/bus-bra SITES --birads 4      # one site per device
    nohup .venv/bin/python bench/loso_bus_bra.py --sites SITES --out OUT > OUT.log 2>&1 &
    .venv/bin/python bench/loso_bus_bra.py --sites SITES --out OUT --table   # the table of what finished

CPU setting (as docs/RESULTS.md's federation runs): 64 px ROIs, VGG11 without ImageNet weights,
Adam 1e-4, batch 16, ``--rounds 2 --local-epochs 1``, RFF/LS-SVM fusion. ``--set k=v`` adds overrides.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from cldlr.common.config import load_config
from cldlr.common.io import atomic_write_text
from cldlr.common.logs import configure_logging
from cldlr.simulations.loso import LOSO_FILE, loso_markdown, run_loso
from cldlr.simulations.sites import load_sites

CPU = ["data.image_size=64", "model.weights=none", "train.lr=0.0001", "train.batch_size=16", "svm.embedding_pca=16",
       "svm.rff_features=256", "federation.compare_loso=true", "federation.strategy=fedavg"]


def main() -> int:
    """Run (or resume) the LOSO arms and write ``OUT/loso.md``; ``--table`` only prints what has finished."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=Path, required=True, help="output of `cldlr import bus-bra … --birads 4`")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if args.table:
        print(loso_markdown(json.loads((args.out / LOSO_FILE).read_text())))
        return 0
    configure_logging("INFO")
    args.out.mkdir(parents=True, exist_ok=True)
    config = load_config("configs/federated.yaml", [
        f"data.root={args.sites}", f"data.schema={args.sites / 'schema.yaml'}", f"data.cache_dir={args.out / 'cache'}",
        f"run.output_dir={args.out}", "run.name=loso-bus-bra", *CPU, f"federation.rounds={args.rounds}",
        f"federation.local_epochs={args.local_epochs}", *args.set])
    sites = load_sites(config)
    logging.getLogger("cldlr").info("LOSO over %d sites: %s", len(sites), ", ".join(s.name for s in sites))
    result = run_loso(sites, config, args.out, resume=True)
    text = loso_markdown(result)
    atomic_write_text(args.out / "loso.md", text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
