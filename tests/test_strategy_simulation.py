"""A server-optimizer strategy through the real ServerApp and ClientApp (Flower's Ray engine): slow.

The unit tests prove the wrapper hands valid replies to FedAdam's own ``aggregate_train``; this
one runs it where Flower builds the messages, with the centre's ledger grid and checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from cldlr.common.config import load_config
from cldlr.server.checkpoint import checkpoint_weights
from cldlr.simulations.phantom import generate_phantom
from cldlr.simulations.runner import simulate

pytestmark = pytest.mark.slow

TINY = [
    "model.backbone=tiny", "model.weights=none", "data.image_size=32", "train.batch_size=8",
    "svm.solver=rff", "svm.embedding_pca=4", "svm.rff_features=32", "evaluation.min_count=1",
    "federation.mode=federated", "federation.rounds=2", "federation.local_epochs=1", "federation.min_sites=2",
]


def test_a_fedadam_federation_trains_with_the_server_step(tmp_path: Path) -> None:
    root = tmp_path / "data"
    generate_phantom(root, sites=3, images_per_site=24, seed=0, image_size=96)
    base = [f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", f"run.output_dir={tmp_path / 'runs'}", *TINY]
    runs = {name: simulate(load_config(None, [*base, f"run.name={name}", f"federation.strategy={name}",
                                              "federation.server_opt.eta=0.05"]))
            for name in ("fedavg", "fedadam")}
    report = json.loads((runs["fedadam"] / "report.json").read_text())
    assert report["federation"]["strategy"] == "fedadam" and report["federation"]["rounds"] == 2
    progress = json.loads((runs["fedadam"] / "checkpoints" / "progress.json").read_text())
    assert [len(h["sites"]) for h in progress["history"]] == [3, 3]
    adam, avg = (load_file(str(checkpoint_weights(runs[n] / "checkpoints"))) for n in ("fedadam", "fedavg"))
    assert all(np.isfinite(v).all() for v in adam.values())
    # same seeds and sites: the round-1 site updates coincide, so only the server step tells the models apart
    assert max(float(np.abs(adam[k] - avg[k]).max()) for k in adam if adam[k].dtype.kind == "f") > 1e-3
