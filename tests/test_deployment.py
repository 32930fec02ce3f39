"""A real deployment on 127.0.0.1: SuperLink (TLS + SuperNode auth), SuperNodes, ``flwr run``, and its faults.

Everything runs as real Flower 1.41 processes started from the commands ``cldlr deploy`` prints,
each with its own ``FLWR_HOME`` and a free loopback port, all killed in teardown, deployed as
docs/DEPLOY.md says: the SuperLink on 127.0.0.1, the SuperNodes dialling the Fleet-only nginx
proxy, each SuperNode ``--isolation process`` with its FAB gate (the sites pin the cldlr FAB).
One scenario (module fixture) carries the study and its in-run faults; its tests read what it
observed:

* site-4's data fails validation — it connects, refuses the handshake, its log says why (e);
* site-5's policy requires DP-SGD, which the study does not use — it refuses to join, and the
  centre is told the policy's public reason only;
* site-2 sends NaN weights in round 1 — excluded from that round (f) (test-only fault injection
  through ``tests/deploy_faults/sitecustomize.py`` on that SuperNode's PYTHONPATH: the real FAB
  and the real cldlr code run, only its reply is corrupted);
* after round 1 the SuperLink is killed with its ServerApp, restarted on the same database and
  the study resubmitted with ``resume=true`` — round 1 is kept, not redone (b);
* site-3 is killed (SIGKILL) in round 2 — the round completes with sites 1 and 2, the ledger
  names the dropped site and the secure phases go on with the survivors (a);
* the study finishes: report, model bundle and ledger appear; then every process is stopped the
  way an operator would (one SIGTERM) and must leave nothing running.

Each SecAgg+ sum costs four message exchanges, each a fresh ClientApp process behind Flower's
3-s polling (~35 s per sum here), so the study batches its secure sums (7-8 in all); the whole
scenario takes ~8-10 min on 2 cores. Connection refusals (c, d) run against a SuperLink of their own;
the proxy's refusals and an unapproved FAB are in tests/test_deployment_pinning.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO
from deploy_harness import (
    CONNECTION,
    FAULTS_DIR,
    NGINX_MISSING,
    Federation,
    Proc,
    descendants,
    free_port,
    ledger,
    progress,
    run_cli,
    run_finished,
    running,
    wait_for,
    write_policy,
)

from cldlr.client.deploy import supernode_command
from cldlr.client.fab_gate import fab_sha256
from cldlr.common.deploy.launch import Command, flower_command
from cldlr.common.deploy.pki import create_ca
from cldlr.server.deploy import run_command
from cldlr.simulations.phantom import generate_phantom

# the first test of the scenario carries its setup: bound it explicitly (waits inside are bounded too)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
SITES = ("site-1", "site-2", "site-3", "site-4", "site-5")
STUDY = """\
run: {{name: deployed, output_dir: {root}/runs}}
data: {{root: {root}/data, schema: {root}/data/schema.yaml, image_size: 32, cache_dir: {root}/cache}}
model: {{backbone: tiny, weights: none}}
train: {{epochs: 1, batch_size: 8}}
svm: {{solver: rff, embedding_pca: 4, rff_features: 32}}
federation: {{num_sites: 5, min_sites: 2, rounds: 2, local_epochs: 1}}
evaluation: {{min_count: 1}}
"""


def _gone(pids: list[int]) -> bool:
    """True once none of ``pids`` runs any more (zombies waiting for their reaper count as gone)."""
    try:
        return wait_for(lambda: not any(running(p) for p in pids), 15, "the killed processes to exit")
    except TimeoutError:
        return False


def _submit(fed: Federation, study: Path, run_dir: Path, *, resume: bool = False) -> str:
    result = run_cli(run_command(CONNECTION, study, run_dir=run_dir, resume=resume, stream=False),
                     home=fed.cli_home, cwd=fed.root)
    match = re.search(r"started run (\d+)", result.stdout)
    assert result.returncode == 0 and match, result.stdout + result.stderr
    return match.group(1)


def _train_messages(node: Proc, run_id: str) -> int:
    """Train messages of run ``run_id`` the SuperNode has received (it logs "[RUN id, ROUND r]" before each;
    its FAB gate and ClientApps write to the same log, so a few of their lines may come between)."""
    return len(re.findall(rf"\[RUN {run_id}\b[^\n]*\n(?:[^\n]*\n){{0,5}}?[^\n]*Receiving: train message", node.log()))


@dataclass
class Observed:
    """What the scenario saw, for the tests to check."""

    fed: Federation
    run_dir: Path
    after_round_1: dict[str, Any] = field(default_factory=dict)
    stopped_cleanly: bool = False
    run2_start: float = 0.0
    killed_at: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    stopped_at_end: dict[str, bool] = field(default_factory=dict)
    run_id: str = ""


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    if NGINX_MISSING:
        pytest.skip(NGINX_MISSING)
    root = tmp_path_factory.mktemp("deploy")
    fed = Federation(root)
    t0 = time.monotonic()
    try:
        generate_phantom(root / "data", sites=5, images_per_site=24, image_size=96, seed=0)
        clinical = root / "data" / "site-4" / "clinical.csv"
        lines = clinical.read_text().splitlines()
        header = lines[0].split(",")
        row = lines[1].split(",")
        row[header.index("label")] = "maybe"  # an unknown label: the site fails validation
        clinical.write_text("\n".join([lines[0], ",".join(row), *lines[2:]]) + "\n")
        (root / "study.yaml").write_text(STUDY.format(root=root))
        fed.make_pki(SITES)
        fed.start_superlink()
        fed.start_proxy()  # the hospitals come in through nginx (Fleet API only); the CLI uses 127.0.0.1
        for site in SITES:
            fed.register(site)
        faults = {"site-2": {"CLDLR_TEST_FAULT": "nan@1"}, "site-3": {"CLDLR_TEST_HEARTBEAT_S": "20"}}
        approved = [fab_sha256(REPO)]  # each site pins the cldlr FAB; its gate starts only that ClientApp
        for site in SITES:
            strict = {"dp": {"required": True}} if site == "site-5" else {}  # stricter than the study
            policy = write_policy(root / f"policy-{site}.yaml", approved=approved, schema=root / "data" / "schema.yaml",
                                  state=root / f"state-{site}", **strict)
            command = supernode_command(fed.fleet_address, root / "ca" / "ca.crt", fed.node_key(site), root / "data" / site,
                                        port=free_port(), state_dir=root / f"state-{site}", validate=site != "site-4",
                                        policy=policy)
            env = {"PYTHONPATH": str(FAULTS_DIR), **faults[site]} if site in faults else None
            fed.start_site(site, command, policy, env)
        wait_for(lambda: fed.online() == len(SITES), 90, f"{len(SITES)} SuperNodes online")
        obs = Observed(fed, root / "runs" / "study")
        obs.timings["setup"] = time.monotonic() - t0

        # run 1: handshake (site-4 refuses), round 1 (site-2's NaN rejected); then the SuperLink dies
        first_run = _submit(fed, root / "study.yaml", obs.run_dir)
        wait_for(lambda: progress(obs.run_dir).get("completed_rounds", 0) >= 1, 300, "round 1 checkpoint", poll=1)
        obs.after_round_1 = progress(obs.run_dir)
        obs.timings["run1-round1"] = time.monotonic() - t0
        link = fed.procs["superlink"]
        tree = [link.pid, *descendants(link.pid)]  # SuperExec and the running ServerApp (detached sessions)
        link.kill()
        obs.stopped_cleanly = _gone(tree)

        # restart on the same database; the SuperNodes reconnect; resubmit with resume
        fed.start_superlink("superlink-2")
        wait_for(lambda: fed.online() == len(SITES), 90, "SuperNodes back online after the restart")
        # the runbook: the interrupted run is still "running" and its pushed round-2 messages are
        # still delivered after the restart; stop it, and watch only the resumed run's messages
        stopped = fed.flwr("stop", first_run, CONNECTION)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        obs.run2_start = time.time()
        run_id = _submit(fed, root / "study.yaml", obs.run_dir, resume=True)
        obs.run_id = run_id
        wait_for(lambda: _train_messages(fed.procs["site-3"], run_id) > 0, 240, "site-3 to receive round 2", poll=0.2)
        fed.procs["site-3"].kill()  # SIGKILL mid-round: no goodbye to the SuperLink
        fed.procs["site-3-gate"].kill()  # the hospital's machine is gone: its gate and ClientApp with it
        obs.killed_at = time.time()
        wait_for(lambda: progress(obs.run_dir).get("completed_rounds", 0) >= 2, 180, "round 2 checkpoint", poll=1)
        obs.timings["run2-round2"] = time.monotonic() - t0
        wait_for(lambda: (obs.run_dir / "report.json").is_file(), 1200, "the report", poll=2)
        obs.timings["report"] = time.monotonic() - t0
        wait_for(lambda: run_finished(fed, run_id), 120, "the run to be marked finished", poll=2)
        for name in ("site-1", "site-1-gate", "site-2", "site-2-gate", "site-4", "site-4-gate", "site-5", "site-5-gate",
                     "superlink-2", "proxy"):
            # the hospitals first (SuperNode, then its gate), then the centre
            obs.stopped_at_end[name] = fed.procs[name].stop()
        obs.timings["end"] = time.monotonic() - t0
        yield obs
    finally:
        fed.close()


def _round(history: dict[str, Any], number: int) -> dict[str, Any]:
    return next(h for h in history["history"] if h["round"] == number)


def test_invalid_site_never_joins_and_its_log_says_why(scenario: Observed) -> None:
    refused = [e for e in ledger(scenario.run_dir) if e.get("event") == "site-refused"]
    assert refused, "the centre recorded no refused site"
    log4 = scenario.fed.procs["site-4"].log()
    assert "this site cannot join" in log4 and "maybe" in log4 and "clinical.csv" in log4, log4[-3000:]
    sites_seen = {s["site"] for h in progress(scenario.run_dir)["history"] for s in h["sites"].values()}
    assert "site-4" not in sites_seen


def test_a_site_whose_policy_is_stricter_than_the_study_refuses_to_join(scenario: Observed) -> None:
    log5 = scenario.fed.procs["site-5"].log()
    assert "the site requires DP-SGD training" in log5 and "privacy.enabled is false" in log5, log5[-3000:]
    reasons = [e["reason"] for e in ledger(scenario.run_dir) if e.get("event") == "site-refused"]
    assert any("the site requires DP-SGD training" in r for r in reasons), reasons
    assert not any("privacy.enabled is false" in r for r in reasons), reasons  # the detail stays at the site
    sites_seen = {s["site"] for h in progress(scenario.run_dir)["history"] for s in h["sites"].values()}
    assert "site-5" not in sites_seen
    audit = [json.loads(line) for line in (scenario.fed.root / "state-site-5" / "audit.jsonl").read_text().splitlines()]
    assert any(e["phase"] == "handshake" and e["decision"].startswith("refused") for e in audit), audit


def test_the_sites_audit_and_the_centres_ledger_agree_message_for_message(scenario: Observed) -> None:
    """What site-1 wrote down before sending in the resumed run is what the centre received from it."""
    audit = [json.loads(line) for line in (scenario.fed.root / "state-site-1" / "audit.jsonl").read_text().splitlines()]
    sent = Counter(e["message_type"] for e in audit if str(e["run"]) == scenario.run_id)
    entries = [e for e in ledger(scenario.run_dir) if "event" not in e and e["time"] >= scenario.run2_start]
    node = {e["node"] for e in entries if e.get("site") == "site-1"}  # the handshake reply precedes the name
    assert len(node) == 1, node
    received = Counter(e["message_type"] for e in entries if e["node"] in node)
    assert sent and sent == received, (sent, received)


def test_corrupt_update_is_excluded_from_its_round(scenario: Observed) -> None:
    round1 = _round(scenario.after_round_1, 1)
    assert {s["site"] for s in round1["sites"].values()} == {"site-1", "site-3"}
    assert "invalid update" in round1["rejected"]["site-2"]
    assert "CLDLR TEST FAULT: round 1" in scenario.fed.procs["site-2"].log()
    round2 = _round(progress(scenario.run_dir), 2)
    assert "site-2" in {s["site"] for s in round2["sites"].values()}, "a site's bad round must not ban it"


def test_restart_resumes_from_the_checkpoint(scenario: Observed) -> None:
    assert scenario.stopped_cleanly, "the killed SuperLink left processes (SuperExec, ServerApp) behind"
    final = progress(scenario.run_dir)
    assert _round(final, 1) == _round(scenario.after_round_1, 1), "round 1 was redone or changed"
    resumed = [e for e in ledger(scenario.run_dir) if e["time"] >= scenario.run2_start]
    assert resumed and not [e for e in resumed if e["phase"] == "backbone" and e["round"] == 1]
    assert [e for e in resumed if e["phase"] == "backbone" and e["round"] == 2]


def test_killed_supernode_is_dropped_and_the_study_goes_on(scenario: Observed) -> None:
    round2 = _round(progress(scenario.run_dir), 2)
    assert {s["site"] for s in round2["sites"].values()} == {"site-1", "site-2"}
    assert "site-3" in round2["rejected"]
    events = ledger(scenario.run_dir)
    assert [e for e in events if e.get("event") == "site-dropped" and e.get("site") == "site-3"]
    secure = [e for e in events if e["time"] >= scenario.killed_at and str(e["phase"]).startswith("secure:")]
    assert secure and {e["site"] for e in secure} == {"site-1", "site-2"}


def test_the_study_reports_and_every_process_stops_on_one_sigterm(scenario: Observed) -> None:
    report = json.loads((scenario.run_dir / "report.json").read_text())
    assert (scenario.run_dir / "report.md").is_file()
    for model in ("clinical", "dlr", "cldlr"):
        assert 0.0 <= report["metrics"][model]["test"]["auc"] <= 1.0, model
    assert sorted(site["name"] for site in report["sites"]) == ["site-1", "site-2"], report["sites"]
    assert "site-3" in report["federation"]["dropped"]["2"] and "site-2" in report["federation"]["dropped"]["1"]
    assert (scenario.run_dir / "model" / "bundle.json").is_file()
    secure = [e for e in ledger(scenario.run_dir) if str(e["phase"]).startswith("secure:") and "event" not in e]
    assert secure and all(e.get("secure") for e in secure)
    assert scenario.stopped_at_end and all(scenario.stopped_at_end.values()), scenario.stopped_at_end


# -- connection refusals, against a SuperLink of their own -------------------------------------------
@pytest.fixture(scope="module")
def bare_link(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    fed = Federation(tmp_path_factory.mktemp("refusals"))
    try:
        fed.make_pki(("known", "stranger"))
        create_ca(fed.root / "other-ca")
        generate_phantom(fed.root / "data", sites=1, images_per_site=6, image_size=48, seed=1)
        fed.start_superlink()
        fed.register("known")
        yield fed
    finally:
        fed.close()


def _refused(fed: Federation, name: str, command: Command, expected: str) -> str:
    node = fed.start(name, command)
    try:
        node.popen.wait(timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name} was not refused within 90 s:\n{node.log()[-2000:]}")
    assert node.popen.returncode != 0
    log = node.log()
    assert expected in log, log[-2000:]
    return log


def test_supernode_without_tls_or_with_a_foreign_ca_is_refused(bare_link: Federation) -> None:
    fed = bare_link
    plain = flower_command("flower-supernode", ["--superlink", fed.address, "--insecure", "--max-retries", "1",
                                                "--port", str(free_port())])
    _refused(fed, "no-tls", plain, "could not establish a connection")
    foreign = supernode_command(fed.address, fed.root / "other-ca" / "ca.crt", fed.node_key("known"),
                                fed.root / "data" / "site-1", port=free_port(), validate=False)
    foreign = Command((*foreign.argv, "--max-retries", "1"), foreign.env)
    _refused(fed, "foreign-ca", foreign, "certificate verify failed")
    assert fed.online() == 0


def test_supernode_with_an_unregistered_key_is_refused(bare_link: Federation) -> None:
    fed = bare_link
    stranger = supernode_command(fed.address, fed.root / "ca" / "ca.crt", fed.node_key("stranger"),
                                 fed.root / "data" / "site-1", port=free_port(), validate=False)
    _refused(fed, "stranger", stranger, "Failed to activate SuperNode")
    known = fed.start("known", supernode_command(fed.address, fed.root / "ca" / "ca.crt", fed.node_key("known"),
                                                 fed.root / "data" / "site-1", port=free_port(), validate=False))
    wait_for(lambda: fed.online() == 1, 60, "the registered SuperNode online")
    assert known.alive() and len(fed.nodes()) == 1


def test_deploy_supernode_refuses_an_invalid_site_with_the_report(bare_link: Federation) -> None:
    site = bare_link.root / "broken"
    shutil.copytree(bare_link.root / "data" / "site-1", site)
    image = sorted((site / "images").iterdir())[0]
    image.unlink()
    result = subprocess.run(
        [sys.executable, "-m", "cldlr.cli", "deploy", "supernode", "--superlink", bare_link.address,
         "--ca", str(bare_link.root / "ca" / "ca.crt"), "--key", str(bare_link.node_key("known")),
         "--data-path", str(site), "--schema", str(bare_link.root / "data" / "schema.yaml"), "--run"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "FLWR_HOME": str(bare_link.root / "home-x")})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "fails validation" in result.stderr and image.stem in result.stderr, result.stderr
    assert "flower-supernode" not in result.stdout
