"""The centre's aggregation: invalid updates are excluded, the round goes on, averaging is float32,
and a wrapped Flower strategy (FedAdam, FedYogi, FedMedian) aggregates with its own method.
"""

from __future__ import annotations

from unittest.mock import Mock

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedYogi
from flwr.supercore.task_identity import TaskIdentity

from cldlr.common.config import FederationConfig, ServerOptConfig
from cldlr.common.errors import CldlrError, ConfigError
from cldlr.common.secure.wire import record_to_arrays
from cldlr.server.strategies import STRATEGIES, StrategyEntry, make_strategy, register_strategy
from cldlr.server.strategy import CheckedStrategy, Reply


@pytest.fixture
def strategy():
    reference = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    s = make_strategy("fedavg", min_sites=2, proximal_mu=0.0)
    s.setup(reference=reference, min_sites=2, transfer_dtype="float16", node_names={1: "a", 2: "b", 3: "c"})
    return s


def update(value: float, n: int, node: int, **changes) -> Reply:
    arrays = {"w": np.full((2, 3), value, np.float16), "b": np.full(3, value, np.float16)}
    arrays.update(changes)
    return Reply(node, arrays=arrays, metrics={"num-examples": n, "train-loss": 0.5}, nbytes=18)


def test_weighted_average_of_float16_updates_is_float32(strategy) -> None:
    average, metrics = strategy.aggregate_replies(1, [update(1.0, 1, 1), update(4.0, 3, 2)])
    np.testing.assert_allclose(average["w"], 3.25)
    assert average["w"].dtype == np.float32 and metrics["num-sites"] == 2


@pytest.mark.parametrize("bad", [
    {"w": np.full((2, 3), np.nan, np.float16)},
    {"b": np.array([np.inf, 0, 0], np.float16)},
    {"w": np.zeros((3, 2), np.float16)},
    {"extra": np.zeros(1, np.float16)},
])
def test_nan_inf_or_wrong_shape_is_excluded_and_round_continues(strategy, bad) -> None:
    average, metrics = strategy.aggregate_replies(1, [update(1.0, 1, 1), update(3.0, 1, 2), update(9.0, 1, 3, **bad)])
    np.testing.assert_allclose(average["w"], 2.0)
    assert metrics["num-sites"] == 2
    assert set(strategy.rounds[-1].rejected) == {3}


def test_too_few_valid_updates_stop_the_run(strategy) -> None:
    with pytest.raises(CldlrError, match="only 1 valid update"):
        strategy.aggregate_replies(1, [update(1.0, 1, 1), Reply(2, error="node unavailable")])
    assert strategy.rounds[-1].rejected == {2: "node unavailable"}


# -- the wrapper around Flower's own strategies, on Message replies built as Flower's tests build them --------


@pytest.fixture
def flower_task():
    """Flower stamps every message it builds with the task of its process (a ServerApp's runtime sets it)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


def grid(nodes=(1, 2, 3)) -> Grid:
    fake = Mock(spec=Grid)
    fake.get_node_ids.return_value = list(nodes)
    return fake


def metadata(node: int) -> Metadata:
    return Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="", group_id="",
                    created_at=0.0, ttl=60.0, message_type=MessageType.TRAIN)


def reply(node: int, arrays: dict[str, np.ndarray], n: float, **metrics: float) -> Message:
    """A site's train reply as it reaches the centre: one ArrayRecord, one MetricRecord with num-examples."""
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": n, **metrics})})
    return Message(content, metadata=metadata(node))


def global_model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}


def site_updates(model: dict[str, np.ndarray], seed: int, sites: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{k: (v + rng.normal(scale=0.3, size=v.shape)).astype(np.float32) for k, v in model.items()} for _ in range(sites)]


def flower_kwargs() -> dict:
    return dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=2, min_evaluate_nodes=0, min_available_nodes=2)


@pytest.mark.parametrize(("name", "flower_class"), [("fedadam", FedAdam), ("fedyogi", FedYogi)])
def test_a_server_optimizer_takes_its_own_step_inside_the_wrapper(flower_task, name, flower_class) -> None:
    settings = ServerOptConfig(eta=0.05, beta_1=0.8, tau=1e-2)
    checked = make_strategy(name, min_sites=2, server_opt=settings)
    bare = flower_class(**flower_kwargs(), eta=0.05, beta_1=0.8, tau=1e-2)
    assert type(checked.strategy) is flower_class and not checked.fast_average
    start = global_model()
    checked.setup(reference=start, min_sites=2, transfer_dtype="float16", node_names={1: "a", 2: "b", 3: "c"})
    ours, theirs = ArrayRecord({k: Array(v) for k, v in start.items()}), ArrayRecord({k: Array(v) for k, v in start.items()})
    for rnd in (1, 2, 3):
        messages = list(checked.configure_train(rnd, ours, ConfigRecord(), grid()))
        list(bare.configure_train(rnd, theirs, ConfigRecord(), grid()))
        # the sites get the model in the transfer dtype; the optimizer keeps it in full precision
        assert {m.content.array_records["arrays"]["w"].numpy().dtype for m in messages} == {np.dtype(np.float16)}
        assert checked.strategy.current_arrays["w"].dtype == np.float32
        updates = site_updates(record_to_arrays(ours), seed=rnd)
        sizes = (5, 7, 11)
        valid = [reply(node, u, n, **{"train-loss": 0.4}) for node, u, n in zip((1, 2), updates, sizes)]
        poisoned = dict(updates[2], w=np.full((3, 4), np.nan, np.float32))
        replies = [*valid, reply(3, poisoned, sizes[2], **{"train-loss": 0.4})] if rnd == 2 else [
            *valid, reply(3, updates[2], sizes[2], **{"train-loss": 0.4})]
        ours, metrics = checked.aggregate_train(rnd, replies)
        # Flower's own FedAdam/FedYogi on the replies the wrapper accepted
        accepted = [reply(node, u, n, **{"train-loss": 0.4}) for node, u, n in zip((1, 2, 3), updates, sizes)
                    if not (rnd == 2 and node == 3)]
        theirs, _ = bare.aggregate_train(rnd, accepted)
        got, want = record_to_arrays(ours), record_to_arrays(theirs)
        for key in start:
            if rnd == 1:  # same inputs: bit for bit (Flower computes in float64, the global model is float32)
                np.testing.assert_array_equal(got[key], want[key].astype(np.float32))
            else:
                np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6)
        assert metrics["num-sites"] == (2 if rnd == 2 else 3)
        mean = {k: sum(n * u[k] for u, n in zip(updates, sizes)) / sum(sizes) for k in start}
        assert not np.allclose(got["w"], mean["w"], atol=1e-3)  # the server step was taken, not just the average
    assert set(checked.rounds[1].rejected) == {3} and "NaN" in checked.rounds[1].rejected[3]


def test_fedavg_and_fedprox_take_the_fused_average_which_equals_flowers(flower_task) -> None:
    start = global_model()
    updates = site_updates(start, seed=4)
    for name in ("fedavg", "fedprox"):
        checked = make_strategy(name, min_sites=2, proximal_mu=0.1)
        assert checked.fast_average
        checked.setup(reference=start, min_sites=2, transfer_dtype="float32", node_names={})
        (message, *_) = checked.configure_train(1, ArrayRecord({k: Array(v) for k, v in start.items()}),
                                                ConfigRecord(), grid())
        assert message.content.config_records["config"].get("proximal-mu") == (0.1 if name == "fedprox" else None)
        ours, _ = checked.aggregate_train(1, [reply(n, u, n) for n, u in zip((1, 2, 3), updates)])
        theirs, _ = FedAvg(**flower_kwargs()).aggregate_train(1, [reply(n, u, n) for n, u in zip((1, 2, 3), updates)])
        for key in start:
            np.testing.assert_allclose(record_to_arrays(ours)[key], record_to_arrays(theirs)[key], rtol=1e-6, atol=1e-7)


def test_any_other_flower_strategy_aggregates_with_its_own_method(flower_task) -> None:
    checked = CheckedStrategy(FedMedian(**flower_kwargs()))
    assert not checked.fast_average
    start = global_model()
    checked.setup(reference=start, min_sites=2, transfer_dtype="float32", node_names={})
    checked.configure_train(1, ArrayRecord({k: Array(v) for k, v in start.items()}), ConfigRecord(), grid())
    updates = site_updates(start, seed=5)
    record, _ = checked.aggregate_train(1, [reply(n, u, 10) for n, u in zip((1, 2, 3), updates)])
    np.testing.assert_allclose(record_to_arrays(record)["w"], np.median([u["w"] for u in updates], axis=0), rtol=1e-6)


def test_a_non_finite_aggregate_never_becomes_the_global_model(flower_task) -> None:
    checked = make_strategy("fedadam", min_sites=2, server_opt=ServerOptConfig(eta=1e39))  # overflows float32
    start = global_model()
    checked.setup(reference=start, min_sites=2, transfer_dtype="float16", node_names={})
    checked.configure_train(1, ArrayRecord({k: Array(v) for k, v in start.items()}), ConfigRecord(), grid())
    replies = [reply(n, u, 10) for n, u in zip((1, 2, 3), site_updates(start, seed=6))]
    with pytest.raises(CldlrError, match=r"round 1: the aggregate of 3 valid update\(s\) by FedAdam is refused .*NaN or Inf"):
        checked.aggregate_train(1, replies)
    assert checked.reference is start


class BrokenAverage(FedAvg):
    """A strategy whose aggregate goes NaN (a diverged server optimizer, a bug in a custom strategy)."""

    def aggregate_train(self, server_round, replies):
        record, metrics = super().aggregate_train(server_round, replies)
        arrays = record_to_arrays(record)
        arrays["b"] = np.full_like(arrays["b"], np.nan)
        return ArrayRecord({k: Array(v) for k, v in arrays.items()}), metrics


def test_a_nan_aggregate_is_refused_whoever_computed_it(flower_task) -> None:
    checked = CheckedStrategy(BrokenAverage(**flower_kwargs()))
    start = global_model()
    checked.setup(reference=start, min_sites=2, transfer_dtype="float32", node_names={})
    with pytest.raises(CldlrError, match=r"by BrokenAverage is refused \(b: contains NaN or Inf\)"):
        checked.aggregate_train(1, [reply(n, u, 10) for n, u in zip((1, 2, 3), site_updates(start, seed=7))])
    assert checked.reference is start


@pytest.mark.parametrize(("n", "why"), [(0, "positive number"), (-3, "positive number"), (float("nan"), "positive number"),
                                        (None, "num-examples")])
def test_a_bad_number_of_examples_is_rejected(strategy, n, why) -> None:
    bad = update(9.0, 1, 3)
    if n is None:
        del bad.metrics["num-examples"]
    else:
        bad.metrics["num-examples"] = n
    average, _ = strategy.aggregate_replies(1, [update(1.0, 1, 1), update(3.0, 1, 2), bad])
    np.testing.assert_allclose(average["w"], 2.0)
    assert why in strategy.rounds[-1].rejected[3]


def test_a_weight_other_than_the_announced_training_images_is_rejected() -> None:
    """Attack: a site (or a forged reply) claims 1e9 examples to make its update the global model."""
    s = make_strategy("fedavg", min_sites=2, proximal_mu=0.0)
    reference = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    s.setup(reference=reference, min_sites=2, transfer_dtype="float32", node_names={1: "a", 2: "b", 3: "c"},
            announced={1: 1, 2: 1, 3: 1})
    average, _ = s.aggregate_replies(1, [update(1.0, 1, 1), update(3.0, 1, 2), update(9.0, 10**9, 3)])
    np.testing.assert_allclose(average["w"], 2.0)
    assert "announced 1 training images" in s.rounds[-1].rejected[3]
    average, _ = s.aggregate_replies(2, [update(1.0, 1, 1), update(3.0, 1, 2), update(8.0, 1, 3)])
    np.testing.assert_allclose(average["w"], 4.0)  # the honest weight is accepted


def test_error_replies_and_replies_without_metrics_are_rejected_by_reason(flower_task, strategy) -> None:
    ok = {"w": np.full((2, 3), 2.0, np.float16), "b": np.full(3, 2.0, np.float16)}
    no_metrics = Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in ok.items()})}), metadata=metadata(3))
    failed = Message(Error(code=0, reason="CUDA out of memory"), metadata=metadata(2))
    record, metrics = strategy.aggregate_train(1, [reply(1, ok, 4), no_metrics, failed, reply(4, ok, 4)])
    assert metrics["num-sites"] == 2
    assert strategy.rounds[-1].rejected == {3: "reply lacks its weights or metrics", 2: "error reply: CUDA out of memory"}


def test_resumed_rounds_are_numbered_globally_and_the_downlink_is_fp16(flower_task, strategy) -> None:
    strategy.round_offset = 4
    model = ArrayRecord({"w": Array(np.ones((2, 3), np.float32)), "b": Array(np.ones(3, np.float32))})
    messages = list(strategy.configure_train(1, model, ConfigRecord({"local-epochs": 1}), grid()))
    assert {m.metadata.dst_node_id for m in messages} == {1, 2, 3}
    config = messages[0].content.config_records["config"]
    assert (config["global-round"], config["server-round"]) == (5, 1)
    assert messages[0].content.array_records["arrays"]["b"].numpy().dtype == np.float16
    strategy.aggregate_train(1, [reply(1, record_to_arrays(model), 1), reply(2, record_to_arrays(model), 1)])
    assert strategy.rounds[-1].round == 5


def test_the_registry_names_every_strategy_and_refuses_unknown_ones() -> None:
    assert {"fedavg", "fedprox", "fedadam", "fedyogi"} <= set(STRATEGIES)
    assert STRATEGIES["fedprox"].proximal and not STRATEGIES["fedprox"].dp_sgd
    assert STRATEGIES["fedadam"].server_optimizer and STRATEGIES["fedadam"].dp_sgd
    with pytest.raises(ConfigError, match="unknown federation.strategy 'fedsgd'; available: fedadam, fedavg, fedprox, fedyogi"):
        make_strategy("fedsgd", min_sites=1)
    with pytest.raises(CldlrError, match="already registered"):
        register_strategy(STRATEGIES["fedavg"])
    with pytest.raises(CldlrError, match="dp_reason"):
        StrategyEntry("x", "X", STRATEGIES["fedavg"].build, dp_sgd=False)


def test_titles_name_the_settings_that_distinguish_an_arm() -> None:
    fed = FederationConfig(proximal_mu=0.05, server_opt=ServerOptConfig(eta=0.02, tau=1e-4))
    assert [STRATEGIES[n].arm_title(fed) for n in ("fedavg", "fedprox", "fedadam")] == [
        "FedAvg", "FedProx (μ=0.05)", "FedAdam (η=0.02, τ=0.0001)"]
    assert STRATEGIES["fedyogi"].arm_title(FederationConfig()) == "FedYogi"
