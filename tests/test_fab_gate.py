"""The hospital's FAB gate and ``cldlr deploy fab-hash`` (fast; the gate against real Flower processes is in
tests/test_deployment_pinning.py).

The hash a site approves must be the one of the FAB ``flwr run`` packs; the gate must start a
ClientApp only for an approved hash and a ClientApp task only; stopping the gate must stop the
ClientApps it started, even one that ignores SIGTERM (Flower's exit path can hang when the
SuperNode went away first).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from deploy_harness import write_policy
from flwr.cli.build import build_fab_from_disk

from cldlr.cli import main
from cldlr.client.fab_gate import FabGate, approved_fabs, fab_sha256, stop_clientapps
from cldlr.common.errors import CldlrError


def _policy(tmp_path: Path, approved: list[str]) -> Path:
    return write_policy(tmp_path / "site-policy.yaml", approved=approved, schema=tmp_path / "schema.yaml",
                        state=tmp_path / "state")


def test_fab_hash_is_the_hash_of_the_fab_flwr_run_packs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expected = hashlib.sha256(build_fab_from_disk(REPO)).hexdigest()
    assert fab_sha256(REPO) == expected
    assert main(["deploy", "fab-hash"]) == 0 and capsys.readouterr().out.strip() == expected
    fab = tmp_path / "app.fab"
    fab.write_bytes(build_fab_from_disk(REPO))
    assert main(["deploy", "fab-hash", str(fab)]) == 0 and capsys.readouterr().out.strip() == expected
    (tmp_path / "README").write_text("not an app")
    with pytest.raises(CldlrError, match="neither a .fab file nor a Flower app folder"):
        fab_sha256(tmp_path)


def test_gate_runs_only_approved_clientapps(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    approved = fab_sha256(REPO)
    gate = FabGate("127.0.0.1:9100", approved_fabs(_policy(tmp_path, [approved])))
    assert gate.decide("flwr-clientapp", approved) is None
    assert "not approved" in str(gate.decide("flwr-clientapp", "0" * 64))
    assert "not a ClientApp" in str(gate.decide("flwr-agentapp", approved))
    assert "not approved" in str(gate.decide("flwr-clientapp", ""))
    assert not FabGate("127.0.0.1:9100", approved_fabs(_policy(tmp_path, []))).approved
    assert "every run will be refused" in caplog.text


def test_stopping_the_gate_stops_its_clientapps_even_stuck_ones(caplog: pytest.LogCaptureFixture) -> None:
    stuck = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                              "print('ready', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    polite = subprocess.Popen(["sleep", "120"])
    assert stuck.stdout is not None and stuck.stdout.readline().strip() == "ready"
    started = time.monotonic()
    stop_clientapps(grace_s=1.0)
    assert time.monotonic() - started < 10
    for child in (stuck, polite):
        assert not Path(f"/proc/{child.pid}").exists(), child.args  # gone and reaped, not a zombie
    assert f"[{stuck.pid}] did not stop" in caplog.text and str(polite.pid) not in caplog.text
