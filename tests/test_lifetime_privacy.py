"""The site's lifetime ε ledger in the real training path, and DP randomness the centre cannot set (issue #13, attacks 3, 4)."""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_schema, write_site

from cldlr.client import privacy as privacy_module
from cldlr.client.federated import FederatedSite
from cldlr.client.policy import SitePolicy, policy_from_dict
from cldlr.client.privacy import epsilon_of
from cldlr.client.privacy_ledger import LifetimeBudgetError, LifetimeLedger, dataset_key, read_ledger
from cldlr.client.site import SiteSession
from cldlr.common.config import Config, load_config
from cldlr.common.data.schema import load_schema
from cldlr.common.data.site import read_site
from cldlr.common.errors import CldlrError

DELTA = 1e-3
DP = ("privacy.enabled=true", "privacy.target_epsilon=1.0", f"privacy.delta={DELTA}", "privacy.max_grad_norm=1.0")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lifetime")
    schema = write_schema(root / "schema.yaml")
    write_site(root / "site-a", n_patients=12, size=40, seed=0, with_split=True)
    write_site(root / "site-b", n_patients=12, size=40, seed=1, with_split=True)
    return {"root": root, "schema": schema, "a": root / "site-a", "b": root / "site-b"}


def study(world: dict[str, Path], *overrides: str, dp: bool = True) -> Config:
    return load_config(None, [
        f"data.root={world['a']}", f"data.schema={world['schema']}", f"data.cache_dir={world['root'] / 'cache'}",
        "data.image_size=32", "model.backbone=tiny", "model.weights=none", "train.batch_size=4", "train.device=cpu",
        "federation.rounds=2", "federation.local_epochs=1", *(DP if dp else ()), *overrides,
    ])


def session(world: dict[str, Path], config: Config, which: str = "a") -> SiteSession:
    return SiteSession(read_site(world[which], load_schema(world["schema"])), config)


def site_policy(world: dict[str, Path], state: Path, cap: float) -> SitePolicy:
    return policy_from_dict({"schema": str(world["schema"]), "folders": {"state": str(state)},
                             "dp": {"epsilon_cap": cap, "delta": DELTA}})


def weights(site: FederatedSite) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in site.model.state_dict().items()}


def run_study(site: FederatedSite, rounds: int, first: int = 1) -> None:
    arrays = weights(site)
    for server_round in range(first, first + rounds):
        arrays, _, _ = site.train_round(arrays, server_round=server_round)


def largest_change(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)


@pytest.fixture(scope="module")
def plan(world: dict[str, Path]) -> dict[str, tuple[float, float, int]]:
    """One run's and one round's DP-SGD history entries (a site without policy: today's behaviour)."""
    probe = FederatedSite(session(world, study(world)), study(world))
    assert probe.privacy is not None
    return {"run": probe.privacy.planned(2), "round": probe.privacy.planned(1)}


def test_two_dp_runs_fill_the_lifetime_budget_and_a_third_is_refused_before_training(world, plan, tmp_path):
    config = study(world)
    run, rnd = plan["run"], plan["round"]
    two = epsilon_of([run, run], DELTA)
    cap = (two + epsilon_of([run, run, rnd], DELTA)) / 2  # room for two whole runs, not for one round more
    policy = site_policy(world, tmp_path / "site-state", cap)
    for run_id in ("run-1", "run-2"):
        run_study(FederatedSite(session(world, config), config, tmp_path / run_id, policy=policy, run_id=run_id), 2)
    ledger = LifetimeLedger(policy.state_dir, dataset_key(read_site(world["a"], load_schema(world["schema"]))),
                            delta=DELTA, cap=cap)
    assert [r["run"] for r in ledger.runs()] == ["run-1", "run-2"]
    assert [r["steps"] for r in ledger.runs()] == [run[2], run[2]]
    assert ledger.epsilon() == pytest.approx(two)  # composed across runs: not each run's own ε from zero
    assert two > epsilon_of([run], DELTA) > 0.9  # each run spent about its whole target of 1.0
    saved = ledger.path.read_bytes()

    with pytest.raises(LifetimeBudgetError, match="lifetime ε cap") as refused:
        FederatedSite(session(world, config), config, tmp_path / "run-3", policy=policy, run_id="run-3")
    assert re.search(r"run run-3 \(2 rounds × 1 local epochs.*lifetime ε from .* cap .*2 earlier run", refused.value.detail)
    assert "earlier" not in refused.value.public and "run-3" not in str(refused.value)  # the centre learns no history
    assert ledger.path.read_bytes() == saved  # nothing trained, nothing charged
    assert not (tmp_path / "run-3" / "privacy.json").exists()

    # other data, its own budget: site-b's first run is accepted under the same policy and cap
    other = FederatedSite(session(world, config, "b"), config, tmp_path / "b-1", policy=policy, run_id="run-3")
    run_study(other, 2)
    assert other.ledger is not None and other.ledger.dataset != ledger.dataset
    assert other.ledger.epsilon() == pytest.approx(epsilon_of([run], DELTA))
    assert ledger.epsilon() == pytest.approx(two)


def test_a_round_that_would_pass_the_cap_is_refused_before_the_model_is_touched(world, plan, tmp_path):
    config = study(world)
    run = plan["run"]
    cap = (epsilon_of([run, run], DELTA) + epsilon_of([run, run, plan["round"]], DELTA)) / 2
    policy = site_policy(world, tmp_path / "site-state", cap)
    run_study(FederatedSite(session(world, config), config, policy=policy, run_id="first"), 2)
    late = FederatedSite(session(world, config), config, policy=policy, run_id="late")  # fits: one run spent
    run_study(FederatedSite(session(world, config), config, policy=policy, run_id="concurrent"), 2)
    before = weights(late)
    other_weights = {k: v + 1.0 for k, v in before.items()}
    with pytest.raises(LifetimeBudgetError) as refused:
        late.train_round(other_weights, server_round=1)
    assert "round 1 of run late" in refused.value.detail
    assert late.privacy is not None and late.privacy.steps == 0
    assert largest_change(before, weights(late)) == 0.0
    assert "late" not in [r["run"] for r in late.ledger.runs()]


def test_a_restart_continues_the_runs_entry_without_counting_it_twice(world, plan, tmp_path):
    config = study(world)
    run, rnd = plan["run"], plan["round"]
    cap = (epsilon_of([run], DELTA) + epsilon_of([run, rnd], DELTA)) / 2  # exactly one run's budget
    policy = site_policy(world, tmp_path / "site-state", cap)
    first = FederatedSite(session(world, config), config, tmp_path / "process-1", policy=policy, run_id="7")
    arrays = weights(first)
    first.train_round(arrays, server_round=1)
    assert [r["steps"] for r in first.ledger.runs()] == [rnd[2]]
    # the SuperNode restarts: a new process, and the per-run folder (privacy.json) is gone
    restarted = FederatedSite(session(world, config), config, tmp_path / "process-2", policy=policy, run_id=7)
    restarted.train_round(arrays, server_round=2)
    assert restarted.privacy is not None and restarted.privacy.steps == run[2]  # continued from the ledger's round 1
    runs = read_ledger(restarted.ledger.path)["datasets"][restarted.ledger.dataset]["runs"]
    assert [(r["run"], r["steps"], r["planned_steps"]) for r in runs] == [("7", run[2], run[2])]
    assert restarted.ledger.epsilon() == pytest.approx(epsilon_of([run], DELTA))
    with pytest.raises(CldlrError, match="would exceed"):  # the run's own target is spent too
        restarted.train_round(arrays, server_round=3)


def test_a_dp_site_under_a_policy_needs_the_run_id(world, tmp_path):
    config = study(world)
    with pytest.raises(CldlrError, match="run_id=context.run_id"):
        FederatedSite(session(world, config), config, policy=site_policy(world, tmp_path, 10.0))
    plain = study(world, dp=False)  # no DP: no ledger, no run id needed
    assert FederatedSite(session(world, plain), plain, policy=site_policy(world, tmp_path, 10.0)).ledger is None


def test_the_dataset_key_follows_the_bytes_not_the_folder(world, tmp_path):
    schema = load_schema(world["schema"])
    key = dataset_key(read_site(world["a"], schema))
    copy_dir = shutil.copytree(world["a"], tmp_path / "renamed-site")
    assert dataset_key(read_site(copy_dir, schema)) == key
    clinical = copy_dir / "clinical.csv"
    clinical.write_text(clinical.read_text().replace("left", "right", 1))
    assert dataset_key(read_site(copy_dir, schema)) != key
    assert dataset_key(read_site(world["b"], schema)) != key


@pytest.fixture
def pinned_entropy(monkeypatch):
    """DP randomness as it was before: fixed by a number the centre knows (here 0), not drawn from the OS."""
    monkeypatch.setattr(privacy_module, "os_generator", lambda device="cpu": torch.Generator(device=device).manual_seed(0))


def two_updates(world: dict[str, Path], *, dp: bool) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Two trainings from the same global weights, data and ``run.seed`` (what a hostile centre can replay)."""
    config = study(world, "run.seed=3", dp=dp)
    sites = [FederatedSite(session(world, config), config) for _ in range(2)]
    arrays = weights(sites[0])
    assert largest_change(arrays, weights(sites[1])) == 0.0
    first, second = (site.train_round(copy.deepcopy(arrays), server_round=1)[0] for site in sites)
    return first, second


def test_attack_3_dp_noise_and_sampling_do_not_follow_the_centres_seed(world):
    assert largest_change(*two_updates(world, dp=True)) > 1e-3


def test_attack_3_replayed_randomness_would_give_the_same_update(world, pinned_entropy):
    """The control: with the randomness fixed, the update is a function of what the centre knows."""
    assert largest_change(*two_updates(world, dp=True)) == 0.0


def test_runs_without_dp_stay_seeded_and_reproducible(world):
    assert largest_change(*two_updates(world, dp=False)) == 0.0
