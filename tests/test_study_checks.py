"""What only the registries can refuse is refused where a study starts, before anything trains.

Strategy and backbone names are plain strings in the config (``cldlr.common`` imports neither
Flower nor the model zoo); DP-SGD with a BatchNorm backbone or with FedProx is refused from the
registries' flags at the CLI, at each ``--compare`` arm and at the ServerApp.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_schema, write_site
from torch import nn

from cldlr.cli import main
from cldlr.common.config import load_config
from cldlr.common.errors import ConfigError
from cldlr.common.models.backbones import BACKBONES, build_model, check_backbone
from cldlr.server.strategies import STRATEGIES, check_study_config
from cldlr.simulations.compare import comparison_arms

REPO = Path(__file__).resolve().parents[1]
DP = ["privacy.enabled=true", "privacy.target_epsilon=8", "privacy.delta=1e-5", "privacy.max_grad_norm=1"]


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_each_backbones_batchnorm_flag_matches_its_layers(name: str) -> None:
    model = build_model(load_config(None, [f"model.backbone={name}", "model.weights=none"]).model)
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    assert BACKBONES[name].batchnorm == any(isinstance(m, norms) for m in model.modules())


@pytest.mark.parametrize("backbone", [n for n, b in sorted(BACKBONES.items()) if b.batchnorm])
def test_dp_with_a_batchnorm_backbone_is_refused_at_the_boundary(backbone: str) -> None:
    config = load_config(None, [*DP, f"model.backbone={backbone}"])  # the config alone cannot tell
    with pytest.raises(ConfigError, match=f"{backbone} has BatchNorm; use one without it \\(.*vgg11.*\\)"):
        check_study_config(config)
    check_backbone(config.model, private=False)


def test_dp_with_fedprox_is_refused_and_the_others_pass() -> None:
    with pytest.raises(ConfigError, match="FedProx's proximal term would be overwritten by DP-SGD's noisy gradient; "
                                          "use federation.strategy=fedadam, fedavg or fedyogi"):
        check_study_config(load_config(None, [*DP, "federation.strategy=fedprox"]))
    for name in ("fedavg", "fedadam", "fedyogi"):
        assert check_study_config(load_config(None, [*DP, f"federation.strategy={name}"])) is STRATEGIES[name]


@pytest.mark.parametrize(("override", "message"), [
    ("federation.strategy=fedadamw", "unknown federation.strategy 'fedadamw'; available: fedadam, fedavg, fedprox, fedyogi"),
    ("federation.compare_strategies=[fedavg, fedprx]", "unknown federation.compare_strategies[1] 'fedprx'; available:"),
    ("model.backbone=resnet50", "unknown model.backbone 'resnet50'; available: alexnet, densenet201"),
])
def test_unknown_names_are_refused_with_the_available_ones(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_study_config(load_config(None, [override]))
    assert message in str(info.value)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_the_shipped_configs_pass_the_checks(path: Path) -> None:
    assert check_study_config(load_config(path)).name == "fedavg"


def test_the_cli_refuses_dp_with_batchnorm_before_reading_any_site(tmp_path: Path, capsys) -> None:
    code = main(["simulate", "configs/paper.yaml", *(x for s in [*DP, "model.backbone=vgg19_bn", "data.root=/nowhere",
                                                                 f"run.output_dir={tmp_path / 'runs'}"] for x in ("--set", s))])
    assert code == 2
    assert "vgg19_bn has BatchNorm" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_compare_arms_come_from_the_registry_and_dp_skips_what_cannot_take_it() -> None:
    arms, skipped = comparison_arms(load_config(None, ["federation.proximal_mu=0.1"]))
    assert [entry.name for entry, _ in arms] == ["fedavg", "fedprox"] and skipped == {}  # the registry's compared ones
    assert all(arm.federation.strategy == entry.name and arm.federation.mode == "federated" for entry, arm in arms)
    arms, skipped = comparison_arms(load_config(None, [*DP, "federation.proximal_mu=0.1"]))
    assert "fedprox" not in [entry.name for entry, _ in arms] and [entry.name for entry, _ in arms]
    assert skipped == {"FedProx (μ=0.1)": STRATEGIES["fedprox"].dp_reason}
    arms, _ = comparison_arms(load_config(None, ["federation.compare_strategies=[fedyogi, fedavg]"]))
    assert [entry.name for entry, _ in arms] == ["fedyogi", "fedavg"]


def test_compare_refuses_an_explicit_dp_incompatible_arm_before_the_first_arm_trains(tmp_path: Path, capsys) -> None:
    site, schema = write_site(tmp_path / "site"), write_schema(tmp_path / "schema.yaml")
    sets = [*DP, f"data.root={site}", f"data.schema={schema}", f"data.cache_dir={tmp_path / 'cache'}", "run.name=cmp",
            f"run.output_dir={tmp_path / 'runs'}", "data.image_size=32", "model.backbone=tiny", "model.weights=none",
            "federation.compare_strategies=[fedavg, fedprox]"]
    code = main(["simulate", "configs/paper.yaml", "--compare", *(x for s in sets for x in ("--set", s))])
    assert code == 2
    assert "federation.compare_strategies names fedprox with privacy.enabled" in capsys.readouterr().err
    run = tmp_path / "runs" / "cmp"
    assert not run.exists() or not any(run.iterdir())  # not even the pooled arm started
