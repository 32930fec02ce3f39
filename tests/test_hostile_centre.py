"""A hostile centre drives the real ClientApp in one process (no network): every attack is refused.

The centre here builds Flower messages by hand and hands them to ``cldlr.client.app.app`` the way
a SuperNode does (``ClientApp.__call__`` with the node's ``Context``), so every handler and mod
runs as deployed. It also plays SuperNodes of its own (:class:`FakeNode`) to take SecAgg+ rounds
as far as the site's masked vector. Each refusal must reach the centre as a short generic reason,
and appear in the site's log and its ``audit.jsonl`` with the detail.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import write_schema, write_site
from flwr.app import ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict
from flwr.common.secure_aggregation.crypto.symmetric_encryption import encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_concat
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from cldlr import __version__
from cldlr.client import app as client_app
from cldlr.client.audit import read_audit
from cldlr.client.node_policy import detach_site_log
from cldlr.client.outbound import describe_reply
from cldlr.client.secure_sum import FITINS_CONFIG
from cldlr.common.clinical.stats import StatisticsLayout
from cldlr.common.config import Config, dump_config, load_config
from cldlr.common.data.roi import PIPELINE_VERSION
from cldlr.common.data.schema import Schema, load_schema
from cldlr.common.models.backbones import build_model
from cldlr.common.models.weights import model_to_arrays
from cldlr.common.secure.sums import SPEC_KEY, ScalePlan, SecureSumSpec
from cldlr.common.secure.tasks import CLINICAL_STATS, HANDSHAKE, PLAIN_SUM
from cldlr.common.secure.wire import arrays_to_record

NODE = 7  # the hospital's SuperNode
CENTRE = 1
TINY = ["model.backbone=tiny", "model.weights=none", "data.image_size=32", "train.batch_size=8",
        "federation.local_epochs=1", "federation.rounds=2", "evaluation.min_count=1"]
_RUNS = iter(range(100, 10_000))


@dataclass
class Hospital:
    """The site as its operator set it up: data, its own schema copy, a policy file; and the study."""

    root: Path
    data: Path
    schema_path: Path
    schema: Schema

    def policy(self, name: str, **rules: Any) -> Path:
        """A policy file with the default rules unless ``rules`` say otherwise; state in ``root/<name>``."""
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"schema": str(self.schema_path), "folders": {"state": str(self.root / name)}, **rules}))
        return path

    def study(self, *overrides: str) -> Config:
        """The centre's study config (its cache folder is the centre's, not the site's)."""
        return load_config(None, [f"data.schema={self.schema_path}", f"data.cache_dir={self.root / 'centre-cache'}",
                                  *TINY, "federation.num_sites=3", *overrides])


@pytest.fixture(autouse=True)
def _site_log_detached() -> Iterator[None]:
    yield
    detach_site_log()  # the site's log file belongs to this test's hospital only


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Hospital:
    root = tmp_path_factory.mktemp("hospital")
    schema_path = write_schema(root / "schema.yaml")
    data = write_site(root / "site", n_patients=24, images_per_patient=2, size=40, seed=3, with_split=True)
    return Hospital(root, data, schema_path, load_schema(schema_path))


def node_context(hospital: Hospital, policy: Path | None) -> Context:
    """The SuperNode's context: its node config names the data and (normally) the policy."""
    config: dict[str, Any] = {"data-path": str(hospital.data)}
    if policy is not None:
        config["policy"] = str(policy)
    return Context(run_id=next(_RUNS), node_id=NODE, node_config=config, state=RecordDict(), run_config={})


def deliver(context: Context, message_type: str, content: RecordDict) -> Message:
    """What the SuperNode does with a message from the centre: ``app(message, context)``."""
    msg = Message(content, metadata=Metadata(
        run_id=context.run_id, message_id=uuid.uuid4().hex, src_node_id=CENTRE, dst_node_id=NODE, reply_to_message_id="",
        group_id="1", created_at=time.time(), ttl=600.0, message_type=message_type))
    return client_app.app(msg, context)


def handshake(hospital: Hospital, context: Context, config: Config) -> Message:
    offer = ConfigRecord({"version": __version__, "pipeline": PIPELINE_VERSION, "config-yaml": dump_config(config),
                          "schema-yaml": hospital.schema.to_yaml()})
    return deliver(context, HANDSHAKE, RecordDict({"handshake": offer}))


def audit(policy: Path) -> list[dict[str, Any]]:
    return list(read_audit(yaml.safe_load(policy.read_text())["folders"]["state"]))


def assert_refused(reply: Message, reason: str, caplog: pytest.LogCaptureFixture, policy: Path, detail: str) -> None:
    """The centre reads only ``reason``; the site's log and audit file keep ``detail``."""
    assert reply.has_error(), "the site answered a request its policy forbids"
    assert reply.error.reason == reason
    assert detail in caplog.text
    assert any(e["decision"].startswith("refused") and detail in e["decision"] for e in audit(policy)), audit(policy)


def clinical_spec(hospital: Hospital, *, bound: float = 1000.0, payload: dict[str, Any] | None = None,
                  task: str = CLINICAL_STATS) -> SecureSumSpec:
    length = StatisticsLayout.from_schema(hospital.schema).size
    return SecureSumSpec(task, uuid.uuid4().hex, ScalePlan.from_bounds(bound, length, 8.0), 0, length, payload or {})


# -- SecAgg+ as a centre with SuperNodes of its own would run it -------------------------------------------------
class FakeNode:
    """A SuperNode the hostile centre registered itself: it has real SecAgg+ keys."""

    def __init__(self, nid: int) -> None:
        self.nid = nid
        (_, pk1), (sk2, pk2) = generate_key_pairs(), generate_key_pairs()
        self.pk1, self.pk2 = public_key_to_bytes(pk1), public_key_to_bytes(pk2)
        self.sk2 = private_key_to_bytes(sk2)

    def share_for(self, site_pk2: bytes) -> bytes:
        """The encrypted key shares this node forwards to the site (stage 2 input)."""
        key = generate_shared_key(bytes_to_private_key(self.sk2), bytes_to_public_key(site_pk2))
        return encrypt(key, share_keys_plaintext_concat(self.nid, NODE, b"seed-share", b"key-share"))


def secagg(context: Context, stage: str, entries: dict[str, Any], extra: RecordDict | None = None) -> Message:
    content = extra if extra is not None else RecordDict()
    content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord({Key.STAGE: stage, **entries})
    return deliver(context, "train", content)


def setup(context: Context, sample: int, share: int, threshold: int) -> Message:
    return secagg(context, Stage.SETUP, {Key.SAMPLE_NUMBER: sample, Key.SHARE_NUMBER: share, Key.THRESHOLD: threshold,
                                         Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 2**22, Key.MOD_RANGE: 2**32,
                                         Key.MAX_WEIGHT: 1.0})


def secure_round(context: Context, spec: SecureSumSpec, others: list[FakeNode]) -> Message:
    """Setup, share keys and collect with ``others`` as the neighbours; the collect reply (or refusal)."""
    keys = setup(context, len(others) + 1, len(others) + 1, 2)
    assert not keys.has_error(), keys.error.reason
    site_pk = keys.content.config_records[RECORD_KEY_CONFIGS]
    pk1, pk2 = bytes(site_pk[Key.PUBLIC_KEY_1]), bytes(site_pk[Key.PUBLIC_KEY_2])  # type: ignore[arg-type]
    shared = secagg(context, Stage.SHARE_KEYS, {str(NODE): [pk1, pk2], **{str(o.nid): [o.pk1, o.pk2] for o in others}})
    assert not shared.has_error(), shared.error.reason
    fitins = RecordDict({FITINS_CONFIG: ConfigRecord({SPEC_KEY: spec.to_json()})})
    return secagg(context, Stage.COLLECT_MASKED_VECTORS,
                  {Key.CIPHERTEXT_LIST: [o.share_for(pk2) for o in others], Key.SOURCE_LIST: [o.nid for o in others]}, fitins)


def joined(hospital: Hospital, policy: Path, *overrides: str) -> Context:
    context = node_context(hospital, policy)
    reply = handshake(hospital, context, hospital.study(*overrides))
    assert not reply.has_error(), reply.error.reason
    return context


# -- attack 1: a one-site study, plaintext sums, fine histogram bins ---------------------------------------------
def test_a_one_site_study_is_refused_and_no_plaintext_sum_leaves(hospital: Hospital, caplog) -> None:
    policy = hospital.policy("one-site")
    caplog.set_level(logging.INFO)
    context = node_context(hospital, policy)
    assert_refused(handshake(hospital, context, hospital.study("federation.num_sites=1")),
                   "refused by the site's policy: too few sites in the study", caplog, policy,
                   "federation.num_sites=1 < min_parties=3")
    context = joined(hospital, policy)  # the same site joins an honest three-site study
    request = RecordDict({"sum": ConfigRecord({"task": CLINICAL_STATS, "payload": "{}"})})
    reply = deliver(context, PLAIN_SUM, request)
    assert_refused(reply, "refused by the site's policy: a plaintext sum of this site alone", caplog, policy,
                   "federation.num_sites=3, allow_single_site=False")
    # the site's folders are its policy's: the ROI cache is not where the centre's config points
    assert not (hospital.root / "centre-cache").exists()
    assert list((hospital.root / "one-site" / "cache").glob("*.safetensors"))
    assert "refused" in (hospital.root / "one-site" / "logs" / "site.log").read_text()


def test_histogram_bins_finer_than_the_policy_allows_are_refused(hospital: Hospital, caplog) -> None:
    policy = hospital.policy("single", allow_single_site=True)
    context = joined(hospital, policy, "federation.num_sites=1")

    def plain_sum(payload: dict[str, Any]) -> Message:
        request = ConfigRecord({"task": CLINICAL_STATS, "payload": json.dumps(payload)})
        return deliver(context, PLAIN_SUM, RecordDict({"sum": request}))

    coarse = plain_sum({"histogram_ranges": {"age": [18, 100]}})  # the schema's range, 1000 bins: the default allows it
    assert not coarse.has_error(), coarse.error.reason
    assert coarse.content.array_records["sum"]["vector"].numpy().shape == (StatisticsLayout.from_schema(hospital.schema).size,)
    fine = plain_sum({"histogram_ranges": {"age": [40, 50]}})  # 0.01-year bins: close to one patient per bin
    assert_refused(fine, "refused by the site's policy: histogram bins finer than the site allows", caplog, policy,
                   "age: bin width 0.01")
    assert [e["phase"] for e in audit(policy)] == ["handshake", "plain-sum", "plain-sum"]


# -- attack 2: SecAgg+ groups the centre chose, and differencing -------------------------------------------------
def test_a_secure_round_over_too_few_sites_gets_not_even_the_sites_keys(hospital: Hospital, caplog) -> None:
    policy = hospital.policy("small-group")
    context = joined(hospital, policy)
    assert_refused(setup(context, 2, 2, 2), "refused by the site's policy: secure round over too few sites", caplog,
                   policy, "sample_num=2 < min_parties=3")
    assert RECORD_KEY_STATE not in context.state.config_records  # Flower's SecAgg+ never ran: no keys were made
    assert_refused(setup(context, 3, 3, 1), "refused by the site's policy: secure round with too low a reconstruction "
                   "threshold", caplog, policy, "threshold=1 is not a majority of share_num=3")
    refusals = [e for e in audit(policy) if e["decision"] != "sent"]
    assert [e["phase"] for e in refusals] == ["secure-sum: setup"] * 2 and not any(e["records"] for e in refusals)


def test_the_same_sum_over_another_set_of_sites_is_refused(hospital: Hospital, caplog) -> None:
    policy = hospital.policy("differencing")
    context = joined(hospital, policy)
    a, b, c = FakeNode(21), FakeNode(22), FakeNode(23)
    spec = clinical_spec(hospital)
    first = secure_round(context, spec, [a, b])
    assert not first.has_error(), first.error.reason
    masked = first.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
    assert masked and not any(len(r) for r in first.content.array_records.values())  # the vector left masked only
    unmasked = secagg(context, Stage.UNMASK, {Key.ACTIVE_NODE_ID_LIST: [NODE, a.nid, b.nid], Key.DEAD_NODE_ID_LIST: []})
    assert not unmasked.has_error(), unmasked.error.reason
    again = secure_round(context, clinical_spec(hospital), [a, c])  # same task and payload, one site swapped
    assert_refused(again, "refused by the site's policy: the same sum again over other sites", caplog, policy,
                   f"now asked over {sorted([NODE, a.nid, c.nid])}")
    retry = secure_round(context, clinical_spec(hospital), [b, a])  # the first set again: a retry, answered
    assert not retry.has_error(), retry.error.reason
    # a centre that calls a live site dead at unmask would get that site's mask: refused
    tricked = secagg(context, Stage.UNMASK, {Key.ACTIVE_NODE_ID_LIST: [NODE, a.nid], Key.DEAD_NODE_ID_LIST: [a.nid]})
    assert_refused(tricked, "refused by the site's policy: a site both active and dropped in one secure round", caplog,
                   policy, f"nodes [{a.nid}] are in both lists")
    phases = [e["phase"] for e in audit(policy) if e["decision"] == "sent"]
    assert phases[1:5] == ["secure-sum: setup", "secure-sum: share_keys", f"secure-sum {CLINICAL_STATS}: collect_masked_vectors",
                           f"secure-sum {CLINICAL_STATS}: unmask"]
    assert all(e["secure"] for e in audit(policy) if e["decision"] == "sent" and e["phase"].startswith("secure-sum"))


def test_requests_outside_the_protocol_are_refused(hospital: Hospital, caplog) -> None:
    policy = hospital.policy("protocol")
    context = joined(hospital, policy)
    a, b = FakeNode(31), FakeNode(32)
    assert_refused(secure_round(context, clinical_spec(hospital, task="raw-rows"), [a, b]),
                   "refused by the site's policy: a secure-sum task outside the protocol", caplog, policy, "'raw-rows'")
    short = clinical_spec(hospital)
    short = SecureSumSpec(short.task, short.call_id, ScalePlan.from_bounds(1000.0, 5, 8.0), 0, 5)
    reply = secure_round(context, short, [a, b])
    assert reply.has_error()
    assert reply.error.reason.startswith("the site's vector has another length than the centre expects")


# -- attack 5: error replies carry no values ----------------------------------------------------------------------
def test_a_bound_violation_reaches_the_centre_without_its_value(hospital: Hospital, caplog) -> None:
    policy = hospital.policy("bounds")
    context = joined(hospital, policy)
    reply = secure_round(context, clinical_spec(hospital, bound=1e-3), [FakeNode(41), FakeNode(42)])
    assert reply.has_error()
    assert reply.error.reason == "a value exceeds its secure-sum bound"
    assert not re.search(r"\d", reply.error.reason)  # not one digit of the site's data
    assert "exceeds the announced bound" in caplog.text  # the site's own log has the whole story
    (entry,) = [e for e in audit(policy) if e["decision"] != "sent"]
    assert entry["phase"] == f"secure-sum {CLINICAL_STATS}: collect_masked_vectors" and "element" in entry["decision"]


def test_a_supernode_without_a_policy_refuses_to_join(hospital: Hospital) -> None:
    reply = handshake(hospital, node_context(hospital, None), hospital.study())
    assert reply.has_error()
    assert "policy=" in reply.error.reason and "configs/policy/site.yaml" in reply.error.reason


# -- attack 6: plaintext training metrics -------------------------------------------------------------------------
DP = ("privacy.enabled=true", "privacy.target_epsilon=8", "privacy.delta=1e-5", "privacy.max_grad_norm=1.0")


@pytest.mark.parametrize(("rules", "study", "expected"), [
    ({}, (), {"num-examples"}),
    ({"share_training_metrics": True}, (), {"num-examples", "train-loss", "train-accuracy"}),
    ({"share_training_metrics": True}, DP, {"num-examples", "epsilon", "delta"}),  # never un-noised metrics under DP
], ids=["default", "shared", "shared-but-dp"])
def test_train_metrics_stay_at_the_site_unless_its_policy_shares_them(hospital: Hospital, rules: dict[str, Any],
                                                                     study: tuple[str, ...], expected: set[str]) -> None:
    policy = hospital.policy(f"metrics-{len(rules)}-{len(study)}", **rules)
    context = joined(hospital, policy, *study)
    config = hospital.study(*study)
    weights = arrays_to_record(model_to_arrays(build_model(config.model)))
    reply = deliver(context, "train", RecordDict({"arrays": weights, "config": ConfigRecord({"global-round": 1})}))
    assert not reply.has_error(), reply.error.reason
    metrics = set(reply.content.metric_records["metrics"])
    assert metrics == expected
    (entry,) = [e for e in audit(policy) if e["phase"] == "train"]
    assert entry["decision"] == "sent" and not entry["secure"]
    records = {r["key"]: r for r in entry["records"]}
    assert set(records["metrics"]["entries"]) == metrics and records["arrays"]["kind"] == "arrays"
    assert records["arrays"]["nbytes"] == reply.content.array_records["arrays"].count_bytes() > 0
    assert all(isinstance(shape, list) for shape in records["arrays"]["entries"].values())  # shapes, never values


def test_the_audit_line_is_on_disk_before_the_reply_leaves(hospital: Hospital, monkeypatch) -> None:
    policy = hospital.policy("audit-first")
    context = node_context(hospital, policy)
    from cldlr.client import audit as audit_module

    def fail(self: Any, entry: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(audit_module.AuditLog, "write", fail)
    reply = handshake(hospital, context, hospital.study())
    assert reply.has_error() and "audit" in reply.error.reason and not reply.has_content()  # joined, but said nothing


def test_the_audit_names_every_record_and_entry_but_no_value() -> None:
    content = RecordDict({"local": ConfigRecord({"shared": False, "metrics": "", "ids": []}),
                          "scores": MetricRecord({"auc": 0.9317})})
    metadata = Metadata(run_id=1, message_id="m", src_node_id=NODE, dst_node_id=CENTRE, reply_to_message_id="", group_id="",
                        created_at=0.0, ttl=60.0, message_type="query.local_metrics")
    local, scores = describe_reply(Message(content, metadata=metadata))
    assert (local.key, local.kind, local.entries) == ("local", "config", {"shared": "bool", "metrics": "str", "ids": "list"})
    assert local.nbytes == len("shared") + 1 + len("metrics") + len("ids")  # Flower's count_bytes raises on "" and []
    assert (scores.kind, scores.entries) == ("metrics", {"auc": "float"}) and "0.93" not in json.dumps(scores.__dict__)
