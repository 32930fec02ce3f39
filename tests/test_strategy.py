"""The centre's aggregation: invalid updates are excluded, the round goes on, averaging is float32."""

from __future__ import annotations

import numpy as np
import pytest

from cldlr.common.errors import CldlrError
from cldlr.server.strategy import Reply, make_strategy


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
