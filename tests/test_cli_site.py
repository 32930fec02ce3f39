"""``cldlr privacy`` and ``cldlr audit``: a site's privacy officer reads the site's own files."""

from __future__ import annotations

import pytest
import yaml

from cldlr.cli import main
from cldlr.client.audit import AuditEntry, AuditLog, RecordSummary
from cldlr.client.privacy import epsilon_of
from cldlr.client.privacy_ledger import LifetimeLedger

RUN = [(1.1, 0.2, 40)]


@pytest.fixture
def state(tmp_path):
    ledger = LifetimeLedger(tmp_path / "state", "d" * 64, delta=1e-5, cap=10.0)
    ledger.record("101", RUN, site="hospital-a", delta=1e-5, cap=10.0)
    ledger.record("102", RUN, site="hospital-a", delta=1e-5, cap=8.0)
    return tmp_path / "state"


def test_privacy_prints_the_ledger_at_the_recorded_delta(state, capsys):
    assert main(["privacy", str(state)]) == 0
    out = capsys.readouterr().out
    assert "ε at δ=1e-05" in out and "run 101 (site hospital-a): 40 steps" in out and "run 102" in out
    assert f"total: ε = {epsilon_of(RUN + RUN, 1e-5):.3f}, cap 8 at run 102" in out


def test_privacy_states_epsilon_at_the_delta_asked_for(state, tmp_path, capsys):
    assert main(["privacy", str(state), "--delta", "1e-3"]) == 0
    assert f"total: ε = {epsilon_of(RUN + RUN, 1e-3):.3f}" in capsys.readouterr().out
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"schema": "schema.yaml", "folders": {"state": str(state)}, "dp": {"delta": 1e-2}}))
    assert main(["privacy", str(state), "--policy", str(policy)]) == 0
    out = capsys.readouterr().out
    assert "ε at δ=0.01" in out and f"total: ε = {epsilon_of(RUN + RUN, 1e-2):.3f}" in out


def test_privacy_errors_name_what_to_pass(state, tmp_path, capsys):
    assert main(["privacy", str(tmp_path / "missing")]) == 2
    assert "folders.state" in capsys.readouterr().err
    assert main(["privacy", str(state), "--delta", "2"]) == 2
    assert "δ must be in (0, 1)" in capsys.readouterr().err
    LifetimeLedger(tmp_path / "bare", "e" * 64, delta=1e-5, cap=1.0).record("1", RUN)  # no δ recorded
    assert main(["privacy", str(tmp_path / "bare")]) == 2
    assert "--delta D or --policy FILE" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["privacy", str(tmp_path / "empty")]) == 0
    assert "no DP training recorded" in capsys.readouterr().out


def test_audit_summarizes_what_left_the_site(tmp_path, capsys):
    log = AuditLog(tmp_path)
    log.write(AuditEntry(5, 1, "train", "backbone", False, "sent", (RecordSummary("arrays", "arrays", {"w": [2, 2]}, 16),)))
    log.write(AuditEntry(5, 1, "query.sum", "plain-sum", False, "refused: too few sites in the study"))
    assert main(["audit", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "run 5: 1 sent (0 bytes masked by SecAgg+, 16 bytes plaintext), 1 refused" in out
    assert "arrays.w" in out and "too few sites" in out
    assert main(["audit", str(tmp_path / "nowhere")]) == 2
    assert "state folder" in capsys.readouterr().err
