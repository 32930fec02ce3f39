"""A site's state folder stays consistent when its process dies between two writes (final model vs its caches)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_schema, write_site

from cldlr.client.federated import FederatedSite
from cldlr.client.site import SiteSession
from cldlr.common.config import Config, load_config
from cldlr.common.data.schema import load_schema
from cldlr.common.data.site import read_site


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, SiteSession]:
    root = tmp_path_factory.mktemp("state")
    schema_path = write_schema(root / "schema.yaml")
    write_site(root / "site", n_patients=6, images_per_patient=2, size=40, with_split=True)
    config = load_config(None, [
        f"data.root={root / 'site'}", f"data.schema={schema_path}", f"data.cache_dir={root / 'cache'}",
        "data.image_size=32", "model.backbone=tiny", "model.weights=none", "train.batch_size=8",
    ])
    return config, SiteSession(read_site(root / "site", load_schema(schema_path)), config)


def _two_models(site: FederatedSite) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    first = {k: v.numpy().copy() for k, v in site.model.state_dict().items()}
    second = {k: (v * 0.5 + 0.1 if v.dtype.kind == "f" else v) for k, v in first.items()}
    return first, second


def test_embeddings_of_an_earlier_final_model_are_not_reused_after_a_crash(
        world: tuple[Config, SiteSession], tmp_path: Path) -> None:
    config, session = world
    state = tmp_path / "node"
    site = FederatedSite(session, config, state)
    first, second = _two_models(site)
    site.set_global_model(first)
    old = site.embeddings("train")
    shutil.copy(state / "embeddings.npz", tmp_path / "old-embeddings.npz")

    # the process dies after writing the new final model, before it removed the old embeddings
    site.set_global_model(second)
    shutil.copy(tmp_path / "old-embeddings.npz", state / "embeddings.npz")

    restarted = FederatedSite(session, config, state)  # a new process: only the files remain
    fresh = restarted.embeddings("train")
    reference = FederatedSite(session, config)
    reference.set_global_model(second)
    np.testing.assert_allclose(fresh, reference.embeddings("train"), rtol=1e-5, atol=1e-6)
    assert not np.allclose(fresh, old)  # the two models embed differently: the check above means something
    with np.load(state / "embeddings.npz") as saved:  # and the cache was rewritten for the new model
        np.testing.assert_allclose(saved["train"], fresh)


def test_a_restarted_process_reuses_the_caches_of_the_same_final_model(
        world: tuple[Config, SiteSession], tmp_path: Path) -> None:
    config, session = world
    state = tmp_path / "node"
    site = FederatedSite(session, config, state)
    site.set_global_model(_two_models(site)[0])
    site.embeddings("train")
    stamp = (state / "embeddings.npz").stat().st_mtime_ns
    restarted = FederatedSite(session, config, state)
    np.testing.assert_array_equal(restarted.embeddings("train"), site.embeddings("train"))
    assert (state / "embeddings.npz").stat().st_mtime_ns == stamp  # read, not recomputed
