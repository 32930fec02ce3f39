"""Typed config: YAML + overrides, unknown keys and wrong types rejected with the key's name."""

from __future__ import annotations

from pathlib import Path

import pytest

from cldlr.common.config import Config, apply_overrides, load_config
from cldlr.common.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_paper_defaults_load() -> None:
    config = load_config(REPO / "configs" / "paper.yaml")
    assert (config.train.lr, config.train.epochs, config.train.batch_size) == (0.005, 200, 16)
    assert config.data.image_size == 224 and config.model.backbone == "vgg11"


def test_overrides_are_typed(tmp_path: Path) -> None:
    config = load_config(None, ["train.epochs=3", "data.root=/x", "svm.C=2", "train.amp=false"])
    assert config.train.epochs == 3 and config.data.root == "/x" and config.svm.C == 2.0
    assert config.train.amp is False
    again = apply_overrides(config, ["federation.sites=[a, b]"])
    assert again.federation.sites == ("a", "b") and again.train.epochs == 3


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=3", "unknown config key(s) train.epoch"),
        ("trian.epochs=3", "unknown config key(s) trian"),
        ("train.epochs=three", "train.epochs: expected an integer"),
        ("train.lr=fast", "train.lr: expected a number"),
        ("train.amp=maybe", "train.amp: expected true/false"),
        ("svm.solver=magic", "svm.solver: 'magic' is not one of"),
        ("train.lr=-1", "train.lr must be > 0"),
        ("noequals", "must look like section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_partial_dp_is_refused() -> None:
    with pytest.raises(ConfigError, match="privacy.delta"):
        load_config(None, ["privacy.enabled=true", "privacy.target_epsilon=8", "privacy.max_grad_norm=1"])
    with pytest.raises(ConfigError, match="privacy.enabled is false"):
        load_config(None, ["privacy.target_epsilon=8"])


def test_unknown_key_in_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 2\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="train.learning_rate"):
        load_config(path)


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(AttributeError):
        config.train.epochs = 5  # type: ignore[misc]


def test_exponent_notation_is_a_number() -> None:
    assert load_config(None, ["train.lr=1e-4"]).train.lr == 1e-4


def test_server_optimizer_settings_are_typed_and_checked() -> None:
    config = load_config(None, ["federation.strategy=fedadam", "federation.server_opt.eta=0.05",
                                "federation.server_opt.tau=1e-4"])
    assert (config.federation.server_opt.eta, config.federation.server_opt.tau) == (0.05, 1e-4)
    assert config.federation.server_opt.beta_1 is None  # Flower's default for the chosen strategy
    assert apply_overrides(config, ["federation.server_opt.eta=null"]).federation.server_opt.eta is None
    for override, message in [("federation.server_opt.eta=0", "federation.server_opt.eta must be > 0"),
                              ("federation.server_opt.beta_2=1", "federation.server_opt.beta_2 must be in [0, 1)"),
                              ("federation.server_opt.tau=-1", "federation.server_opt.tau must be > 0"),
                              ("federation.server_opt.eta_l=0.1", "unknown config key(s) federation.server_opt.eta_l"),
                              ("federation.server_opt.eta=fast", "federation.server_opt.eta: 'fast' matches none")]:
        with pytest.raises(ConfigError) as info:
            load_config(None, [override])
        assert message in str(info.value)


def test_strategy_names_are_strings_checked_against_the_registry_later() -> None:
    # the config cannot import the server's registry: any lower-case name loads, a malformed one does not
    assert load_config(None, ["federation.strategy=fedsomething"]).federation.strategy == "fedsomething"
    for override, message in [("federation.strategy=FedAvg!", "federation.strategy: 'FedAvg!' is not a strategy name"),
                              ("federation.compare_strategies=[fedavg, fedavg]", "names a strategy twice")]:
        with pytest.raises(ConfigError, match=None) as info:
            load_config(None, [override])
        assert message in str(info.value)
