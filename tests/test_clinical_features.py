"""The clinical encoder fitted from summed vectors equals the encoder fitted on the pooled data."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cldlr.common.clinical.features import ClinicalEncoder, encoder_sums, encoder_sums_length, select_encoder_sums
from cldlr.common.data.schema import Schema


def make_frame(n: int = 90, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "age": rng.normal(55, 9, n).clip(18, 100),
        "size_mm": rng.uniform(3, 40, n),
        "palpable": (rng.random(n) < 0.35).astype(float),
        "side": rng.choice(["left", "right"], n, p=[0.3, 0.7]).astype(object),
        "birads": rng.choice(["4a", "4b"], n),
    })
    frame.loc[rng.choice(n, 8, replace=False), "age"] = np.nan
    frame.loc[rng.choice(n, 6, replace=False), "palpable"] = np.nan
    frame.loc[rng.choice(n, 7, replace=False), "side"] = None
    return frame


def selected(schema: Schema) -> list:
    return [schema.get(n) for n in ("age", "palpable", "side")]


def test_fit_on_union_equals_from_summed_vectors_of_three_parts(tiny_schema: Schema) -> None:
    frame, params = make_frame(), selected(tiny_schema)
    pooled = ClinicalEncoder.fit(frame, params)
    parts = [frame.iloc[:20], frame.iloc[20:55], frame.iloc[55:]]
    summed = np.sum([encoder_sums(p, params) for p in parts], axis=0)
    np.testing.assert_allclose(summed, encoder_sums(frame, params), rtol=1e-12)
    fed = ClinicalEncoder.from_sums(summed, params)
    assert fed.impute[1:] == pooled.impute[1:] and fed.impute[0] == pytest.approx(pooled.impute[0], rel=1e-12)
    np.testing.assert_allclose(fed.mean, pooled.mean, rtol=1e-12)
    np.testing.assert_allclose(fed.sd, pooled.sd, rtol=1e-10)
    np.testing.assert_allclose(fed.transform(frame), pooled.transform(frame), rtol=1e-9, atol=1e-12)


def test_sums_of_all_candidates_contain_those_of_any_selection(tiny_schema: Schema) -> None:
    frame = make_frame()
    candidates = [tiny_schema.get(n) for n in ("age", "size_mm", "palpable", "side")]
    everything = encoder_sums(frame, candidates)
    assert everything.size == encoder_sums_length(candidates)  # what the centre expects before asking
    for chosen in ([], selected(tiny_schema), [tiny_schema.get("side"), tiny_schema.get("age")]):
        np.testing.assert_array_equal(select_encoder_sums(everything, candidates, chosen), encoder_sums(frame, chosen))
    with pytest.raises(ValueError, match="birads"):
        select_encoder_sums(everything, candidates, [tiny_schema.get("birads")])
    with pytest.raises(ValueError, match="entries"):
        select_encoder_sums(everything[:-1], candidates, [])


def test_imputation_values_are_training_mean_and_mode(tiny_schema: Schema) -> None:
    frame = make_frame()
    enc = ClinicalEncoder.fit(frame, selected(tiny_schema))
    assert enc.impute[0] == pytest.approx(frame.age.mean(), rel=1e-12)  # pandas skips NaN
    assert enc.impute[1] == float(frame.palpable.mode()[0])
    assert enc.impute[2] == frame.side.mode()[0]
    assert enc.feature_names == ["age", "palpable", "side=left", "side=right"]


def test_transform_is_standardized_and_imputed_on_training_data(tiny_schema: Schema) -> None:
    frame = make_frame()
    enc = ClinicalEncoder.fit(frame, selected(tiny_schema))
    out = enc.transform(frame)
    assert out.shape == (len(frame), 4) and np.isfinite(out).all()
    np.testing.assert_allclose(out.mean(axis=0), 0.0, atol=1e-10)
    np.testing.assert_allclose(out.std(axis=0), 1.0, rtol=1e-10)
    # the imputed rows carry the training mean / mode
    age_missing = frame.age.isna().to_numpy()
    np.testing.assert_allclose(out[age_missing, 0], 0.0, atol=1e-10)
    side_missing = frame.side.isna().to_numpy()
    mode_col = 2 + ["left", "right"].index(enc.impute[2])
    assert (out[side_missing, mode_col] > 0).all()


def test_constant_column_gets_unit_sd(tiny_schema: Schema) -> None:
    frame = make_frame()
    frame["palpable"] = 1.0
    enc = ClinicalEncoder.fit(frame, selected(tiny_schema))
    assert enc.sd[1] == 1.0
    np.testing.assert_allclose(enc.transform(frame)[:, 1], 0.0)


def test_dict_round_trip_is_json_and_equivalent(tiny_schema: Schema) -> None:
    frame = make_frame()
    enc = ClinicalEncoder.fit(frame, selected(tiny_schema))
    back = ClinicalEncoder.from_dict(json.loads(json.dumps(enc.to_dict())))
    assert back.parameters == enc.parameters and back.feature_names == enc.feature_names
    np.testing.assert_array_equal(back.transform(frame), enc.transform(frame))
    broken = enc.to_dict() | {"sd": enc.to_dict()["sd"][:-1]}
    with pytest.raises(ValueError, match="inconsistent"):
        ClinicalEncoder.from_dict(broken)


def test_test_rows_use_training_statistics_only(tiny_schema: Schema) -> None:
    train, test = make_frame(seed=1), make_frame(n=30, seed=2)
    enc = ClinicalEncoder.fit(train, selected(tiny_schema))
    out = enc.transform(test)
    age = test.age.fillna(train.age.mean()).to_numpy()
    np.testing.assert_allclose(out[:, 0], (age - enc.mean[0]) / enc.sd[0], rtol=1e-9, atol=1e-9)
    assert not np.allclose(out.mean(axis=0), 0.0)


def test_refusals(tiny_schema: Schema) -> None:
    frame, params = make_frame(), selected(tiny_schema)
    with pytest.raises(ValueError, match="model_input"):
        ClinicalEncoder.fit(frame, [tiny_schema.get("birads")])
    with pytest.raises(ValueError, match="expected"):
        ClinicalEncoder.from_sums(encoder_sums(frame, params)[:-1], params)
    empty = frame.assign(age=np.nan)
    with pytest.raises(ValueError, match="'age' has no observed value"):
        ClinicalEncoder.fit(empty, params)
    enc = ClinicalEncoder.fit(frame, params)
    with pytest.raises(ValueError, match="'side', row 3"):
        enc.transform(frame.assign(side=["up" if i == 3 else "left" for i in range(len(frame))]))


def test_no_selected_parameters_gives_empty_block() -> None:
    frame = make_frame()
    enc = ClinicalEncoder.fit(frame, [])
    assert enc.transform(frame).shape == (len(frame), 0) and enc.feature_names == []
