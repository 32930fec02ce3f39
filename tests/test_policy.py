"""The site's own policy, lifetime ε ledger and audit log, as pure functions (no Flower, no centre)."""

from __future__ import annotations

import json
import multiprocessing

import pytest

from cldlr.client.audit import AuditEntry, AuditLog, RecordSummary, read_audit, summarize_audit
from cldlr.client.policy import (
    PolicyRefusal,
    check_class_counts,
    check_histogram_ranges,
    check_secagg_group,
    check_study,
    load_policy,
    policy_from_dict,
)
from cldlr.client.privacy import epsilon_of
from cldlr.client.privacy_ledger import LifetimeBudgetError, LifetimeLedger, describe_ledger
from cldlr.common.config import Config
from cldlr.common.data.schema import schema_from_dict
from cldlr.common.errors import CldlrError, ConfigError

SCHEMA = {"name": "t", "version": 1, "parameters": [
    {"name": "age", "type": "numeric", "unit": "years", "range": [18, 98], "missing": "error"}]}


@pytest.fixture
def policy(tmp_path):
    return policy_from_dict({"schema": str(tmp_path / "schema.yaml"), "folders": {"state": str(tmp_path / "state")}})


def config(**overrides):
    return Config().replace(**overrides)


def test_default_policy_file_loads_and_names_its_folders(tmp_path):
    from pathlib import Path

    text = (Path(__file__).parents[1] / "configs" / "policy" / "site.yaml").read_text()
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    loaded = load_policy(path)
    assert loaded.min_parties >= 3 and not loaded.allow_single_site
    assert loaded.cache_dir.parent == loaded.state_dir == loaded.log_dir.parent


@pytest.mark.parametrize("data, message", [
    ({"min_partys": 3}, "unknown config key(s) min_partys"),
    ({"min_parties": 1}, "min_parties must be >= 2"),
    ({"dp": {"epsilon_cap": -1.0}}, "dp.epsilon_cap must be a finite number > 0"),
    ({"folders": {"state": ""}}, "folders.state must name"),
    ({"approved_fabs": ["ABC"]}, "not a lowercase sha256"),
])
def test_bad_policy_is_an_error_naming_the_key(tmp_path, data, message):
    base = {"schema": "s.yaml", "folders": {"state": str(tmp_path)}}
    for key, value in data.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        policy_from_dict(base, source="site.yaml")


def test_study_checks_refuse_with_a_generic_public_reason(policy):
    schema = schema_from_dict(SCHEMA, source="t")
    check_study(policy, config(**{"federation.num_sites": 3}), schema, schema)
    with pytest.raises(PolicyRefusal) as info:
        check_study(policy, config(**{"federation.num_sites": 1}), schema, schema)
    assert info.value.public == "too few sites in the study" and "num_sites=1" in info.value.detail
    other = schema_from_dict({**SCHEMA, "name": "other"}, source="o")
    with pytest.raises(PolicyRefusal, match="schema differs"):
        check_study(policy, config(), other, schema)
    strict = policy_from_dict({"schema": "s", "folders": {"state": "x"}, "dp": {"required": True}})
    with pytest.raises(PolicyRefusal, match="requires DP-SGD"):
        check_study(strict, config(), schema, schema)
    dp = config(**{"privacy.enabled": True, "privacy.target_epsilon": 1.0, "privacy.delta": 1e-3,
                   "privacy.max_grad_norm": 1.0})
    with pytest.raises(PolicyRefusal, match="δ is larger"):
        check_study(strict, dp, schema, schema)


def test_single_site_studies_only_where_the_policy_allows(tmp_path):
    schema = schema_from_dict(SCHEMA, source="t")
    single = policy_from_dict({"schema": "s", "folders": {"state": "x"}, "allow_single_site": True})
    check_study(single, config(**{"federation.num_sites": 1}), schema, schema)
    with pytest.raises(PolicyRefusal):
        check_study(single, config(**{"federation.num_sites": 2}), schema, schema)


@pytest.mark.parametrize("sample, shares, threshold, ok", [
    (3, 3, 2, True), (5, 5, 3, True), (2, 2, 2, False), (5, 5, 2, False), (5, 2, 2, False), (4, 4, 2, False)])
def test_secagg_groups_need_enough_parties_and_a_majority_threshold(policy, sample, shares, threshold, ok):
    if ok:
        check_secagg_group(policy, sample_num=sample, share_num=shares, threshold=threshold)
    else:
        with pytest.raises(PolicyRefusal):
            check_secagg_group(policy, sample_num=sample, share_num=shares, threshold=threshold)


def test_histograms_finer_than_the_data_or_outside_the_schema_are_refused(policy):
    schema = schema_from_dict(SCHEMA, source="t")
    age_sd = {"age": 12.0}
    check_histogram_ranges(policy, schema, {"age": (18.0, 98.0)}, bins=1000, spread=age_sd)  # the first pass
    check_histogram_ranges(policy, schema, {"age": (25.0, 85.0)}, bins=1000, spread=age_sd)  # mean ± 5 SD
    with pytest.raises(PolicyRefusal, match="finer") as info:  # the attack: 0.01-year bins on [40, 50]
        check_histogram_ranges(policy, schema, {"age": (40.0, 50.0)}, bins=1000, spread=age_sd)
    assert "age: bin width 0.01 < 0.06" in info.value.detail
    with pytest.raises(PolicyRefusal, match="more bins"):
        check_histogram_ranges(policy, schema, {"age": (18.0, 98.0)}, bins=5000, spread=age_sd)
    with pytest.raises(PolicyRefusal, match="outside"):
        check_histogram_ranges(policy, schema, {"age": (0.0, 120.0)}, bins=10, spread=age_sd)
    no_floor = policy_from_dict({"schema": "s", "folders": {"state": "x"}, "finest_bin_sd": 0.0})
    check_histogram_ranges(no_floor, schema, {"age": (40.0, 50.0)}, bins=1000, spread=age_sd)


def test_class_counts_below_the_minimum_are_refused(policy):
    check_class_counts(policy, {"train": (10, 5)})
    with pytest.raises(PolicyRefusal, match="too few cases"):
        check_class_counts(policy, {"train": (10, 5), "test": (4, 9)})


def test_lifetime_ledger_composes_runs_and_refuses_past_the_cap(tmp_path):
    ledger = LifetimeLedger(tmp_path, "data-1", delta=1e-5, cap=10.0)
    run = [(1.0, 0.05, 200)]
    first = ledger.check(run, what="run a")
    ledger.record("a", run)
    second = ledger.check(run, what="run b")
    assert second == pytest.approx(epsilon_of(run + run, 1e-5)) and first < second < 10.0
    ledger.record("b", run)
    with pytest.raises(LifetimeBudgetError, match="lifetime ε"):
        ledger.check(run * 3, what="run c")
    ledger.record("b", run)  # a run's later rounds replace its own entry, never double-count it
    assert ledger.epsilon() == pytest.approx(second)
    assert LifetimeLedger(tmp_path, "data-2", delta=1e-5, cap=10.0).epsilon() == 0.0  # other data, own budget
    assert "run b" in describe_ledger(tmp_path, 1e-5) and f"{second:.3f}" in describe_ledger(tmp_path, 1e-5)


def _record(path, run):
    LifetimeLedger(path, "d", delta=1e-5, cap=100.0).record(run, [(1.0, 0.01, 10)])


def test_lifetime_ledger_keeps_every_run_written_concurrently(tmp_path):
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.starmap(_record, [(tmp_path, f"r{i}") for i in range(8)])
    assert sorted(r["run"] for r in LifetimeLedger(tmp_path, "d", delta=1e-5, cap=1.0).runs()) == [f"r{i}" for i in range(8)]


def test_a_corrupt_ledger_is_an_error_not_a_fresh_budget(tmp_path):
    (tmp_path / "privacy-ledger.json").write_text("{not json")
    with pytest.raises(CldlrError, match="never delete it"):
        LifetimeLedger(tmp_path, "d", delta=1e-5, cap=1.0).epsilon()


def test_audit_log_lists_what_left_and_never_values(tmp_path):
    log = AuditLog(tmp_path)
    weights = RecordSummary("arrays", "arrays", {"0.weight": [4, 3]}, 48)
    metrics = RecordSummary("metrics", "metrics", {"num-examples": "int"}, 8)
    log.write(AuditEntry(7, 1, "train", "backbone", False, "sent", (weights, metrics)))
    log.write(AuditEntry(7, 1, "train", "secure-sum", True, "sent", (RecordSummary("fitres", "config", {"masked": "list"}, 80),)))
    log.write(AuditEntry(7, 1, "query.sum", "plain-sum", False, "refused: too few sites in the study"))
    entries = list(read_audit(tmp_path))
    assert [e["decision"] for e in entries] == ["sent", "sent", "refused: too few sites in the study"]
    assert entries[0]["nbytes"] == 56 and entries[0]["records"][0]["entries"] == {"0.weight": [4, 3]}
    summary = summarize_audit(tmp_path)
    assert "run 7: 2 sent (80 bytes masked by SecAgg+, 56 bytes plaintext), 1 refused" in summary
    assert "metrics.num-examples" in summary and "too few sites" in summary
    (tmp_path / "audit.jsonl").open("a").write("garbage\n")
    with pytest.raises(CldlrError, match=r"audit.jsonl:4"):
        list(read_audit(tmp_path))
    assert json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[0])["run"] == 7
