"""Whole-study DP deployed on 127.0.0.1: every site's own accountant, not the centre's report, is the truth.

The same deployment as tests/test_deployment.py (SuperLink with TLS and SuperNode auth, the
hospitals' SuperNodes through the nginx proxy, ``--isolation process`` with each site's FAB gate,
``flwr run``), now with ``privacy.secure_sums``: DP-SGD on the backbone and each site's Skellam
noise share on every secure sum. Every site's policy *requires* both (``dp.required``,
``dp.sum_noise: required``) at the study's δ, with its own lifetime ε cap:

* sites 1-3 have a cap above the plan — the study finishes; the report gives each of them ε per
  phase (each within its planned share) and in total (within the cap), the model card says the DP
  covers every secure sum;
* each of those sites' **own** lifetime ledger (``STATE/privacy-ledger.json``, written by its
  ClientApp before each release leaves) composes to the total the report gives for it, and its
  audit log lists the masked vectors that carried exactly those noisy releases;
* site-4's cap is below the plan (DP-SGD alone would fit it, the noisy sums would not) — it refuses
  at the handshake, the centre is told the public reason only, and the study goes on with three.

One round, one local epoch, the tiny backbone at 32 px and a small rff fusion keep it short; the
secure sums (each four SecAgg+ message exchanges behind Flower's polling) take most of the time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO
from deploy_harness import (
    CONNECTION,
    NGINX_MISSING,
    Federation,
    free_port,
    ledger,
    run_cli,
    run_diagnosis,
    run_finished,
    wait_for,
    write_policy,
)
from flwr.common.secure_aggregation.secaggplus_constants import Stage

from cldlr.client.deploy import supernode_command
from cldlr.client.fab_gate import fab_sha256
from cldlr.client.privacy_ledger import LifetimeLedger, read_ledger
from cldlr.common.config import load_config
from cldlr.common.secure.dp_plan import PHASES, StudyPlan
from cldlr.server.deploy import run_command
from cldlr.simulations.phantom import generate_phantom

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]
SITES = ("site-1", "site-2", "site-3", "site-4")
JOINING = SITES[:3]
REFUSING = "site-4"
DELTA = 1e-3
TARGET = 4.0  # the backbone's share (privacy.target_epsilon); the sums keep their default shares
CAP = 20.0  # sites 1-3: above the whole plan
LOW_CAP = TARGET + 0.5  # site-4: DP-SGD alone fits, the plan with its noisy sums does not
STUDY = """\
run: {{name: deployed-dp, output_dir: {root}/runs}}
data: {{root: {root}/data, schema: {root}/data/schema.yaml, image_size: 32, cache_dir: {root}/cache}}
model: {{backbone: tiny, weights: none}}
train: {{epochs: 1, batch_size: 8}}
svm: {{solver: rff, embedding_pca: 4, rff_features: 32}}
federation: {{num_sites: 4, min_sites: 3, rounds: 1, local_epochs: 1}}
evaluation: {{min_count: 1, histogram_bins: 20}}
privacy:
  enabled: true
  target_epsilon: {target}
  delta: {delta}
  max_grad_norm: 1.0
  secure_sums: {{enabled: true}}
"""
BUDGET_REFUSAL = "training would take this dataset past the site's lifetime ε cap"


@dataclass
class Observed:
    """What the scenario left behind, for the tests to read."""

    fed: Federation
    run_dir: Path
    study: Path
    run_id: str


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    if NGINX_MISSING:
        pytest.skip(NGINX_MISSING)
    root = tmp_path_factory.mktemp("deploy-dp")
    fed = Federation(root)
    try:
        generate_phantom(root / "data", sites=len(SITES), images_per_site=24, image_size=96, seed=0)
        study = root / "study.yaml"
        study.write_text(STUDY.format(root=root, target=TARGET, delta=DELTA))
        fed.make_pki(SITES)
        fed.start_superlink()
        fed.start_proxy()
        for site in SITES:
            fed.register(site)
        approved = [fab_sha256(REPO)]
        for site in SITES:
            dp = {"required": True, "sum_noise": "required", "delta": DELTA,
                  "epsilon_cap": LOW_CAP if site == REFUSING else CAP}
            policy = write_policy(root / f"policy-{site}.yaml", approved=approved, schema=root / "data" / "schema.yaml",
                                  state=root / f"state-{site}", dp=dp)
            command = supernode_command(fed.fleet_address, root / "ca" / "ca.crt", fed.node_key(site), root / "data" / site,
                                        port=free_port(), state_dir=root / f"state-{site}", policy=policy)
            fed.start_site(site, command, policy)
        wait_for(lambda: fed.online() == len(SITES), 90, f"{len(SITES)} SuperNodes online")
        run_dir = root / "runs" / "study"
        result = run_cli(run_command(CONNECTION, study, run_dir=run_dir, stream=False), home=fed.cli_home, cwd=root)
        match = re.search(r"started run (\d+)", result.stdout)
        assert result.returncode == 0 and match, result.stdout + result.stderr
        run_id = match.group(1)
        done = [run_dir / "report.json", run_dir / "model" / "bundle.json"]
        wait_for(lambda: run_finished(fed, run_id), 1800, "the run to finish", poll=10)
        errors = [e for e in ledger(run_dir) if e.get("error")][-3:]
        assert all(p.is_file() for p in done), (f"the run ended without its report and model bundle: {errors}\n"
                                                f"{run_diagnosis(fed, run_id)}")
        yield Observed(fed, run_dir, study, run_id)
    finally:
        fed.close()


def _report(obs: Observed) -> dict[str, Any]:
    return dict(json.loads((obs.run_dir / "report.json").read_text()))


def _site_run(obs: Observed, site: str) -> tuple[LifetimeLedger, str, dict[str, Any]]:
    """The site's own ledger file: its one dataset, its one run's entry, and the ledger at the site's δ and cap."""
    path = obs.fed.root / f"state-{site}"
    datasets = read_ledger(path / "privacy-ledger.json")["datasets"]
    assert len(datasets) == 1, datasets.keys()
    (dataset, entry), = datasets.items()
    runs = entry["runs"]
    assert len(runs) == 1 and runs[0]["site"] == site, runs
    return LifetimeLedger(path, dataset, delta=DELTA, cap=CAP), runs[0]["run"], runs[0]


def test_the_study_reports_epsilon_per_phase_within_the_plan_and_the_caps(scenario: Observed) -> None:
    report = _report(scenario)
    assert sorted(s["name"] for s in report["sites"]) == list(JOINING), report["sites"]
    plan = StudyPlan.from_config(load_config(scenario.study, [])).epsilon
    privacy = report["federation"]["privacy"]
    assert set(privacy) == set(JOINING), privacy.keys()
    for site, entry in privacy.items():
        phases = entry["phases"]
        assert set(phases) == {*PHASES, "total", "lifetime"}, (site, phases)
        assert entry["plan"]["epsilon"] == dict(plan), (site, entry["plan"])
        for phase in PHASES:
            assert 0 < phases[phase] <= plan[phase] + 1e-6, (site, phase, phases[phase], plan[phase])
        assert max(phases[p] for p in PHASES) < phases["total"] <= entry["cap"] == CAP, (site, phases)
        assert entry["delta"] == DELTA
    card = json.loads((scenario.run_dir / "model" / "bundle.json").read_text())["model_card"]["differential_privacy"]
    assert "every secure sum" in card["covers"] and set(card["per_site"]) == set(JOINING), card


def test_each_sites_own_ledger_and_audit_account_for_what_the_report_says(scenario: Observed) -> None:
    """The site's accountant, from the file in its own state folder, gives the report's ε; its audit shows the sums."""
    report = _report(scenario)["federation"]["privacy"]
    plan = StudyPlan.from_config(load_config(scenario.study, []))
    for site in JOINING:
        book, run, entry = _site_run(scenario, site)
        assert str(run) == scenario.run_id and entry["history"] and entry["cap"] == CAP, entry
        phases = book.phase_epsilons(run)
        assert phases["total"] == pytest.approx(report[site]["phases"]["total"], rel=1e-9), (site, phases)
        assert phases["lifetime"] == pytest.approx(phases["total"]) and book.epsilon() <= CAP
        releases = entry["releases"]
        for phase in PHASES[1:]:
            assert 0 < sum(r["phase"] == phase for r in releases) <= plan.releases[phase], (site, phase, releases)
        # every noisy release left the site inside a masked vector it audited first, and nothing else did
        audit = [json.loads(line) for line in (scenario.fed.root / f"state-{site}" / "audit.jsonl").read_text().splitlines()]
        masked = [e["phase"] for e in audit if str(e["run"]) == scenario.run_id and e["decision"] == "sent"
                  and e["phase"].endswith(f": {Stage.COLLECT_MASKED_VECTORS}")]
        tasks = [t for label in masked for t in label.removeprefix("secure-sum ").split(":")[0].split("+")]
        assert tasks == [r["task"] for r in releases], (site, masked, releases)
        assert not [e for e in audit if str(e["run"]) == scenario.run_id and e["decision"] != "sent"], site


def test_a_site_whose_cap_is_below_the_plan_refuses_to_join(scenario: Observed) -> None:
    refused = [e for e in ledger(scenario.run_dir) if e.get("event") == "site-refused"]
    assert len(refused) == 1, refused  # by node: a refusing site does not give its name
    assert BUDGET_REFUSAL in refused[0]["reason"], refused
    assert "noisy secure sums" not in refused[0]["reason"] and f"cap {LOW_CAP:g}" not in refused[0]["reason"]
    log = scenario.fed.procs[REFUSING].log()
    assert BUDGET_REFUSAL in log and "noisy secure sums" in log, log[-3000:]
    audit = [json.loads(line) for line in (scenario.fed.root / f"state-{REFUSING}" / "audit.jsonl").read_text().splitlines()]
    assert [e["phase"] for e in audit] == ["handshake"] and audit[0]["decision"].startswith("refused"), audit
    ledger_file = scenario.fed.root / f"state-{REFUSING}" / "privacy-ledger.json"
    assert not ledger_file.is_file() or not read_ledger(ledger_file)["datasets"], "a refused site spent budget"

