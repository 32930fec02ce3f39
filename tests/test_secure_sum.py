"""Secure sum over sites: scaling maths, site replies, and a 3-site SecAgg+ simulation that never leaks a vector."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from secagg_app import LONG_BOUND, SMALL_BLOCKS, fingerprints, leaks, site_vector

from cldlr.client.secure_sum import FITINS_CONFIG, build_fitres_content
from cldlr.common.config import SecAggConfig
from cldlr.common.secure.sums import (
    SPEC_KEY,
    ScalePlan,
    SecureSumError,
    SecureSumSpec,
    check_capacity,
    quantization_error_bound,
    resolution_per_site,
    round_to_integers,
    scale_for_bound,
    split_rounds,
)
from cldlr.server.secure_sum import secure_sum, wait_for_sites

TESTS = Path(__file__).resolve().parent
C, Q = SecAggConfig().clipping_range, SecAggConfig().quantization_range


def _flower_sum(scaled: list[np.ndarray], seed: int) -> np.ndarray:
    """Sum exactly as SecAgg+ does with unit weights: quantize per site, add integers, dequantize."""
    np.random.seed(seed)  # Flower's stochastic rounding draws from numpy's global generator
    total = sum(quantize([x], C, Q)[0].astype(np.int64) for x in scaled)
    mean = (dequantize([total], C, Q)[0] - (len(scaled) - 1) * C) / len(scaled)
    return mean * len(scaled)


# --- pure maths -------------------------------------------------------------------------------


def test_scale_round_trip_maps_bounds_onto_clipping_range() -> None:
    plan = ScalePlan.from_bounds([(3, 500.0), (2, 5000.0)], 5, C)
    v = np.array([500.0, -250.0, 1.5, -5000.0, 4999.0])
    x = plan.scale(v)
    assert np.max(np.abs(x)) == pytest.approx(C) and np.all(np.abs(x) <= C)
    np.testing.assert_allclose(plan.unscale(x), v, rtol=1e-15)
    assert scale_for_bound(500.0, C) == pytest.approx(C / 500.0)


def test_sum_through_flower_quantization_stays_within_error_bound() -> None:
    rng = np.random.default_rng(0)
    n, length, bound = 3, 20_000, 1000.0
    plan = ScalePlan.from_bounds(bound, length, C)
    sites = [rng.uniform(-bound, bound, length) for _ in range(n)]
    secure = plan.unscale(_flower_sum([plan.scale(v) for v in sites], seed=1))
    err = np.abs(secure - np.sum(sites, axis=0))
    limit = plan.error_bound(n, Q)
    assert np.all(err <= limit)
    assert err.max() > 0.3 * limit.max()  # the bound is tight, not vacuous
    assert limit[0] == pytest.approx(n * resolution_per_site(bound, Q), rel=1e-4)  # + float64 slack


def test_error_bound_grows_with_bound_and_sites() -> None:
    one = quantization_error_bound(1.0, 1, Q)
    assert quantization_error_bound(10.0, 1, Q) == pytest.approx(10 * one)
    assert quantization_error_bound(1.0, 4, Q) == pytest.approx(4 * one)
    assert one == pytest.approx(2.0 / Q, rel=1e-5, abs=2e-12)  # + float64 slack
    with pytest.raises(SecureSumError):
        quantization_error_bound(1.0, 0, Q)


@pytest.mark.parametrize(
    ("vector", "message"),
    [([1.0, 2.0, 600.0], "element 2"), ([1.0, np.nan, 0.0], "finite"), ([1.0, 2.0], "length 3")],
)
def test_scale_refuses_what_secagg_would_silently_clip(vector: list[float], message: str) -> None:
    with pytest.raises(SecureSumError, match=message):
        ScalePlan.from_bounds(500.0, 3, C).scale(vector)


def test_per_element_bounds_become_blocks() -> None:
    bounds = np.array([5.0, 5.0, 5.0, 80.0, 80.0, 5.0])
    plan = ScalePlan.from_bounds(bounds, 6, C)
    assert plan.blocks == ((3, 5.0), (2, 80.0), (1, 5.0))
    np.testing.assert_array_equal(plan.bounds(), bounds)
    assert ScalePlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    with pytest.raises(SecureSumError, match="add up"):
        ScalePlan.from_bounds([(2, 1.0), (2, 1.0)], 5, C)
    with pytest.raises(SecureSumError, match="> 0"):
        ScalePlan.from_bounds(0.0, 5, C)


def test_integer_sums_are_exact_only_when_fine_enough() -> None:
    rng = np.random.default_rng(3)
    counts = [rng.integers(0, 300, 500).astype(float) for _ in range(3)]
    plan = ScalePlan.from_bounds(300.0, 500, C)
    total = plan.unscale(_flower_sum([plan.scale(c) for c in counts], seed=2))
    np.testing.assert_array_equal(round_to_integers(total, plan.error_bound(3, Q)), np.sum(counts, axis=0))
    with pytest.raises(SecureSumError, match="below 0.5"):
        round_to_integers(total, ScalePlan.from_bounds(1e9, 500, C).error_bound(3, Q))


def test_capacity_and_slices() -> None:
    check_capacity(3, Q, 2**32)
    with pytest.raises(SecureSumError, match="wrap"):
        check_capacity(1024, Q, 2**32)
    with pytest.raises(SecureSumError, match="2\\*\\*31"):
        check_capacity(3, 2**31, 2**40)
    slices = split_rounds(263_169, 65_536)
    assert slices[0] == (0, 65_536) and sum(c for _, c in slices) == 263_169
    assert all(a + n == b for (a, n), (b, _) in zip(slices, slices[1:]))
    assert split_rounds(10, None) == [(0, 10)]


def test_spec_round_trip_carries_numpy_payload() -> None:
    plan = ScalePlan.from_bounds(2.0, 4, C)
    spec = SecureSumSpec("svm-sums", "abc", plan, 1, 3, {"means": np.array([0.5, 1.5]), "a": np.float32(2.0)})
    back = SecureSumSpec.from_json(spec.to_json())
    assert (back.task, back.call_id, back.offset, back.count, back.plan) == ("svm-sums", "abc", 1, 3, plan)
    assert back.payload == {"means": [0.5, 1.5], "a": 2.0} and back.is_last_round
    with pytest.raises(SecureSumError, match="malformed"):
        SecureSumSpec.from_json("{not json")
    with pytest.raises(SecureSumError, match="outside"):
        SecureSumSpec.from_json(SecureSumSpec("t", "c", plan, 3, 5).to_json())


# --- site side (no Flower runtime needed) ----------------------------------------------------


def _context(partition: int = 0) -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": partition}, state=RecordDict(), run_config={})


def _fitins(spec: SecureSumSpec) -> RecordDict:
    return RecordDict({FITINS_CONFIG: ConfigRecord({SPEC_KEY: spec.to_json()})})


def test_site_reply_has_legacy_fitres_layout_with_scaled_slices() -> None:
    calls: list[dict[str, Any]] = []

    def task(payload: Any, context: Context) -> np.ndarray:
        calls.append(dict(payload))
        return np.arange(10.0) * payload["k"]

    plan = ScalePlan.from_bounds(100.0, 10, C)
    ctx = _context()
    pieces = []
    for offset, count in split_rounds(10, 4):
        content = build_fitres_content(_fitins(SecureSumSpec("t", "id1", plan, offset, count, {"k": 3})), ctx, {"t": task})
        assert content.metric_records["fitres.num_examples"]["num_examples"] == 1
        assert content.config_records["fitres.status"]["code"] == 0
        assert content.config_records["fitres.metrics"]["call-id"] == "id1"
        pieces.append(content.array_records["fitres.parameters"].to_numpy_ndarrays()[0])
    np.testing.assert_allclose(plan.unscale(np.concatenate(pieces)), np.arange(10.0) * 3)
    assert len(calls) == 1  # computed once, cached across slices
    assert not ctx.state.array_records and not ctx.state.config_records  # cache dropped after the last slice


def test_site_reply_fails_clearly_on_wrong_length_or_unknown_task() -> None:
    spec = SecureSumSpec("clinical-stats", "id", ScalePlan.from_bounds(10.0, 4, C), 0, 4)
    with pytest.raises(SecureSumError, match="length 4"):
        build_fitres_content(_fitins(spec), _context(), {"clinical-stats": lambda p, c: np.ones(5)})
    with pytest.raises(SecureSumError, match="no secure-sum task 'clinical-stats'"):
        build_fitres_content(_fitins(spec), _context(), {})
    with pytest.raises(SecureSumError, match="not a secure-sum request"):
        build_fitres_content(RecordDict(), _context(), {})


def test_the_task_mapping_is_explicit_and_a_missing_task_names_the_ones_there_are() -> None:
    def fn(payload: Any, context: Context) -> np.ndarray:
        return np.full(2, float(context.node_config["partition-id"]))

    tasks = {"per-site": fn, "other": lambda p, c: np.zeros(2)}
    spec = SecureSumSpec("per-site", "id", ScalePlan.from_bounds(4.0, 2, C), 0, 2)
    content = build_fitres_content(_fitins(spec), _context(partition=2), tasks)
    np.testing.assert_allclose(content.array_records["fitres.parameters"].to_numpy_ndarrays()[0], [C / 2, C / 2])
    assert spec.is_reply_to(content.config_records["fitres.metrics"])
    assert not SecureSumSpec("per-site", "id", spec.plan, 1, 1).is_reply_to(content.config_records["fitres.metrics"])
    missing = SecureSumSpec("missing", "id", spec.plan, 0, 2)
    with pytest.raises(SecureSumError, match="no secure-sum task 'missing' \\(it answers: other, per-site\\)"):
        build_fitres_content(_fitins(missing), _context(), tasks)


# --- centre side: argument checks before any network traffic -------------------------------


class _FewNodes:
    def get_node_ids(self) -> list[int]:
        return [1, 2]


def test_centre_refuses_bad_requests_before_sending() -> None:
    ctx = _context()
    with pytest.raises(SecureSumError, match="min_sites"):
        secure_sum(_FewNodes(), ctx, task="t", length=3, bound=1.0, num_sites_expected=3, min_sites=4)  # type: ignore[arg-type]
    with pytest.raises(SecureSumError, match="below 0.5"):
        secure_sum(_FewNodes(), ctx, task="t", length=3, bound=1e9, num_sites_expected=3, integer=True)  # type: ignore[arg-type]
    with pytest.raises(SecureSumError, match="only 2 of 3"):
        secure_sum(_FewNodes(), ctx, task="t", length=3, bound=1.0, num_sites_expected=3, wait_for_sites_s=0)  # type: ignore[arg-type]
    assert wait_for_sites(_FewNodes(), 2, 0) == [1, 2]  # type: ignore[arg-type]


# --- 3 simulated sites through Flower's SecAgg+ (Ray) -----------------------------------------

LONG = 513 * 513  # an LS-SVM Gram matrix of 512 random features + bias


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("secagg")
    settings = {"output": str(out / "result.json"), "sites": 3, "record-dir": str(out / "sent"), "long-length": LONG,
                "bad-task": True}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(TESTS / "secagg_app.py"), json.dumps(settings)],
        capture_output=True, text=True, timeout=600, env=env, cwd=out,
    )
    assert proc.returncode == 0 and (out / "result.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text()), out / "sent"


def _plain(task: str, payload: dict[str, Any]) -> np.ndarray:
    return np.sum([site_vector(task, p, payload) for p in range(3)], axis=0)


@pytest.mark.parametrize("task", ["small", "long", "counts"])
def test_secure_sum_equals_plain_sum(demo: tuple[dict[str, Any], Path], task: str) -> None:
    result = demo[0][task]
    assert "error" not in result, result.get("error")
    values, limit = np.array(result["values"]), np.array(result["error_bound"])
    plain = _plain(task, result["payload"])
    assert values.shape == plain.shape and result["num_sites"] == 3 and len(set(result["node_ids"])) == 3
    if task == "counts":
        np.testing.assert_array_equal(values, plain)
    else:
        assert np.all(np.abs(values - plain) <= limit), np.max(np.abs(values - plain) - limit)


def test_failures_are_reported_not_swallowed(demo: tuple[dict[str, Any], Path]) -> None:
    results = demo[0]
    assert results["passthrough"] == {"train": True, "query": True}  # other messages bypass SecAgg+
    assert "halted" in results["bad"]["error"] and "length 4" in results["bad"]["error"]
    assert "only 2 sites contributed" in results["one-bad"]["error"] and "length 4" in results["one-bad"]["error"]


def test_leak_detector_sees_a_plaintext_vector() -> None:
    v = np.random.default_rng(5).uniform(-3, 3, 50)
    fp = fingerprints(v)
    for dtype in (np.float32, np.float64):
        blob = np.frombuffer(b"\x01\x02\x03" + v[10:14].astype(dtype).tobytes() + b"\x04", dtype=np.uint8)
        assert leaks({"bytes/x": blob}, fp) == ["bytes/x"]
    assert leaks({"numbers/x": v[7:8]}, fp) == ["numbers/x"]  # a single element is enough
    assert leaks({"text/x": np.frombuffer(f"debug {v[3]:.6g}".encode(), np.uint8)}, fp) == ["text/x"]
    random_bytes = np.frombuffer(np.random.default_rng(6).bytes(4096), dtype=np.uint8)
    assert leaks({"bytes/x": random_bytes, "text/y": np.frombuffer(b"1.5 call 0.25", np.uint8)}, fp) == []


def test_no_site_vector_leaves_a_site_in_plaintext(demo: tuple[dict[str, Any], Path]) -> None:
    results, sent = demo
    masked_seen = 0
    for partition in range(3):
        files = sorted(sent.glob(f"site{partition}-*.npz"))
        assert files, f"site {partition} recorded nothing"
        vectors = {
            "small": (site_vector("small", partition, results["small"]["payload"]), ScalePlan.from_bounds(SMALL_BLOCKS, 6, C)),
            "long": (site_vector("long", partition, results["long"]["payload"]), ScalePlan.from_bounds(LONG_BOUND, LONG, C)),
        }
        secret = fingerprints(*[v for vec, plan in vectors.values() for v in (vec, plan.scale(vec))])
        for path in files:
            with np.load(path) as npz:
                blobs = {k: npz[k] for k in npz.files}
            if "count/fitres.parameters" in blobs:
                assert blobs["count/fitres.parameters"][0] == 0  # SecAgg+ emptied the plaintext ArrayRecord
            assert not leaks(blobs, secret), path.name
            masked = [np.load(io.BytesIO(blobs[k].tobytes())) for k in blobs if "masked_params" in k]
            if masked and masked[-1].size == LONG:
                masked_seen += 1
                quantized = np.rint((vectors["long"][1].scale(vectors["long"][0]) + C) * Q / (2 * C))
                assert np.mean(np.abs(masked[-1] - quantized) <= 1) < 0.01  # nothing like the site's integers
    assert masked_seen == 3  # every site did upload its (masked) long vector
